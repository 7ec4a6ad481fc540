"""The orchestrator drives our own OpenAI-compatible server on loopback, end to end.

The tiny random model writes garbage, so the agent meets malformed steps every turn: the test
checks that the whole path (ReActAgent -> OpenAIClient -> HTTP -> ServingLoop -> Engine) keeps
working, that a session's later calls reuse its cached prefix on the server, and that the server
returns every block and keeps serving.
"""

from __future__ import annotations

import asyncio

import httpx

from agentinfer_jax.agents.clients import OpenAIClient
from agentinfer_jax.agents.loop import AgentConfig, ReActAgent
from agentinfer_jax.agents.tools import SearchTool
from agentinfer_jax.serving.builder import ServerConfig, build_stack
from agentinfer_jax.serving.server import BackgroundServer

CORPUS = {"Paris": ["Paris is the capital of France.", "It lies on the Seine."],
          "Seine": ["The Seine is a river in France."]}


class RecordingClient:
    """Delegates to the real client and keeps every Completion (to read cached_tokens)."""

    def __init__(self, inner):
        self.inner, self.completions = inner, []

    async def complete(self, messages, **kw):
        c = await self.inner.complete(messages, **kw)
        self.completions.append(c)
        return c


def test_react_agent_against_our_server_on_loopback():
    stack = build_stack(ServerConfig(config="tiny", num_blocks=160, block_size=16, max_num_seqs=4,
                                     max_tokens_per_step=64, min_token_bucket=64, max_model_len=2048,
                                     drafter="sam", num_draft_tokens=4))
    stack.engine.warmup()
    with BackgroundServer(stack) as srv:
        assert srv.base_url.startswith("http://127.0.0.1:")
        client = RecordingClient(OpenAIClient(f"{srv.base_url}/v1", stack.model_name, timeout_s=120))
        agent = ReActAgent(client, SearchTool(CORPUS), config=AgentConfig(max_steps=3, max_tokens=16))

        async def two_sessions():
            return await asyncio.gather(agent.run("What river flows through Paris?", session_id="s1"),
                                        agent.run("What is the capital of France?", session_id="s2"))

        results = asyncio.run(two_sessions())
        for res in results:
            assert res.metrics.llm_calls == len(res.steps) >= 1
            assert res.metrics.completion_tokens["large"] > 0
        assert len(client.completions) == sum(r.metrics.llm_calls for r in results)
        # A session's later calls extend its earlier prompt: the server's prefix cache serves them.
        later = [c for c in client.completions[2:]]
        assert later and max(c.cached_tokens for c in later) > 0
        with httpx.Client(base_url=srv.base_url, timeout=60) as http:
            assert http.get("/health").json() == {"status": "ok"}
    stack.prefix_cache.evict(stack.pool.num_used)
    assert stack.pool.num_used == 0
