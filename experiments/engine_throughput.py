"""Engine throughput: tokens/s and step time against batch size and context length, without drafting,
with prompt-lookup drafting and with AgentSAM (fixed k, and with the adaptive switch choosing k from
measured step times), on agent-like prompts from the bundled FireAct traces.

Each request's prompt is the last `context_len` tokens of a recorded ReAct context (chat template,
built-in tokenizer) and its output is forced to the recorded assistant turn (trace replay: the
forward passes, KV writes and verification are real, the emitted tokens are the record's), so draft
acceptance reflects real agent text even with random weights. Every point runs once untimed to
compile its shape buckets, then once timed. The prefix cache is off so the timed run recomputes, and
AgentSAM's cross-session memory is emptied before the timed run (it would otherwise hold the warmup's
copies of the very same turns).

  python experiments/engine_throughput.py --quick --json_out=/tmp/engine_throughput.json
  python experiments/engine_throughput.py --config=llama3_2_1b --batch_sizes=1,4,16,64 --context_lens=512,2048
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import platform
import time

import jax
import numpy as np
from absl import app, flags

from agentinfer_jax.serving.builder import ServerConfig, ServingStack, build_stack
from agentinfer_jax.serving.request import Request, SamplingParams
from agentinfer_jax.speculation import SAMDrafter, SessionMemory
from agentinfer_jax.tokenizer import load_tokenizer
from agentinfer_jax.workloads.traces import default_trace_path, load_traces, portable_path

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "tiny", "configs/<name>.py (random weights).")
flags.DEFINE_list("batch_sizes", ["1", "4", "16"], "Concurrent requests.")
flags.DEFINE_list("context_lens", ["128", "512"], "Prompt tokens per request.")
flags.DEFINE_integer("gen_len", 64, "Output tokens per request.")
flags.DEFINE_integer("num_draft_tokens", 4, "k of the drafters (at most k with the adaptive switch).")
flags.DEFINE_list("drafters", ["none", "ngram", "sam", "sam_adaptive"],
                  "none, ngram (prompt lookup), sam (AgentSAM, fixed k), sam_adaptive (AgentSAM, adaptive k).")
flags.DEFINE_integer("block_size", 16, "Tokens per KV page.")
flags.DEFINE_integer("max_tokens_per_step", 512, "Token budget per step.")
flags.DEFINE_string("dtype", "", "Activation dtype override (default: the config's).")
flags.DEFINE_bool("quick", False, "Small sweep (< 2 min on CPU).")
flags.DEFINE_string("json_out", "", "Write results here.")


@dataclasses.dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    records: list[list[int]]  # forced outputs (recorded assistant turns)


def trace_turns() -> list[tuple[list[int], list[int]]]:
    """(context ids, recorded reply ids) of every assistant turn in the bundled traces, longest first."""
    tok = load_tokenizer()
    turns = [(tok.encode_chat(list(earlier)), tok.encode(reply))
             for traj in load_traces(default_trace_path()) for earlier, reply in traj.assistant_turns()]
    return sorted(turns, key=lambda t: -len(t[0]))


def agent_workload(turns: list[tuple[list[int], list[int]]], num: int, context_len: int,
                   gen_len: int) -> Workload:
    """`num` (prompt, recorded reply) pairs, longest contexts first."""
    prompts, records = [], []
    for i in range(num):
        ctx, reply = turns[i % len(turns)]
        if len(ctx) < context_len:  # short traces: repeat the context, as a long agent loop would
            ctx = ctx * math.ceil(context_len / len(ctx))
        prompts.append(ctx[-context_len:])
        records.append(reply[:gen_len])
    return Workload(prompts, records)


def run_once(stack: ServingStack, work: Workload, gen_len: int, tag: str) -> dict[str, float]:
    """Runs the workload to completion on the stack's scheduler and engine; returns its timings."""
    sched, engine = stack.scheduler, stack.engine
    engine.steps.clear()
    reqs = [Request(f"{tag}-{i}", p, SamplingParams(max_tokens=gen_len, ignore_eos=True), forced_output=r)
            for i, (p, r) in enumerate(zip(work.prompts, work.records))]
    for r in reqs:
        sched.add_request(r)
    t0 = time.perf_counter()
    while sched.has_unfinished:
        out = sched.schedule()
        t1 = time.perf_counter()
        new = engine.execute(out)
        sched.observe_step(out, time.perf_counter() - t1)  # the adaptive switch's cost model
        sched.update(out, new)
    wall = time.perf_counter() - t0
    for r in reqs:
        sched.forget(r.request_id)
    if stack.pool.num_used:
        raise RuntimeError(f"{stack.pool.num_used} blocks leaked")
    decode = [s for s in engine.steps if s.prefill_tokens == 0]
    out_tokens = sum(len(r.output_tokens) for r in reqs)
    decode_tokens = out_tokens - len(reqs)  # the first token of each request comes from its prefill step
    decode_s = sum(s.seconds for s in decode)
    verify = sum(r.num_verify_steps for r in reqs)
    return {
        "wall_s": wall, "output_tokens": out_tokens, "steps": len(engine.steps), "decode_steps": len(decode),
        "tokens_per_s": out_tokens / wall,
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s else float("nan"),
        "mean_decode_step_ms": 1e3 * decode_s / len(decode) if decode else float("nan"),
        "mean_step_ms": 1e3 * sum(s.seconds for s in engine.steps) / len(engine.steps),
        "acceptance": sum(r.num_accepted for r in reqs) / max(1, sum(r.num_drafted for r in reqs)),
        "tokens_per_verify_step": (sum(r.num_accepted for r in reqs) + verify) / verify if verify else 1.0,
    }


def main(argv):
    del argv
    batches = [1, 4] if FLAGS.quick else [int(b) for b in FLAGS.batch_sizes]
    contexts = [128, 512] if FLAGS.quick else [int(c) for c in FLAGS.context_lens]
    gen_len = 24 if FLAGS.quick else FLAGS.gen_len
    k = FLAGS.num_draft_tokens
    bs = FLAGS.block_size
    max_len = int(2 ** math.ceil(math.log2(max(contexts) + gen_len + k + 1)))
    pages = math.ceil(max_len / bs)
    results = []
    turns = trace_turns()
    for drafter in FLAGS.drafters:
        if drafter not in ("none", "ngram", "sam", "sam_adaptive"):
            raise app.UsageError(f"unknown drafter {drafter!r}")
        config = ServerConfig(config=FLAGS.config, dtype=FLAGS.dtype or None, num_blocks=max(batches) * pages + 1,
                              block_size=bs, max_num_seqs=max(batches), max_model_len=max_len,
                              max_tokens_per_step=max(FLAGS.max_tokens_per_step, max(batches) * (k + 1)),
                              drafter=drafter.removesuffix("_adaptive"), num_draft_tokens=k, prefix_cache=False,
                              adaptive_draft=drafter.endswith("_adaptive"))
        stack = build_stack(config)
        stack.engine.record_steps = True
        for ctx in contexts:
            for b in batches:
                work = agent_workload(turns, b, ctx, gen_len)
                run_once(stack, work, gen_len, "warmup")  # compiles this point's shape buckets
                if stack.session_memory is not None:  # forget the warmup's copies of these turns
                    stack.session_memory.close()
                    stack.session_memory = SessionMemory()
                    stack.scheduler.drafter = SAMDrafter(stack.session_memory)
                row = {"drafter": drafter, "k": k if drafter != "none" else 0, "batch": b, "context": ctx,
                       **run_once(stack, work, gen_len, "timed")}
                results.append(row)
                print(f"{drafter:12s} ctx={ctx:5d} batch={b:3d}  {row['tokens_per_s']:9.1f} tok/s  "
                      f"decode {row['decode_tokens_per_s']:9.1f} tok/s  step {row['mean_decode_step_ms']:7.2f} ms",
                      flush=True)
        if stack.session_memory is not None:
            stack.session_memory.close()

    header = (f"{'drafter':14s}{'ctx':>6s}{'batch':>6s}{'tok/s':>10s}{'dec tok/s':>11s}{'dec step ms':>12s}"
              f"{'step ms':>9s}{'accept':>8s}{'tok/verify':>11s}")
    print(f"\nengine throughput: config={FLAGS.config} backend={jax.default_backend()} gen_len={gen_len}\n{header}")
    for r in results:
        print(f"{r['drafter']:14s}{r['context']:6d}{r['batch']:6d}{r['tokens_per_s']:10.1f}"
              f"{r['decode_tokens_per_s']:11.1f}{r['mean_decode_step_ms']:12.2f}{r['mean_step_ms']:9.2f}"
              f"{r['acceptance']:8.2f}{r['tokens_per_verify_step']:11.2f}")
    if FLAGS.json_out:
        out = {"config": FLAGS.config, "backend": jax.default_backend(), "device": str(jax.devices()[0]),
               "host": platform.node(), "gen_len": gen_len, "num_draft_tokens": k, "block_size": bs,
               "trace": portable_path(default_trace_path()), "results": results,
               "mean_tokens_per_s": float(np.mean([r["tokens_per_s"] for r in results]))}
        path = pathlib.Path(FLAGS.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
