"""Trace replay pieces (agentinfer_jax.workloads.replay) against the recorded trace itself."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from agentinfer_jax.agents.clients import RecordedCall
from agentinfer_jax.agents.react import Action, parse_step
from agentinfer_jax.agents.tools import ToolState
from agentinfer_jax.workloads.replay import (HIT_RATES_PATH, HitRates, TraceProgressController, TraceReplay, TraceTool,
                                             derive_hit_rates, record_session)
from agentinfer_jax.workloads.traces import default_trace_path, load_traces


def recorded_sessions(seed=3):
    rng = random.Random(seed)
    trajs = load_traces(default_trace_path())
    return [s for t in trajs if (s := record_session(t, lambda: 0.0, HitRates.bundled(), rng)) is not None], rng


def test_hit_rates_are_the_bundled_counts_with_pooling():
    counts = json.loads(HIT_RATES_PATH.read_text())["counts"]
    rates = HitRates.bundled()
    for kind, cells in counts.items():
        for step, (hits, total) in cells.items():
            if total >= 5:
                assert rates.probability(kind, int(step)) == pytest.approx(hits / total)
    # A sparse cell falls back to the action type's pooled rate, an unknown type to the global one.
    table = {"counts": {"search": {"1": [1, 2], "2": [6, 8]}, "lookup": {"1": [0, 1]}}}
    hr = HitRates(table, min_total=5)
    assert hr.probability("search", 1) == pytest.approx(7 / 10)
    assert hr.probability("search", 2) == pytest.approx(6 / 8)
    assert hr.probability("finish", 3) == pytest.approx(7 / 11)


def test_record_session_keeps_the_trajectory_step_for_step():
    sessions, _ = recorded_sessions()
    assert sessions
    trajs = {t.id: t for t in load_traces(default_trace_path())}
    for s in sessions[:10]:
        turns = [m["content"] for m in trajs[s.session_id].messages if m["role"] == "assistant"]
        assert list(s.responses) == turns
        assert list(s.actions) == [parse_step(r).action for r in turns]
        assert s.answer == s.actions[-1].arg and s.actions[-1].kind == "finish"
        assert len(s.observations) == len(s.tool_latencies) == len(s.guess_hits) == len(s.responses)


def test_replay_oracle_follows_the_trace():
    sessions, rng = recorded_sessions()
    s = sessions[rng.randrange(len(sessions))]
    oracle = TraceReplay({s.session_id: s})
    msgs = [{"role": "user", "content": "Question: q"}]
    for i, response in enumerate(s.responses):
        call = RecordedCall(list(msgs), "large", 256, None, 0.0, 1, s.session_id, 0, False)
        assert oracle(call) == [response]
        guess = oracle(RecordedCall(list(msgs), "large", 24, None, 0.0, 1, s.session_id, 0, True))[0]
        assert (str(s.actions[i]) in guess) == s.guess_hits[i]
        # The verified phase's guess continues an "Action:" prefix: the same step, the rest of the line.
        cont = oracle(RecordedCall([*msgs, {"role": "assistant", "content": "Action:"}], "large", 24, ["\n"], 0.0, 1,
                                   s.session_id, 0, True, continue_final_message=True))[0]
        assert cont.startswith(" ") and cont.endswith("\n") and (str(s.actions[i]) in cont) == s.guess_hits[i]
        msgs += [{"role": "assistant", "content": response}, {"role": "user", "content": "Observation: x"}]
    assert oracle(RecordedCall(msgs, "large", 8, None, 0.0, 1, s.session_id, 0, False)) is None  # past the record
    assert oracle(RecordedCall(msgs, "large", 8, None, 0.0, 1, "unknown", 0, False)) is None


def test_trace_tool_returns_recorded_observations_for_recorded_actions():
    sessions, _ = recorded_sessions()
    s = next(x for x in sessions if len(x.actions) >= 2)
    tool = TraceTool(s)

    async def run():
        state = ToolState()
        for i, action in enumerate(s.actions[:-1]):
            wrong = await tool.run(Action("search", "certainly not recorded"), state)
            assert wrong.observation.startswith("Could not find") and wrong.state.cursor == i + 1
            out = await tool.run(action, state)
            assert out.observation == s.observations[i] and out.state.cursor == i + 1
            state = out.state
        end = await tool.run(s.actions[-1], state)
        assert end.done and end.answer == s.answer

    asyncio.run(run())
    assert tool.invocations == 2 * (len(s.actions) - 1) + 1


@pytest.mark.parametrize("thought, repeat, expected", [("I found it.", False, True), ("I could not find it.", False, False),
                                                       ("Next step.", True, False)])
def test_trace_progress_controller_escalates_on_derived_failure(thought, repeat, expected):
    ctl = TraceProgressController(warmup_large_steps=1, escalation_steps=1)
    ctl.observe("large", "Thought: plan\nAction: Search[A]")
    action = Action("search", "A" if repeat else "B")
    signal = ctl.observe("small", f"Thought: {thought}\nAction: {action}")
    assert signal.value is expected
    assert ctl.role_for_next_step() == ("small" if expected else "large")


def test_derive_hit_rates_counts_guesses_per_step(tmp_path):
    log = tmp_path / "agent_x_top1" / "trajs_1" / "q1" / "log.txt"
    log.parent.mkdir(parents=True)
    log.write_text("\n STEP: 1 \nNORMAL TRAJECTORY\nAction 1: Search[Paris]\nSIMULATION TRAJECTORY\n"
                   "Action 1: Search[paris]\n\n STEP: 2 \nNORMAL TRAJECTORY\nAction 2: Finish[yes]\n"
                   "SIMULATION TRAJECTORY\nAction 2: Finish[no]\n")
    table = derive_hit_rates(tmp_path)
    assert table["num_logs"] == 1
    assert table["counts"] == {"finish": {"2": [0, 1]}, "search": {"1": [1, 1]}}
