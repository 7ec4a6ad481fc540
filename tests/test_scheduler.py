"""Scheduler correctness against a model-free page oracle (see page_oracle.py).

Every configuration (prefix cache on/off, chunk sizes, preemption, drafting, batching) must give
exactly the reference tokens, and every block must come back.
"""

from __future__ import annotations

import random

import pytest

from agentinfer_jax.cache import BlockPool, PrefixCache
from agentinfer_jax.serving.policies import make_policy
from agentinfer_jax.serving.request import InvalidRequestError, Request, SamplingParams
from agentinfer_jax.serving.scheduler import Scheduler, SchedulerConfig, SessionRetention
from page_oracle import PageOracleExecutor, PipelinedOracleExecutor, reference_generate, run_until_done

VOCAB = 97


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 1e-3
        return self.t


class RandomDrafter:
    """Adversarial: proposes random tokens, sometimes the right ones (it peeks at the oracle)."""

    def __init__(self, seed: int, p_right: float):
        self.rng = random.Random(seed)
        self.p_right = p_right
        self.ctx: dict[str, list[int]] = {}

    def begin(self, rid, prompt, session_id=None):
        self.ctx[rid] = list(prompt)

    def extend(self, rid, toks):
        self.ctx[rid].extend(toks)

    def propose(self, rid, k):
        from page_oracle import next_token
        ctx, out = list(self.ctx[rid]), []
        for _ in range(self.rng.randint(0, k)):
            t = next_token(ctx, VOCAB) if self.rng.random() < self.p_right else self.rng.randrange(VOCAB)
            out.append(t)
            ctx.append(t)
        return out

    def end(self, rid):
        del self.ctx[rid]


def make(num_blocks=64, bs=4, budget=64, seqs=8, cache=True, drafter=None, k=0, policy="fcfs",
         retention_ttl=None, max_len=256, share_inflight=True):
    clock = FakeClock()
    pool = BlockPool(num_blocks)
    pc = PrefixCache(bs, pool) if cache else None
    cfg = SchedulerConfig(block_size=bs, max_num_seqs=seqs, max_tokens_per_step=budget, max_model_len=max_len,
                          vocab_size=VOCAB, num_draft_tokens=k, eos_token_ids=(0,),
                          share_inflight_prefill=share_inflight)
    ret = SessionRetention(pool, retention_ttl) if retention_ttl else None
    sched = Scheduler(cfg, pool, pc, make_policy(policy), drafter=drafter, retention=ret, clock=clock)
    return sched, PageOracleExecutor(num_blocks, bs, VOCAB), pool, pc


def random_requests(rng, n, shared_prefix_len=24, max_prompt=60, max_new=20):
    prefix = [rng.randrange(1, VOCAB) for _ in range(shared_prefix_len)]
    reqs = []
    for i in range(n):
        body = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, max_prompt))]
        prompt = (prefix if rng.random() < 0.6 else []) + body
        reqs.append((f"r{i}", prompt, rng.randint(1, max_new)))
    return reqs


def expected(prompt, n):
    return reference_generate(prompt, n, VOCAB, stop_ids=(0,))


def all_released(pool, pc, sched):
    if sched.retention:
        sched.retention.clear()
    if pc is not None:
        pc.evict(pool.num_used)
    return pool.num_used == 0


CONFIGS = {
    "no_cache_whole": dict(cache=False, budget=256),
    "cache_whole": dict(cache=True, budget=256),
    "cache_chunked": dict(cache=True, budget=16),
    "forced_preemption": dict(cache=True, num_blocks=28, budget=32),
    "random_drafter": dict(cache=True, drafter="adv", k=4),
    "mostly_right_drafter": dict(cache=True, drafter="good", k=6),
    "drafter_preempt": dict(cache=True, num_blocks=28, drafter="adv", k=3),
    "sjf_policy": dict(policy="sjf"),
    "agentsched_policy": dict(policy="agentsched", num_blocks=40),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_outputs_match_reference_batch_of_32(name):
    kw = dict(CONFIGS[name])
    d = kw.pop("drafter", None)
    drafter = {None: None, "adv": RandomDrafter(1, 0.3), "good": RandomDrafter(2, 0.9)}[d]
    sched, ex, pool, pc = make(drafter=drafter, **kw)
    rng = random.Random(sum(map(ord, name)))
    reqs = random_requests(rng, 32)
    objs = []
    for rid, prompt, n in reqs:
        r = Request(rid, prompt, SamplingParams(max_tokens=n))
        sched.add_request(r)
        objs.append(r)
    run_until_done(sched, ex)
    for r, (_, prompt, n) in zip(objs, reqs):
        assert r.output_tokens == expected(prompt, n), r.request_id
    if name == "forced_preemption" or name == "drafter_preempt":
        assert sched.num_preemptions > 0
    if drafter is not None:
        assert sum(r.num_drafted for r in objs) > 0
    assert all_released(pool, pc, sched)


def test_alone_equals_in_batch():
    rng = random.Random(5)
    reqs = random_requests(rng, 8)
    alone = []
    for rid, prompt, n in reqs:
        sched, ex, *_ = make()
        r = Request(rid, prompt, SamplingParams(max_tokens=n))
        sched.add_request(r)
        run_until_done(sched, ex)
        alone.append(r.output_tokens)
    sched, ex, *_ = make(num_blocks=28, budget=24)
    objs = [Request(rid, p, SamplingParams(max_tokens=n)) for rid, p, n in reqs]
    for r in objs:
        sched.add_request(r)
    run_until_done(sched, ex)
    assert [r.output_tokens for r in objs] == alone


def test_prefix_cache_hits_across_session_calls():
    sched, ex, pool, pc = make(bs=4)
    rng = random.Random(0)
    ctx = [rng.randrange(1, VOCAB) for _ in range(40)]
    hits = []
    for call in range(4):
        r = Request(f"s{call}", list(ctx), SamplingParams(max_tokens=8), session_id="s")
        sched.add_request(r)
        run_until_done(sched, ex)
        assert r.output_tokens == expected(ctx, 8)
        hits.append(r.num_cached_tokens)
        ctx = ctx + r.output_tokens + [rng.randrange(1, VOCAB) for _ in range(7)]  # observation
    assert hits[0] == 0
    # Later calls reuse every full block of the previous call's prompt + response.
    assert all(h >= 40 for h in hits[1:])
    assert all_released(pool, pc, sched)


def test_retention_survives_pressure_from_other_requests():
    """With retention a session's context outlives LRU pressure from other traffic during a tool call."""
    results = {}
    for ttl in (None, 100.0):
        sched, ex, pool, pc = make(num_blocks=40, bs=4, retention_ttl=ttl)
        rng = random.Random(3)
        ctx = [rng.randrange(1, VOCAB) for _ in range(60)]
        first = Request("a0", ctx, SamplingParams(max_tokens=4), session_id="a")
        sched.add_request(first)
        run_until_done(sched, ex)
        for i in range(6):  # other sessions churn the cache while "a" runs its tool
            sched.add_request(Request(f"o{i}", [rng.randrange(1, VOCAB) for _ in range(50)],
                                      SamplingParams(max_tokens=4)))
            run_until_done(sched, ex)
        nxt = Request("a1", ctx + first.output_tokens + [5, 6, 7], SamplingParams(max_tokens=4), session_id="a")
        sched.add_request(nxt)
        run_until_done(sched, ex)
        assert nxt.output_tokens == expected(nxt.prompt_tokens, 4)
        results[ttl] = nxt.num_cached_tokens
        assert all_released(pool, pc, sched)
    assert results[None] < results[100.0]
    assert results[100.0] >= 60


def test_thousand_random_requests_no_leak():
    rng = random.Random(11)
    sched, ex, pool, pc = make(num_blocks=48, bs=4, budget=48, seqs=12, drafter=RandomDrafter(3, 0.5), k=3)
    sessions: dict[str, list[int]] = {}
    objs = {}
    n = 0
    while n < 1000 or sched.has_unfinished:
        if n < 1000:
            for _ in range(rng.randint(0, 4)):
                if sessions and rng.random() < 0.4:  # a session's next call extends its context
                    sid = rng.choice(sorted(sessions))
                    prompt = sessions[sid] + [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 8))]
                else:
                    sid = f"sess{n}"
                    prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 50))]
                prompt = prompt[-150:]
                r = Request(f"q{n}", prompt, SamplingParams(max_tokens=rng.randint(1, 12)), session_id=sid)
                sched.add_request(r)
                objs[r.request_id] = r
                sessions[sid] = prompt
                n += 1
        out = sched.schedule()
        for seq in out.seqs:  # cancel some mid-flight
            if rng.random() < 0.02:
                sched.abort(seq.request_id)
        sched.update(out, ex.execute(out))
        if rng.random() < 0.05 and sched.waiting:
            sched.abort(rng.choice(sched.waiting).request_id)
    done = [r for r in objs.values() if r.finish_reason.value != "abort"]
    assert len(done) > 700
    for r in done:
        assert r.output_tokens == expected(r.prompt_tokens, r.sampling.max_tokens)
    assert all_released(pool, pc, sched)


@pytest.mark.parametrize("prompt,params,msg", [
    ([], SamplingParams(), "empty"),
    ([1, 2, VOCAB], SamplingParams(), "vocabulary"),
    ([1, 2, -1], SamplingParams(), "vocabulary"),
    ([1, 2], SamplingParams(max_tokens=0), "max_tokens"),
    ([1] * 300, SamplingParams(), "context limit"),
    ([1, 2], SamplingParams(top_p=0.0), "top_p"),
    ([1, 2], SamplingParams(top_k=2**31), "top_k"),  # the engine packs k as int32: a failed step before
])
def test_bad_input_is_rejected_and_serving_continues(prompt, params, msg):
    sched, ex, pool, pc = make()
    with pytest.raises(InvalidRequestError, match=msg):
        sched.add_request(Request("bad", prompt, params))
    good = Request("good", [3, 4, 5], SamplingParams(max_tokens=5))
    sched.add_request(good)
    run_until_done(sched, ex)
    assert good.output_tokens == expected([3, 4, 5], 5)
    assert all_released(pool, pc, sched)


class RecordingAdaptive:
    """Stands in for AdaptiveSpeculation: drafts max_k and records the step width it is shown."""

    def __init__(self):
        self.calls = []

    def choose_k(self, request_id, batch_size, context_len, max_k=None, tokens_fed=None):
        self.calls.append((request_id, batch_size, tokens_fed))
        return max_k

    def observe(self, request_id, proposed, accepted):
        pass

    def end(self, request_id):
        pass


def test_adaptive_switch_is_shown_the_steps_real_width():
    """A decoding request that shares a step with a prefill chunk is priced at the step's width
    (its own token plus the other request's pending prefill, capped by the budget), not at one
    token per request."""
    sched, ex, pool, _ = make(budget=40, seqs=4, drafter=RandomDrafter(4, 0.5), k=3, cache=False)
    sched.adaptive = RecordingAdaptive()
    sched.add_request(Request("a", [5, 6, 7], SamplingParams(max_tokens=30)))
    out = sched.schedule()
    sched.update(out, ex.execute(out))  # "a" is decoding now
    sched.add_request(Request("b", list(range(1, 61)), SamplingParams(max_tokens=2)))
    out = sched.schedule()  # "b" is admitted after "a" was planned
    sched.update(out, ex.execute(out))
    b = sched.requests["b"]
    b_pending = b.num_tokens - b.num_computed_tokens
    assert 1 < b_pending < 60  # "b" is mid-prefill
    sched.adaptive.calls.clear()
    out = sched.schedule()
    rid, batch, fed = sched.adaptive.calls[0]
    assert (rid, batch, fed) == ("a", 2, min(1 + b_pending, 40))
    sched.update(out, ex.execute(out))
    run_until_done(sched, ex)
    assert all_released(pool, None, sched)


def test_trace_replay_is_applied_by_update_not_by_the_executor():
    """The executor reports the model's own tokens; update emits the record instead, accepts a draft
    exactly where it matches the record, and falls back to the model's first token past the record."""
    record = [5, 9, 9, 2]

    class RecordDrafter:
        """Drafts the record's next token, then a wrong one."""

        def __init__(self):
            self.n = 0

        def begin(self, rid, prompt, session_id=None):
            pass

        def extend(self, rid, toks):
            self.n += len(toks)

        def propose(self, rid, k):
            return (record[self.n:self.n + 1] + [96, 96])[:k]

        def end(self, rid):
            pass

    pool = BlockPool(32)
    sched = Scheduler(SchedulerConfig(block_size=4, max_num_seqs=2, max_tokens_per_step=16, vocab_size=VOCAB,
                                      num_draft_tokens=2), pool, drafter=RecordDrafter())
    req = Request("f", [1, 2, 3], SamplingParams(max_tokens=6, ignore_eos=True), forced_output=record)
    sched.add_request(req)
    model_token = 42  # the model disagrees with the record everywhere
    steps = []
    while sched.has_unfinished:
        out = sched.schedule()
        [seq] = out.seqs
        steps.append((len(req.output_tokens), seq.drafts))
        sched.update(out, {"f": [model_token]} if seq.samples else {})
    # The record, then the model's own token once the record is exhausted.
    assert req.output_tokens == record + [model_token, model_token]
    # A drafted record token is accepted (two tokens that step), the wrong draft after it is not.
    first_draft_step = next(i for i, (_, d) in enumerate(steps) if d)
    n0, drafts = steps[first_draft_step]
    assert drafts[0] == record[n0] and steps[first_draft_step + 1][0] == n0 + 2
    assert req.num_accepted >= 1 and pool.num_used == 0


def test_planning_ahead_asks_the_adaptive_switch_once_per_step():
    """schedule_ahead decides a request's k for the step it plans; when that k is > 0 (so the step
    cannot be planned blind), the synchronous plan that follows uses the same decision."""
    from agentinfer_jax.engine.step_batch import PREVIOUS_TOKEN

    class CountingSwitch:
        def __init__(self, ks):
            self.ks, self.calls = list(ks), 0

        def choose_k(self, rid, batch, ctx, max_k=None, tokens_fed=None):
            self.calls += 1
            return self.ks.pop(0)

        def observe(self, *a):
            pass

        def end(self, rid):
            pass

    class Drafter:
        def begin(self, *a):
            pass

        def extend(self, *a):
            pass

        def propose(self, rid, k):
            return [3] * k

        def end(self, rid):
            pass

    pool = BlockPool(32)
    switch = CountingSwitch([0, 0, 2, 0])
    sched = Scheduler(SchedulerConfig(block_size=4, max_num_seqs=2, max_tokens_per_step=16, max_model_len=64,
                                      vocab_size=50, num_draft_tokens=2), pool, drafter=Drafter(), adaptive=switch)
    sched.add_request(Request("a", [1, 2, 3], SamplingParams(max_tokens=20)))
    first = sched.schedule()  # prefill: no k asked
    assert switch.calls == 0
    ahead = sched.schedule_ahead(first)  # asks k for the step after the prefill: 0 -> planned ahead
    assert switch.calls == 1 and ahead.seqs[0].tokens == (PREVIOUS_TOKEN,)
    sched.update(first, {"a": [7]})
    third = sched.schedule_ahead(ahead)  # asks again: 0 -> planned ahead
    assert switch.calls == 2 and third.seqs[0].tokens == (PREVIOUS_TOKEN,)
    sched.update(ahead, {"a": [8]})
    assert sched.schedule_ahead(third) is None  # asks: 2 -> must wait for the step's result
    assert switch.calls == 3
    sched.update(third, {"a": [9]})
    plan = sched.schedule()  # the same decision, not a new question
    assert switch.calls == 3 and plan.seqs[0].num_draft == 2


class ScoredDrafter:
    """Proposes `token` k times and scores each proposal with `score` (as AgentSAM's calibrator does)."""

    def __init__(self, token, score):
        self.token, self.score, self.proposals = token, score, 0

    def begin(self, *a, **kw):
        pass

    def extend(self, *a):
        pass

    def propose(self, rid, k):
        self.proposals += 1
        return [self.token] * k

    def expected_accepted(self, rid):
        return self.score

    def end(self, rid):
        pass


@pytest.mark.parametrize("score, drafts", [(0.3, False), (7.0, True)])
def test_a_scored_proposal_is_verified_only_when_its_score_pays(score, drafts):
    """A verify step costs 3 plain ones (the measured table below). A drafter scoring its proposal
    at 0.3 expected tokens gets no verification and the next step is planned ahead (overlap kept);
    one at 7 is verified, so the step after it waits for the result. Outputs stay the oracle's."""
    from agentinfer_jax.speculation.adaptive import AdaptiveSpeculation, StepCostTable

    adaptive = AdaptiveSpeculation(StepCostTable({1: {1: 1e-3, 5: 3e-3}}), k_choices=(1, 2, 4))
    drafter = ScoredDrafter(5, score)
    pool = BlockPool(64)
    sched = Scheduler(SchedulerConfig(block_size=4, max_num_seqs=2, max_tokens_per_step=32, max_model_len=128,
                                      vocab_size=VOCAB, num_draft_tokens=4), pool, drafter=drafter, adaptive=adaptive)
    sched.add_request(Request("a", [1, 2, 3], SamplingParams(max_tokens=12)))
    executor = PipelinedOracleExecutor(64, 4, VOCAB)
    first = sched.schedule()
    pending = executor.dispatch(first)
    ahead = sched.schedule_ahead(first)
    assert drafter.proposals == 1  # the proposal was judged before deciding to plan ahead
    assert (ahead is None) is drafts
    sched.update(first, executor.collect(pending))
    if ahead is None:
        ahead = sched.schedule()
    assert (ahead.seqs[0].num_draft > 0) is drafts
    sched.update(ahead, executor.collect(executor.dispatch(ahead)))
    run_until_done(sched, executor)
    expected = reference_generate([1, 2, 3], 12, VOCAB, stop_ids=sched.config.eos_token_ids)
    assert sched.requests["a"].output_tokens == expected and pool.num_used == 0


@pytest.mark.parametrize("score, synchronous", [(0.3, False), (7.0, True)])
def test_a_request_outside_the_step_in_flight_that_would_draft_gets_a_synchronous_step(score, synchronous):
    """b runs but is not in the step in flight (a is). If b's proposal pays, the next step is not
    planned ahead: it waits for a's result and batches b's verification with a's decode (sitting
    b out would run it alone, and again after every step planned ahead while a decodes). A weak
    proposal keeps the overlap, b's decode planned ahead. Outputs stay the oracle's."""
    from agentinfer_jax.serving.scheduler import SchedulerOutput
    from agentinfer_jax.speculation.adaptive import AdaptiveSpeculation, StepCostTable

    class PerRequestScore(ScoredDrafter):
        def expected_accepted(self, rid):
            return self.score if rid == "b" else 0.0  # a's proposals never pay

    # Batch 2: a verify step of up to 6 tokens costs 1.5 plain ones.
    adaptive = AdaptiveSpeculation(StepCostTable({2: {1: 1e-3, 2: 1e-3, 6: 1.5e-3}}), k_choices=(1, 2, 4))
    drafter = PerRequestScore(5, 0.3)
    pool = BlockPool(64)
    sched = Scheduler(SchedulerConfig(block_size=4, max_num_seqs=2, max_tokens_per_step=32, max_model_len=128,
                                      vocab_size=VOCAB, num_draft_tokens=4), pool, drafter=drafter, adaptive=adaptive)
    prompts = {"a": [1, 2, 3], "b": [4, 5, 6, 7]}
    for rid, prompt in prompts.items():
        sched.add_request(Request(rid, list(prompt), SamplingParams(max_tokens=12)))
    executor = PipelinedOracleExecutor(64, 4, VOCAB)
    first = sched.schedule()  # both prefill and sample
    sched.update(first, executor.collect(executor.dispatch(first)))
    # The step in flight feeds a alone (b's seq of this plan is left out of it).
    a_only = SchedulerOutput([s for s in sched.schedule().seqs if s.request_id == "a"], [], 0)
    pending = executor.dispatch(a_only)
    drafter.score = score
    sched._backoff.clear()  # b's weak proposal in the plan above must not hold it back here
    ahead = sched.schedule_ahead(a_only)
    assert (ahead is None) is synchronous
    sched.update(a_only, executor.collect(pending))
    if ahead is None:
        ahead = sched.schedule()
        assert {s.request_id: s.num_draft > 0 for s in ahead.seqs} == {"a": False, "b": True}
    else:
        assert {s.request_id: s.num_draft for s in ahead.seqs} == {"a": 0, "b": 0}  # both planned ahead
    sched.update(ahead, executor.collect(executor.dispatch(ahead)))
    run_until_done(sched, executor)
    for rid, prompt in prompts.items():
        expected = reference_generate(prompt, 12, VOCAB, stop_ids=sched.config.eos_token_ids)
        assert sched.requests[rid].output_tokens == expected
    assert pool.num_used == 0


def test_weak_scored_proposals_back_off():
    """Proposing costs host time every step: after proposals judged too weak to verify, a request
    proposes less often (at most every MAX_PROPOSAL_BACKOFF + 1 steps), and outputs are unchanged."""
    from agentinfer_jax.serving.scheduler import MAX_PROPOSAL_BACKOFF
    from agentinfer_jax.speculation.adaptive import AdaptiveSpeculation, StepCostTable

    adaptive = AdaptiveSpeculation(StepCostTable({1: {1: 1e-3, 5: 3e-3}}), k_choices=(1, 2, 4))
    drafter = ScoredDrafter(5, 0.3)
    sched, executor, pool, _ = make(drafter=drafter, k=4, cache=False)
    sched.adaptive = adaptive
    sched.add_request(Request("a", [1, 2, 3], SamplingParams(max_tokens=90, ignore_eos=True)))
    run_until_done(sched, executor)
    assert sched.requests["a"].output_tokens == reference_generate([1, 2, 3], 90, VOCAB)
    assert drafter.proposals <= 90 // (MAX_PROPOSAL_BACKOFF + 1) + 4 and pool.num_used == 0


# ---- in-flight prefix sharing: a waiting request waits for a running prefill of its blocks ----

def prompt_fed(seqs, prompt_len):
    """Prompt positions fed by a step's seqs (prefill work)."""
    return sum(max(0, min(s.start_pos + len(s.tokens) - s.num_draft, prompt_len) - s.start_pos) for s in seqs)


def run_recording(sched, ex, prompt_len):
    """Runs to completion; returns (request ids per step, prompt tokens fed in all)."""
    ids, fed = [], 0
    while sched.has_unfinished:
        out = sched.schedule()
        assert not out.empty, "scheduler stalled with work left"
        ids.append({s.request_id for s in out.seqs})
        fed += prompt_fed(out.seqs, prompt_len)
        sched.update(out, ex.execute(out))
    return ids, fed


@pytest.mark.parametrize("budget", [64, 16])  # whole prompts in one step; chunked prefill
def test_same_prompt_submitted_together_is_prefilled_once(budget):
    rng = random.Random(21)
    prompt = [rng.randrange(1, VOCAB) for _ in range(5 * 4 + 1)]  # 5 full blocks + 1 token
    results = {}
    for share in (False, True):
        sched, ex, pool, pc = make(budget=budget, seqs=4, share_inflight=share)
        a, b = (Request(rid, list(prompt), SamplingParams(max_tokens=6)) for rid in ("a", "b"))
        sched.add_request(a)
        sched.add_request(b)
        ids, fed = run_recording(sched, ex, len(prompt))
        assert a.output_tokens == b.output_tokens == expected(prompt, 6)
        assert all_released(pool, pc, sched)
        results[share] = (ids, fed, b.num_cached_tokens, b.num_inflight_shared_tokens,
                          sched.num_inflight_shared_admissions, a.output_tokens, b.output_tokens)
    (ids_off, fed_off, cached_off, shared_off, adm_off, *out_off) = results[False]
    (ids_on, fed_on, cached_on, shared_on, adm_on, *out_on) = results[True]
    assert out_on == out_off
    # On: b waits until a has computed (and cached) all five blocks, then computes one token.
    prefill_steps = -(-len(prompt) // budget)
    assert all(step == {"a"} for step in ids_on[:prefill_steps])
    assert "b" in ids_on[prefill_steps]
    assert cached_on == 20 and adm_on == 1
    assert fed_on == len(prompt) + 1
    # Off: b computes blocks a is computing in the same steps.
    assert cached_off < 20 and shared_off == 0 and adm_off == 0
    assert shared_on == cached_on - cached_off  # counted: the hits b gained by waiting
    assert fed_off >= len(prompt) + 1 + 4
    if budget == 64:
        assert fed_off == 2 * len(prompt)  # halved by sharing


def _same_prompt_pair(seed):
    """Requests a and b with one 21-token prompt, submitted together, after the first schedule:
    a prefills, b waits for a's blocks."""
    rng = random.Random(seed)
    prompt = [rng.randrange(1, VOCAB) for _ in range(21)]
    sched, ex, pool, pc = make(budget=64, seqs=2)
    a, b = (Request(rid, list(prompt), SamplingParams(max_tokens=5)) for rid in ("a", "b"))
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    assert {s.request_id for s in out.seqs} == {"a"} and sched.waiting == [b]
    return prompt, sched, ex, pool, pc, a, b, out


@pytest.mark.parametrize("end", ["abort", "stop"])
def test_waiting_request_is_admitted_when_the_prefilling_one_goes_away(end):
    """The prefilling request ends while its step runs (its blocks are released, never cached):
    the request waiting for them is admitted at the next step and computes them itself."""
    prompt, sched, ex, pool, pc, a, b, out = _same_prompt_pair(22)
    getattr(sched, end)("a")  # mid-prefill
    sched.update(out, ex.execute(out))
    out = sched.schedule()
    assert {s.request_id for s in out.seqs} == {"b"}
    assert b.num_cached_tokens == 0 and b.num_inflight_shared_tokens == 0
    assert sched.num_inflight_shared_admissions == 0
    sched.update(out, ex.execute(out))
    run_until_done(sched, ex)
    assert b.output_tokens == expected(prompt, 5)
    assert all_released(pool, pc, sched)


def test_preempted_prefill_does_not_strand_the_waiting_request():
    """The prefilling request preempted while its step runs computes nothing any more: the waiting
    one is no longer held for it. FCFS re-admits the preempted one first, so the waiting one then
    waits for that recompute and still gets its blocks as a cache hit; both complete."""
    prompt, sched, ex, pool, pc, a, b, out = _same_prompt_pair(23)
    sched._preempt(a, sched.clock())  # what running out of blocks does
    sched.update(out, ex.execute(out))
    assert sched.waiting == [a, b]
    out = sched.schedule()
    assert {s.request_id for s in out.seqs} == {"a"}
    sched.update(out, ex.execute(out))
    run_until_done(sched, ex)
    assert a.output_tokens == b.output_tokens == expected(prompt, 5)
    assert a.num_preemptions == 1 and b.num_cached_tokens == 20
    assert all_released(pool, pc, sched)


def test_unrelated_requests_are_not_held_back_by_one_waiting_for_a_prefill():
    rng = random.Random(24)
    prompt = [rng.randrange(1, VOCAB) for _ in range(21)]
    other = [rng.randrange(1, VOCAB) for _ in range(13)]
    sched, ex, pool, pc = make(budget=64, seqs=4)
    reqs = [Request("a", list(prompt), SamplingParams(max_tokens=4)),
            Request("b", list(prompt) + [3, 4], SamplingParams(max_tokens=4)),  # shares a's 5 blocks: waits
            Request("c", other, SamplingParams(max_tokens=4)),  # FCFS after b, unrelated
            Request("d", list(prompt), SamplingParams(max_tokens=4), namespace="tenant2")]  # never shares with a
    for r in reqs:
        sched.add_request(r)
    out = sched.schedule()
    assert {s.request_id for s in out.seqs} == {"a", "c", "d"}
    assert [r.request_id for r in sched.waiting] == ["b"]
    sched.update(out, ex.execute(out))
    run_until_done(sched, ex)
    for r in reqs:
        assert r.output_tokens == expected(r.prompt_tokens, 4), r.request_id
    assert reqs[1].num_cached_tokens == 20 and reqs[3].num_cached_tokens == 0
    assert all_released(pool, pc, sched)


def bursts_with_shared_contexts(rng, n):
    """n requests in bursts (one per step, some empty); within a burst a request often repeats an
    earlier one's context plus a short instruction, as SPAgent's guess call does."""
    prefix = [rng.randrange(1, VOCAB) for _ in range(24)]
    bursts, i = [], 0
    while i < n:
        burst = []
        for _ in range(min(rng.choice([0, 1, 2, 3, 4]), n - i)):
            if burst and rng.random() < 0.5:
                prompt = burst[-1][1] + [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 6))]
            else:
                prompt = (prefix if rng.random() < 0.5 else []) + [rng.randrange(1, VOCAB)
                                                                  for _ in range(rng.randint(1, 60))]
            burst.append((f"r{i}", prompt, rng.randint(1, 20)))
            i += 1
        bursts.append(burst)
    return bursts


SHARING_CONFIGS = {
    "roomy": dict(num_blocks=400),
    "roomy_drafter": dict(num_blocks=400, drafter=True, k=4),
    "tight_pool": dict(num_blocks=36, budget=128),  # preempts and evicts
    "tight_pool_drafter": dict(num_blocks=28, drafter=True, k=3),
}


@pytest.mark.parametrize("name", sorted(SHARING_CONFIGS))
def test_inflight_sharing_is_lossless_against_sharing_off(name):
    """Requests with common contexts arriving together: the same tokens with sharing on and off
    (and the reference), no leaked blocks either way; with a roomy pool, fewer prompt tokens fed."""
    kw = dict(SHARING_CONFIGS[name])
    runs = {}
    for share in (False, True):
        drafter = RandomDrafter(1, 0.3) if kw.get("drafter") else None
        sched, ex, pool, pc = make(**{**kw, "drafter": drafter}, share_inflight=share)
        bursts = bursts_with_shared_contexts(random.Random(sum(map(ord, name))), 40)
        objs, fed = [], 0
        while bursts or sched.has_unfinished:
            for rid, prompt, n in (bursts.pop(0) if bursts else []):
                r = Request(rid, prompt, SamplingParams(max_tokens=n))
                sched.add_request(r)
                objs.append(r)
            out = sched.schedule()
            fed += sum(prompt_fed([s], len(sched.requests[s.request_id].prompt_tokens)) for s in out.seqs)
            sched.update(out, ex.execute(out))
        for r in objs:
            assert r.output_tokens == expected(r.prompt_tokens, r.sampling.max_tokens), r.request_id
        assert all_released(pool, pc, sched)
        runs[share] = ([r.output_tokens for r in objs], fed, sched.num_inflight_shared_tokens, sched.num_preemptions)
    assert runs[True][0] == runs[False][0]
    assert runs[True][2] > 0 and runs[False][2] == 0
    if name.startswith("roomy"):
        assert runs[True][1] < runs[False][1]
    else:
        assert runs[True][3] > 0
