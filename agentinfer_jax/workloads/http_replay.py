"""Agent sessions replayed over HTTP against any OpenAI-compatible endpoint (a server, a router).

Each session's calls run in order, as the agent made them: call i sends the recorded prompt (the
trace's messages, so call i + 1's prompt extends call i's), the model answers with up to
`max_tokens` tokens of its own (greedy), and the call's usage (prompt and cached tokens) is kept.
Sessions run concurrently, at most `concurrency` at a time. The client is the agents' own
`OpenAIClient`, with `session_id` in the body (and, through `http_client`, e.g. as a routing-key
header for a session-affine router).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from agentinfer_jax.agents.clients import ClientError, OpenAIClient
from agentinfer_jax.workloads.sessions import AgentSession

__all__ = ["CallResult", "SessionResult", "replay_sessions", "summarize"]


@dataclasses.dataclass
class CallResult:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    latency_s: float
    text: str
    attempts: int = 1  # > 1: the call failed (e.g. its replica died) and was sent again


@dataclasses.dataclass
class SessionResult:
    session_id: str
    calls: list[CallResult]
    started_s: float
    finished_s: float

    @property
    def latency_s(self) -> float:
        return self.finished_s - self.started_s

    @property
    def final_answer(self) -> str:
        return self.calls[-1].text if self.calls else ""


async def _call(client: OpenAIClient, session: AgentSession, i: int, session_id: str, max_tokens: int,
                retries: int) -> CallResult:
    messages = [dict(m) for m in session.calls[i].messages]
    for attempt in range(1, retries + 2):
        try:
            c = await client.complete(messages, max_tokens=max_tokens, temperature=0.0, session_id=session_id)
            return CallResult(c.prompt_tokens, c.cached_tokens, c.completion_tokens, c.latency_s, c.text, attempt)
        except ClientError:
            if attempt > retries:
                raise
            await asyncio.sleep(0.2 * attempt)
    raise AssertionError("unreachable")


async def _replay(base_url: str, model: str, sessions: Sequence[AgentSession], *, concurrency: int,
                  max_tokens: int, http_client_factory: Callable[[], Any] | None, session_suffix: str,
                  retries: int, after_call: Callable[[str, int], Any] | None) -> list[SessionResult]:
    http_client = http_client_factory() if http_client_factory is not None else None
    client = OpenAIClient(f"{base_url}/v1", model, http_client=http_client, timeout_s=300.0)
    gate = asyncio.Semaphore(concurrency)

    async def run(session: AgentSession) -> SessionResult:
        sid = session.session_id + session_suffix
        async with gate:
            t0 = time.perf_counter()
            calls = []
            for i in range(session.num_calls):
                calls.append(await _call(client, session, i, sid, max_tokens, retries))
                if after_call is not None:
                    await after_call(sid, i)
            return SessionResult(sid, calls, t0, time.perf_counter())

    try:
        return list(await asyncio.gather(*(run(s) for s in sessions)))
    finally:
        await client.close()


def replay_sessions(base_url: str, model: str, sessions: Sequence[AgentSession], *, concurrency: int = 4,
                    max_tokens: int = 8, http_client_factory: Callable[[], Any] | None = None,
                    session_suffix: str = "", retries: int = 0,
                    after_call: Callable[[str, int], Any] | None = None) -> list[SessionResult]:
    """Replays `sessions` against `base_url` (without /v1); results in the order of `sessions`.

    `session_suffix` makes the session ids of a repeated run distinct; `retries` re-sends a failed
    call (a client-side retry, counted in `CallResult.attempts`); `after_call(session_id, i)` is an
    async hook run after each call (fault injection)."""
    return asyncio.run(_replay(base_url, model, sessions, concurrency=concurrency, max_tokens=max_tokens,
                               http_client_factory=http_client_factory, session_suffix=session_suffix,
                               retries=retries, after_call=after_call))


def summarize(results: Sequence[SessionResult]) -> dict[str, float]:
    """Cached-token ratio (cached / prompt tokens over all calls), session latency mean and p99."""
    prompt = sum(c.prompt_tokens for r in results for c in r.calls)
    cached = sum(c.cached_tokens for r in results for c in r.calls)
    lat = np.array([r.latency_s for r in results]) if results else np.zeros(1)
    return {"sessions": len(results), "calls": sum(len(r.calls) for r in results), "prompt_tokens": prompt,
            "cached_tokens": cached, "cached_token_ratio": cached / prompt if prompt else 0.0,
            "mean_session_latency_s": float(lat.mean()), "p99_session_latency_s": float(np.percentile(lat, 99))}
