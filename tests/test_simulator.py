"""The discrete-event workload driver over the real scheduler, allocator and prefix cache."""

from __future__ import annotations

import math

import pytest

from agentinfer_jax.cache import BlockPool, PrefixCache
from agentinfer_jax.serving.policies import make_policy
from agentinfer_jax.serving.scheduler import Scheduler, SchedulerConfig
from agentinfer_jax.tokenizer import load_tokenizer
from agentinfer_jax.workloads.cost_model import StepCostModel, StepFeatures
from agentinfer_jax.workloads.sessions import poisson_arrivals, sessions_from_traces, tokenize_session
from agentinfer_jax.workloads.simulator import SimulatedExecutor, VirtualClock, run_sessions
from agentinfer_jax.workloads.traces import default_trace_path, load_traces

BS = 16


@pytest.fixture(scope="module")
def sessions():
    tok = load_tokenizer()
    return [tokenize_session(s, tok) for s in sessions_from_traces(load_traces(default_trace_path(), limit=12))]


class RecordingCost(StepCostModel):
    """A linear cost model that also records what it predicted (independent sum for the clock)."""

    def __init__(self):
        super().__init__({"const": 1e-3, "prefill_tokens": 2e-5, "decode_tokens": 1e-4, "num_seqs": 0.0,
                          "attn_ctx_tokens": 0.0, "kv_read_tokens": 1e-7})
        self.predicted = []

    def predict(self, features):
        dt = super().predict(features)
        self.predicted.append(float(dt))
        return dt


def run(sessions, capacity, policy="fcfs"):
    longest = max(len(c.prompt_ids) + len(c.response_ids) for s in sessions for c in s.calls)
    num_blocks = max(capacity, math.ceil(longest / BS) + 1) + 1
    clock, pool = VirtualClock(), BlockPool(num_blocks)
    cache = PrefixCache(BS, pool)
    cfg = SchedulerConfig(block_size=BS, max_num_seqs=8, max_tokens_per_step=512, max_model_len=longest + 1,
                          vocab_size=4096)
    sched = Scheduler(cfg, pool, cache, make_policy(policy), clock=clock)
    cost = RecordingCost()
    responses = {}
    orig_update = sched.update

    def spy(out, new_tokens):
        finished = orig_update(out, new_tokens)
        for r in finished:
            responses[r.request_id] = list(r.output_tokens)
        return finished

    sched.update = spy
    res = run_sessions(sessions, poisson_arrivals(len(sessions), 4.0, seed=1), sched, SimulatedExecutor(cost, clock),
                       clock, lambda: 0.3)
    cache.evict(pool.num_used)
    return res, responses, pool, cost


def test_replay_emits_the_record_frees_every_block_and_keeps_time(sessions):
    res, responses, pool, cost = run(sessions, capacity=10_000)
    assert pool.num_used == 0
    assert len(res.calls) == sum(len(s.calls) for s in sessions)
    for s in sessions:
        for i, call in enumerate(s.calls):
            assert responses[f"{s.session_id}#{i}"] == call.response_ids
    assert res.busy_s == pytest.approx(sum(cost.predicted))
    assert res.makespan_s >= res.busy_s
    # Later calls of a session reuse its earlier context.
    summary = res.summary()
    assert summary["kv_hit_rate"] > 0.5
    # The model's share of a session excludes its tool time; the batch is within the engine's limit.
    tool_s = 0.3 * sum(len(s.calls) - 1 for s in sessions) / len(sessions)
    assert summary["mean_session_llm_s"] + tool_s == pytest.approx(summary["mean_session_latency_s"])
    assert 1.0 <= summary["mean_batch"] <= 8


@pytest.mark.parametrize("policy", ["fcfs", "agentsched"])
def test_less_kv_capacity_never_raises_the_hit_rate(sessions, policy):
    rates = [run(sessions, cap, policy)[0].summary()["kv_hit_rate"] for cap in (10_000, 400, 150)]
    assert rates[0] >= rates[1] >= rates[2]
    assert rates[0] > rates[2]


def test_features_of_a_step_match_its_sequences():
    f = StepFeatures.from_sequences([(10, 10, True), (1, 50, False)])
    assert (f.prefill_tokens, f.decode_tokens, f.num_seqs) == (10, 1, 2)
