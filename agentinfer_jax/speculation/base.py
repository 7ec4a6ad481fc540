"""The Drafter protocol the engine calls, and shared validation helpers.

A drafter proposes draft tokens for speculative decoding without a draft model. The engine calls,
per request: `begin` once with the prompt, `extend` with every token that enters the context
(accepted draft tokens plus the target's own token), `propose` before a verify step, `end` when the
request finishes. Requests of one agent session share a `session_id`; a drafter may keep
per-session state across requests (the next request's prompt usually extends the last context).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


class UnknownRequestError(KeyError):
    """A request id that was never begun, or was already ended."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else "unknown request"


@runtime_checkable
class Drafter(Protocol):
    """Model-free draft proposer (see module docstring for the call order)."""

    def begin(self, request_id: str, prompt_tokens: Sequence[int], session_id: str | None = None) -> None:
        """Starts a request with its prompt; `session_id` links requests of one agent session."""

    def extend(self, request_id: str, tokens: Sequence[int]) -> None:
        """Appends tokens that entered the request's context (accepted or generated)."""

    def propose(self, request_id: str, k: int) -> list[int]:
        """Up to k draft tokens continuing the context; [] when there is nothing worth drafting."""

    def end(self, request_id: str) -> None:
        """Finishes a request: frees its state (and may feed cross-session memory)."""


def check_tokens(tokens: Sequence[int], what: str = "tokens") -> list[int]:
    """Returns `tokens` as a list of non-negative ints, or raises ValueError naming the problem."""
    if isinstance(tokens, (str, bytes)):
        raise ValueError(f"{what} must be a sequence of token ids, got {type(tokens).__name__}")
    out = list(tokens)
    for i, t in enumerate(out):
        if isinstance(t, bool) or not isinstance(t, int) and not hasattr(t, "__index__"):
            raise ValueError(f"{what}[{i}] is not an integer token id: {t!r}")
        t = int(t)
        if t < 0:
            raise ValueError(f"{what}[{i}] is a negative token id: {t}")
        out[i] = t
    return out


def check_k(k: int) -> int:
    """Validates a draft budget k (>= 0)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"draft length k must be a non-negative int, got {k!r}")
    return k
