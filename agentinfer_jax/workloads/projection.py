"""Virtual-clock projection of a measured run onto another device's step costs.

A replayed agent run records, on the wall clock, when each engine step ran (and what it computed)
and when each session waited on an LLM call. The projection keeps everything the run decided (the
drafts and their acceptance, cache hits, which requests shared a step, tool latencies, overlaps)
and changes only how long each step takes: while a session waits on a call of role r, every step of
r's engine that runs in that window counts at the predicted cost of the same step on the target
device instead of its measured time. Time a session spends on anything else (tools, host work
between steps, queueing) is kept as measured, except a tool wait for an execution that speculation
started earlier: the execution keeps its recorded duration, so its wait follows the virtual clock.

This is a projection, not a measurement: the batch composition is the run's, although on a faster
device sessions would overlap differently. Results are labelled as such wherever they are printed.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from agentinfer_jax.workloads.cost_model import StepCostModel, StepFeatures

__all__ = ["TimedStep", "CallWindow", "ToolWait", "StepTimeline", "project_session", "project_span"]


@dataclasses.dataclass(frozen=True)
class TimedStep:
    """One engine step on the wall clock (time.perf_counter seconds) and what it computed."""

    start_s: float
    end_s: float
    features: StepFeatures


@dataclasses.dataclass(frozen=True)
class CallWindow:
    """A session waiting on one LLM call of `role` from `start_s` to `end_s`."""

    role: str
    start_s: float
    end_s: float


class StepTimeline:
    """The steps of one engine, sorted by start, with the target device's predicted time of each.

    Invariant: steps do not overlap (one engine runs one step at a time), so the time of a window
    that is spent in steps is the sum of per-step overlaps.
    """

    def __init__(self, steps: Iterable[TimedStep], predict: StepCostModel | Callable[[StepFeatures], float]):
        self.steps = sorted(steps, key=lambda s: s.start_s)
        for a, b in zip(self.steps, self.steps[1:]):
            if b.start_s < a.end_s - 1e-9:
                raise ValueError(f"steps overlap: [{a.start_s}, {a.end_s}] and [{b.start_s}, {b.end_s}]")
        fn = predict.predict if isinstance(predict, StepCostModel) else predict
        self.starts = np.array([s.start_s for s in self.steps])
        self.measured = np.array([max(s.end_s - s.start_s, 0.0) for s in self.steps])
        self.predicted = np.array([float(fn(s.features)) for s in self.steps])

    def __len__(self) -> int:
        return len(self.steps)

    def rate_at(self, t: float) -> float:
        """Projected seconds per measured second at wall time t: predicted / measured of the step
        running at t, 1 between steps (host work and queueing are kept as measured)."""
        i = bisect.bisect_right(self.starts, t) - 1
        if i < 0 or t >= self.steps[i].end_s or self.measured[i] <= 0:
            return 1.0
        return float(self.predicted[i] / self.measured[i])

    def boundaries(self, start_s: float, end_s: float) -> list[float]:
        """Step starts and ends strictly inside (start_s, end_s)."""
        out = []
        i = max(bisect.bisect_right(self.starts, start_s) - 1, 0)
        while i < len(self.steps) and self.steps[i].start_s < end_s:
            out += [t for t in (self.steps[i].start_s, self.steps[i].end_s) if start_s < t < end_s]
            i += 1
        return out


def _merged(windows: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(windows):
        if b < a:
            raise ValueError(f"call window ends before it starts: [{a}, {b}]")
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


@dataclasses.dataclass(frozen=True)
class ToolWait:
    """A session waiting on a tool from `start_s` to `end_s` for an execution that ran from
    `exec_start_s` to `exec_end_s` (earlier than the wait when speculation started it)."""

    start_s: float
    end_s: float
    exec_start_s: float
    exec_end_s: float


def _saved_segments(calls: Sequence[CallWindow],
                    timelines: Mapping[str, StepTimeline]) -> list[tuple[float, float, float]]:
    """(a, b, saved seconds per measured second) over the session's call windows."""
    by_role: dict[str, list[tuple[float, float]]] = {}
    for c in calls:
        if c.role not in timelines:
            raise KeyError(f"no step timeline for role {c.role!r}")
        by_role.setdefault(c.role, []).append((c.start_s, c.end_s))
    merged = {r: _merged(w) for r, w in by_role.items()}
    points: set[float] = set()
    for role, windows in merged.items():
        for a, b in windows:
            points |= {a, b, *timelines[role].boundaries(a, b)}
    edges = sorted(points)
    out = []
    for a, b in zip(edges, edges[1:]):
        mid = 0.5 * (a + b)
        rates = [timelines[r].rate_at(mid) for r, ws in merged.items() if any(x <= mid < y for x, y in ws)]
        if rates:
            out.append((a, b, 1.0 - max(rates)))
    return out


def _saved_between(segments: list[tuple[float, float, float]], lo: float, hi: float) -> float:
    return sum(max(0.0, min(b, hi) - max(a, lo)) * r for a, b, r in segments)


def project_session(wall_s: float, calls: Sequence[CallWindow], timelines: Mapping[str, StepTimeline],
                    tool_waits: Sequence[ToolWait] = ()) -> float:
    """The session's wall time with every step it waited on at the target device's cost.

    Where the session waits on calls of several roles at once (a speculative guess on the small model
    beside the reasoning call on the large one), the slowest projected rate of those roles counts:
    the session cannot move on faster than any call it is waiting for.

    Tools keep their recorded durations. A tool whose execution began before the session waited
    for it (a speculative execution the real action joined or found buffered) ran beside the calls
    in between, so its wait is re-derived on the virtual clock: the execution ends
    `exec_end - exec_start` after its virtual start, and the session waits only for what is left.
    """
    segments = _saved_segments(calls, timelines)
    projected = wall_s - sum((b - a) * r for a, b, r in segments)
    for w in tool_waits:
        if w.end_s < w.start_s or w.exec_end_s < w.exec_start_s:
            raise ValueError(f"tool wait ends before it starts: {w}")
        if w.exec_start_s >= w.start_s:
            continue  # started when the session began waiting: the wait is the tool's own time
        # Virtual time from the execution's start to the wait's start is the measured span minus
        # what the projection saved in it; the execution needs exec_end - exec_start of it.
        head_start = (w.start_s - w.exec_start_s) - _saved_between(segments, w.exec_start_s, w.start_s)
        wait = max(0.0, (w.exec_end_s - w.exec_start_s) - head_start)
        projected += wait - (w.end_s - w.start_s)
    return projected


def project_span(start_s: float, end_s: float, calls: Sequence[CallWindow],
                 timelines: Mapping[str, StepTimeline]) -> float:
    """How long the wall-clock span [start_s, end_s] of a session waiting on `calls` lasts on the
    virtual clock (one call's window, for instance), by the same rule as `project_session`."""
    if end_s < start_s:
        raise ValueError(f"span ends before it starts: [{start_s}, {end_s}]")
    return (end_s - start_s) - _saved_between(_saved_segments(calls, timelines), start_s, end_s)
