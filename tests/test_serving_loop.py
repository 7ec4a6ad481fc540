"""The serving loop over the page oracle: streaming, stop strings, cancellation, failure isolation."""

from __future__ import annotations

import random
import threading

import pytest

from agentinfer_jax.cache import BlockPool, PrefixCache
from agentinfer_jax.serving.loop import ServingLoop
from agentinfer_jax.serving.request import Request, SamplingParams
from agentinfer_jax.serving.scheduler import Scheduler, SchedulerConfig, SessionRetention
from page_oracle import PageOracleExecutor, PipelinedOracleExecutor, next_token, reference_generate

VOCAB = 50


def make_loop(executor=None, detok=None):
    pool = BlockPool(64)
    sched = Scheduler(SchedulerConfig(block_size=4, max_num_seqs=8, max_tokens_per_step=32, max_model_len=200,
                                      vocab_size=VOCAB), pool, PrefixCache(4, pool))
    ex = executor or PageOracleExecutor(64, 4, VOCAB)
    return ServingLoop(sched, ex, detokenize=detok), pool


def detok(ids):
    return "".join(chr(ord("a") + i % 26) for i in ids)


def test_streamed_tokens_concatenate_to_the_reference():
    loop, pool = make_loop()
    events = {}
    for i in range(5):
        prompt = list(range(1, 10 + i))
        loop.submit(Request(f"r{i}", prompt, SamplingParams(max_tokens=12)),
                    lambda ev: events.setdefault(ev.request_id, []).append(ev))
    loop.run_until_idle()
    for i in range(5):
        evs = events[f"r{i}"]
        assert evs[-1].finished and sum(e.finished for e in evs) == 1
        streamed = [t for e in evs for t in e.new_tokens]
        assert streamed == reference_generate(list(range(1, 10 + i)), 12, VOCAB)
    s = loop.metrics.summary()
    assert s["requests"] == 5 and s["mean_ttft_s"] >= 0
    assert b"agentinfer_output_tokens_total 60.0" in loop.metrics.prometheus_text()


def test_stop_string_cuts_text_and_frees_blocks():
    loop, pool = make_loop(detok=detok)
    prompt = [1, 2, 3, 4, 5]
    ref_text = detok(reference_generate(prompt, 40, VOCAB))
    stop = ref_text[7:9]
    final = []
    loop.submit(Request("s", prompt, SamplingParams(max_tokens=40, stop=(stop,))),
                lambda ev: final.append(ev) if ev.finished else None)
    loop.run_until_idle()
    assert final[0].finish_reason == "stop"
    assert final[0].text == ref_text[: ref_text.find(stop)]
    assert pool.num_used == loop.scheduler.prefix_cache.num_evictable()


def test_cancel_from_another_thread_and_failing_pieces_do_not_stop_serving():
    class FlakyExecutor(PageOracleExecutor):
        def execute(self, out):
            if any(s.request_id == "boom" for s in out.seqs):
                raise RuntimeError("device fault")
            return super().execute(out)

    loop, pool = make_loop(FlakyExecutor(64, 4, VOCAB))
    got = {}

    def cb(ev):
        if ev.finished:
            got[ev.request_id] = ev

    def bad_cb(ev):
        raise OSError("client went away")

    loop.submit(Request("boom", [1, 2, 3], SamplingParams(max_tokens=5)), cb)
    loop.submit(Request("gone", [4, 5, 6], SamplingParams(max_tokens=30)), bad_cb)
    loop.submit(Request("cancelled", [7, 8, 9], SamplingParams(max_tokens=100)), cb)
    loop.submit(Request("ok", [2, 4, 6], SamplingParams(max_tokens=8)), cb)
    t = threading.Thread(target=loop.cancel, args=("cancelled",))
    t.start()
    t.join()
    loop.run_until_idle()
    assert got["boom"].finish_reason == "abort" and "device fault" in got["boom"].error
    assert got["cancelled"].finish_reason == "abort"
    assert got["ok"].finish_reason == "length"
    assert [t for t in loop.metrics.finished if t.request_id == "ok"][0].output_tokens == 8
    loop.scheduler.prefix_cache.evict(pool.num_used)
    assert pool.num_used == 0


def test_background_thread_serves_and_shuts_down():
    loop, _ = make_loop()
    done = threading.Event()
    out = []
    loop.start()
    try:
        loop.submit(Request("bg", [3, 1, 4], SamplingParams(max_tokens=6)),
                    lambda ev: (out.extend(ev.new_tokens), ev.finished and done.set()))
        assert done.wait(30)
    finally:
        loop.shutdown()
    assert out == reference_generate([3, 1, 4], 6, VOCAB)


@pytest.mark.parametrize("overlap", [False, True])
def test_inflight_shared_prefill_is_counted_in_the_metrics(overlap):
    """Two calls over one context submitted together: the second waits for the first's prefill
    (also while steps are planned ahead) and the metrics count the prompt tokens it so shared."""
    pool = BlockPool(64)
    sched = Scheduler(SchedulerConfig(block_size=4, max_num_seqs=4, max_tokens_per_step=32, max_model_len=200,
                                      vocab_size=VOCAB), pool, PrefixCache(4, pool))
    loop = ServingLoop(sched, PipelinedOracleExecutor(64, 4, VOCAB), overlap=overlap)
    prompt = [(7 * i) % (VOCAB - 1) + 1 for i in range(21)]  # five full blocks + 1 token
    reqs = [Request("a", list(prompt), SamplingParams(max_tokens=6)),
            Request("b", list(prompt) + [9, 8], SamplingParams(max_tokens=6))]
    for r in reqs:
        loop.submit(r)
    loop.run_until_idle()
    for r in reqs:
        assert r.output_tokens == reference_generate(r.prompt_tokens, 6, VOCAB)
    assert reqs[1].num_cached_tokens == 20
    assert loop.metrics.summary()["inflight_shared_tokens"] == 20
    assert b"agentinfer_inflight_shared_prompt_tokens_total 20.0" in loop.metrics.prometheus_text()
    sched.prefix_cache.evict(pool.num_used)
    assert pool.num_used == 0


# ---- host/device overlap: step n+1 planned and dispatched before step n's tokens are on the host ----

def _overlap_run(overlap: bool, seed: int, blocks: int = 22):
    """Many requests (shared prefixes, stop ids, stop strings, cancels, a pool small enough to
    preempt) through the loop; returns each request's streamed tokens, finish reason, the pool."""
    rng = random.Random(seed)
    pool = BlockPool(blocks)
    sched = Scheduler(SchedulerConfig(block_size=4, max_num_seqs=6, max_tokens_per_step=24, max_model_len=120,
                                      vocab_size=VOCAB, eos_token_ids=(7,)), pool, PrefixCache(4, pool))
    ex = PipelinedOracleExecutor(blocks, 4, VOCAB)
    loop = ServingLoop(sched, ex, detokenize=detok, overlap=overlap)
    shared = [rng.randrange(1, VOCAB) for _ in range(9)]
    streams, finals, specs = {}, {}, {}
    for i in range(24):
        prompt = (shared if i % 3 else []) + [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 14))]
        sp = SamplingParams(max_tokens=rng.randint(1, 30), ignore_eos=i % 4 == 0,
                            stop=("q",) if i % 5 == 0 else ())
        cancel_after = rng.randint(1, 6) if i % 7 == 3 else None
        specs[f"r{i}"] = (prompt, sp, cancel_after)

        def cb(ev, rid=f"r{i}", cancel_after=cancel_after):
            streams.setdefault(rid, []).extend(ev.new_tokens)
            if ev.finished:
                finals[rid] = ev
            elif cancel_after is not None and len(streams[rid]) >= cancel_after:
                loop.cancel(rid)

        loop.submit(Request(f"r{i}", prompt, sp), cb)
    loop.run_until_idle()
    return streams, finals, specs, pool, sched, ex


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_overlap_streams_exactly_what_the_synchronous_loop_streams(seed):
    sync = _overlap_run(False, seed)
    over = _overlap_run(True, seed)
    streams, finals, specs, pool, sched, ex = over
    assert ex.placeholders > 0, "no step was planned ahead"
    assert sched.num_preemptions > 0  # preempted (synchronously) between steps planned ahead
    for rid, (prompt, sp, cancel_after) in specs.items():
        stops = () if sp.ignore_eos else (7,)
        ref = reference_generate(prompt, sp.max_tokens, VOCAB, stop_ids=stops)
        got = streams.get(rid, [])
        assert got == ref[:len(got)], rid  # every streamed token is the model's
        if cancel_after is None:
            assert finals[rid].text == sync[1][rid].text and finals[rid].finish_reason == sync[1][rid].finish_reason
            if "q" not in (finals[rid].text or "") and sp.stop == ():
                assert got == ref, rid
        else:
            assert finals[rid].finish_reason in ("abort", "length", "stop")
    sched.prefix_cache.evict(pool.num_used)
    assert pool.num_used == 0  # nothing leaked, whatever ended mid-flight


def test_overlap_replay_feeds_the_record_not_the_models_token():
    """A replayed request emits its record; planned ahead, it must feed the record too, so its KV
    (read back by a later request sharing that prefix) is the record's."""
    pool = BlockPool(64)
    sched = Scheduler(SchedulerConfig(block_size=4, max_num_seqs=4, max_tokens_per_step=16, max_model_len=100,
                                      vocab_size=VOCAB), pool, PrefixCache(4, pool))
    ex = PipelinedOracleExecutor(64, 4, VOCAB)
    loop = ServingLoop(sched, ex, overlap=True)
    prompt, record = [3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2]
    rec = Request("rec", prompt, SamplingParams(max_tokens=len(record)), forced_output=record)
    loop.submit(rec)
    loop.run_until_idle()
    assert rec.output_tokens == record
    assert ex.placeholders == 0  # the record, never a placeholder, was fed
    follow = Request("next", prompt + record, SamplingParams(max_tokens=5))
    got = []
    loop.submit(follow, lambda ev: got.extend(ev.new_tokens))
    loop.run_until_idle()
    assert follow.num_cached_tokens >= 12  # read the replayed blocks back from the prefix cache
    assert got == reference_generate(prompt + record, 5, VOCAB)


def test_overlap_dispatch_failure_isolates_the_bad_request():
    class FlakyPipelined(PipelinedOracleExecutor):
        def dispatch(self, out):
            if any(s.request_id == "boom" for s in out.seqs):
                raise RuntimeError("device fault")
            return super().dispatch(out)

        def execute(self, out):
            if any(s.request_id == "boom" for s in out.seqs):
                raise RuntimeError("device fault")
            return super().execute(out)

    pool = BlockPool(64)
    sched = Scheduler(SchedulerConfig(block_size=4, max_num_seqs=8, max_tokens_per_step=32, max_model_len=200,
                                      vocab_size=VOCAB), pool, PrefixCache(4, pool))
    loop = ServingLoop(sched, FlakyPipelined(64, 4, VOCAB), overlap=True)
    got, final = {}, {}
    for rid, prompt, n in (("ok1", [1, 2, 3], 20), ("boom", [4, 5, 6], 5), ("ok2", [7, 8, 9], 12)):
        loop.submit(Request(rid, prompt, SamplingParams(max_tokens=n)),
                    lambda ev, rid=rid: (got.setdefault(rid, []).extend(ev.new_tokens),
                                         ev.finished and final.setdefault(rid, ev)))
    loop.run_until_idle()
    assert final["boom"].finish_reason == "abort" and "device fault" in final["boom"].error
    assert got["ok1"] == reference_generate([1, 2, 3], 20, VOCAB)
    assert got["ok2"] == reference_generate([7, 8, 9], 12, VOCAB)
    sched.prefix_cache.evict(pool.num_used)
    assert pool.num_used == 0


def test_step_costs_count_device_time_and_a_verify_steps_exposed_host_time(monkeypatch):
    """What the loop reports to the cost model, on a scripted clock: a step's device time runs from
    its dispatch (or the previous result, if later) to its result, so a host stall before dispatch
    never prices a step; a verify step also reports the host time it exposed after the previous
    result (overlap hides it behind a plain step, which reports none)."""
    import types

    import agentinfer_jax.serving.loop as loop_module
    from agentinfer_jax.engine.step_batch import StepSeq

    seen = []
    scheduler = types.SimpleNamespace(observe_step=lambda out, s, exposed=None: seen.append((s, exposed)))
    executor = types.SimpleNamespace(dispatch=None, collect=None)
    loop = ServingLoop(scheduler, executor, overlap=True)
    plain = types.SimpleNamespace(seqs=[StepSeq("a", 5, (1,), 0, (1,))])
    verify = types.SimpleNamespace(seqs=[StepSeq("a", 6, (1, 2, 3), 2, (1,))])
    clock = iter([0.30, 0.60, 0.70, 1.50])
    monkeypatch.setattr(loop_module.time, "perf_counter", lambda: next(clock))
    loop._observe(plain, planned_s=0.0, dispatched_s=0.10)  # first step: busy from its planning
    loop._observe(verify, planned_s=0.25, dispatched_s=0.50)  # host stalled 0.2 s after A's result
    loop._observe(plain, planned_s=0.52, dispatched_s=0.55)  # dispatched while B ran
    loop._observe(verify, planned_s=0.70, dispatched_s=1.40)  # stalled 0.7 s: exposed, not priced
    assert seen == [pytest.approx((0.20, None)), pytest.approx((0.10, 0.20)), pytest.approx((0.10, None)),
                    pytest.approx((0.10, 0.70))]
    seen.clear()
    loop.overlap = False  # without overlap nothing is hidden, so nothing is reported as exposed
    monkeypatch.setattr(loop_module.time, "perf_counter", lambda: 2.0)
    loop._observe(verify, planned_s=1.6, dispatched_s=1.9)
    assert seen == [pytest.approx((0.10, None))]


# ---- robustness: faulty drafters, stops inside accepted drafts, loop-level failures, shutdown ----

class _OracleDrafter:
    """Proposes the page oracle's own continuation (every draft accepted) unless `fault(rid)` names
    a fault for that request: the method that raises ("begin", "extend", "propose", "end") or the
    garbage `propose` returns ("oov", "negative", "float", "str", "none")."""

    def __init__(self, fault=lambda rid: None, wrong_every: int = 0):
        self.ctx, self.fault, self.wrong_every, self.calls = {}, fault, wrong_every, 0

    def _maybe_raise(self, rid, method):
        if self.fault(rid) == method:
            raise RuntimeError(f"drafter {method} bug")

    def begin(self, rid, prompt, session_id=None):
        self._maybe_raise(rid, "begin")
        assert rid not in self.ctx
        self.ctx[rid] = list(prompt)

    def extend(self, rid, toks):
        self._maybe_raise(rid, "extend")
        self.ctx[rid] += list(toks)

    def end(self, rid):
        self._maybe_raise(rid, "end")
        del self.ctx[rid]

    def propose(self, rid, k):
        self._maybe_raise(rid, "propose")
        garbage = {"oov": [VOCAB + 3] * k, "negative": [-1] * k, "float": [1.5] * k, "str": ["x"] * k,
                   "none": None}
        if self.fault(rid) in garbage:
            return garbage[self.fault(rid)]
        ctx, out = list(self.ctx[rid]), []
        for _ in range(k):
            self.calls += 1
            t = next_token(ctx, VOCAB)
            if self.wrong_every and self.calls % self.wrong_every == 0:
                t = (t + 1) % VOCAB  # a rejected draft
            out.append(t)
            ctx.append(t)
        return out


def _drafting_loop(drafter, blocks=64, overlap=True, detok_fn=None, max_model_len=200, retention=False,
                   eos=()):
    pool = BlockPool(blocks)
    sched = Scheduler(SchedulerConfig(block_size=4, max_num_seqs=6, max_tokens_per_step=24,
                                      max_model_len=max_model_len, vocab_size=VOCAB, num_draft_tokens=4,
                                      eos_token_ids=eos),
                      pool, PrefixCache(4, pool), drafter=drafter,
                      retention=SessionRetention(pool, ttl_s=100.0) if retention else None)
    loop = ServingLoop(sched, PipelinedOracleExecutor(blocks, 4, VOCAB), detokenize=detok_fn, overlap=overlap)
    return loop, sched, pool


def _collect(loop, events, rid, req):
    loop.submit(req, lambda ev: events.setdefault(rid, []).append(ev))


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("fault", ["propose", "oov", "negative", "float", "str", "none", "begin", "extend",
                                   "end"])
def test_a_faulty_drafter_costs_only_its_request_its_drafts(fault, overlap):
    """A drafter that raises, or proposes ids outside the vocabulary, negative ids (-1 is the
    engine's PREVIOUS_TOKEN), non-ints or None, for one request: that request decodes without drafts
    and its output is the model's; the others still draft; nothing leaks; the loop serves on."""
    drafter = _OracleDrafter(lambda rid: fault if rid == "bad" else None)
    loop, sched, pool = _drafting_loop(drafter, overlap=overlap)
    events = {}
    prompts = {"bad": [1, 2, 3, 4, 5], "good": [6, 7, 8, 9]}
    for rid, prompt in prompts.items():
        _collect(loop, events, rid, Request(rid, prompt, SamplingParams(max_tokens=15)))
    loop.run_until_idle()
    for rid, prompt in prompts.items():
        evs = events[rid]
        assert [e.finished for e in evs].count(True) == 1 and evs[-1].finished
        assert evs[-1].finish_reason == "length" and evs[-1].error is None
        assert [t for e in evs for t in e.new_tokens] == reference_generate(prompt, 15, VOCAB), rid
    assert sched.num_drafter_errors >= 1
    assert loop.metrics.finished[-1].accepted > 0 or loop.metrics.finished[0].accepted > 0  # "good" drafted
    # operators see it: the faulty request alone is counted
    assert {m.request_id for m in loop.metrics.finished if m.drafter_failed} == {"bad"}
    assert b"agentinfer_drafter_failed_requests_total 1.0" in loop.metrics.prometheus_text()
    assert not drafter.ctx or fault == "end"  # every begun request's state ended
    _collect(loop, events, "after", Request("after", [3, 3, 3], SamplingParams(max_tokens=6)))
    loop.run_until_idle()
    assert [t for e in events["after"] for t in e.new_tokens] == reference_generate([3, 3, 3], 6, VOCAB)
    sched.prefix_cache.evict(pool.num_used)
    assert pool.num_used == 0


def test_a_stop_string_inside_accepted_drafts_drops_the_tokens_after_it():
    """All drafts accepted, a stop string completed by a token in the middle of them: the tokens
    after it are neither streamed, kept nor counted (as without drafts)."""
    prompt = [1, 2, 3, 4, 5]
    ref = reference_generate(prompt, 40, VOCAB)
    ref_text = detok(ref)
    stop = ref_text[5:7]
    n_stop = ref_text.find(stop) + len(stop)  # tokens until the stop string is complete (1 char each)
    loop, sched, pool = _drafting_loop(_OracleDrafter(), overlap=False, detok_fn=detok)
    events = {}
    req = Request("s", prompt, SamplingParams(max_tokens=40, stop=(stop,)))
    _collect(loop, events, "s", req)
    loop.run_until_idle()
    evs = events["s"]
    assert req.num_accepted > 0 and n_stop < len([t for e in evs for t in e.new_tokens]) + 4  # drafts did land
    assert [t for e in evs for t in e.new_tokens] == ref[:n_stop]
    assert req.output_tokens == ref[:n_stop]
    assert evs[-1].finished and evs[-1].finish_reason == "stop" and evs[-1].text == ref_text[:ref_text.find(stop)]
    assert loop.metrics.finished[-1].output_tokens == n_stop
    sched.prefix_cache.evict(pool.num_used)
    assert pool.num_used == 0


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_drafts_under_block_pressure_with_faults_cancels_and_sessions(seed, overlap):
    """A pool small enough to preempt while verifying drafts, with the prefix cache, session
    retention (sessions reused by concurrent calls), stop ids, stop strings, max_tokens reaching
    max_model_len exactly, cancels (also of preempted requests), partly rejected drafts and a
    drafter that fails for some requests: every token streamed is the model's, each request gets
    exactly one final event, and every block comes back."""
    rng = random.Random(seed)
    max_len = 40
    drafter = _OracleDrafter(lambda rid: {"r3": "propose", "r8": "extend", "r13": "oov"}.get(rid), wrong_every=5)
    loop, sched, pool = _drafting_loop(drafter, blocks=14, overlap=overlap, detok_fn=detok, max_model_len=max_len,
                                       retention=True, eos=(7,))
    shared = [rng.randrange(1, VOCAB) for _ in range(7)]
    streams, finals, specs = {}, {}, {}
    for i in range(18):
        prompt = (shared if i % 2 else []) + [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 10))]
        sp = SamplingParams(max_tokens=rng.choice([1, 5, 20, max_len, max_len - len(prompt)]), ignore_eos=i % 3 == 0,
                            stop=("q",) if i % 5 == 0 else ())
        cancel_after = rng.randint(1, 5) if i % 6 == 1 else None
        specs[f"r{i}"] = (prompt, sp, cancel_after)

        def cb(ev, rid=f"r{i}", cancel_after=cancel_after):
            assert rid not in finals, "an event after the final one"
            streams.setdefault(rid, []).extend(ev.new_tokens)
            if ev.finished:
                finals[rid] = ev
            elif cancel_after is not None and len(streams[rid]) >= cancel_after:
                loop.cancel(rid)

        loop.submit(Request(f"r{i}", prompt, sp, session_id=f"s{i % 3}"), cb)
    loop.cancel("r17")  # possibly preempted or waiting by then
    steps = 0
    while loop.step():
        steps += 1
        assert steps < 5000, "stalled"
    assert sched.num_preemptions > 0 and sched.num_drafter_errors >= 1
    for rid, (prompt, sp, cancel_after) in specs.items():
        ref = reference_generate(prompt, min(sp.max_tokens, max_len - len(prompt)), VOCAB,
                                 stop_ids=() if sp.ignore_eos else (7,))
        got = streams.get(rid, [])
        assert got == ref[:len(got)], rid
        if cancel_after is None and rid != "r17":
            if sp.stop:
                text = detok(ref)
                assert finals[rid].text == text[:text.find("q")] if "q" in text else got == ref, rid
            else:
                assert got == ref and finals[rid].finish_reason in ("stop", "length"), rid
    assert set(finals) == set(specs)
    assert not drafter.ctx
    assert loop.metrics.summary()["requests"] == len(specs)
    sched.retention.clear()
    sched.prefix_cache.evict(pool.num_used)
    assert pool.num_used == 0


def test_a_step_bug_past_the_isolation_ends_its_requests_and_the_thread_serves_on():
    """An executor breaking its contract (more tokens than drafts) makes Scheduler.update raise
    outside the engine-failure isolation: the loop's thread must not die with the request waiting
    forever; it ends what it holds with an error and serves the next request."""
    class Garbled(PageOracleExecutor):
        def execute(self, out):
            res = super().execute(out)
            if "bad" in res:
                res["bad"] = res["bad"] * 3
            return res

    loop, pool = make_loop(Garbled(64, 4, VOCAB))
    finals = {}
    done = {rid: threading.Event() for rid in ("bad", "ok")}

    def cb(ev):
        if ev.finished:
            finals[ev.request_id] = ev
            done[ev.request_id].set()

    loop.start()
    try:
        loop.submit(Request("bad", [1, 2, 3], SamplingParams(max_tokens=5)), cb)
        assert done["bad"].wait(10), "the request was never ended"
        assert finals["bad"].finish_reason == "abort" and "serving loop error" in finals["bad"].error
        assert loop.is_running
        loop.submit(Request("ok", [2, 4, 6], SamplingParams(max_tokens=8)), cb)
        assert done["ok"].wait(10)
    finally:
        loop.shutdown()
    assert finals["ok"].finish_reason == "length"
    assert [t.output_tokens for t in loop.metrics.finished if t.request_id == "ok"] == [8]
    loop.scheduler.prefix_cache.evict(pool.num_used)
    assert pool.num_used == 0


@pytest.mark.parametrize("overlap", [False, True])
def test_shutdown_ends_every_request_it_holds(overlap):
    """Requests running, waiting and still queued when the loop shuts down each get one final
    event (abort, with an error); their blocks come back; the loop serves again once restarted."""
    pool = BlockPool(64)
    sched = Scheduler(SchedulerConfig(block_size=4, max_num_seqs=2, max_tokens_per_step=32, max_model_len=200,
                                      vocab_size=VOCAB), pool, PrefixCache(4, pool))
    loop = ServingLoop(sched, PipelinedOracleExecutor(64, 4, VOCAB), overlap=overlap)
    events = {}
    for i in range(4):
        _collect(loop, events, f"r{i}", Request(f"r{i}", [1 + i, 2, 3], SamplingParams(max_tokens=50)))
    loop.step()
    loop.step()
    _collect(loop, events, "queued", Request("queued", [5, 5, 5], SamplingParams(max_tokens=5)))
    assert len(sched.running) == 2 and len(sched.waiting) == 2
    loop.shutdown()
    for rid in ("r0", "r1", "r2", "r3", "queued"):
        finals = [e for e in events[rid] if e.finished]
        assert len(finals) == 1 and finals[0].finish_reason == "abort" and "shut down" in finals[0].error, rid
    assert not sched.requests and not sched.has_unfinished
    assert loop.metrics.summary()["requests"] == 4  # the queued one never reached the scheduler
    sched.prefix_cache.evict(pool.num_used)
    assert pool.num_used == 0
    _collect(loop, events, "later", Request("later", [3, 1, 4], SamplingParams(max_tokens=6)))
    loop.run_until_idle()
    assert [t for e in events["later"] for t in e.new_tokens] == reference_generate([3, 1, 4], 6, VOCAB)
