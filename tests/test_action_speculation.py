"""SPAgent: buffer, plausibility parsing, both phases inside the loop, and the load-aware planner."""

import asyncio
import collections
import itertools
import math
import random
import string
import threading
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from agentinfer_jax.agents.action_buffer import ActionBuffer
from agentinfer_jax.agents.action_server import ActionServer
from agentinfer_jax.agents.clients import ScriptedClient
from agentinfer_jax.agents.loop import AgentConfig, AgentFeatures, ReActAgent
from agentinfer_jax.agents.spagent import (SessionSpeculationInfo, SpeculationConfig, SpeculationGate, SpeculationPlanner,
                                          parse_plausibility)
from agentinfer_jax.agents.tools import SearchTool, ToolOutcome, ToolState, tool_error

CORPUS = {"Alpha": ["Alpha is a town."], "Beta": ["Beta is a river."], "Gamma": ["Gamma is a hill."]}


def test_buffer_matches_lru_model_and_counts():
    rng = random.Random(0)
    buf = ActionBuffer(capacity_per_session=3, max_sessions=2)
    model: collections.OrderedDict = collections.OrderedDict()  # session -> OrderedDict(key -> obs)
    hits = misses = 0
    for _ in range(2000):
        sid, key = rng.choice("abc"), rng.choice("uvwxy")
        if rng.random() < 0.5:
            out = ToolOutcome(f"{sid}{key}{rng.random()}", ToolState())
            buf.put(sid, key, out)
            model.setdefault(sid, collections.OrderedDict())[key] = out
            model.move_to_end(sid)
            model[sid].move_to_end(key)
            while len(model[sid]) > 3:
                model[sid].popitem(last=False)
            while len(model) > 2:
                model.popitem(last=False)
        else:
            got = buf.get(sid, key)
            want = model.get(sid, {}).get(key)
            assert got == want
            if want is None:
                misses += 1
            else:
                hits += 1
                model[sid].move_to_end(key)
                model.move_to_end(sid)
    stats = buf.stats()
    assert (stats.hits, stats.misses, stats.sessions) == (hits, misses, len(model))
    assert not buf.put("a", "z", tool_error("x", ToolState())) and ("a", "z") not in buf


def test_buffer_is_thread_safe():
    buf = ActionBuffer(capacity_per_session=1000)

    def worker(t):
        for i in range(500):
            buf.put(f"s{t % 2}", f"k{t}-{i}", ToolOutcome("o", ToolState()))
            buf.get(f"s{t % 2}", f"k{t}-{i}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    stats = buf.stats()
    assert stats.puts == 2000 and stats.hits == 2000 and buf.session_size("s0") == 1000


def test_parse_plausibility():
    cases = {"Action: Search[x]\nPlausibility: 4": 4, "Search[x] (score 2/5)": 2, "Search[x] - 5": 5,
             "confidence=3.5": 3.5, "Plausibility: 9": None, "Search[x]": None, "": None}
    for text, want in cases.items():
        assert parse_plausibility(text) == want, text


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(alphabet=string.printable, max_size=120))
def test_plausibility_fuzz_never_raises(text):
    score = parse_plausibility(text)
    assert score is None or 1 <= score <= 5


class CountingSearch:
    """SearchTool with per-action latency and scripted failures, counting calls per action."""

    def __init__(self, latency=None, fail_first=()):
        self.inner = SearchTool(CORPUS)
        self.latency = latency or {}
        self.fail_first = set(fail_first)
        self.calls = collections.Counter()

    async def run(self, action, state):
        key = action.arg.lower()
        self.calls[key] += 1
        await asyncio.sleep(self.latency.get(key, 0.005))
        if key in self.fail_first and self.calls[key] == 1:
            return tool_error("injected", state)
        return self.inner.execute(action, state)


def spec_line(arg, score):
    return f"Action: Search[{arg}]\nPlausibility: {score}"


def make_agent(client, tool, **spec):
    return ReActAgent(
        client,
        tool,
        config=AgentConfig(max_steps=6),
        features=AgentFeatures(speculate=True),
        action_server=ActionServer(tool, timeout_s=5.0),
        speculation=SpeculationConfig(k=2, beta=3, **spec),
    )


def test_threshold_switches_from_aggressive_to_verified():
    client = ScriptedClient(
        {
            "speculative": [[spec_line("Alpha", 5), spec_line("Gamma", 2)], [spec_line("Gamma", 2), spec_line("Gamma", 1)], [spec_line("Gamma", 1)] * 2],
            "large": ["Thought: now beta.\nAction: Search[Beta]", "Thought: done.\nAction: Finish[river]"],
        }
    )
    tool = CountingSearch()
    result = asyncio.run(make_agent(client, tool).run("q"))
    assert result.answer == "river"
    spec = result.metrics.speculation
    assert spec["skipped_reasoning_calls"] == 1 and spec["phase_switch_step"] == 2 and spec["phase"] == "verified"
    assert len(client.calls_on("large")) == 2  # step 1 had no reasoning call
    assert result.steps[0].response == "Action 1: Search[Alpha]" and result.steps[0].observation == "Alpha is a town."
    assert result.steps[1].observation == "Beta is a river."
    assert client.calls_on("speculative")[0].n == 2 and client.calls_on("speculative")[0].max_tokens == 24
    assert tool.calls["alpha"] == 1 and tool.calls["beta"] == 1


def _verified_client(real_arg, spec_arg, reasoning_s):
    return ScriptedClient(
        {
            "speculative": [[spec_line(spec_arg, 2), spec_line("Gamma", 1)]] + [["Action: Finish[x]\nPlausibility: 1"] * 2] * 2,
            "large": [f"Thought: t.\nAction: Search[{real_arg}]", "Action: Finish[done]"],
        },
        latency_s=lambda call: 0.0 if call.speculative else reasoning_s,
    )


def test_buffer_hit_reuses_the_speculated_result():
    tool = CountingSearch()
    client = _verified_client("  beta ", "Beta", reasoning_s=0.05)  # speculation finishes first
    result = asyncio.run(make_agent(client, tool, aggressive=False).run("q"))
    assert result.steps[0].observation == "Beta is a river."
    assert tool.calls["beta"] == 1 and result.metrics.buffer_hits == 1


def test_real_action_joins_inflight_speculation_and_survives_its_failure():
    # the speculative Beta is still running when the real Beta arrives: shared, not re-run
    tool = CountingSearch(latency={"beta": 0.05})
    result = asyncio.run(make_agent(_verified_client("Beta", "Beta", 0.01), tool, aggressive=False).run("q"))
    assert result.steps[0].observation == "Beta is a river." and tool.calls["beta"] == 1
    spec = result.metrics.speculation
    assert (spec["inflight_hits"], spec["buffer_hits"], spec["buffer_misses"]) == (1, 0, 0)
    # the same, but the speculative execution fails: the main path runs the tool itself
    tool = CountingSearch(latency={"beta": 0.05}, fail_first={"beta"})
    result = asyncio.run(make_agent(_verified_client("Beta", "Beta", 0.01), tool, aggressive=False).run("q"))
    assert result.steps[0].observation == "Beta is a river." and tool.calls["beta"] == 2
    assert result.metrics.tool_errors == 0
    spec = result.metrics.speculation
    assert (spec["inflight_hits"], spec["buffer_misses"]) == (0, 1)  # the failed speculation served nothing
    # failed speculation finished before the real action: nothing buffered, tool called again
    tool = CountingSearch(fail_first={"beta"})
    result = asyncio.run(make_agent(_verified_client("Beta", "Beta", 0.05), tool, aggressive=False).run("q"))
    assert result.steps[0].observation == "Beta is a river." and tool.calls["beta"] == 2 and result.metrics.buffer_hits == 0


def test_slow_speculation_does_not_delay_the_main_path():
    slow_s = 1.0

    async def main():
        tool = CountingSearch(latency={"gamma": slow_s, "alpha": slow_s})
        agent = make_agent(_verified_client("Beta", "Alpha", 0.01), tool, aggressive=False)
        start = time.perf_counter()
        result = await agent.run("q")
        wall = time.perf_counter() - start
        await asyncio.sleep(0.01)  # let cancelled executions unwind
        return result, wall, agent.server.running

    result, wall, running = asyncio.run(main())
    assert result.answer == "done" and result.steps[0].observation == "Beta is a river."
    assert wall < slow_s / 3  # the main path never waited for the slow speculative calls
    assert running == 0  # the session's speculative executions were cancelled at its end


def test_planner_greedy_equals_brute_force_under_convex_cost():
    rng = random.Random(5)
    for _ in range(200):
        n, k = rng.randint(0, 7), rng.randint(1, 5)
        sessions = [SessionSpeculationInfo(f"s{i}", rng.random(), rng.uniform(0, 3)) for i in range(n)]
        a, c = rng.uniform(0, 1), rng.uniform(0, 0.3)
        cost = lambda m: a * m + c * m * m
        planner = SpeculationPlanner(cost, k=k)
        benefit = {s.session_id: (1 - (1 - s.hit_probability) ** k) * s.mean_tool_time_s for s in sessions}
        best = max(
            (sum(benefit[s.session_id] for s in sub) - cost(len(sub)) for r in range(n + 1) for sub in itertools.combinations(sessions, r)),
            default=0.0,
        )
        chosen = planner.select(sessions)
        assert abs(sum(benefit[i] for i in chosen) - cost(len(chosen)) - best) < 1e-9
    assert SpeculationPlanner(lambda m: 10.0 * m).select([SessionSpeculationInfo("x", 0.9, 1.0)]) == []


def test_verified_phase_guesses_continue_the_reasoning_prompt_with_an_action_prefix():
    """The verified phase executes every guess whatever its score, so its call is the reasoning
    call's own prompt with the reply forced to start "Action:": its tokens extend the reasoning
    prompt's (one shared prefix in the cache), and the model writes the rest of one line (SPAgent:
    under ~10 tokens)."""
    from agentinfer_jax.agents.spagent import ActionSpeculator
    from agentinfer_jax.tokenizer import load_tokenizer

    client = ScriptedClient({"speculative": [[" Search[Paris]", " Lookup[tower]"]]})
    spec = ActionSpeculator(client, ActionServer(SearchTool({"Paris": ["Paris is a city."]})), ActionBuffer(), "s",
                            SpeculationConfig(k=2, aggressive=False))
    messages = [{"role": "user", "content": "Question: Where?"}]
    candidates = asyncio.run(spec.propose(messages, "large", scored=False))
    assert sorted(str(c.action) for c in candidates) == ["Lookup[tower]", "Search[Paris]"]
    assert all(c.score == 0 for c in candidates) and spec.metrics.unscored_candidates == 0
    call = client.calls[0]
    assert call.speculative and call.continue_final_message and call.stop == ["\n"]
    assert call.messages[:-1] == messages and call.messages[-1]["role"] == "assistant"
    tok = load_tokenizer()
    reasoning = tok.encode_chat(messages)
    guess = tok.encode_chat(call.messages, continue_final_message=True)
    assert guess[:len(reasoning)] == reasoning and len(guess) - len(reasoning) <= 4


def test_gate_admits_the_best_subset_online_and_frees_room_on_release():
    """Sessions asking in order of benefit (none leaving) end up admitted exactly as the best subset
    found by brute force under a convex cost; a release makes room for a refused session."""
    rng = random.Random(11)
    for _ in range(200):
        n, k = rng.randint(1, 7), rng.randint(1, 4)
        p = [rng.random() for _ in range(n)]
        a, c = rng.uniform(0, 0.5), rng.uniform(0, 0.3)
        cost = lambda m: a * m + c * m * m  # noqa: E731
        tool_s = rng.uniform(0.1, 3)
        gate = SpeculationGate(SpeculationPlanner(cost, k=k), hit_probability=lambda i: p[i], default_tool_time_s=tool_s)
        benefit = [(1 - (1 - q) ** k) * tool_s for q in p]
        order = sorted(range(n), key=lambda i: -benefit[i])
        admitted = [i for i in order if gate.admit(f"s{i}", i)]
        best = max(sum(benefit[i] for i in sub) - cost(len(sub))
                   for r in range(n + 1) for sub in itertools.combinations(range(n), r))
        assert abs(sum(benefit[i] for i in admitted) - cost(len(admitted)) - best) < 1e-9
        assert set(gate.active) == {f"s{i}" for i in admitted} and gate.refused == n - len(admitted)
    # One slot: the second asks in vain until the first's step ends.
    gate = SpeculationGate(SpeculationPlanner(lambda m: 0.0 if m <= 1 else math.inf), default_tool_time_s=1.0)
    assert gate.admit("a", 1) and not gate.admit("b", 1)
    gate.release("a")
    assert gate.admit("b", 1)
    gate.observe_tool(0.5)
    gate.observe_tool(1.5)
    assert gate.mean_tool_time_s == 1.0


def test_agent_guesses_only_where_the_gate_admits():
    """A gate whose cost beats any benefit stops every guess (the answer is the same); a free one
    lets them run; either way no session stays active after its run."""
    for cost, guesses in ((lambda m: 100.0 * m, 0), (lambda m: 0.0, 1)):
        gate = SpeculationGate(SpeculationPlanner(cost, k=2))
        tool = CountingSearch()
        client = _verified_client("Beta", "Beta", reasoning_s=0.05)
        agent = ReActAgent(client, tool, config=AgentConfig(max_steps=6), features=AgentFeatures(speculate=True),
                           action_server=ActionServer(tool, timeout_s=5.0),
                           speculation=SpeculationConfig(k=2, beta=3, aggressive=False), speculation_gate=gate)
        result = asyncio.run(agent.run("q"))
        assert result.answer == "done" and result.steps[0].observation == "Beta is a river."
        assert min(len(client.calls_on("speculative")), 1) == guesses
        assert result.metrics.speculation["gated_steps"] == (0 if guesses else 2)
        assert result.metrics.buffer_hits == guesses and gate.active == {}


def test_buffered_search_miss_does_not_rewind_the_browsing_state():
    """Step 1 guesses Search[Zeta] (a miss, run with no page open) while the real Search[Alpha] opens
    Alpha; step 2's real Search[Zeta] must not take the buffered miss's state, or step 3's Lookup
    finds no page. Speculation must give the same session as no speculation."""
    script = ["Action: Search[Alpha]", "Action: Search[Zeta]", "Action: Lookup[town]", "Action: Finish[x]"]
    plain = asyncio.run(ReActAgent(ScriptedClient(list(script)), SearchTool(CORPUS)).run("q"))
    client = ScriptedClient({"speculative": [" Search[Zeta]"] + [" Search[Gamma]"] * 3, "large": script},
                            latency_s=lambda call: 0.0 if call.speculative else 0.05)
    result = asyncio.run(make_agent(client, CountingSearch(), aggressive=False).run("q"))
    assert [s.observation for s in result.steps] == [s.observation for s in plain.steps]
    assert result.steps[2].observation == "(Result 1 / 1) Alpha is a town."


def test_cancelling_a_session_stops_its_speculative_tool_calls():
    """Cancelling a session while its real and speculative tool calls run: when the cancellation
    reaches the caller, every tool call has stopped (before, a tool still cleaning up after its
    cancellation kept running), nothing of the session is left in the buffer, no thread is added."""
    threads_before = set(threading.enumerate())

    class SlowCleanup:
        def __init__(self):
            self.running = 0
            self.inner = SearchTool(CORPUS)

        async def run(self, action, state):
            self.running += 1
            try:
                await asyncio.sleep(5.0)
                return self.inner.execute(action, state)
            finally:
                await asyncio.sleep(0.05)  # closing a connection, say
                self.running -= 1

    async def main():
        tool = SlowCleanup()
        client = ScriptedClient({"speculative": [" Search[Beta]"] * 3, "large": ["Action: Search[Alpha]"] * 3},
                                latency_s=lambda call: 0.0 if call.speculative else 0.02)
        agent = make_agent(client, tool, aggressive=False)
        session = asyncio.create_task(agent.run("q", session_id="s1"))
        await asyncio.sleep(0.2)
        started = tool.running
        session.cancel()
        try:
            await session
        except asyncio.CancelledError:
            pass
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return started, tool.running, left, agent.server.running, agent.buffer.session_size("s1")

    started, still_running, left, in_flight, buffered = asyncio.run(main())
    assert started == 2  # the real Search[Alpha] and the speculative Search[Beta]
    assert still_running == 0 and left == [] and in_flight == 0 and buffered == 0
    assert set(threading.enumerate()) <= threads_before


def test_a_second_cancellation_during_cleanup_still_empties_the_buffer_and_stops_the_distiller():
    """Cancelled again while it closes (a wait_for timeout followed by a shutdown, say), a session
    used to skip the rest of its cleanup: its buffered results stayed and its distillation ran on."""
    from agentinfer_jax.agents.compress import MemoryDistiller

    class Tool:
        inner = SearchTool(CORPUS)

        async def run(self, action, state):
            try:
                await asyncio.sleep(0.01 if action.arg in ("Alpha", "Beta") else 5.0)
                return self.inner.execute(action, state)
            finally:
                if action.arg == "Gamma":
                    await asyncio.sleep(0.05)  # the cleanup the second cancellation lands in

    async def main():
        client = ScriptedClient({"speculative": [" Search[Beta]"] + [" Search[Gamma]"] * 2,
                                 "large": ["Action: Search[Alpha]", "Action: Search[Gamma]"], "small": ["[1] x"]},
                                latency_s=lambda call: 0.0 if call.speculative else 0.02 if call.role == "large" else 30.0)
        words = lambda text: len(text.split())  # noqa: E731
        agent = ReActAgent(client, Tool(), features=AgentFeatures(speculate=True, distill_memory=True),
                           speculation=SpeculationConfig(k=2, aggressive=False), token_counter=words,
                           distiller_factory=lambda sid: MemoryDistiller(client, threshold_tokens=1, token_counter=words))
        session = asyncio.create_task(agent.run("q", session_id="s1"))
        await asyncio.sleep(0.2)  # Beta buffered, the distiller waiting on the small model, Gamma running
        buffered = agent.buffer.session_size("s1")
        session.cancel()
        await asyncio.sleep(0.01)
        session.cancel()
        try:
            await session
        except asyncio.CancelledError:
            pass
        await asyncio.sleep(0.2)  # what was cancelled has unwound; nothing may still be running
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return buffered, agent.buffer.session_size("s1"), left

    buffered, after, left = asyncio.run(main())
    assert buffered == 1 and after == 0 and left == []
