"""The serving loop: runs scheduler steps on an executor, streams tokens, never dies of one request.

Thread model: `submit` and `cancel` may be called from any thread (the HTTP server's event loop, an
agent orchestrator); they only enqueue. Steps run on the loop's own thread (`start()`) or the
caller's (`step()`, `run_until_idle()`); only that thread touches the scheduler.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from agentinfer_jax.engine.step_batch import PREVIOUS_TOKEN, StepBatch
from agentinfer_jax.serving.metrics import ServingMetrics
from agentinfer_jax.serving.request import FinishReason, Request
from agentinfer_jax.serving.scheduler import Scheduler, SchedulerOutput

log = logging.getLogger(__name__)
_BLOCK_GAUGE_PERIOD_S = 0.05  # block gauges' refresh period while requests run


class Executor(Protocol):
    """Runs steps. An executor that also has `dispatch(batch) -> pending` (start without waiting)
    and `collect(pending) -> tokens` (the JAX engine) lets the loop overlap host and device."""

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
                 metrics: ServingMetrics | None = None, overlap: bool = True):
        """`overlap`: plan and dispatch step n+1 while step n runs, where the executor can."""
        self.scheduler = scheduler
        self.executor = executor
        self.overlap = overlap and hasattr(executor, "dispatch") and hasattr(executor, "collect")
        # The dispatched, uncollected step: (SchedulerOutput, pending, planning began, dispatched).
        self._inflight = None
        self._last_done_s: float | None = None  # last step's result on host, while busy (perf_counter)
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
        """Stops the loop's thread; every request it still holds (queued, waiting, running) gets
        its final event (finish_reason abort, with an error) and its blocks back in the pool."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._fail_all("the serving loop was shut down")

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
                except Exception as e:  # noqa: BLE001 - validated again (e.g. duplicate id), or its
                    # grammar failed to build: report to this request alone, keep serving
                    if cb is not None:
                        with contextlib.suppress(Exception):
                            cb(StreamEvent(arg.request_id, [], True, FinishReason.ABORT.value, error=str(e)))
            else:
                req = self.scheduler.abort(arg)
                if req is not None:
                    self._deliver_finish(req)

    def step(self) -> bool:
        """Runs one scheduler step; returns False when there was nothing to do.

        With overlap (an executor that can `dispatch` and `collect`), a call plans and dispatches
        step n+1 (`Scheduler.schedule_ahead`) before it waits for step n, so scheduling, batch
        building, detokenisation and streaming of one step run while the device computes the next.
        Steps that verify drafts are not planned ahead (their accepted counts decide the next feed).
        """
        self._drain_inbox()
        t_plan = time.perf_counter()
        if self._inflight is None:
            if not self.scheduler.has_unfinished:
                self._last_done_s = None  # idle: the next step's time starts at its planning
                return False
            out = self.scheduler.schedule()
            if out.empty:
                self._last_done_s = None
                self._update_gauges()
                return bool(self.scheduler.has_unfinished)
            if not self.overlap:
                self._apply(*self._execute(out, t_plan))
                return True
            self._inflight = self._dispatch(out, t_plan)
            return True
        out, pending, planned_s, dispatched_s = self._inflight
        ahead = self.scheduler.schedule_ahead(out)
        self._inflight = (self._dispatch(ahead, t_plan, planned_ahead=True)
                          if ahead is not None and not ahead.empty else None)
        try:
            new_tokens = self.executor.collect(pending)
            self._observe(out, planned_s, dispatched_s)
        except Exception:  # noqa: BLE001 - one bad request must not take the loop or its batch down
            log.exception("step failed; re-running its %d sequences one by one", len(out.seqs))
            if self._inflight is not None:  # it fed on the failed step's tokens: drop it
                with contextlib.suppress(Exception):
                    self.executor.collect(self._inflight[1])
                self._inflight = None
            out, new_tokens = self._isolate_failure(out)
        self._apply(out, new_tokens)
        return True

    def _execute(self, out: SchedulerOutput, planned_s: float) -> tuple[SchedulerOutput, dict[str, Sequence[int]]]:
        """A synchronous step (no overlap), isolating failures."""
        try:
            t0 = time.perf_counter()
            new_tokens = self.executor.execute(out)
            self._observe(out, planned_s, t0)
            return out, new_tokens
        except Exception:  # noqa: BLE001 - one bad request must not take the loop or its batch down
            log.exception("step failed; re-running its %d sequences one by one", len(out.seqs))
            return self._isolate_failure(out)

    def _dispatch(self, out: SchedulerOutput, planned_s: float, planned_ahead: bool = False):
        """Starts `out` on the executor: (out, pending, when its planning began) in flight, or None
        when it could not start (a step planned ahead is then planned again after the step in
        flight; any other is re-run one sequence at a time)."""
        try:
            t0 = time.perf_counter()
            return out, self.executor.dispatch(out), planned_s, t0
        except Exception:  # noqa: BLE001
            if planned_ahead:
                log.exception("dispatch of a step planned ahead failed; planning it again")
                return None
            log.exception("step failed; re-running its %d sequences one by one", len(out.seqs))
            self._apply(*self._isolate_failure(out))
            return None

    def _observe(self, out: SchedulerOutput, planned_s: float, dispatched_s: float) -> None:
        """Feeds the step's cost to the scheduler (the adaptive switch prices drafts with it).

        The cost is device time: from the step's dispatch (or the previous result, if later) to its
        result, so host stalls (another thread holding the GIL, a memory rebuild) before a rare
        verify step do not price a whole bucket. With overlap on, a verify step also reports the
        host time it exposed (from the previous result, or its planning after idling, to its
        dispatch), which a plain step hides behind the device."""
        now = time.perf_counter()
        busy_from = self._last_done_s if self._last_done_s is not None else planned_s
        exposed = (max(0.0, dispatched_s - busy_from)
                   if self.overlap and any(s.num_draft for s in out.seqs) else None)
        self.scheduler.observe_step(out, now - max(dispatched_s, busy_from), exposed)
        self._last_done_s = now

    def _apply(self, out: SchedulerOutput, new_tokens: dict[str, Sequence[int]]) -> None:
        """Updates the scheduler with an executed step and streams what it produced."""
        reqs = {s.request_id: r for s in out.seqs if (r := self.scheduler.requests.get(s.request_id)) is not None}
        before = {rid: (len(r.output_tokens), r.last_token_s) for rid, r in reqs.items()}
        finished = self.scheduler.update(out, new_tokens)
        for rid, req in reqs.items():
            n0, last = before[rid]
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
            req = self.scheduler.requests.get(seq.request_id)
            if req is None or req.done:
                continue
            if seq.tokens[:1] == (PREVIOUS_TOKEN,):  # planned ahead: its token is on the host by now
                seq = dataclasses.replace(seq, tokens=(req.all_tokens[seq.start_pos],) + seq.tokens[1:])
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
            try:
                busy = self.step()
            except Exception as e:  # noqa: BLE001 - a bug past the per-request isolation: the thread
                # must not die with requests waiting on it forever; end them and serve on.
                log.exception("serving loop step failed; ending the requests it holds")
                self._fail_all(f"serving loop error: {e}")
                continue
            if not busy:
                self._wake.wait(timeout=0.05)
                self._wake.clear()

    def _fail_all(self, error: str) -> None:
        """Ends every request the loop holds with a final event: queued ones, waiting and running
        ones (aborted, blocks released) and any finished but not yet delivered. The step in
        flight, if any, is collected and dropped."""
        if self._inflight is not None:
            with contextlib.suppress(Exception):
                self.executor.collect(self._inflight[1])
            self._inflight = None
        self._last_done_s = None
        while True:
            try:
                op, arg, cb = self._inbox.get_nowait()
            except queue.Empty:
                break
            if op == "add" and cb is not None:
                with contextlib.suppress(Exception):
                    cb(StreamEvent(arg.request_id, [], True, FinishReason.ABORT.value, error=error))
        for rid, req in list(self.scheduler.requests.items()):
            aborted = self.scheduler.abort(rid)
            self._deliver_finish(req, error=error if aborted is not None else None)
            self.scheduler.forget(rid)
        self._update_gauges()

    # ---- delivery --------------------------------------------------------------------------------

    def _check_stop_strings(self, req: Request, fresh: list[int]) -> str | None:
        """The output text so far, cut before a matched stop string; a match finishes the request
        with this step's tokens up to the one completing the match in its last event (so usage
        counts every emitted token). Tokens after it (accepted drafts) are dropped, as they would
        never have been generated one at a time."""
        if self.detokenize is None:
            return None
        text = self.detokenize(req.output_tokens)
        if not any(stop in text for stop in req.sampling.stop):
            return text
        n0 = len(req.output_tokens) - len(fresh)
        for m in range(1, len(fresh) + 1):  # the fewest of this step's tokens that complete a stop
            text = self.detokenize(req.output_tokens[:n0 + m])
            hits = [i for stop in req.sampling.stop if (i := text.find(stop)) >= 0]
            if hits:
                break
        del req.output_tokens[n0 + m:]
        del req.output_logprobs[len(req.output_tokens):]
        text = text[:min(hits)]
        req.stop_text = text
        if self.scheduler.stop(req.request_id) is None:  # finished by this step too (length, EOS)
            req.finish_reason = FinishReason.STOP  # the stop string came first
        self._deliver_finish(req, new=fresh[:m], text=text)
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
