"""SPAgent's Action Server: runs tool calls asynchronously, bounded, timed out and de-duplicated."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from agentinfer_jax.agents.react import Action
from agentinfer_jax.agents.tools import (ToolEnvironment, ToolError, ToolOutcome, ToolState, action_cache_key,
                                         reusable_in, tool_error)


class _ToolTimeout(Exception):
    """The server's own timeout (a tool's own TimeoutError is a tool failure like any other)."""


@dataclasses.dataclass
class ServerStats:
    submitted: int = 0
    invocations: int = 0
    deduplicated: int = 0
    timeouts: int = 0
    errors: int = 0
    retried_after_failed_speculation: int = 0
    retried_in_other_state: int = 0  # joined an execution whose outcome was not reusable in the caller's state
    abandoned: int = 0  # tool calls that ignored their cancellation for cancel_grace_s


@dataclasses.dataclass
class _Flight:
    """One running execution and how many callers wait on it."""

    task: asyncio.Task[ToolOutcome]
    speculative: bool
    key: str
    action: Action
    state: ToolState
    waiters: int = 0


class ActionServer:
    """Executes actions on a tool environment; never raises for tool failures.

    - Real (non-speculative) calls and speculative calls have separate concurrency limits, so
      speculation can never take the slots the critical path needs.
    - Every call has a timeout; a timeout, an exception or a result that is not a ToolOutcome
      becomes an ok=False outcome whose observation starts with "tool error: ". The timeout holds
      even for a tool that ignores its cancellation: after `cancel_grace_s` more it is abandoned
      (counted, cancelled again by `aclose`) and its late result is never used.
    - Identical actions in flight (same cache key, which includes the browsing state where it
      matters) share one execution; it is cancelled when its last waiter is, and that waiter
      returns only once it has stopped. A real call that joined a speculative execution which
      then failed, or whose outcome does not carry over to the caller's state (`reusable_in`),
      runs the action itself, so speculation never corrupts the main path.
    - `aclose` cancels what is still running.
    """

    def __init__(
        self,
        tool: ToolEnvironment,
        *,
        max_concurrency: int = 16,
        max_speculative_concurrency: int = 16,
        timeout_s: float = 30.0,
        cancel_grace_s: float = 1.0,
    ) -> None:
        if max_concurrency < 1 or max_speculative_concurrency < 1:
            raise ValueError("ActionServer concurrency limits must be >= 1")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if not cancel_grace_s >= 0:
            raise ValueError(f"cancel_grace_s must be >= 0, got {cancel_grace_s}")
        self._tool = tool
        self._slots = asyncio.Semaphore(max_concurrency)
        self._speculative_slots = asyncio.Semaphore(max_speculative_concurrency)
        self.timeout_s = timeout_s
        self.cancel_grace_s = cancel_grace_s
        self._in_flight: dict[str, _Flight] = {}
        self._abandoned: set[asyncio.Future[ToolOutcome]] = set()
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
            if not outcome.ok:
                if speculative or not shared.speculative:
                    return outcome, shared.speculative
                self.stats.retried_after_failed_speculation += 1
            elif reusable_in(outcome, state):
                return outcome, shared.speculative
            else:
                self.stats.retried_in_other_state += 1
        flight = _Flight(asyncio.create_task(self._run(action, state, speculative)), speculative, key, action, state)
        self._in_flight[key] = flight
        flight.task.add_done_callback(lambda t, key=key: self._forget(key, t))
        return await self._wait(flight), False

    async def _wait(self, flight: _Flight) -> ToolOutcome:
        # Shielded so one waiter's cancellation leaves the others served; the last waiter to leave
        # cancels the execution so that no tool call outlives everyone interested in it.
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.task)
        except asyncio.CancelledError:
            if flight.task.cancelled() and not asyncio.current_task().cancelling():
                # the execution was cancelled under us (aclose), not this caller: an error, not a crash
                return tool_error(f"{flight.action} was cancelled (the action server closed)", flight.state)
            if flight.waiters == 1 and not flight.task.done():
                flight.task.cancel()
                # a caller arriving now must start afresh, not join an execution that is being cancelled
                self._forget(flight.key, flight.task)
                # `_run` stops within cancel_grace_s of its cancellation: wait, so nothing outlives its callers
                await asyncio.wait({flight.task})
            raise
        finally:
            flight.waiters -= 1

    def _forget(self, key: str, task: asyncio.Task[ToolOutcome]) -> None:
        flight = self._in_flight.get(key)
        if flight is not None and flight.task is task:
            del self._in_flight[key]

    async def _call_tool(self, action: Action, state: ToolState) -> object:
        """The tool's result within timeout_s; raises _ToolTimeout past it."""
        call = asyncio.ensure_future(self._tool.run(action, state))
        try:
            done, _ = await asyncio.wait({call}, timeout=self.timeout_s)
        except asyncio.CancelledError:
            await self._stop(call)
            raise
        if not done:
            await self._stop(call)
            raise _ToolTimeout()
        if call.cancelled():  # it raised CancelledError on its own (e.g. a closed connection pool)
            raise ToolError("the tool cancelled itself")
        return call.result()

    async def _stop(self, call: asyncio.Future[ToolOutcome]) -> None:
        """Cancels a tool call and gives it cancel_grace_s to stop; a call that will not is abandoned,
        never awaited (wait_for would wait for it and then return its late result)."""
        call.cancel()
        self._abandoned.add(call)
        call.add_done_callback(self._abandoned.discard)
        await asyncio.wait({call}, timeout=self.cancel_grace_s)
        if not call.done():
            self.stats.abandoned += 1

    async def _run(self, action: Action, state: ToolState, speculative: bool) -> ToolOutcome:
        slots = self._speculative_slots if speculative else self._slots
        async with slots:
            self.stats.invocations += 1
            start = time.perf_counter()
            try:
                outcome = await self._call_tool(action, state)
            except _ToolTimeout:
                self.stats.timeouts += 1
                return tool_error(f"{action} timed out after {self.timeout_s:g}s", state, time.perf_counter() - start)
            except Exception as e:  # a tool bug must not take the agent loop down
                self.stats.errors += 1
                return tool_error(f"{action} failed: {type(e).__name__}: {e}", state, time.perf_counter() - start)
            if not (isinstance(outcome, ToolOutcome) and isinstance(outcome.observation, str)
                    and isinstance(outcome.state, ToolState)):
                self.stats.errors += 1
                what = type(outcome).__name__ if not isinstance(outcome, ToolOutcome) else "a malformed ToolOutcome"
                return tool_error(f"{action} returned {what}, not a ToolOutcome", state, time.perf_counter() - start)
            if not outcome.ok:
                self.stats.errors += 1
            return dataclasses.replace(outcome, started_s=start, finished_s=time.perf_counter(), from_state=state)

    async def aclose(self) -> None:
        """Cancels executions still running (and abandoned tool calls) and waits for them to finish,
        abandoned ones at most cancel_grace_s."""
        tasks = [f.task for f in self._in_flight.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._in_flight.clear()
        stragglers = list(self._abandoned)
        for t in stragglers:
            t.cancel()
        if stragglers:
            await asyncio.wait(stragglers, timeout=self.cancel_grace_s)
