"""SPAgent's Action Server: runs tool calls asynchronously, bounded, timed out and de-duplicated."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from agentinfer_jax.agents.react import Action
from agentinfer_jax.agents.tools import ToolEnvironment, ToolOutcome, ToolState, action_cache_key, tool_error


@dataclasses.dataclass
class ServerStats:
    submitted: int = 0
    invocations: int = 0
    deduplicated: int = 0
    timeouts: int = 0
    errors: int = 0
    retried_after_failed_speculation: int = 0


@dataclasses.dataclass
class _Flight:
    """One running execution and how many callers wait on it."""

    task: asyncio.Task[ToolOutcome]
    speculative: bool
    waiters: int = 0


class ActionServer:
    """Executes actions on a tool environment; never raises for tool failures.

    - Real (non-speculative) calls and speculative calls have separate concurrency limits, so
      speculation can never take the slots the critical path needs.
    - Every call has a timeout; a timeout or exception becomes an ok=False outcome whose
      observation starts with "tool error: ".
    - Identical actions in flight (same cache key, which includes the browsing state where it
      matters) share one execution; it is cancelled when its last waiter is. A real call that joined a speculative execution which then
      failed runs the action itself, so speculation never corrupts the main path.
    - `aclose` cancels what is still running.
    """

    def __init__(
        self,
        tool: ToolEnvironment,
        *,
        max_concurrency: int = 16,
        max_speculative_concurrency: int = 16,
        timeout_s: float = 30.0,
    ) -> None:
        if max_concurrency < 1 or max_speculative_concurrency < 1:
            raise ValueError("ActionServer concurrency limits must be >= 1")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self._tool = tool
        self._slots = asyncio.Semaphore(max_concurrency)
        self._speculative_slots = asyncio.Semaphore(max_speculative_concurrency)
        self.timeout_s = timeout_s
        self._in_flight: dict[str, _Flight] = {}
        self.stats = ServerStats()

    def in_flight(self, action: Action, state: ToolState) -> bool:
        return action_cache_key(action, state) in self._in_flight

    @property
    def running(self) -> int:
        return len(self._in_flight)

    async def execute(self, action: Action, state: ToolState, *, speculative: bool = False) -> ToolOutcome:
        """The outcome of `action` in `state`, sharing an identical in-flight execution if any."""
        return (await self.execute_sharing(action, state, speculative=speculative))[0]

    async def execute_sharing(self, action: Action, state: ToolState, *,
                              speculative: bool = False) -> tuple[ToolOutcome, bool]:
        """`execute`, and whether the outcome came from a speculative execution already in flight."""
        self.stats.submitted += 1
        key = action_cache_key(action, state)
        shared = self._in_flight.get(key)
        if shared is not None:
            self.stats.deduplicated += 1
            outcome = await self._wait(shared)
            if outcome.ok or speculative or not shared.speculative:
                return outcome, shared.speculative
            self.stats.retried_after_failed_speculation += 1
        flight = _Flight(asyncio.create_task(self._run(action, state, speculative)), speculative)
        self._in_flight[key] = flight
        flight.task.add_done_callback(lambda t, key=key: self._forget(key, t))
        return await self._wait(flight), False

    @staticmethod
    async def _wait(flight: _Flight) -> ToolOutcome:
        # Shielded so one waiter's cancellation leaves the others served; the last waiter to leave
        # cancels the execution so that no tool call outlives everyone interested in it.
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.task)
        except asyncio.CancelledError:
            if flight.waiters == 1 and not flight.task.done():
                flight.task.cancel()
            raise
        finally:
            flight.waiters -= 1

    def _forget(self, key: str, task: asyncio.Task[ToolOutcome]) -> None:
        flight = self._in_flight.get(key)
        if flight is not None and flight.task is task:
            del self._in_flight[key]

    async def _run(self, action: Action, state: ToolState, speculative: bool) -> ToolOutcome:
        slots = self._speculative_slots if speculative else self._slots
        async with slots:
            self.stats.invocations += 1
            start = time.perf_counter()
            try:
                outcome = await asyncio.wait_for(self._tool.run(action, state), self.timeout_s)
            except asyncio.TimeoutError:
                self.stats.timeouts += 1
                return tool_error(f"{action} timed out after {self.timeout_s:g}s", state, time.perf_counter() - start)
            except Exception as e:  # a tool bug must not take the agent loop down
                self.stats.errors += 1
                return tool_error(f"{action} failed: {type(e).__name__}: {e}", state, time.perf_counter() - start)
            if not outcome.ok:
                self.stats.errors += 1
            return dataclasses.replace(outcome, started_s=start, finished_s=time.perf_counter())

    async def aclose(self) -> None:
        """Cancels executions still running and waits for them to finish."""
        tasks = [f.task for f in self._in_flight.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._in_flight.clear()
