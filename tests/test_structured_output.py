"""Structured outputs: grammar-constrained decoding through the scheduler and the engine.

A tiny random model with the built-in tokenizer (4096 ids) must produce outputs that parse and
validate (the `jsonschema` library, an independent validator) on every request, greedy and
sampled, with drafting on and off; greedy constrained decoding with drafts must emit exactly the
tokens it emits without them (masked verification is lossless).
"""

from __future__ import annotations

import json
import random

import jsonschema
import numpy as np
import pytest

from agentinfer_jax.cache import BlockPool, PrefixCache
from agentinfer_jax.engine.engine import Engine, EngineConfig
from agentinfer_jax.engine.structured import GrammarCompiler, tool_call_grammar, validate_structured
from agentinfer_jax.model.config import ModelConfig
from agentinfer_jax.model.transformer import init_model
from agentinfer_jax.sampling_params import InvalidRequestError, StructuredOutput
from agentinfer_jax.serving.request import Request, SamplingParams
from agentinfer_jax.serving.scheduler import Scheduler
from agentinfer_jax.tokenizer import load_tokenizer

EOS = 4  # <|im_end|> of the built-in tokenizer
CFG = ModelConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=512,
                  eos_token_ids=(EOS,))
# One token bucket and one page bucket: few shapes to compile (compiling dominates on CPU).
EC = EngineConfig(num_blocks=400, block_size=8, max_num_seqs=32, max_tokens_per_step=192, max_model_len=160,
                  max_draft_tokens=4, min_token_bucket=192, min_page_bucket_tokens=160)

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 6},
        "unit": {"enum": ["C", "F"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "alerts": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "properties": {"query": {"type": "string", "maxLength": 10},
                                         "k": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["query"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 10}},
        "required": ["a", "b"], "additionalProperties": False}}},
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler.from_tokenizer(tokenizer, CFG.vocab_size, CFG.eos_token_ids)


@pytest.fixture(scope="module")
def engine():
    return Engine(init_model(CFG, seed=11), EC)


class NoisyDrafter:
    """Proposes a known continuation (the undrafted greedy output) with random corruptions, so that
    drafts are often right, often break the grammar, and sometimes are allowed but wrong."""

    def __init__(self, refs, seed):
        self.refs, self.rng, self.pos = refs, random.Random(seed), {}

    def begin(self, rid, prompt, session_id=None):
        self.pos[rid] = 0

    def extend(self, rid, toks):
        self.pos[rid] += len(toks)

    def propose(self, rid, k):
        ref = self.refs.get(rid, [])[self.pos[rid]:self.pos[rid] + k]
        return [t if self.rng.random() < 0.8 else self.rng.randrange(CFG.vocab_size) for t in ref]

    def end(self, rid):
        self.pos.pop(rid, None)


def drive(engine, compiler, reqs, drafter=None):
    pool = BlockPool(EC.num_blocks)
    cfg = EC.scheduler_config(CFG, EC.max_draft_tokens if drafter else 0)
    sched = Scheduler(cfg, pool, PrefixCache(EC.block_size, pool), drafter=drafter, grammar=compiler)
    for r in reqs:
        sched.add_request(r)
    while sched.has_unfinished:
        out = sched.schedule()
        sched.update(out, engine.execute(out))
    sched.prefix_cache.evict(pool.num_used)
    assert pool.num_used == 0
    return sched


def prompts(n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(5, CFG.vocab_size) for _ in range(rng.randint(3, 30))] for _ in range(n)]


def run(engine, compiler, spec, *, temperature, drafter=None, n=50, seed=0):
    reqs = [Request(f"r{i}", p, SamplingParams(max_tokens=120, temperature=temperature, seed=i, structured=spec))
            for i, p in enumerate(prompts(n, seed))]
    sched = drive(engine, compiler, reqs, drafter)
    return reqs, sched


def text_of(tokenizer, req):
    toks = [t for t in req.output_tokens if t != EOS]
    return tokenizer.decode(toks)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_outputs_validate_with_and_without_drafts(engine, compiler, tokenizer, temperature):
    spec = StructuredOutput("json_schema", json.dumps(SCHEMA))
    plain, _ = run(engine, compiler, spec, temperature=temperature)
    refs = {r.request_id: r.output_tokens for r in plain}
    drafted, sched = run(engine, compiler, spec, temperature=temperature, drafter=NoisyDrafter(refs, 1))
    for reqs in (plain, drafted):
        for r in reqs:
            assert r.finish_reason.value == "stop", (r.request_id, text_of(tokenizer, r))
            jsonschema.validate(json.loads(text_of(tokenizer, r)), SCHEMA)
    assert sum(r.num_verify_steps for r in drafted) > 0
    assert sum(r.num_accepted for r in drafted) > 0
    if temperature == 0.0:  # masked verification is lossless: drafts change nothing
        assert [r.output_tokens for r in drafted] == [r.output_tokens for r in plain]
    else:
        assert len({tuple(r.output_tokens) for r in plain}) > 10  # sampling does vary


def parse_tool_call(text):
    assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>"), text
    return json.loads(text[len("<tool_call>\n"):-len("\n</tool_call>")])


@pytest.mark.parametrize("temperature,drafting", [(0.0, False), (0.0, True), (1.0, False), (1.0, True)])
def test_tool_choice_required_calls_validate(engine, compiler, tokenizer, temperature, drafting):
    spec = tool_call_grammar(TOOLS)
    refs = {}
    if drafting:
        refs = {r.request_id: r.output_tokens for r in run(engine, compiler, spec, temperature=temperature, seed=3)[0]}
    reqs, _ = run(engine, compiler, spec, temperature=temperature, seed=3,
                  drafter=NoisyDrafter(refs, 2) if drafting else None)
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    names = set()
    for r in reqs:
        call = parse_tool_call(text_of(tokenizer, r))
        assert set(call) == {"name", "arguments"}
        jsonschema.validate(call["arguments"], params[call["name"]])
        names.add(call["name"])
    if temperature > 0:
        assert names == set(params)
    if drafting and temperature == 0.0:
        assert {r.request_id: r.output_tokens for r in reqs} == refs


def test_named_tool_choice_calls_only_that_tool(engine, compiler, tokenizer):
    reqs, _ = run(engine, compiler, tool_call_grammar(TOOLS, "add"), temperature=1.0, n=8)
    for r in reqs:
        call = parse_tool_call(text_of(tokenizer, r))
        assert call["name"] == "add"
        jsonschema.validate(call["arguments"], TOOLS[1]["function"]["parameters"])


def test_json_object_and_regex(engine, compiler, tokenizer):
    reqs, _ = run(engine, compiler, StructuredOutput("json_object"), temperature=1.0, n=8)
    done = [r for r in reqs if r.finish_reason.value == "stop"]  # free-form strings may run to max_tokens
    assert len(done) >= 2
    for r in done:
        assert isinstance(json.loads(text_of(tokenizer, r)), dict)
    reqs, _ = run(engine, compiler, StructuredOutput("regex", r"(yes|no), [0-9]{2}"), temperature=1.0, n=8)
    for r in reqs:
        assert text_of(tokenizer, r) in {f"{w}, {d:02d}" for w in ("yes", "no") for d in range(100)}


def test_bad_grammars_are_refused_by_name(compiler):
    for spec, word in [(StructuredOutput("json_schema", "{not json"), "json_schema"),
                       (StructuredOutput("json_schema", '{"type": 3}'), "json_schema"),
                       (StructuredOutput("regex", "[ab"), "regex"),
                       (StructuredOutput("xml", "x"), "kind")]:
        with pytest.raises(InvalidRequestError, match=word):
            validate_structured(spec)
    with pytest.raises(InvalidRequestError, match="not among the tools"):
        tool_call_grammar(TOOLS, "nope")
    sched = Scheduler(EC.scheduler_config(CFG), BlockPool(8))
    with pytest.raises(InvalidRequestError, match="structured outputs"):
        sched.add_request(Request("x", [5, 6], SamplingParams(structured=StructuredOutput("json_object"))))


def test_batched_masks_equal_one_matcher_at_a_time(compiler):
    """The scheduler's one parallel call per step gives each row the mask a lone matcher gives."""
    rng = random.Random(4)

    def allowed(row):
        return [t for t in range(CFG.vocab_size) if (row[t // 32] >> (t % 32)) & 1]

    jobs = []
    for i in range(10):
        m = compiler.matcher(StructuredOutput("json_schema", json.dumps(SCHEMA)) if i % 2 else tool_call_grammar(TOOLS))
        for _ in range(rng.randint(0, 12)):
            if m.is_stopped:
                break
            assert m.advance(rng.choice(allowed(m.allowed_rows([])[0])))
        drafts = []
        for _ in range(rng.randint(0, 4)):
            drafts.append(rng.choice(allowed(m.allowed_rows(drafts)[-1])))
        drafts.append(rng.randrange(CFG.vocab_size))  # usually forbidden: cut
        jobs.append((m, drafts[:m.valid_prefix(drafts)]))
    batched = compiler.allowed_rows_batch(jobs)
    for (m, drafts), got in zip(jobs, batched):
        np.testing.assert_array_equal(got, m.allowed_rows(drafts))
        assert got.shape == (len(drafts) + 1, compiler.words)


def test_overlapped_loop_keeps_masks_and_penalties_exact(engine, compiler):
    """Host/device overlap never plans a constrained or penalised request ahead (its next mask or
    penalty follows the token still in flight): the overlapped serving loop emits exactly what the
    synchronous schedule/execute/update drive emits, mixed with plain requests that it does plan ahead."""
    from agentinfer_jax.serving.loop import ServingLoop

    spec = StructuredOutput("json_schema", json.dumps(SCHEMA))

    def requests():
        out = []
        for i, p in enumerate(prompts(12, 7)):
            kind = i % 3
            # The plain ones outlive the others, so their last steps are planned ahead.
            sp = SamplingParams(max_tokens=60 if kind == 2 else 12, temperature=0.0 if i % 2 else 1.0, seed=i,
                                structured=spec if kind == 0 else None,
                                frequency_penalty=1.5 if kind == 1 else 0.0, presence_penalty=0.5 if kind == 1 else 0.0)
            out.append(Request(f"r{i}", p, sp))
        return out

    sync = requests()
    drive(engine, compiler, sync)
    over = requests()
    pool = BlockPool(EC.num_blocks)
    sched = Scheduler(EC.scheduler_config(CFG, 0), pool, PrefixCache(EC.block_size, pool), grammar=compiler)
    loop = ServingLoop(sched, engine, overlap=True)
    fed_before = engine.num_fed_on_device
    for r in over:
        loop.submit(r)
    loop.run_until_idle()
    assert [r.output_tokens for r in over] == [r.output_tokens for r in sync]
    assert engine.num_fed_on_device > fed_before  # the plain ones were planned ahead
    sched.prefix_cache.evict(pool.num_used)
    assert pool.num_used == 0
