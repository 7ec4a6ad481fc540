"""Prompt-lookup (n-gram) drafting: the usual model-free baseline.

For n from `max_ngram` down to `min_ngram`, find the most recent earlier occurrence of the last n
context tokens and copy the (up to k) tokens that followed it. One vectorised scan of the context
per n, so O(context) per step, as in prompt lookup decoding / vLLM's n-gram proposer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agentinfer_jax.speculation.base import UnknownRequestError, check_k, check_tokens


class _GrowingArray:
    """An int32 buffer with amortised O(1) append, viewed as the first `size` entries."""

    def __init__(self, tokens: list[int]) -> None:
        self.buf = np.zeros(max(16, 2 * len(tokens)), dtype=np.int64)
        self.buf[:len(tokens)] = tokens
        self.size = len(tokens)

    def extend(self, tokens: list[int]) -> None:
        need = self.size + len(tokens)
        if need > len(self.buf):
            grown = np.zeros(2 * need, dtype=np.int64)
            grown[:self.size] = self.buf[:self.size]
            self.buf = grown
        self.buf[self.size:need] = tokens
        self.size = need

    @property
    def view(self) -> np.ndarray:
        return self.buf[:self.size]


class PromptLookupDrafter:
    """Drafter: longest recent n-gram match in the request's own context (no cross-request state)."""

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._contexts: dict[str, _GrowingArray] = {}

    def begin(self, request_id: str, prompt_tokens: Sequence[int], session_id: str | None = None) -> None:
        if request_id in self._contexts:
            raise ValueError(f"request {request_id!r} already begun")
        self._contexts[request_id] = _GrowingArray(check_tokens(prompt_tokens, "prompt_tokens"))

    def _get(self, request_id: str) -> _GrowingArray:
        try:
            return self._contexts[request_id]
        except KeyError:
            raise UnknownRequestError(f"unknown request {request_id!r}") from None

    def extend(self, request_id: str, tokens: Sequence[int]) -> None:
        self._get(request_id).extend(check_tokens(tokens))

    def propose(self, request_id: str, k: int) -> list[int]:
        check_k(k)
        ctx = self._get(request_id).view
        n_ctx = len(ctx)
        if k == 0:
            return []
        for n in range(min(self.max_ngram, n_ctx - 1), self.min_ngram - 1, -1):
            suffix = ctx[n_ctx - n:]
            # Candidate starts j < n_ctx - n whose window ctx[j:j+n] equals the suffix.
            hits = ctx[:n_ctx - n] == suffix[0]
            for i in range(1, n):
                hits &= ctx[i:n_ctx - n + i] == suffix[i]
            idx = np.flatnonzero(hits)
            if len(idx):
                start = int(idx[-1]) + n  # most recent occurrence
                return ctx[start:start + k].tolist()
        return []

    def end(self, request_id: str) -> None:
        self._get(request_id)
        del self._contexts[request_id]
