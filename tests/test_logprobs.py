"""Logprobs, penalties and logit_bias through the scheduler and the engine, against float64 numpy
over a dense (contiguous-cache) forward pass of the same model."""

from __future__ import annotations

import random

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from agentinfer_jax.cache import BlockPool, PrefixCache
from agentinfer_jax.engine.engine import Engine, EngineConfig
from agentinfer_jax.model.attention import ContiguousMeta
from agentinfer_jax.model.config import ModelConfig
from agentinfer_jax.model.transformer import forward, init_cache, init_model
from agentinfer_jax.serving.request import Request, SamplingParams
from agentinfer_jax.serving.scheduler import Scheduler

CFG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=512)
EC = EngineConfig(num_blocks=128, block_size=8, max_num_seqs=8, max_tokens_per_step=64, max_model_len=96,
                  max_draft_tokens=3, min_token_bucket=64, min_page_bucket_tokens=96)
WIDTH = 96  # the dense reference's padded length (one compilation)


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, seed=5)


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, EC)


def dense_logits(model, tokens):
    """float64 logits [len(tokens), V] of one sequence through the contiguous-cache forward pass."""
    graphdef, state = nnx.split(model)
    n = len(tokens)
    toks = jnp.asarray([list(tokens) + [0] * (WIDTH - n)], jnp.int32)
    pos = jnp.arange(WIDTH, dtype=jnp.int32)[None]
    logits, _ = forward(graphdef, state, toks, pos, init_cache(CFG, 1, WIDTH), ContiguousMeta(pos, jnp.asarray([n])))
    return np.asarray(logits[0, :n], np.float64)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class OracleDrafter:
    """Drafts the known continuation with every third token wrong: accepted and rejected drafts."""

    def __init__(self, refs):
        self.refs, self.pos = refs, {}

    def begin(self, rid, prompt, session_id=None):
        self.pos[rid] = 0

    def extend(self, rid, toks):
        self.pos[rid] += len(toks)

    def propose(self, rid, k):
        ref = self.refs[rid][self.pos[rid]:self.pos[rid] + k]
        return [(t + 1) % CFG.vocab_size if (self.pos[rid] + j) % 3 == 2 else t for j, t in enumerate(ref)]

    def end(self, rid):
        pass


def drive(engine, reqs, drafter=None):
    pool = BlockPool(EC.num_blocks)
    sched = Scheduler(EC.scheduler_config(CFG, EC.max_draft_tokens if drafter else 0), pool,
                      PrefixCache(EC.block_size, pool), drafter=drafter)
    for r in reqs:
        sched.add_request(r)
    while sched.has_unfinished:
        out = sched.schedule()
        sched.update(out, engine.execute(out))
    return sched


def make_requests(n, seed, **params):
    rng = random.Random(seed)
    return [Request(f"r{i}", [rng.randrange(CFG.vocab_size) for _ in range(rng.randint(2, 30))],
                    SamplingParams(max_tokens=rng.randint(4, 16), seed=i, **params)) for i in range(n)]


def penalised(logits, outputs, presence, frequency, bias):
    """OpenAI's rule, stated over the tokens generated before each position."""
    out = logits.copy()
    for j in range(len(outputs)):
        counts = np.bincount(outputs[:j], minlength=logits.shape[1])
        out[j] -= frequency * counts + presence * (counts > 0)
        for t, b in bias.items():
            out[j, t] += b
    return out


BIAS = {7: 3.0, 11: -100.0, 12: 1.5}
# Every request asks for logprobs and penalties, so the engine compiles one step variant per draft
# width (compiling dominates on CPU); logprobs are raw, so the penalties do not touch them.
PARAMS = dict(logprobs=5, presence_penalty=0.8, frequency_penalty=1.3, logit_bias=tuple(BIAS.items()))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_and_penalties_match_dense_float64_reference(model, engine, temperature):
    reqs = make_requests(6, 0, temperature=temperature, **PARAMS)
    drive(engine, reqs)
    refs = {r.request_id: list(r.output_tokens) for r in reqs}
    drafted = make_requests(6, 0, temperature=temperature, **PARAMS)
    sched = drive(engine, drafted, OracleDrafter(refs))
    assert sum(r.num_verify_steps for r in drafted) > 0
    if temperature == 0.0:  # a random model's flat distribution rarely accepts a sampled draft
        assert sum(r.num_accepted for r in drafted) > 0
        assert [r.output_tokens for r in drafted] == [r.output_tokens for r in reqs]  # lossless
    changed = 0
    for reqs_ in (reqs, drafted):
        for r in reqs_:
            assert len(r.output_logprobs) == len(r.output_tokens)
            logits = dense_logits(model, r.all_tokens)[len(r.prompt_tokens) - 1:-1]
            logp = log_softmax(logits)
            for j, (tok, lp) in enumerate(zip(r.output_tokens, r.output_logprobs)):
                assert lp.logprob == pytest.approx(logp[j, tok], abs=2e-4)
                ids = [t for t, _ in lp.top]
                assert len(ids) == 5
                np.testing.assert_allclose([v for _, v in lp.top], np.sort(logp[j])[::-1][:5], atol=2e-4)
                np.testing.assert_allclose([logp[j, t] for t in ids], [v for _, v in lp.top], atol=2e-4)
            assert 11 not in r.output_tokens
            if temperature == 0.0:  # greedy picks follow the penalised logits, not the raw ones
                want = penalised(logits, np.asarray(r.output_tokens), 0.8, 1.3, BIAS).argmax(-1)
                assert r.output_tokens == want.tolist()
                changed += r.output_tokens != logits.argmax(-1).tolist()
    if temperature == 0.0:
        assert changed > 0  # the penalties act
    assert sched.pool.num_used == sched.prefix_cache.num_evictable()


def test_logit_bias_shifts_the_sampled_distribution():
    """Sampling under an additive bias draws from softmax(logits + bias) (chi-square-free check:
    frequencies within 0.015 of the float64 reference over 20000 seeded draws)."""
    from agentinfer_jax.engine.sampling import SamplingArrays, verify_rows
    n, v = 20000, 6
    logits = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
    bias = np.array([0.0, 0.0, 1.0, 0.0, -2.0, 2.0])
    flat = jnp.asarray(np.broadcast_to(logits, (n, v)), jnp.float32)
    rows = jnp.arange(n, dtype=jnp.int32)[:, None]
    params = SamplingArrays(jnp.ones(n), jnp.zeros(n, jnp.int32), jnp.ones(n), jnp.arange(n, dtype=jnp.uint32))
    ids = jnp.broadcast_to(jnp.arange(v, dtype=jnp.int32), (n, 1, v))
    vals = jnp.broadcast_to(jnp.asarray(bias, jnp.float32), (n, 1, v))
    toks, _ = verify_rows(flat, rows, jnp.zeros((n, 0), jnp.int32), jnp.zeros(n, jnp.int32), params,
                          jnp.zeros(n, jnp.int32), None, ids, vals)
    want = np.exp(log_softmax(logits + bias))
    np.testing.assert_allclose(np.bincount(np.asarray(toks[:, 0]), minlength=v) / n, want, atol=0.015)
