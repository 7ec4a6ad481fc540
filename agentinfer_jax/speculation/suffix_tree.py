"""SuffixDecoding-style drafter (Oliaro et al., 2024), written from the paper's description.

Two depth-limited suffix trees (tries of all substrings up to `max_depth` tokens, with occurrence
counts per node): one per request over its current context (prompt + generated tokens), and one
global tree over the responses of finished requests. To draft, every suffix of the context (length
1..max_depth) that is a node with children is a candidate; from it the drafter follows the most
frequent child while the path probability (product of count(child) / count(all children)) stays
>= `min_prob` (~0.1 in the paper), for at most min(k, ceil(factor * match length)) tokens. The
candidate with the highest score (sum of path probabilities = expected accepted tokens) wins.
Defaults follow the reference implementation (ArcticInference: max_spec_factor 1.0,
min_token_prob 0.1). The paper builds a speculation *tree*; the Drafter interface verifies one sequence, so this is the
greedy (most-likely) path of that tree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from agentinfer_jax.speculation.base import UnknownRequestError, check_k, check_tokens


class SuffixTrie:
    """Trie of all substrings of length <= max_depth of the inserted sequences, with counts.

    Node 0 is the root. `count[v]` = number of occurrences of v's string over all inserted text.
    """

    def __init__(self, max_depth: int) -> None:
        if max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {max_depth}")
        self.max_depth = max_depth
        self.children: list[dict[int, int]] = [{}]
        self.count: list[int] = [0]

    def _child(self, node: int, token: int) -> int:
        kids = self.children[node]
        c = kids.get(token)
        if c is None:
            c = len(self.count)
            kids[token] = c
            self.children.append({})
            self.count.append(0)
        return c

    def append(self, active: list[int], token: int) -> list[int]:
        """Inserts the new suffixes ending at `token`; `active` are the nodes of the previous
        suffixes (lengths 1..), returns the new ones (shortest first, at most max_depth)."""
        out = []
        for node in [0, *active[:self.max_depth - 1]]:
            c = self._child(node, token)
            self.count[c] += 1
            out.append(c)
        return out

    def insert(self, tokens: Sequence[int]) -> None:
        active: list[int] = []
        for t in tokens:
            active = self.append(active, t)

    def match(self, matched: list[int], token: int) -> list[int]:
        """Read-only counterpart of `append`: nodes of the stream's suffixes that are in the trie."""
        out = []
        for node in [0, *matched[:self.max_depth - 1]]:
            c = self.children[node].get(token)
            if c is None:
                break  # longer suffixes contain this one, so they are absent too
            out.append(c)
        return out

    def greedy_path(self, node: int, limit: int, min_prob: float) -> tuple[list[int], float]:
        """Most frequent continuation from `node`: tokens and score (sum of path probabilities)."""
        out: list[int] = []
        prob, score = 1.0, 0.0
        while len(out) < limit:
            kids = self.children[node]
            if not kids:
                break
            total = 0
            best_tok, best_node, best = -1, -1, -1
            for tok, c in kids.items():
                n = self.count[c]
                total += n
                if n > best:
                    best_tok, best_node, best = tok, c, n
            prob *= best / total
            if prob < min_prob:
                break
            out.append(best_tok)
            score += prob
            node = best_node
        return out, score


class _Request:
    __slots__ = ("trie", "active", "global_matched", "generated")

    def __init__(self, trie: SuffixTrie) -> None:
        self.trie = trie
        self.active: list[int] = []
        self.global_matched: list[int] = []
        self.generated: list[int] = []


class SuffixTreeDrafter:
    """Drafter: per-request suffix tree + global suffix tree over past responses."""

    def __init__(self, max_depth: int = 32, min_prob: float = 0.1, factor: float = 1.0,
                 min_match: int = 1) -> None:
        if not 0.0 <= min_prob <= 1.0 or factor <= 0 or min_match < 1:
            raise ValueError("need 0 <= min_prob <= 1, factor > 0 and min_match >= 1")
        self.max_depth, self.min_prob, self.factor, self.min_match = max_depth, min_prob, factor, min_match
        self.global_trie = SuffixTrie(max_depth)
        self._requests: dict[str, _Request] = {}

    def begin(self, request_id: str, prompt_tokens: Sequence[int], session_id: str | None = None) -> None:
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} already begun")
        prompt = check_tokens(prompt_tokens, "prompt_tokens")
        req = _Request(SuffixTrie(self.max_depth))
        for t in prompt:
            req.active = req.trie.append(req.active, t)
        for t in prompt[-self.max_depth:]:
            req.global_matched = self.global_trie.match(req.global_matched, t)
        self._requests[request_id] = req

    def _get(self, request_id: str) -> _Request:
        try:
            return self._requests[request_id]
        except KeyError:
            raise UnknownRequestError(f"unknown request {request_id!r}") from None

    def extend(self, request_id: str, tokens: Sequence[int]) -> None:
        req = self._get(request_id)
        for t in check_tokens(tokens):
            req.active = req.trie.append(req.active, t)
            req.global_matched = self.global_trie.match(req.global_matched, t)
            req.generated.append(t)

    def propose(self, request_id: str, k: int) -> list[int]:
        check_k(k)
        req = self._get(request_id)
        best: list[int] = []
        best_score = 0.0
        for trie, nodes in ((req.trie, req.active), (self.global_trie, req.global_matched)):
            for depth in range(len(nodes), self.min_match - 1, -1):
                limit = min(k, math.ceil(self.factor * depth))
                draft, score = trie.greedy_path(nodes[depth - 1], limit, self.min_prob)
                if score > best_score:
                    best, best_score = draft, score
        return best

    def end(self, request_id: str) -> None:
        req = self._get(request_id)
        del self._requests[request_id]
        self.global_trie.insert(req.generated)
