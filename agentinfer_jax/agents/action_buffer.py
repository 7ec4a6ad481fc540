"""SPAgent's Action Buffer: results of speculatively executed actions, per session, bounded."""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable

from agentinfer_jax.agents.tools import ToolOutcome


@dataclasses.dataclass(frozen=True)
class BufferStats:
    hits: int
    misses: int
    puts: int
    evictions: int
    sessions: int

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


class ActionBuffer:
    """Thread-safe map (session, action cache key) -> ToolOutcome with LRU eviction.

    Invariants: each session holds at most `capacity_per_session` entries and at most
    `max_sessions` sessions are kept (the least recently used session is dropped whole).
    Only successful outcomes are stored: a failed speculative call must never stand in for a
    real one.
    """

    def __init__(self, capacity_per_session: int = 64, max_sessions: int = 4096) -> None:
        if capacity_per_session < 1 or max_sessions < 1:
            raise ValueError("ActionBuffer capacities must be >= 1")
        self._capacity = capacity_per_session
        self._max_sessions = max_sessions
        self._sessions: collections.OrderedDict[str, collections.OrderedDict[str, ToolOutcome]] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()
        self._hits = self._misses = self._puts = self._evictions = 0

    def put(self, session_id: str, key: str, outcome: ToolOutcome) -> bool:
        """Stores a successful outcome; returns False (and stores nothing) for failed ones."""
        if not outcome.ok:
            return False
        with self._lock:
            entries = self._sessions.get(session_id)
            if entries is None:
                entries = self._sessions[session_id] = collections.OrderedDict()
                while len(self._sessions) > self._max_sessions:
                    _, dropped = self._sessions.popitem(last=False)
                    self._evictions += len(dropped)
            self._sessions.move_to_end(session_id)
            entries[key] = outcome
            entries.move_to_end(key)
            while len(entries) > self._capacity:
                entries.popitem(last=False)
                self._evictions += 1
            self._puts += 1
        return True

    def get(self, session_id: str, key: str,
            usable: Callable[[ToolOutcome], bool] | None = None) -> ToolOutcome | None:
        """The stored outcome (counted as a hit) or None (a miss). An entry that `usable` rejects
        (e.g. one run in another browsing state) is a miss and stays stored."""
        with self._lock:
            entries = self._sessions.get(session_id)
            outcome = entries.get(key) if entries is not None else None
            if outcome is not None and usable is not None and not usable(outcome):
                outcome = None
            if outcome is None:
                self._misses += 1
                return None
            entries.move_to_end(key)  # type: ignore[union-attr]
            self._sessions.move_to_end(session_id)
            self._hits += 1
            return outcome

    def peek(self, session_id: str, key: str) -> ToolOutcome | None:
        """The stored outcome, without counting a lookup or refreshing its recency."""
        with self._lock:
            return self._sessions.get(session_id, {}).get(key)

    def __contains__(self, item: tuple[str, str]) -> bool:
        session_id, key = item
        with self._lock:
            return key in self._sessions.get(session_id, {})

    def drop_session(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def session_size(self, session_id: str) -> int:
        with self._lock:
            return len(self._sessions.get(session_id, {}))

    def stats(self) -> BufferStats:
        with self._lock:
            return BufferStats(self._hits, self._misses, self._puts, self._evictions, len(self._sessions))
