"""Agent sessions from traces: prompts extend each other (messages and tokens), instruction handling,
Action parsing, Poisson arrivals and tool-latency distributions."""

from __future__ import annotations

import json
import math
import pathlib

import jinja2
import numpy as np
import pytest
from tokenizers import Tokenizer

from agentinfer_jax.workloads.sessions import (AgentSession, LLMCall, PrefixInstabilityError, ToolLatency,
                                               load_prompt, parse_action, poisson_arrivals,
                                               session_from_trajectory, sessions_from_traces, tokenize_session)
from agentinfer_jax.workloads.traces import Trajectory, default_trace_path, load_traces, portable_path

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "agentinfer_jax" / "assets"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_file(str(ASSETS / "tokenizer.json"))


@pytest.fixture(scope="module")
def sample():
    return load_traces(default_trace_path())


def test_prompt_asset_is_react_with_examples():
    text = load_prompt()
    for action in ("Search[", "Lookup[", "Finish["):
        assert action in text
    assert text.count("Question:") == 2  # two few-shot examples


def test_calls_follow_the_transcript(sample):
    instruction = load_prompt()
    for traj in sample:
        s = session_from_trajectory(traj)
        asst = [i for i, m in enumerate(traj.messages) if m["role"] == "assistant"]
        assert s.session_id == traj.id and len(s.calls) == len(asst)
        for call, i in zip(s.calls, asst):
            # FireAct traces carry no instruction: a system message holds it before the history.
            assert call.messages[0] == {"role": "system", "content": instruction}
            assert list(call.messages[1:]) == list(traj.messages[:i])
            assert call.response == traj.messages[i]["content"]
            action_lines = [ln for ln in call.response.splitlines() if ln.startswith("Action:")]
            assert call.tool_action == action_lines[-1][len("Action:"):].strip()
            nxt = traj.messages[i + 1] if i + 1 < len(traj.messages) else None
            assert call.observation == (nxt["content"] if nxt else None)
        # Message-level prefix property: prompt i+1 = prompt i + response i + what came between.
        for a, b in zip(s.calls, s.calls[1:]):
            assert b.messages[: len(a.messages) + 1] == (*a.messages, {"role": "assistant", "content": a.response})
        assert s.calls[-1].is_final or s.calls[-1].tool_action is not None


def test_instruction_flag_and_traces_with_their_own(sample):
    traj = sample[0]
    plain = session_from_trajectory(traj, add_instruction=False)
    assert all(c.messages[0] == traj.messages[0] for c in plain.calls)
    custom = session_from_trajectory(traj, instruction="Be brief.")
    assert custom.calls[0].messages[0] == {"role": "system", "content": "Be brief."}
    # A trace whose first message already explains the action format is replayed as recorded.
    own = Trajectory("q", ({"role": "user", "content": "Use Search[entity], Lookup[keyword] or Finish[answer].\nQ?"},
                           {"role": "assistant", "content": "Thought 1: go\nAction 1: Search[X]"},
                           {"role": "user", "content": "Observation 1: x"}), "run", {"tool_times_s": [0.25]})
    s = session_from_trajectory(own)
    assert s.calls[0].messages == own.messages[:1]
    assert s.calls[0].tool_action == "Search[X]" and s.calls[0].tool_latency_s == 0.25
    with_system = Trajectory("s", ({"role": "system", "content": "sys"}, *own.messages[1:]), "x")
    assert session_from_trajectory(with_system).calls[0].messages[0]["content"] == "sys"


def test_without_instruction_sessions_share_no_prompt_block(sample, tokenizer):
    """kv_hit_rate.py --instruction: 'fewshot' puts one long block in front of every session (hot in any
    prefix cache); 'none' (FireAct's fine-tuned, zero-shot deployment) leaves only the template header."""
    def common_prefix(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    for add, lo, hi in ((True, 500, None), (False, 0, 16)):
        firsts = [tokenize_session(s, tokenizer).calls[0].prompt_ids
                  for s in sessions_from_traces(sample[:6], add_instruction=add)]
        shared = min(common_prefix(firsts[0], f) for f in firsts[1:])
        assert shared >= lo and (hi is None or shared < hi), (add, shared)


def test_parse_action():
    assert parse_action("Thought: a\nAction: search[Paris]") == "search[Paris]"
    assert parse_action("Thought 3: a\nAction 3:  Finish[yes] ") == "Finish[yes]"
    assert parse_action("Action: Search[A]\nThought: no\nAction: Lookup[b]") == "Lookup[b]"
    assert parse_action("Thought: the answer is B.") is None
    assert LLMCall((), "x", None, None).is_final and LLMCall((), "x", "finish[b]", None).is_final
    assert not LLMCall((), "x", "Search[b]", "obs").is_final


def reference_prompt_ids(tokenizer, template_src, messages):
    """Independent: render the whole prompt with plain jinja2 and encode it in one go."""
    text = jinja2.Template(template_src).render(messages=list(messages), add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False).ids


def test_tokenized_prompts_extend_each_other_exactly(sample, tokenizer):
    cfg = json.loads((ASSETS / "tokenizer_config.json").read_text())
    eot = tokenizer.token_to_id(cfg["eos_token"])
    rng = np.random.default_rng(0)
    checked = 0
    for traj in sample:
        s = session_from_trajectory(traj)
        ts = tokenize_session(s, tokenizer)
        assert len(ts.calls) == len(s.calls)
        for a, b in zip(ts.calls, ts.calls[1:]):
            assert b.prompt_ids[: len(a.prompt_ids) + len(a.response_ids)] == a.prompt_ids + a.response_ids
        for call, tcall in zip(s.calls, ts.calls):
            assert tcall.response_ids[-1] == eot
            assert tokenizer.decode(tcall.response_ids[:-1]) == call.response
        # The ids equal encoding the whole rendered prompt: what a server re-tokenizing would see.
        for i in rng.choice(len(s.calls), size=min(2, len(s.calls)), replace=False):
            assert ts.calls[i].prompt_ids == reference_prompt_ids(tokenizer, cfg["chat_template"], s.calls[i].messages)
            checked += 1
    assert checked > 100


def test_prefix_unstable_template_is_rejected(sample, tokenizer):
    # A template that shows only the latest two messages re-renders history differently.
    last_two = ("{% for m in messages[-2:] %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    s = session_from_trajectory(sample[0])
    with pytest.raises(PrefixInstabilityError):
        tokenize_session(s, tokenizer, chat_template=last_two)
    with pytest.raises(ValueError, match="single token"):
        tokenize_session(s, tokenizer, end_of_turn="<|im_end|><|im_end|>")


def test_sessions_from_traces_skips_empty_and_rejects_single():
    empty = Trajectory("e", ({"role": "user", "content": "Q?"},), "x")
    one = Trajectory("o", ({"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}), "x")
    assert [s.session_id for s in sessions_from_traces([empty, one])] == ["o"]
    with pytest.raises(ValueError, match="no assistant turn"):
        session_from_trajectory(empty)
    assert isinstance(sessions_from_traces([one])[0], AgentSession)


@pytest.mark.parametrize("seed", [0, 1])
def test_poisson_interarrival_mean_and_spread(seed):
    rng = np.random.default_rng(100 + seed)
    rate = float(rng.uniform(0.2, 20))
    n = 20_000
    t = poisson_arrivals(n, rate, seed=seed, start_s=5.0)
    gaps = np.diff(np.concatenate([[5.0], t]))
    assert t.shape == (n,) and np.all(gaps > 0)
    # Exponential gaps: mean 1/rate with standard error (1/rate)/sqrt(n); allow 4 standard errors.
    assert abs(gaps.mean() - 1 / rate) < 4 * (1 / rate) / math.sqrt(n)
    assert abs(gaps.std() * rate - 1.0) < 0.05  # coefficient of variation 1
    # Counts in unit windows are Poisson: variance ~ mean.
    counts = np.bincount(np.floor((t - 5.0) * rate / 10).astype(int))[:-1]
    assert abs(counts.var() / counts.mean() - 1.0) < 0.25
    np.testing.assert_array_equal(t, poisson_arrivals(n, rate, seed=seed, start_s=5.0))


def test_tool_latency_distributions():
    n = 40_000
    for kind, mean in (("lognormal", 1.5), ("exponential", 0.7)):
        d = ToolLatency(kind, mean, sigma=0.8, seed=3)
        x = d.sample_n(n)
        assert np.all(x > 0)
        std = x.std()
        assert abs(x.mean() - mean) < 5 * std / math.sqrt(n)
    lg = ToolLatency("lognormal", 2.0, sigma=0.6, seed=4).sample_n(n)
    assert abs(np.log(lg).std() - 0.6) < 0.02
    assert np.all(ToolLatency("constant", 1.25).sample_n(5) == 1.25)
    emp = ToolLatency("empirical", samples=[0.1, 0.5, 2.0], seed=1)
    assert set(emp.sample_n(100).tolist()) <= {0.1, 0.5, 2.0} and emp.mean == pytest.approx(2.6 / 3)
    a, b = ToolLatency(seed=9), ToolLatency(seed=9)
    assert [a.sample() for _ in range(5)] == [b.sample() for _ in range(5)]


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="rate"):
        poisson_arrivals(3, 0.0)
    with pytest.raises(ValueError, match="non-negative integer"):
        poisson_arrivals(-1, 1.0)
    with pytest.raises(ValueError, match="unknown tool latency kind"):
        ToolLatency("uniform")
    with pytest.raises(ValueError, match="empirical"):
        ToolLatency("empirical")
    with pytest.raises(ValueError, match="mean_s"):
        ToolLatency("lognormal", -1.0)
    with pytest.raises(FileNotFoundError):
        load_prompt("no_such_prompt")


def test_portable_path_is_relative_to_the_repository_or_its_parent(tmp_path):
    repo = pathlib.Path(__file__).resolve().parents[1]
    assert portable_path(default_trace_path()) == "agentinfer_jax/assets/data/fireact_hotpotqa_sample.json"
    assert portable_path(repo.parent / "shared" / "data" / "x.json") == "../shared/data/x.json"
    outside = pathlib.Path("/") / "elsewhere-not-a-repo" / "t.json"
    if not outside.resolve().is_relative_to(repo.parent):
        assert portable_path(outside) == str(outside)
