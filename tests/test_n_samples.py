"""n > 1: sibling requests share the prompt's KV blocks (computed once) and sample independently."""

from __future__ import annotations

from agentinfer_jax.cache import BlockPool
from agentinfer_jax.engine.engine import Engine, EngineConfig
from agentinfer_jax.model.config import ModelConfig
from agentinfer_jax.model.transformer import init_model
from agentinfer_jax.serving.request import Request, RequestState, SamplingParams
from agentinfer_jax.serving.scheduler import Scheduler

CFG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=512)
EC = EngineConfig(num_blocks=64, block_size=8, max_num_seqs=8, max_tokens_per_step=64, max_model_len=96,
                  max_draft_tokens=2, min_token_bucket=64, min_page_bucket_tokens=96)
PROMPT = [(7 * i + 3) % 64 for i in range(21)]  # two full blocks of 8, five tokens in the third


def siblings(n, fork=True, max_tokens=10):
    return [Request(f"c{i}", list(PROMPT), SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=100 + i),
                    fork_of="c0" if fork and i else None) for i in range(n)]


def test_siblings_share_prompt_blocks_and_sample_as_if_alone():
    engine = Engine(init_model(CFG, seed=1), EC)
    pool = BlockPool(EC.num_blocks)
    free0 = pool.num_free
    sched = Scheduler(EC.scheduler_config(CFG), pool)  # no prefix cache: sharing is the fork's doing
    reqs = siblings(4)
    for r in reqs:
        sched.add_request(r)
    fed = {r.request_id: 0 for r in reqs}
    shared_seen = False
    while sched.has_unfinished:
        out = sched.schedule()
        for s in out.seqs:
            fed[s.request_id] += len(s.tokens) - s.num_draft
        running = {r.request_id: r for r in sched.running}
        if len(running) == 4:
            blocks = [running[f"c{i}"].block_ids[:2] for i in range(4)]
            shared_seen |= all(b == blocks[0] for b in blocks)
            assert pool.refcount(blocks[0][0]) == 4
        sched.update(out, engine.execute(out))
    assert shared_seen
    # The prompt is computed once: each child feeds only the 5 tokens past the shared blocks.
    assert fed["c0"] >= len(PROMPT) and all(fed[f"c{i}"] < len(PROMPT) - 15 + 10 for i in (1, 2, 3))
    assert pool.num_free == free0
    # Each child emits what it emits alone (draws are a function of seed and position).
    outs = [r.output_tokens for r in reqs]
    assert len({tuple(o) for o in outs}) == 4
    for i in (1, 3):
        alone = siblings(4, fork=False)[i]
        s2 = Scheduler(EC.scheduler_config(CFG), BlockPool(EC.num_blocks))
        s2.add_request(alone)
        while s2.has_unfinished:
            o = s2.schedule()
            s2.update(o, engine.execute(o))
        assert alone.output_tokens == outs[i]


def test_abort_of_the_prefilling_sibling_leaks_nothing():
    engine = Engine(init_model(CFG, seed=1), EC)
    pool = BlockPool(EC.num_blocks)
    free0 = pool.num_free
    sched = Scheduler(EC.scheduler_config(CFG), pool)
    reqs = siblings(3, max_tokens=30)
    for r in reqs:
        sched.add_request(r)
    for step in range(4):  # children admitted on the parent's blocks, then the parent goes
        out = sched.schedule()
        sched.update(out, engine.execute(out))
    assert all(r.state is RequestState.RUNNING for r in reqs)
    sched.abort("c0")
    out = sched.schedule()
    sched.update(out, engine.execute(out))
    assert pool.num_free < free0
    for r in reqs[1:]:
        sched.abort(r.request_id)
    assert pool.num_free == free0 and not sched.has_unfinished
    # A child whose sibling is gone before admission computes the prompt itself.
    late = Request("late", list(PROMPT), SamplingParams(max_tokens=10), fork_of="c0")
    sched.add_request(late)
    while sched.has_unfinished:
        out = sched.schedule()
        sched.update(out, engine.execute(out))
    assert len(late.output_tokens) == 10 and pool.num_free == free0
