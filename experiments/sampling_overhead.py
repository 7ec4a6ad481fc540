"""Cost of the request-level sampling features: decode tokens/s and per-step host time of the
scheduler + engine with plain greedy requests against requests with a JSON-schema grammar, logprobs
(top 5), penalties + logit_bias, and sampling (temperature 1, without and with top-p), on the built-in
tiny model (random weights) and tokenizer.

Each variant runs `--num_requests` requests to completion once untimed (compiling its step shapes)
and then once timed; "host ms/step" is the scheduler's planning (draft cuts and grammar masks
included) plus the engine's batch building, "tokens/s" counts emitted tokens over wall time. The
grammar forces every output to the schema, so the constrained rows emit about as many tokens as
the others (max_tokens caps all of them).

  python experiments/sampling_overhead.py --quick --json_out=/tmp/sampling_overhead.json
"""

from __future__ import annotations

import json
import random
import time

from absl import app, flags
from tqdm import tqdm

from agentinfer_jax.cache import BlockPool
from agentinfer_jax.engine.engine import Engine, EngineConfig
from agentinfer_jax.engine.structured import GrammarCompiler
from agentinfer_jax.model.transformer import init_model
from agentinfer_jax.sampling_params import StructuredOutput
from agentinfer_jax.serving.builder import load_model_config
from agentinfer_jax.serving.request import Request, SamplingParams
from agentinfer_jax.serving.scheduler import Scheduler
from agentinfer_jax.tokenizer import load_tokenizer

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_requests", 32, "Requests per variant (all admitted at once).", lower_bound=1)
flags.DEFINE_integer("max_tokens", 64, "Output tokens per request at most.", lower_bound=1)
flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per request.", lower_bound=1)
flags.DEFINE_bool("quick", False, "8 requests of 24 tokens.")
flags.DEFINE_string("json_out", None, "Write the results here as JSON.")

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 14},
                                           "tags": {"type": "array", "items": {"enum": ["sun", "rain", "wind"]},
                                                    "maxItems": 4}},
          "required": ["city", "days", "tags"], "additionalProperties": False}
VARIANTS = {
    "plain": {},
    "json_schema": {"structured": StructuredOutput("json_schema", json.dumps(SCHEMA))},
    "logprobs": {"logprobs": 5},
    "penalties": {"presence_penalty": 0.5, "frequency_penalty": 0.5, "logit_bias": ((10, 2.0), (11, -5.0))},
    "sampled": {"temperature": 1.0},
    "sampled_top_p": {"temperature": 1.0, "top_p": 0.95},  # the sorting path
}


def run(engine, compiler, model_config, params, n, prompt_len, max_tokens):
    rng = random.Random(0)
    pool = BlockPool(engine.config.num_blocks)
    sched = Scheduler(engine.config.scheduler_config(model_config), pool, grammar=compiler)
    for i in range(n):
        prompt = [rng.randrange(5, model_config.vocab_size) for _ in range(prompt_len)]
        sched.add_request(Request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, seed=i, **params)))
    host, steps, t0 = 0.0, 0, time.perf_counter()
    while sched.has_unfinished:
        h0 = time.perf_counter()
        out = sched.schedule()
        h1 = time.perf_counter()
        new = engine.execute(out)
        host += h1 - h0 + engine.last_timing.host_s
        sched.update(out, new)
        steps += 1
    wall = time.perf_counter() - t0
    tokens = sum(len(r.output_tokens) for r in sched.requests.values())
    return {"tokens": tokens, "steps": steps, "seconds": wall, "tokens_per_s": tokens / wall,
            "host_ms_per_step": 1e3 * host / steps}


def main(_):
    n, max_tokens = (8, 24) if FLAGS.quick else (FLAGS.num_requests, FLAGS.max_tokens)
    model_config = load_model_config("tiny")
    tokenizer = load_tokenizer()
    compiler = GrammarCompiler.from_tokenizer(tokenizer, model_config.vocab_size, model_config.eos_token_ids)
    ec = EngineConfig(num_blocks=n * (-(-(FLAGS.prompt_len + max_tokens) // 16)) + 2, block_size=16,
                      max_num_seqs=n, max_tokens_per_step=max(256, n), max_model_len=FLAGS.prompt_len + max_tokens,
                      min_page_bucket_tokens=FLAGS.prompt_len + max_tokens)
    engine = Engine(init_model(model_config, seed=0), ec)
    rows = {}
    for name, params in tqdm(VARIANTS.items(), desc="variants"):
        run(engine, compiler, model_config, params, n, FLAGS.prompt_len, max_tokens)  # compiles
        rows[name] = run(engine, compiler, model_config, params, n, FLAGS.prompt_len, max_tokens)
    print(f"{'variant':<12} {'tokens':>7} {'steps':>6} {'tokens/s':>9} {'host ms/step':>13}")
    for name, r in rows.items():
        print(f"{name:<12} {r['tokens']:>7} {r['steps']:>6} {r['tokens_per_s']:>9.1f} {r['host_ms_per_step']:>13.2f}")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump({"num_requests": n, "max_tokens": max_tokens, "prompt_len": FLAGS.prompt_len,
                       "variants": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
