"""The one bridge from the serving loop's thread into asyncio, and never-retracted text deltas.

`RequestStream` submits a `Request` to a `ServingLoop` with a callback that only hops each
`StreamEvent` onto the submitting event loop (`call_soon_threadsafe` into an `asyncio.Queue`).
The HTTP server and the in-process `EngineClient` (agents/engine_client.py) both use it.

Invariant: whoever submits calls `cancel_unless_finished()` when it stops listening (a `finally`),
so an abandoned request never keeps its KV blocks. When the submitting event loop is already
closed (its owner returned while, say, a speculative call ran on), the callback cancels the
request itself: nobody is left to read it.
"""

from __future__ import annotations

import asyncio

from agentinfer_jax.serving.loop import ServingLoop, StreamEvent
from agentinfer_jax.serving.request import Request

__all__ = ["RequestStream", "TextDeltas"]


class RequestStream:
    """One submitted request and the queue its events arrive on (event-loop side)."""

    def __init__(self, loop: ServingLoop, request: Request, merged: asyncio.Queue | None = None,
                 index: int = 0) -> None:
        """`merged`: deliver `(index, event)` into this shared queue instead of the stream's own
        (the n choices of one call read one queue)."""
        self.loop = loop
        self.request = request
        self.token_ids: list[int] = []
        self.finished = False  # the final event was read, or the request was cancelled
        self.index = index
        self._aio = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue() if merged is None else merged
        self._merged = merged is not None
        self._done: asyncio.Future[StreamEvent] = self._aio.create_future()

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def submit(self) -> RequestStream:
        """Queues the request; raises InvalidRequestError (a ValueError) at once for bad input."""
        self.loop.submit(self.request, self._callback)
        return self

    def _callback(self, ev: StreamEvent) -> None:  # serving-loop thread: hand over, nothing else
        try:
            self._aio.call_soon_threadsafe(self._deliver, ev)
        except RuntimeError:
            if not self._aio.is_closed():
                raise
            self.loop.cancel(self.request.request_id)

    def _deliver(self, ev: StreamEvent) -> None:  # event loop
        self.token_ids.extend(ev.new_tokens)
        self._queue.put_nowait((self.index, ev) if self._merged else ev)
        if ev.finished and not self._done.done():
            self._done.set_result(ev)

    async def next_event(self) -> StreamEvent:
        """The next event in order (`token_ids` already holds every token delivered so far)."""
        ev = await self._queue.get()
        if ev.finished:
            self.finished = True
        return ev

    async def final_event(self) -> StreamEvent:
        """The last event (a future, not the queue: a waiter dropped with its closed event loop
        leaves nothing to clean up)."""
        ev = await self._done
        self.finished = True
        return ev

    def cancel_unless_finished(self) -> None:
        if not self.finished:
            self.loop.cancel(self.request.request_id)
            self.finished = True


class TextDeltas:
    """Turns the loop's "full text so far" into deltas that are never retracted.

    Holds back an incomplete UTF-8 tail (U+FFFD) and any tail that could still grow into a stop
    string (the loop would cut the text there), until the final event.
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.sent = ""

    def push(self, text: str | None, final: bool) -> str:
        if text is None or not text.startswith(self.sent):
            return ""
        ready = len(text) if final else self._stable_length(text)
        if ready <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):ready], text[:ready]
        return delta

    def _stable_length(self, text: str) -> int:
        end = len(text.rstrip("\ufffd"))
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, end), 0, -1):
                if text[end - n:end] == stop[:n]:
                    hold = max(hold, n)
                    break
        return end - hold
