"""The serving loop over the page oracle: streaming, stop strings, cancellation, failure isolation."""

from __future__ import annotations

import threading

from agentinfer_jax.cache import BlockPool, PrefixCache
from agentinfer_jax.serving.loop import ServingLoop
from agentinfer_jax.serving.request import Request, SamplingParams
from agentinfer_jax.serving.scheduler import Scheduler, SchedulerConfig
from page_oracle import PageOracleExecutor, reference_generate

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
