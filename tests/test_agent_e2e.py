"""A tiny end-to-end replay: real trace sessions through ReActAgent -> EngineClient -> ServingLoop -> Engine.

Reference: the recorded trace (final answers) and the baseline config (output tokens of every
reasoning call must be identical under the lossless techniques). The replay pieces themselves
(agentinfer_jax.workloads.replay) are tested in test_replay.py.
"""

from __future__ import annotations

import importlib.util
import pathlib
import random
import sys

from agentinfer_jax.engine.engine import EngineConfig

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
                            show_progress=False, model="tiny")
    checks = report["checks"]
    assert checks["no_errors"], [c["errors"] for c in report["configs"].values()]
    assert checks["answers_equal_recorded"] and checks["answers_identical"]
    assert checks["lossless_outputs_identical"] == {"sam": True, "sam@target": True, "spagent": True}
    sam, base = report["configs"]["sam"], report["configs"]["baseline"]
    assert sam["tokens_per_verify_step"] > 1.0  # drafting really ran and accepted tokens
    assert sam["output_tokens"] == base["output_tokens"]
    assert report["configs"]["all"]["small_model_steps"] > 0  # AgentCollab really used the small model
    assert report["compilations_in_measured_rounds"] == 0  # warm-up compiled every step shape
    assert report["projection"]["speedup"]["baseline"] == 1.0 and report["projection"]["speedup_all"] > 0
    assert report["llm_free_bound"]["wall"] > 1.0  # tools take time: no LLM-side technique passes it
    # No session finishes before its tools, run one after another, and its answering call: no
    # config passes its critical-path bound, on either clock.
    for name, c in report["configs"].items():
        floor = report["critical_path_bound"][name]
        assert 1.0 < floor["wall"] and c["speedup_mean"] <= floor["wall"] * (1 + 1e-9), name
        assert report["projection"]["speedup"][name] <= floor["projection"] * (1 + 1e-9), name
