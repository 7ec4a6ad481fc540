"""A tiny end-to-end replay: real trace sessions through ReActAgent -> EngineClient -> ServingLoop -> Engine.

Reference: the recorded trace (final answers) and the baseline config (output tokens of every
reasoning call must be identical under the lossless techniques).
"""

from __future__ import annotations

import importlib.util
import pathlib
import random
import sys

import pytest

from agentinfer_jax.agents.clients import RecordedCall
from agentinfer_jax.agents.react import Action
from agentinfer_jax.engine.engine import EngineConfig
from agentinfer_jax.workloads.traces import default_trace_path, load_traces

_PATH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "agent_e2e.py"
_spec = importlib.util.spec_from_file_location("agent_e2e", _PATH)
e2e = importlib.util.module_from_spec(_spec)
sys.modules["agent_e2e"] = e2e  # dataclasses look their module up there
_spec.loader.exec_module(e2e)

# Same shapes as test_engine_client.py (one compilation per shape in a pytest process).
ENGINE = EngineConfig(num_blocks=160, block_size=16, max_num_seqs=4, max_tokens_per_step=128, max_model_len=1024,
                      max_draft_tokens=4, min_token_bucket=32)


def test_replay_keeps_answers_and_lossless_outputs_identical():
    report = e2e.experiment(["sam", "spagent", "all"], traces=None, num_sessions=2,
                            tool_latency_mean=0.01, arrival_rate=50.0, max_turns=3, num_draft_tokens=4,
                            memory_sessions=10, seed=random.Random(7).randrange(1000), engine_config=ENGINE,
                            show_progress=False)
    checks = report["checks"]
    assert checks["no_errors"], [c["errors"] for c in report["configs"].values()]
    assert checks["answers_equal_recorded"] and checks["answers_identical"]
    assert checks["lossless_outputs_identical"] == {"sam": True, "spagent": True}
    sam, base = report["configs"]["sam"], report["configs"]["baseline"]
    assert sam["tokens_per_verify_step"] > 1.0  # drafting really ran and accepted tokens
    assert sam["output_tokens"] == base["output_tokens"]
    assert report["configs"]["all"]["small_model_steps"] > 0  # AgentCollab really used the small model


def test_hit_rates_and_replay_oracle_follow_the_trace():
    rates = e2e.HitRates.bundled()
    for kind in ("search", "lookup", "finish"):
        for step in (1, 2, 3, 7):
            assert 0.0 <= rates.probability(kind, step) <= 1.0
    rng = random.Random(3)
    trajs = load_traces(default_trace_path())
    sessions = [s for t in trajs if (s := e2e.record_session(t, lambda: 0.0, rates, rng)) is not None]
    s = sessions[rng.randrange(len(sessions))]
    oracle = e2e.TraceReplay({s.session_id: s})
    msgs = [{"role": "user", "content": "Question: q"}]
    for i, response in enumerate(s.responses):
        call = RecordedCall(list(msgs), "large", 256, None, 0.0, 1, s.session_id, 0, False)
        assert oracle(call) == [response]
        guess = oracle(RecordedCall(list(msgs), "large", 24, None, 0.0, 1, s.session_id, 0, True))[0]
        assert (str(s.actions[i]) in guess) == s.guess_hits[i]
        msgs += [{"role": "assistant", "content": response}, {"role": "user", "content": "Observation: x"}]
    assert oracle(RecordedCall(msgs, "large", 8, None, 0.0, 1, "unknown", 0, False)) is None


@pytest.mark.parametrize("thought, repeat, expected", [("I found it.", False, True), ("I could not find it.", False, False),
                                                       ("Next step.", True, False)])
def test_trace_progress_controller_escalates_on_derived_failure(thought, repeat, expected):
    ctl = e2e.TraceProgressController(warmup_large_steps=1, escalation_steps=1)
    ctl.observe("large", "Thought: plan\nAction: Search[A]")
    action = Action("search", "A" if repeat else "B")
    signal = ctl.observe("small", f"Thought: {thought}\nAction: {action}")
    assert signal.value is expected
    assert ctl.role_for_next_step() == ("small" if expected else "large")
