"""The ReAct loop end to end on scripted, replayed and OpenAI-compatible (mocked HTTP) backends."""

import asyncio
import json
import random
import re

import httpx
import pytest
from tokenizers import Tokenizer

from agentinfer_jax.agents.action_server import ActionServer
from agentinfer_jax.agents.clients import TOKENIZER_PATH, ClientError, LatencyModel, OpenAIClient, ReplayClient, ScriptedClient
from agentinfer_jax.agents.loop import AgentConfig, ReActAgent
from agentinfer_jax.agents.react import parse_step
from agentinfer_jax.agents.tools import ReplayTool, SearchTool, ToolLatency
from agentinfer_jax.workloads.traces import default_trace_path, load_traces

CORPUS = {"Alpha": ["Alpha is a town.", "Alpha has a river."], "Beta": ["Beta is a river."]}


def _replayable(trajectories):
    for t in trajectories:
        turns = [r for _, r in t.assistant_turns()]
        steps = [parse_step(r) for r in turns]
        if all(s.action is not None for s in steps) and steps[-1].action.kind == "finish" and all(
            s.action.kind != "finish" for s in steps[:-1]
        ) and t.messages[0]["role"] == "user" and [m["role"] for m in t.messages[1:]] == ["assistant", "user"] * len(turns):
            yield t


def test_lossless_replay_of_recorded_trajectories():
    trajectories = list(_replayable(load_traces(default_trace_path())))
    assert len(trajectories) >= 5
    chosen = random.Random(0).sample(trajectories, 5)
    client = ReplayClient.from_trajectories(chosen)

    async def replay(t):
        observations = [m["content"] for m in t.messages[2:-1:2]]
        agent = ReActAgent(client, ReplayTool(observations), config=AgentConfig(max_steps=len(observations) + 1))
        return await agent.run(t.messages[0]["content"], session_id=t.id)

    async def main():
        return await asyncio.gather(*(replay(t) for t in chosen))  # concurrent sessions keep apart

    for t, result in zip(chosen, asyncio.run(main())):
        got = [m["content"] for m in result.messages[2:]]
        want = [m["content"].strip() for m in t.messages[1:-1]]  # the recording's last message is its reward
        want = [re.sub(r"^Observation\s*\d*:\s*", "", w) if i % 2 else w for i, w in enumerate(want)]
        got = [re.sub(r"^Observation \d+: ", "", g) if i % 2 else g for i, g in enumerate(got)]
        assert got[: len(want)] == want
        assert result.answer == parse_step(want[-1]).action.arg and result.metrics.finished
        assert result.metrics.llm_calls == client_calls(t) and client.remaining(t.id) == 0


def client_calls(t):
    return sum(1 for _ in t.assistant_turns())


def test_replay_latency_model_and_exhaustion():
    tok = Tokenizer.from_file(str(TOKENIZER_PATH))
    count = lambda s: len(tok.encode(s, add_special_tokens=False).ids)
    model = LatencyModel(base_s=0.1, prefill_s_per_token=1e-3, decode_s_per_token=2e-2, sleep=False)
    client = ReplayClient({"s": ["Thought: a\nAction: Finish[b]"]}, latency=model)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Question: why?"}]
    out = asyncio.run(client.complete(msgs, session_id="s", n=2))
    prompt = sum(count(m["content"]) + 5 for m in msgs)
    assert out.prompt_tokens == prompt and out.completion_tokens == 2 * count(out.text)
    assert out.latency_s == pytest.approx(0.1 + 1e-3 * prompt + 2e-2 * out.completion_tokens)
    with pytest.raises(ClientError):
        asyncio.run(client.complete(msgs, session_id="s"))
    with pytest.raises(ValueError, match="role"):
        asyncio.run(client.complete(msgs, session_id="s", role="medium"))


def test_malformed_output_and_step_limit_never_raise():
    client = ScriptedClient(["I am not sure.", "Action 2: Search[", "Thought: ok\nAction: Search[alpha]\nObservation: fake", "Action: Lookup[river]"])
    result = asyncio.run(ReActAgent(client, SearchTool(CORPUS), config=AgentConfig(max_steps=4)).run("Where?"))
    assert [s.observation.split(":")[0] for s in result.steps[:2]] == ["Invalid action"] * 2
    assert result.metrics.parse_errors == 2 and not result.metrics.finished and result.answer is None
    assert result.steps[2].response == "Thought: ok\nAction: Search[alpha]"  # hallucinated observation cut
    assert result.steps[3].observation == "(Result 1 / 1) Alpha has a river."
    assert client.calls[0].stop == ["\nObservation"] and client.calls[0].session_id == result.metrics.session_id


def test_tool_failures_and_timeouts_become_observations():
    class Flaky:
        def __init__(self):
            self.n = 0

        async def run(self, action, state):
            self.n += 1
            if self.n == 1:
                raise RuntimeError("search backend 503")
            await asyncio.sleep(1.0 if self.n == 2 else 0.0)
            return SearchTool(CORPUS).execute(action, state)

    tool = Flaky()
    client = ScriptedClient(["Action: Search[Alpha]"] * 3 + ["Action: Finish[x]"])
    agent = ReActAgent(client, tool, action_server=ActionServer(tool, timeout_s=0.05))
    result = asyncio.run(agent.run("q"))
    obs = [s.observation for s in result.steps]
    assert obs[0].startswith("tool error: ") and "503" in obs[0]
    assert obs[1].startswith("tool error: ") and "timed out" in obs[1]
    assert obs[2] == "Alpha is a town. Alpha has a river." and result.metrics.tool_errors == 2
    assert result.answer == "x"
    latency = ToolLatency(0.02)
    timed = asyncio.run(ReActAgent(ScriptedClient(["Action: Search[Beta]", "Action: Finish[y]"]), SearchTool(CORPUS, latency=latency)).run("q"))
    assert timed.metrics.tool_time_s >= 0.02 and timed.metrics.llm_time_s < timed.metrics.wall_s


def test_backend_failure_ends_session_cleanly():
    async def main():
        client = ScriptedClient(["Action: Search[Alpha]", ClientError("connection reset")])
        result = await ReActAgent(client, SearchTool(CORPUS)).run("q")
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return result, pending

    result, pending = asyncio.run(main())
    assert result.metrics.error and "connection reset" in result.metrics.error and len(result.steps) == 1
    assert pending == []
    with pytest.raises(ValueError, match="question"):
        asyncio.run(ReActAgent(ScriptedClient(["x"]), SearchTool(CORPUS)).run("  "))


def test_openai_client_sends_session_fields_and_reads_usage():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        return httpx.Response(
            200,
            json={
                "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": i, "message": {"role": "assistant", "content": f"out{i}"}, "finish_reason": "stop"} for i in range(body["n"])],
                "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18, "prompt_tokens_details": {"cached_tokens": 4}},
            },
        )

    async def main():
        http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        client = OpenAIClient("http://test/v1", {"large": "big-model", "small": "tiny-model"}, http_client=http)
        msgs = [{"role": "user", "content": "hi"}]
        out = await client.complete(msgs, role="small", max_tokens=5, stop=["\n"], n=2, session_id="sess-1", priority=3, speculative=True)
        await client.complete(msgs, role="large", max_tokens=5)
        await client.close()
        return out

    out = asyncio.run(main())
    assert out.texts == ["out0", "out1"] and (out.prompt_tokens, out.completion_tokens, out.cached_tokens) == (11, 7, 4)
    assert seen[0]["model"] == "tiny-model" and seen[0]["session_id"] == "sess-1" and seen[0]["priority"] == 3
    assert seen[0]["speculative"] is True and seen[0]["n"] == 2 and seen[0]["stop"] == ["\n"]
    assert seen[1]["model"] == "big-model" and "session_id" not in seen[1] and "speculative" not in seen[1]


def test_hung_llm_call_times_out_and_ends_the_session_with_an_error():
    """A backend that never answers (the in-process EngineClient has no timeout of its own) used
    to hang the session; with llm_timeout_s it ends within the bound, steps kept, nothing left running."""

    async def main():
        client = ScriptedClient(["Action: Search[Alpha]", "Action: Finish[x]"],
                                latency_s=lambda call: 0.0 if len(call.messages) == 2 else 30.0)
        result = await ReActAgent(client, SearchTool(CORPUS), config=AgentConfig(llm_timeout_s=0.1)).run("q")
        return result, [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    result, pending = asyncio.run(main())
    assert result.metrics.error == "ClientError: LLM call timed out after 0.1s"
    assert result.metrics.wall_s < 2.0 and pending == []
    assert [s.observation for s in result.steps] == ["Alpha is a town. Alpha has a river."] and not result.metrics.finished
    with pytest.raises(ValueError, match="llm_timeout_s"):
        AgentConfig(llm_timeout_s=0)


def test_failing_result_filter_keeps_the_unfiltered_observation():
    """A search-result filter that raises (or times out) used to end the session and lose the
    tool's observation; the observation now stands unfiltered and the failure is counted."""
    from agentinfer_jax.agents.compress import SearchResultFilter
    from agentinfer_jax.agents.loop import AgentFeatures

    class Broken(SearchResultFilter):
        async def filter(self, question, results, *, session_id=None):
            raise RuntimeError("ranker down")

    client = ScriptedClient(["Action: Search[river]", "Action: Finish[Beta]"])
    agent = ReActAgent(client, SearchTool(CORPUS), features=AgentFeatures(filter_results=True), result_filter=Broken())
    result = asyncio.run(agent.run("Which page is a river?"))
    assert result.metrics.error is None and result.answer == "Beta" and result.metrics.filter_errors == 1
    assert result.steps[0].observation.startswith("Could not find river. Similar: [")


def test_unusable_native_tool_calls_become_invalid_tool_call_observations():
    """A tool call that is not a dict crashed the session (AttributeError); one without an id broke
    the next request's history (KeyError). Both now give a step the model can read."""
    from agentinfer_jax.agents.clients import Completion

    def reply(*calls):
        return Completion([""], 1, 1, 0.0, tool_calls=calls)

    client = ScriptedClient([
        reply("garbage"),
        reply({"type": "function", "function": {"name": "search", "arguments": '{"entity": "Alpha"}'}}),  # no id
        reply({"id": "c3", "type": "function", "function": {"name": "finish", "arguments": '{"answer": "x"}'}}),
    ])
    result = asyncio.run(ReActAgent(client, SearchTool(CORPUS), config=AgentConfig(native_tools=True)).run("q"))
    assert result.metrics.error is None and result.answer == "x" and result.metrics.parse_errors == 1
    assert result.steps[0].observation.startswith("Invalid tool call: cannot run str 'garbage'")
    assert result.steps[1].observation == "Alpha is a town. Alpha has a river." and result.steps[1].tool_call is None
    assert [m["role"] for m in client.calls[-1].messages[2:]] == ["assistant", "user", "assistant", "user"]


def test_closing_the_agent_under_a_running_session_is_a_tool_error_not_a_cancellation():
    """`agent.aclose()` cancels running tool calls; a session waiting on one used to receive the
    CancelledError as if it had been cancelled itself, and `run` raised it."""

    async def main():
        agent = ReActAgent(ScriptedClient(["Action: Search[Alpha]", "Action: Finish[x]"]), SearchTool(CORPUS, latency=5.0))
        session = asyncio.create_task(agent.run("q"))
        await asyncio.sleep(0.05)
        await agent.aclose()
        return await asyncio.wait_for(session, 2.0)

    result = asyncio.run(main())
    assert result.steps[0].observation == "tool error: Search[Alpha] was cancelled (the action server closed)"
    assert result.answer == "x" and result.metrics.tool_errors == 1 and result.metrics.error is None
