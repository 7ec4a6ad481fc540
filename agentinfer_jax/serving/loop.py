"""The serving loop: runs scheduler steps on an executor, streams tokens, never dies of one request.

Thread model: `submit` and `cancel` may be called from any thread (the HTTP server's event loop, an
agent orchestrator); they only enqueue. Steps run on the loop's own thread (`start()`) or the
caller's (`step()`, `run_until_idle()`); only that thread touches the scheduler.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from agentinfer_jax.engine.step_batch import StepBatch
from agentinfer_jax.serving.metrics import ServingMetrics
from agentinfer_jax.serving.request import FinishReason, Request
from agentinfer_jax.serving.scheduler import Scheduler, SchedulerOutput

log = logging.getLogger(__name__)
_BLOCK_GAUGE_PERIOD_S = 0.05  # block gauges' refresh period while requests run


class Executor(Protocol):
    def execute(self, batch: StepBatch) -> dict[str, Sequence[int]]: ...


@dataclasses.dataclass
class StreamEvent:
    """New tokens of one request; `finished` on its last event."""

    request_id: str
    new_tokens: list[int]
    finished: bool = False
    finish_reason: str | None = None
    text: str | None = None  # full output text so far, cut before a matched stop string
    error: str | None = None


Callback = Callable[[StreamEvent], None]


class ServingLoop:
    def __init__(self, scheduler: Scheduler, executor: Executor,
                 detokenize: Callable[[Sequence[int]], str] | None = None,
                 metrics: ServingMetrics | None = None):
        self.scheduler = scheduler
        self.executor = executor
        self.detokenize = detokenize
        self.metrics = metrics or ServingMetrics()
        self._inbox: queue.Queue = queue.Queue()
        self._callbacks: dict[str, Callback | None] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._block_gauges_s = -float("inf")  # when _block_gauges was last counted (monotonic)
        self._block_gauges = (0, 0)  # (blocks in use, evictable cached blocks)

    # ---- any thread ----------------------------------------------------------------------------

    def submit(self, req: Request, callback: Callback | None = None) -> None:
        """Queues a request; raises InvalidRequestError at once for bad input."""
        req.validate(self.scheduler.config.vocab_size, self.scheduler.config.max_model_len)
        self._inbox.put(("add", req, callback))
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id, None))
        self._wake.set()

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="serving-loop", daemon=True)
            self._thread.start()

    @property
    def is_running(self) -> bool:
        """True while the background serving thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # ---- loop thread ---------------------------------------------------------------------------

    def _drain_inbox(self) -> None:
        changed = False
        while True:
            try:
                op, arg, cb = self._inbox.get_nowait()
            except queue.Empty:
                if changed:  # added or cancelled with no step to follow: gauges must not go stale
                    self._update_gauges()
                return
            changed = True
            if op == "add":
                try:
                    self.scheduler.add_request(arg)
                    self._callbacks[arg.request_id] = cb
                except ValueError as e:  # validated again (e.g. duplicate id): report, keep serving
                    if cb is not None:
                        cb(StreamEvent(arg.request_id, [], True, FinishReason.ABORT.value, error=str(e)))
            else:
                req = self.scheduler.abort(arg)
                if req is not None:
                    self._deliver_finish(req)

    def step(self) -> bool:
        """Runs one scheduler step; returns False when there was nothing to do."""
        self._drain_inbox()
        if not self.scheduler.has_unfinished:
            return False
        out = self.scheduler.schedule()
        if out.empty:
            self._update_gauges()
            return bool(self.scheduler.has_unfinished)
        reqs = {s.request_id: self.scheduler.requests[s.request_id] for s in out.seqs}
        before = {rid: (len(r.output_tokens), r.last_token_s) for rid, r in reqs.items()}
        try:
            t0 = time.perf_counter()
            new_tokens = self.executor.execute(out)
            self.scheduler.observe_step(out, time.perf_counter() - t0)
        except Exception:  # noqa: BLE001 - one bad request must not take the loop or its batch down
            log.exception("step failed; re-running its %d sequences one by one", len(out.seqs))
            out, new_tokens = self._isolate_failure(out)
        finished = self.scheduler.update(out, new_tokens)
        for s in out.seqs:
            req = reqs[s.request_id]
            n0, last = before[req.request_id]
            fresh = req.output_tokens[n0:]
            if not fresh:
                continue
            if last is not None and req.last_token_s is not None:
                self.metrics.on_tokens(req.last_token_s - last)
            text = self._check_stop_strings(req, fresh)
            if req.done:
                continue  # delivered below or by stop handling
            self._emit(StreamEvent(req.request_id, fresh, text=text))
        for req in finished:
            self._deliver_finish(req, new=req.output_tokens[before[req.request_id][0]:])
        self._update_gauges()
        return True

    def _update_gauges(self) -> None:
        """Blocks in use exclude those only the prefix cache holds (evictable: free on demand).

        Counting those walks the cache (~0.4 ms per 20k cached blocks), so while requests keep
        running the block counts are refreshed at most every `_BLOCK_GAUGE_PERIOD_S`; whenever the
        scheduler has nothing left to run (the state a scrape must never get wrong), at once.
        """
        sched = self.scheduler
        now = time.monotonic()
        if not sched.has_unfinished or now - self._block_gauges_s >= _BLOCK_GAUGE_PERIOD_S:
            self._block_gauges_s = now
            evictable = sched.prefix_cache.num_evictable() if sched.prefix_cache is not None else 0
            self._block_gauges = (sched.pool.num_used - evictable, evictable)
        self.metrics.on_state(*self._block_gauges, sched.pool.num_blocks - 1, len(sched.running),
                              len(sched.waiting))

    def _isolate_failure(self, out: SchedulerOutput) -> tuple[SchedulerOutput, dict[str, Sequence[int]]]:
        """Runs each sequence of a failed step alone; aborts only those that fail by themselves."""
        ok, tokens = [], {}
        for seq in out.seqs:
            try:
                tokens.update(self.executor.execute(SchedulerOutput([seq], [], 0)))
                ok.append(seq)
            except Exception as e:  # noqa: BLE001
                req = self.scheduler.abort(seq.request_id)
                if req is not None:
                    self._deliver_finish(req, error=f"engine error: {e}")
        return SchedulerOutput(ok, out.preempted, out.num_waiting), tokens

    def run_until_idle(self) -> None:
        while self.step():
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.step():
                self._wake.wait(timeout=0.05)
                self._wake.clear()

    # ---- delivery --------------------------------------------------------------------------------

    def _check_stop_strings(self, req: Request, fresh: list[int]) -> str | None:
        """The output text so far, cut before a matched stop string; a match finishes the request
        with this step's tokens (`fresh`) in its last event, so usage counts every emitted token."""
        if self.detokenize is None:
            return None
        text = self.detokenize(req.output_tokens)
        for stop in req.sampling.stop:
            idx = text.find(stop)
            if idx >= 0:
                text = text[:idx]
                req.stop_text = text
                self.scheduler.stop(req.request_id)
                self._deliver_finish(req, new=fresh, text=text)
                return text
        return text

    def _emit(self, ev: StreamEvent) -> None:
        cb = self._callbacks.get(ev.request_id)
        if cb is not None:
            try:
                cb(ev)
            except Exception:  # noqa: BLE001 - a broken client callback must not stop serving
                log.exception("stream callback failed; cancelling %s", ev.request_id)
                self._callbacks[ev.request_id] = None
                req = self.scheduler.abort(ev.request_id)
                if req is not None:
                    self._deliver_finish(req)

    def _deliver_finish(self, req: Request, new: list[int] | None = None, text: str | None = None,
                        error: str | None = None) -> None:
        if req.request_id not in self._callbacks:
            return  # already delivered
        if text is None and self.detokenize is not None:
            text = req.stop_text if req.stop_text is not None else self.detokenize(req.output_tokens)
        self._emit(StreamEvent(req.request_id, new or [], True,
                               req.finish_reason.value if req.finish_reason else None, text, error))
        self._callbacks.pop(req.request_id, None)
        self.metrics.on_finish(req)
        self.scheduler.forget(req.request_id)
