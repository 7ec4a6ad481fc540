"""The engine over the paged cache is lossless: greedy tokens equal the contiguous-cache reference.

The reference is `model.transformer.generate` (dense contiguous cache, one prompt at a time); the
engine runs the same model through the scheduler with prefix caching, chunked prefill, forced
preemption, an adversarial drafter and batching, and must emit the same tokens.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import time

import numpy as np
import pytest

from agentinfer_jax.cache import BlockPool, PrefixCache
from agentinfer_jax.engine.engine import Engine, EngineConfig
from agentinfer_jax.engine.step_batch import StepBatch
from agentinfer_jax.model.config import ModelConfig
from agentinfer_jax.model.transformer import generate, init_model
from agentinfer_jax.serving.request import Request, SamplingParams
from agentinfer_jax.serving.scheduler import Scheduler
from agentinfer_jax.speculation import SAMDrafter, SessionMemory
from agentinfer_jax.speculation.adaptive import AdaptiveSpeculation, MeasuredStepCost, StepCostTable

CFG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=512)


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, seed=3)


@pytest.fixture(scope="module")
def requests():
    rng = random.Random(0)
    shared = [rng.randrange(1, 64) for _ in range(20)]
    out = []
    for i in range(32):
        body = [rng.randrange(1, 64) for _ in range(rng.randint(1, 40))]
        out.append(((shared if i % 2 else []) + body, rng.randint(1, 10)))
    return out


@pytest.fixture(scope="module")
def reference(model, requests):
    # One batched call (rows are independent under the reference's masks): two compilations, not 64.
    longest = max(n for _, n in requests)
    rows = generate(model, [p for p, _ in requests], longest, max_len=96, eos_token_ids=())
    return [row[:n] for row, (_, n) in zip(rows, requests)]


class AdversarialDrafter:
    def __init__(self, seed):
        self.rng = random.Random(seed)

    def begin(self, rid, prompt, session_id=None):
        pass

    def extend(self, rid, toks):
        pass

    def propose(self, rid, k):
        return [self.rng.randrange(64) for _ in range(self.rng.randint(0, k))]

    def end(self, rid):
        pass


class EchoDrafter(AdversarialDrafter):
    """Proposes the recorded reference continuation (all drafts right): exercises acceptance."""

    def __init__(self, refs):
        super().__init__(0)
        self.refs, self.ctx = refs, {}

    def begin(self, rid, prompt, session_id=None):
        self.ctx[rid] = 0

    def extend(self, rid, toks):
        self.ctx[rid] += len(toks)

    def propose(self, rid, k):
        ref = self.refs[int(rid[1:])]
        return ref[self.ctx[rid]:self.ctx[rid] + k]


class ScoredEchoDrafter(EchoDrafter):
    """EchoDrafter that scores its proposals as AgentSAM does (all of them worth verifying)."""

    def expected_accepted(self, rid):
        return 4.0


# One engine shape for every test (compilations are shared); variants change the scheduler's limits.
EC = EngineConfig(num_blocks=64, block_size=8, max_num_seqs=32, max_tokens_per_step=128, max_model_len=96,
                  max_draft_tokens=4)


def drive(model, reqs, *, cache=True, budget=128, blocks=64, drafter=None, k=0, seqs=32, adaptive=None, ec=EC,
          engine=None):
    """Runs requests to completion; a smaller BlockPool than the engine's page pool forces preemption."""
    engine = engine or Engine(model, ec)
    pool = BlockPool(blocks)
    cfg = dataclasses.replace(ec.scheduler_config(CFG, k), max_tokens_per_step=min(budget, ec.max_tokens_per_step),
                              max_num_seqs=min(seqs, ec.max_num_seqs))
    sched = Scheduler(cfg, pool, PrefixCache(8, pool) if cache else None, drafter=drafter, adaptive=adaptive)
    for r in reqs:
        sched.add_request(r)
    while sched.has_unfinished:
        out = sched.schedule()
        t0 = time.perf_counter()
        new = engine.execute(out)
        sched.observe_step(out, time.perf_counter() - t0)
        sched.update(out, new)
    if sched.prefix_cache:
        sched.prefix_cache.evict(pool.num_used)
    assert pool.num_used == 0
    return sched, engine


def run(model, requests, subset=None, sessions=False, **kw):
    idx = subset if subset is not None else range(len(requests))
    reqs = [Request(f"r{i}", requests[i][0], SamplingParams(max_tokens=requests[i][1]),
                    session_id=f"s{i % 3}" if sessions else None) for i in idx]
    sched, engine = drive(model, reqs, **kw)
    return [r.output_tokens for r in reqs], sched, engine


def test_batch_with_prefix_cache_matches_reference(model, requests, reference):
    out, sched, engine = run(model, requests)
    assert out == reference
    assert engine.num_compilations > 0
    assert sum(r.num_cached_tokens for r in sched.requests.values()) > 0
    # Bounded compilations: at most one per (token bucket, sequence bucket) pair.
    assert engine.num_compilations <= len(engine.token_buckets) * len(engine.seq_buckets)


@pytest.mark.parametrize("variant", ["no_cache", "chunked", "preemption", "adversarial_drafter", "echo_drafter",
                                     "sam_drafter", "sam_adaptive"])
def test_variants_match_reference(model, requests, reference, variant):
    memory = SessionMemory(top_k=2, global_min_rebuild=8) if variant.startswith("sam") else None
    kw = {"no_cache": dict(cache=False), "chunked": dict(budget=16, seqs=8),
          "preemption": dict(blocks=24, budget=64),
          "adversarial_drafter": dict(drafter=AdversarialDrafter(1), k=4),
          "echo_drafter": dict(drafter=EchoDrafter(reference), k=4),
          # AgentSAM with cross-session memory, requests grouped in sessions; then with the
          # adaptive switch choosing k from measured step times.
          "sam_drafter": dict(drafter=SAMDrafter(memory), k=4, sessions=True),
          "sam_adaptive": dict(drafter=SAMDrafter(memory), k=4, sessions=True,
                               adaptive=AdaptiveSpeculation(MeasuredStepCost(), k_choices=(1, 2, 4)))}[variant]
    subset = list(range(12))
    out, sched, engine = run(model, requests, subset=subset, **kw)
    if memory is not None:
        memory.close()
    assert out == [reference[i] for i in subset]
    # Bounded compilations: per (token bucket, sequence bucket), one width without drafts, one with.
    assert engine.num_compilations <= 2 * len(engine.token_buckets) * len(engine.seq_buckets)
    if variant.startswith("sam"):
        assert sum(r.num_verify_steps for r in sched.requests.values()) > 0
    if variant == "preemption":
        assert sched.num_preemptions > 0
    if variant == "echo_drafter":
        reqs = sched.requests.values()
        assert sum(r.num_accepted for r in reqs) > 0.9 * sum(r.num_drafted for r in reqs) > 0


def test_inflight_prefix_sharing_matches_sharing_off(model, requests, reference):
    """SPAgent's pattern on the real engine: each call submitted together with a "guess" over the
    same context plus a short instruction. With in-flight sharing the guess waits for the call's
    prefill and reads those blocks from the cache: the same greedy tokens as with sharing off (and,
    for the calls, as the contiguous-cache reference), fewer prompt tokens fed, no leaked blocks."""
    engine = Engine(model, EC)
    subset = [1, 3, 4, 5, 7, 9]

    def serve(share):
        pool = BlockPool(64)
        cfg = dataclasses.replace(EC.scheduler_config(CFG), share_inflight_prefill=share)
        sched = Scheduler(cfg, pool, PrefixCache(8, pool))
        reqs = []
        for i in subset:
            prompt, n = requests[i]
            reqs += [Request(f"r{i}", prompt, SamplingParams(max_tokens=n)),
                     Request(f"g{i}", prompt + [5, 6, 7], SamplingParams(max_tokens=4))]
        for r in reqs:
            sched.add_request(r)
        fed = 0
        while sched.has_unfinished:
            out = sched.schedule()
            fed += sum(max(0, min(s.start_pos + len(s.tokens), len(sched.requests[s.request_id].prompt_tokens))
                              - s.start_pos) for s in out.seqs)
            sched.update(out, engine.execute(out))
        sched.prefix_cache.evict(pool.num_used)
        assert pool.num_used == 0
        return {r.request_id: r.output_tokens for r in reqs}, fed, sched

    off, fed_off, _ = serve(False)
    on, fed_on, sched = serve(True)
    assert on == off
    assert [on[f"r{i}"] for i in subset] == [reference[i] for i in subset]
    assert sched.num_inflight_shared_tokens > 0 and fed_on < fed_off


def test_alone_equals_reference(model, requests, reference):
    for i in (0, 5, 17):
        out, _, _ = run(model, requests, subset=[i], seqs=1)
        assert out[0] == reference[i]


def test_forced_replay_emits_the_record_and_accepts_matching_drafts(model):
    record = [5, 9, 9, 2, 7, 7, 7, 1]

    class Half(AdversarialDrafter):
        def begin(self, rid, prompt, session_id=None):
            self.n = 0

        def extend(self, rid, toks):
            self.n += len(toks)

        def propose(self, rid, k):
            return record[self.n:self.n + 2] + [63]

    r = Request("f", [1, 2, 3], SamplingParams(max_tokens=len(record)), forced_output=record)
    drive(model, [r], drafter=Half(0), k=3)
    assert r.output_tokens == record
    assert r.num_accepted >= 4 and r.num_verify_steps < len(record)


def test_sampling_is_seeded_and_batch_invariant(model, requests):
    def sample(subset, seqs):
        reqs = [Request(f"r{i}", requests[i][0], SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=i))
                for i in subset]
        drive(model, reqs, seqs=seqs)
        return {r.request_id: r.output_tokens for r in reqs}

    batch = sample(range(8), 8)
    for i in (2, 6):
        assert sample([i], 1)[f"r{i}"] == batch[f"r{i}"]
    assert len({tuple(v) for v in batch.values()}) > 1
    assert np.mean([len(v) for v in batch.values()]) == 8


def test_bucketed_page_width_matches_full_width(model, requests, reference):
    """Page tables cut to each step's longest context (one-page buckets up) emit the same tokens
    as full-width tables, with drafts on; both equal the contiguous-cache reference."""
    subset = list(range(10))
    outs = []
    for min_tokens in (EC.block_size, EC.max_model_len):  # with 1.5x token buckets, then 2x ones
        fine = min_tokens < EC.max_model_len
        ec = dataclasses.replace(EC, min_page_bucket_tokens=min_tokens, fine_token_buckets=fine,
                                 fine_page_buckets=fine)
        out, _, engine = run(model, requests, subset=subset, drafter=EchoDrafter(reference), k=4, ec=ec)
        outs.append(out)
        assert engine.page_buckets == ((1, 2, 3, 4, 6, 8, 12) if fine else (12,))
    assert outs[0] == outs[1] == [reference[i] for i in subset]


def test_one_token_buckets_and_small_sequence_buckets_match_reference(model, requests, reference):
    """Token buckets from 1 and sequence buckets 1, 2, 4: a lone request's decode runs one row and its
    verification a few, several requests' verifications run the vectorized attention path, steps
    with prefill chunks the looped one; drafts right and wrong. Every token equals the reference."""
    ec = dataclasses.replace(EC, min_token_bucket=1, fine_token_buckets=True, seq_buckets=(1, 2, 4))
    engine = Engine(model, ec)
    assert engine.token_buckets[:3] == (1, 2, 3)
    for subset, seqs, drafter in (([3], 1, EchoDrafter(reference)), ([0, 5, 17], 4, AdversarialDrafter(3)),
                                  ([2, 7], 2, EchoDrafter(reference))):
        out, _, _ = run(model, requests, subset=subset, seqs=seqs, drafter=drafter, k=4, ec=ec, engine=engine)
        assert out == [reference[i] for i in subset]


def test_compile_all_then_serving_compiles_nothing(model, requests, reference):
    ec = EngineConfig(num_blocks=48, block_size=8, max_num_seqs=4, max_tokens_per_step=32, max_model_len=64,
                      max_draft_tokens=3, min_token_bucket=8, min_page_bucket_tokens=32)
    engine = Engine(model, ec)
    shapes = engine.step_shapes()
    assert {k for _, _, k, _ in shapes} == {0, 3} and {p for *_, p in shapes} == {4, 8}
    assert engine.compile_all() == len(shapes) == engine.num_compilations
    assert engine.compile_all() == 0
    # Prefill chunks, decode, drafts (random and right), preemption, prefix reuse: no new shape.
    subset = [i for i in range(16) if len(requests[i][0]) + requests[i][1] <= 64][:10]
    for drafter, k in ((AdversarialDrafter(2), 3), (EchoDrafter(reference), 3), (None, 0)):
        out, _, _ = run(model, requests, subset=subset, drafter=drafter, k=k, ec=ec, engine=engine, blocks=24)
        assert out == [reference[i] for i in subset]
    assert engine.num_compilations == len(shapes)


@pytest.mark.parametrize("variant", ["overlap", "overlap_tight_pool", "overlap_sam_adaptive", "overlap_scored_drafts",
                                     "overlap_sampled"])
def test_overlapped_serving_loop_matches_reference(model, requests, reference, variant):
    """Host/device overlap: the loop plans and dispatches step n+1 (feeding the tokens step n
    samples straight from the device) before step n's result is on the host; lossless, no leaks."""
    from agentinfer_jax.serving.loop import ServingLoop
    memory = SessionMemory(top_k=2, global_min_rebuild=8)
    kw = {"overlap": {}, "overlap_tight_pool": dict(blocks=14, budget=64),
          "overlap_sam_adaptive": dict(k=4, drafter=SAMDrafter(memory),
                                       adaptive=AdaptiveSpeculation(MeasuredStepCost(), k_choices=(1, 2, 4))),
          # Scored proposals judged one token early while a step runs, then verified.
          "overlap_scored_drafts": dict(k=4, drafter=ScoredEchoDrafter(reference), adaptive=AdaptiveSpeculation(
              StepCostTable({b: {1: 1e-3, 64: 1e-3} for b in (1, 2, 4, 8, 16, 32)}), k_choices=(1, 2, 4))),
          "overlap_sampled": {}}[variant]
    sampled = variant == "overlap_sampled"
    subset = list(range(12))

    def serve(overlap):
        engine = Engine(model, EC)
        pool = BlockPool(kw.get("blocks", 64))
        cfg = dataclasses.replace(EC.scheduler_config(CFG, kw.get("k", 0)),
                                  max_tokens_per_step=kw.get("budget", EC.max_tokens_per_step))
        sched = Scheduler(cfg, pool, PrefixCache(8, pool), drafter=kw.get("drafter"), adaptive=kw.get("adaptive"))
        loop = ServingLoop(sched, engine, overlap=overlap)
        reqs = [Request(f"r{i}", requests[i][0],
                        SamplingParams(max_tokens=requests[i][1], temperature=1.0 if sampled else 0.0, seed=i),
                        session_id=f"s{i % 3}") for i in subset]
        for r in reqs:
            loop.submit(r)
        loop.run_until_idle()
        sched.prefix_cache.evict(pool.num_used)
        assert pool.num_used == 0
        if overlap and "drafter" not in kw:
            assert engine.num_fed_on_device > 0
        return [r.output_tokens for r in reqs], reqs

    out, reqs = serve(True)
    memory.close()
    if sampled:
        assert out == serve(False)[0]
    else:
        assert out == [reference[i] for i in subset]
    if variant == "overlap_scored_drafts":  # drafting and planning ahead took turns
        assert sum(r.num_verify_steps for r in reqs) > 0


def test_timed_steps_leave_live_requests_untouched(model, requests, reference):
    """`time_steps` (the adaptive switch's costs, timed before serving) gives one positive time per
    shape, refuses shapes the engine cannot run, and, run between the steps of live requests,
    leaves their greedy tokens equal to the reference."""
    ec = EngineConfig(num_blocks=48, block_size=8, max_num_seqs=4, max_tokens_per_step=32, max_model_len=64,
                      max_draft_tokens=3, min_token_bucket=8, min_page_bucket_tokens=32)
    engine = Engine(model, ec)
    times = engine.time_steps([(1, 1), (1, 4), (2, 8), (4, 32)], context_tokens=40, repeats=2)
    assert len(times) == 4 and all(t > 0 for t in times)
    for bad in ((0, 1), (5, 8), (2, 1), (1, 33)):
        with pytest.raises(ValueError, match="cannot time"):
            engine.time_steps([bad], context_tokens=40)
    real_execute = engine.execute
    calls = itertools.count()

    def execute_and_time(step):  # a timing run after every 3rd served step
        out = real_execute(step)
        if next(calls) % 3 == 0:
            engine.time_steps([(2, 8)], context_tokens=64, repeats=1)
        return out

    engine.execute = execute_and_time
    subset = [i for i in range(16) if len(requests[i][0]) + requests[i][1] <= 64][:6]
    out, _, _ = run(model, requests, subset=subset, ec=ec, engine=engine, blocks=24)
    assert out == [reference[i] for i in subset]


def test_step_records_never_overlap_and_describe_their_steps(model, requests, reference):
    """`record_steps` feeds the projection's timelines, which need the documented invariant that
    records never overlap, also when the loop dispatches a step before the last one's result is
    in; each record describes its step as the cost model's StepFeatures do."""
    from agentinfer_jax.serving.loop import ServingLoop
    from agentinfer_jax.workloads.cost_model import StepFeatures
    from agentinfer_jax.workloads.projection import StepTimeline, TimedStep

    engine = Engine(model, EC, record_steps=True)
    collected = []
    real_collect = engine.collect

    def collect(pending):  # records are appended as steps are collected, in dispatch order
        collected.append(StepBatch(list(pending.seqs)))
        return real_collect(pending)

    engine.collect = collect
    pool = BlockPool(64)
    sched = Scheduler(EC.scheduler_config(CFG), pool, PrefixCache(8, pool))
    loop = ServingLoop(sched, engine, overlap=True)
    subset = [0, 1, 2, 3, 4, 5]
    reqs = [Request(f"r{i}", requests[i][0], SamplingParams(max_tokens=requests[i][1])) for i in subset]
    for r in reqs:
        loop.submit(r)
    loop.run_until_idle()
    assert [r.output_tokens for r in reqs] == [reference[i] for i in subset]
    assert engine.num_fed_on_device > 0  # steps were planned ahead
    recs = engine.steps
    assert len(recs) == len(collected) > 5
    for prev, rec in zip(recs, recs[1:]):
        assert rec.start_s >= prev.end_s
    for rec, batch in zip(recs, collected):
        f = StepFeatures.from_scheduler_output(batch)
        assert (rec.prefill_tokens, rec.decode_tokens, rec.num_seqs, rec.context_tokens, rec.attended_pairs) == (
            f.prefill_tokens, f.decode_tokens, f.num_seqs, f.kv_read_tokens, f.attn_ctx_tokens)
        assert rec.padded_tokens in engine.token_buckets and rec.padded_tokens >= batch.num_tokens
        assert rec.start_s <= rec.end_s and 0 < rec.seconds <= rec.end_s - rec.start_s + 1e-9
    StepTimeline([TimedStep(r.start_s, r.end_s, StepFeatures()) for r in recs], lambda f: 0.0)
