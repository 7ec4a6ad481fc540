"""Replays agent sessions through the real scheduler on a virtual clock.

Two executors share everything but the forward pass:
- `SimulatedExecutor`: advances the clock by a `StepCostModel`'s prediction for the step
  (paper-scale sweeps on 2 CPU cores) and returns placeholder tokens;
- `TimedEngineExecutor`: runs the JAX engine for real and advances the clock by the measured step
  time (cost and cache behaviour are real).
In both, the scheduler's `update` forces the emitted tokens to the record (`forced_output`), so the
text follows the trace.
Both go through the same `Scheduler`, `BlockPool` and `PrefixCache`; the simulator re-implements
neither. Tool calls take simulated time (no sleeping), so sessions interleave as in production.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from agentinfer_jax.engine.step_batch import StepBatch
from agentinfer_jax.serving.request import Request, SamplingParams
from agentinfer_jax.serving.scheduler import Scheduler
from agentinfer_jax.workloads.cost_model import StepCostModel, StepFeatures
from agentinfer_jax.workloads.sessions import TokenizedSession


class VirtualClock:
    """Simulated seconds; the scheduler reads it through `__call__`."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


def placeholder_tokens(batch: StepBatch) -> dict[str, list[int]]:
    """A stand-in model token for every sampling sequence; the scheduler's update replaces it by the
    recorded continuation (`forced_output`), so the simulator needs no model and no replay logic."""
    return {s.request_id: [0] for s in batch.seqs if s.samples}


class SimulatedExecutor:
    def __init__(self, cost_model: StepCostModel, clock: VirtualClock):
        self.cost_model = cost_model
        self.clock = clock
        self.busy_s = 0.0

    def execute(self, batch: StepBatch) -> dict[str, list[int]]:
        dt = float(self.cost_model.predict(StepFeatures.from_scheduler_output(batch)))
        self.clock.advance(dt)
        self.busy_s += dt
        return placeholder_tokens(batch)


class TimedEngineExecutor:
    def __init__(self, engine, clock: VirtualClock):
        self.engine = engine
        self.clock = clock
        self.busy_s = 0.0
        self.samples: list[tuple[StepFeatures, float]] = []  # (features, measured seconds)

    def execute(self, batch: StepBatch) -> dict[str, list[int]]:
        t0 = time.perf_counter()
        result = self.engine.execute(batch)
        dt = time.perf_counter() - t0
        self.samples.append((StepFeatures.from_scheduler_output(batch), dt))
        self.clock.advance(dt)
        self.busy_s += dt
        return result


@dataclasses.dataclass
class CallResult:
    session_id: str
    index: int
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    ready_s: float  # when the agent issued the call
    finish_s: float
    queue_s: float  # ready -> first admission
    preemptions: int

    @property
    def latency_s(self) -> float:
        return self.finish_s - self.ready_s


@dataclasses.dataclass
class WorkloadResult:
    calls: list[CallResult]
    session_latency_s: dict[str, float]
    makespan_s: float
    busy_s: float
    preemptions: int
    lambda_trace: list[tuple[float, float]]  # (time, shadow price) where the policy exposes one
    z_trace: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (time, z = D / U), likewise
    mean_batch: float = 0.0  # sequences per step, weighted by step time (how loaded the engine was)

    def summary(self) -> dict[str, float]:
        lat = np.array([c.latency_s for c in self.calls]) if self.calls else np.zeros(1)
        wait = np.array([c.queue_s for c in self.calls]) if self.calls else np.zeros(1)
        prompt = sum(c.prompt_tokens for c in self.calls)
        out_tokens = sum(c.output_tokens for c in self.calls)
        sess = np.array(list(self.session_latency_s.values())) if self.session_latency_s else np.zeros(1)
        # The model's share of a session (queueing + prefill + decode of its calls); the rest is tool time.
        llm: dict[str, float] = {}
        for c in self.calls:
            llm[c.session_id] = llm.get(c.session_id, 0.0) + c.latency_s
        return {
            "kv_hit_rate": sum(c.cached_tokens for c in self.calls) / prompt if prompt else 0.0,
            "mean_call_latency_s": float(lat.mean()), "p99_call_latency_s": float(np.percentile(lat, 99)),
            "mean_session_latency_s": float(sess.mean()), "p99_session_latency_s": float(np.percentile(sess, 99)),
            "mean_session_llm_s": float(np.mean(list(llm.values()))) if llm else 0.0,
            "mean_wait_s": float(wait.mean()), "p99_wait_s": float(np.percentile(wait, 99)),
            "throughput_tok_s": (prompt + out_tokens) / self.makespan_s if self.makespan_s else 0.0,
            "preemptions": float(self.preemptions), "calls": float(len(self.calls)),
            "mean_batch": self.mean_batch,
        }


def run_sessions(sessions: Sequence[TokenizedSession], arrivals: Sequence[float], scheduler: Scheduler,
                 executor, clock: VirtualClock, tool_latency: Callable[[], float],
                 *, on_progress: Callable[[int], None] | None = None, max_steps: int = 10_000_000) -> WorkloadResult:
    """Runs every session to completion: call i+1 is issued a tool latency after call i finishes."""
    if len(sessions) != len(arrivals):
        raise ValueError("one arrival time per session")
    ready: list[tuple[float, int, int]] = [(float(a), s, 0) for s, a in enumerate(arrivals)]  # (time, sess, call)
    heapq.heapify(ready)
    pending: dict[str, tuple[int, int, float]] = {}  # request id -> (session index, call index, ready time)
    calls: list[CallResult] = []
    session_end: dict[str, float] = {}
    lambdas: list[tuple[float, float]] = []
    zs: list[tuple[float, float]] = []
    steps = 0
    seq_seconds = 0.0
    while ready or scheduler.has_unfinished:
        while ready and ready[0][0] <= clock.now:
            t, si, ci = heapq.heappop(ready)
            sess = sessions[si]
            call = sess.calls[ci]
            rid = f"{sess.session_id}#{ci}"
            scheduler.add_request(Request(rid, list(call.prompt_ids),
                                          SamplingParams(max_tokens=max(1, len(call.response_ids)), ignore_eos=True),
                                          session_id=sess.session_id, arrival_s=max(t, 1e-9),
                                          forced_output=list(call.response_ids)))
            pending[rid] = (si, ci, t)
        if not scheduler.has_unfinished:
            clock.now = ready[0][0]  # idle: jump to the next tool return or arrival
            continue
        out = scheduler.schedule()
        if out.empty:
            raise RuntimeError("scheduler made no progress with work queued (capacity too small?)")
        lam = getattr(scheduler.policy, "last_lambda", None)
        if lam is not None:
            lambdas.append((clock.now, float(lam)))
            zs.append((clock.now, float(getattr(scheduler.policy, "last_z", math.nan))))
        t_step = clock.now
        finished = scheduler.update(out, executor.execute(out))
        seq_seconds += len(out.seqs) * (clock.now - t_step)
        for req in finished:
            si, ci, t = pending.pop(req.request_id)
            sess = sessions[si]
            calls.append(CallResult(sess.session_id, ci, len(req.prompt_tokens), req.num_cached_tokens,
                                    len(req.output_tokens), t, req.finish_s,
                                    (req.admitted_s or req.finish_s) - t, req.num_preemptions))
            scheduler.forget(req.request_id)
            if ci + 1 < len(sess.calls):
                heapq.heappush(ready, (req.finish_s + tool_latency(), si, ci + 1))
            else:
                session_end[sess.session_id] = req.finish_s - arrivals[si]
            if on_progress is not None:
                on_progress(1)
        steps += 1
        if steps > max_steps:
            raise RuntimeError("workload did not finish within max_steps")
    busy = getattr(executor, "busy_s", 0.0)
    return WorkloadResult(calls, session_end, clock.now, busy, scheduler.num_preemptions, lambdas, zs,
                          seq_seconds / busy if busy else 0.0)
