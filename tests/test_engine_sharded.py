"""The engine sharded over 8 fake CPU devices (2 data x 4 model) emits what one device emits.

Requests share prefixes (prefix cache hits) and are drafted by AgentSAM and by a drafter that
proposes the right continuation (acceptance), so verification runs on the sharded pool too. The
independent reference is `generate` (dense contiguous cache, one device).
"""

from __future__ import annotations

import random

import jax
import pytest
from test_engine import EchoDrafter  # proposes the reference continuation: every draft is accepted

from agentinfer_jax.cache import BlockPool, PrefixCache
from agentinfer_jax.engine.engine import Engine, EngineConfig
from agentinfer_jax.model.config import ModelConfig
from agentinfer_jax.model.sharding import make_mesh
from agentinfer_jax.model.transformer import generate, init_model
from agentinfer_jax.serving.builder import build_engine, load_model_config
from agentinfer_jax.serving.cli import config_from_args, parse_args
from agentinfer_jax.serving.request import Request, SamplingParams
from agentinfer_jax.serving.scheduler import Scheduler
from agentinfer_jax.speculation import SAMDrafter, SessionMemory

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")

EC = EngineConfig(num_blocks=48, block_size=8, max_num_seqs=8, max_tokens_per_step=64, max_model_len=96,
                  max_draft_tokens=4)


def _config(num_kv_heads: int) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                       num_kv_heads=num_kv_heads, head_dim=16, rope_theta=10000.0,
                       max_position_embeddings=512)


def _requests(seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(1, 64) for _ in range(19)]
    # Repetitive bodies so that AgentSAM finds drafts in the session itself.
    return [(shared + [rng.randrange(1, 8) for _ in range(rng.randint(3, 24))], rng.randint(4, 12))
            for _ in range(10)]


def _serve(model, config, requests, drafter, mesh):
    engine = Engine(model, EC, mesh=mesh)
    pool = BlockPool(EC.num_blocks)
    sched = Scheduler(EC.scheduler_config(config, 4), pool, PrefixCache(EC.block_size, pool), drafter=drafter)
    reqs = [Request(f"r{i}", p, SamplingParams(max_tokens=n), session_id="s") for i, (p, n) in enumerate(requests)]
    for r in reqs:
        sched.add_request(r)
    while sched.has_unfinished:
        out = sched.schedule()
        sched.update(out, engine.execute(out))
    cached = sum(r.num_cached_tokens for r in reqs)
    return [r.output_tokens for r in reqs], cached, sum(r.num_accepted for r in reqs), engine


@pytest.mark.parametrize(("num_kv_heads", "drafter"), [(4, "sam"), (2, "right")],
                         ids=["kv-heads-sharded-sam", "kv-heads-replicated-right-drafts"])
def test_sharded_engine_equals_single_device(num_kv_heads, drafter):
    config = _config(num_kv_heads)
    model = init_model(config, seed=num_kv_heads)
    requests = _requests(seed=num_kv_heads)
    longest = max(n for _, n in requests)
    rows = generate(model, [p for p, _ in requests], longest, max_len=96, eos_token_ids=())
    reference = [row[:n] for row, (_, n) in zip(rows, requests)]

    def make_drafter():
        return SAMDrafter(SessionMemory(top_k=2)) if drafter == "sam" else EchoDrafter(reference)

    single, cached_1, accepted_1, _ = _serve(model, config, requests, make_drafter(), mesh=None)
    mesh = make_mesh(data=2, model=4)
    sharded, cached_8, accepted_8, engine = _serve(model, config, requests, make_drafter(), mesh=mesh)
    assert single == reference
    assert sharded == single
    assert cached_8 == cached_1 > 0
    assert accepted_8 == accepted_1 > 0
    k_pages = engine.kv[0][0]
    assert len(k_pages.sharding.device_set) == 8
    expected_heads = num_kv_heads // 4 if num_kv_heads % 4 == 0 else num_kv_heads
    assert k_pages.addressable_shards[0].data.shape == (expected_heads, *k_pages.shape[1:])


def test_cli_mesh_builds_a_sharded_engine():
    config = config_from_args(parse_args(["--config", "tiny", "--mesh", "2,4", "--num-blocks", "64",
                                          "--max-model-len", "256"]))
    assert config.mesh_shape == (2, 4)
    engine = build_engine(config, init_model(load_model_config("tiny"), seed=0))
    assert len(engine.kv[0][0].sharding.device_set) == 8
    with pytest.raises(SystemExit):
        parse_args(["--mesh", "4"])
