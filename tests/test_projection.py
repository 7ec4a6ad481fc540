"""The virtual-clock projection against a brute-force clock that samples every millisecond.

All times are whole centiseconds, so sampling millisecond midpoints integrates every piece exactly;
the reference looks up, at each sample, which windows and steps cover it straight from the lists.
"""

from __future__ import annotations

import numpy as np
import pytest

from agentinfer_jax.workloads.cost_model import StepCostModel, StepFeatures
from agentinfer_jax.workloads.projection import (CallWindow, StepTimeline, TimedStep, ToolWait, project_session,
                                                 project_span)


def _random_steps(rng, horizon_cs: int) -> list[TimedStep]:
    steps, t = [], int(rng.integers(0, 5))
    while True:
        length = int(rng.integers(1, 8))
        if t + length > horizon_cs:
            return steps
        steps.append(TimedStep(t / 100, (t + length) / 100,
                               StepFeatures(decode_tokens=int(rng.integers(1, 40)), num_seqs=1)))
        t += length + int(rng.integers(0, 4))


def _brute_force(wall, calls, steps_by_role, predict_by_role, horizon_cs):
    saved = 0.0
    for ms in range(horizon_cs * 10):
        t = (ms + 0.5) / 1000
        rates = []
        for role, steps in steps_by_role.items():
            if not any(c.role == role and c.start_s <= t < c.end_s for c in calls):
                continue
            rate = 1.0
            for s in steps:
                if s.start_s <= t < s.end_s:
                    rate = predict_by_role[role](s.features) / (s.end_s - s.start_s)
            rates.append(rate)
        if rates:
            saved += 0.001 * (1.0 - max(rates))
    return wall - saved


@pytest.mark.parametrize("seed", range(6))
def test_projection_equals_brute_force_clock(seed):
    rng = np.random.default_rng(seed)
    horizon = 300  # centiseconds
    steps = {"large": _random_steps(rng, horizon), "small": _random_steps(rng, horizon)}
    predict = {"large": lambda f: 0.002 + 0.0004 * f.decode_tokens, "small": lambda f: 0.0005 * f.decode_tokens}
    calls = []
    for _ in range(int(rng.integers(1, 7))):
        a = int(rng.integers(0, horizon - 10))
        b = int(rng.integers(a, min(horizon, a + 80)))
        calls.append(CallWindow(str(rng.choice(["large", "small"])), a / 100, b / 100))
    timelines = {r: StepTimeline(steps[r], predict[r]) for r in steps}
    wall = horizon / 100
    got = project_session(wall, calls, timelines)
    want = _brute_force(wall, calls, steps, predict, horizon)
    assert got == pytest.approx(want, abs=1e-9)


def test_no_calls_and_identity_costs_leave_the_wall_time():
    steps = [TimedStep(0.0, 0.5, StepFeatures(decode_tokens=4)), TimedStep(0.6, 1.0, StepFeatures(decode_tokens=4))]
    same = StepTimeline(steps, lambda f: 0.5 if f.decode_tokens == 4 else 0.0)
    assert project_session(3.0, [], {"large": same}) == 3.0
    # A step predicted as long as it measured saves nothing; the 0.1 s gap stays as measured.
    timeline = StepTimeline([TimedStep(0.0, 0.5, StepFeatures(decode_tokens=4))], lambda f: 0.5)
    assert project_session(3.0, [CallWindow("large", 0.0, 0.6)], {"large": timeline}) == pytest.approx(3.0)


def test_cost_model_plugs_in_and_bad_input_is_named():
    model = StepCostModel({"const": 0.001, "decode_tokens": 0.0001})
    steps = [TimedStep(0.0, 0.1, StepFeatures(decode_tokens=10, num_seqs=1))]
    timeline = StepTimeline(steps, model)
    # 0.1 s measured -> 0.002 s predicted: the 1 s session saves 0.098 s.
    assert project_session(1.0, [CallWindow("large", 0.0, 0.2)], {"large": timeline}) == pytest.approx(0.902)
    with pytest.raises(KeyError, match="small"):
        project_session(1.0, [CallWindow("small", 0.0, 0.2)], {"large": timeline})
    with pytest.raises(ValueError, match="overlap"):
        StepTimeline([TimedStep(0.0, 0.2, StepFeatures()), TimedStep(0.1, 0.3, StepFeatures())], model)
    with pytest.raises(ValueError, match="ends before"):
        project_session(1.0, [CallWindow("large", 0.5, 0.2)], {"large": timeline})


def _virtual_clock(t_end, calls, steps_by_role, predict_by_role):
    """Virtual time at t_end by millisecond sampling (rates as in `_brute_force`)."""
    virt = 0.0
    for ms in range(int(round(t_end * 1000))):
        t = (ms + 0.5) / 1000
        rates = []
        for role, steps in steps_by_role.items():
            if any(c.role == role and c.start_s <= t < c.end_s for c in calls):
                rate = 1.0
                for s in steps:
                    if s.start_s <= t < s.end_s:
                        rate = predict_by_role[role](s.features) / (s.end_s - s.start_s)
                rates.append(rate)
        virt += 0.001 * (max(rates) if rates else 1.0)
    return virt


@pytest.mark.parametrize("seed", range(4))
def test_speculative_tool_waits_follow_the_virtual_clock(seed):
    """A tool that speculation started during a call runs its recorded duration from its virtual
    start: the session waits on the virtual clock only for what is left of it."""
    rng = np.random.default_rng(seed)
    horizon = 200
    steps = {"large": _random_steps(rng, horizon)}
    predict = {"large": lambda f: 0.0005 * f.decode_tokens * float(rng_scale)}
    rng_scale = [0.2, 1.0, 4.0, 9.0][seed]  # projected calls faster and slower than measured
    call = CallWindow("large", 0.30, 0.90)
    exec_start, exec_end = 0.35, 1.25  # began 0.05 s into the call, ran 0.9 s
    wait = ToolWait(0.90, 1.25, exec_start, exec_end)  # joined after the call: waited 0.35 s
    plain = ToolWait(1.40, 1.60, 1.40, 1.60)  # an ordinary tool call: kept as measured
    wall = horizon / 100
    timelines = {"large": StepTimeline(steps["large"], predict["large"])}
    got = project_session(wall, [call], timelines, [wait, plain])
    v = lambda t: _virtual_clock(t, [call], steps, predict)  # noqa: E731
    projected_wait = max(0.0, v(exec_start) + (exec_end - exec_start) - v(wait.start_s))
    want = v(wall) - (wait.end_s - wait.start_s) + projected_wait
    assert got == pytest.approx(want, abs=1e-9)
    assert project_session(wall, [call], timelines, [plain]) == pytest.approx(v(wall), abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_a_span_lasts_what_the_virtual_clock_says(seed):
    """A window's projected length (the answering call's, on the critical path) is the virtual
    clock's advance over it, for spans inside, across and outside the calls."""
    rng = np.random.default_rng(100 + seed)
    horizon = 200
    steps = {"large": _random_steps(rng, horizon), "small": _random_steps(rng, horizon)}
    predict = {"large": lambda f: 0.0003 * f.decode_tokens, "small": lambda f: 0.002 + 0.0001 * f.decode_tokens}
    calls = [CallWindow("large", 0.20, 0.90), CallWindow("small", 0.70, 1.40), CallWindow("large", 1.60, 1.95)]
    timelines = {r: StepTimeline(steps[r], predict[r]) for r in steps}
    v = lambda t: _virtual_clock(t, calls, steps, predict)  # noqa: E731
    for a, b in [(0.20, 0.90), (0.70, 1.40), (0.10, 1.99), (1.45, 1.55), (1.60, 1.95), (0.5, 0.5)]:
        assert project_span(a, b, calls, timelines) == pytest.approx(v(b) - v(a), abs=1e-9)
    with pytest.raises(ValueError, match="ends before"):
        project_span(0.5, 0.4, calls, timelines)
