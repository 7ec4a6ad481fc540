"""The real SuffixDecoding (arctic-inference 0.3.0's suffix-tree cache) behind our Drafter interface.

Built by `make suffix-decoding` (tools/build_suffix_decoding.py) into build/suffix_decoding/site;
never a dependency of the package. `available()` says whether it is built.

Each request starts a local tree over its prompt (`start_request`), every verified token goes to
its local tree and to its response in the global tree (`add_active_response`), and a proposal is
`speculate` over the last `max_tree_depth` context tokens with the peer's own selection between
the two trees, as in arctic-inference's vLLM model runner. With `tree=True` the peer's tree
speculation (`use_tree_spec`) is exposed as `propose_tree`: up to k nodes, each with its parent;
`tree_accepted` is how a replay verifies such a tree.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence

import numpy as np

SITE = pathlib.Path(__file__).resolve().parents[1] / "build" / "suffix_decoding" / "site"


def _import_cache():
    if str(SITE) not in sys.path and SITE.exists():
        sys.path.insert(0, str(SITE))
    from arctic_inference.suffix_decoding import SuffixDecodingCache
    return SuffixDecodingCache


def available() -> bool:
    try:
        _import_cache()
    except ImportError:
        return False
    return True


class SuffixDecodingDrafter:
    """Drafter over arctic-inference's SuffixDecodingCache (defaults: depth 64, min prob 0.1,
    max_spec_factor 1). `tree`: the replay verifies `propose_tree`'s trees instead of `propose`'s
    paths (the peer's `use_tree_spec`)."""

    def __init__(self, max_tree_depth: int = 64, max_spec_factor: float = 1.0,
                 min_token_prob: float = 0.1, max_cached_requests: int = -1, tree: bool = False) -> None:
        self.cache = _import_cache()(max_tree_depth=max_tree_depth, max_cached_requests=max_cached_requests)
        self.depth, self.factor, self.min_prob = max_tree_depth, max_spec_factor, min_token_prob
        self.tree = tree
        self._contexts: dict[str, tuple[np.ndarray, int]] = {}
        self.response_tokens = 0

    def begin(self, request_id: str, prompt_tokens: Sequence[int], session_id: str | None = None) -> None:
        prompt = np.asarray(prompt_tokens, np.int32)
        self.cache.start_request(request_id, prompt)
        buf = np.empty(max(64, 2 * len(prompt)), np.int32)
        buf[:len(prompt)] = prompt
        self._contexts[request_id] = (buf, len(prompt))

    def extend(self, request_id: str, tokens: Sequence[int]) -> None:
        toks = np.asarray(tokens, np.int32)
        self.cache.add_active_response(request_id, toks)
        buf, n = self._contexts[request_id]
        if n + len(toks) > len(buf):
            grown = np.empty(2 * (n + len(toks)), np.int32)
            grown[:n] = buf[:n]
            buf = grown
        buf[n:n + len(toks)] = toks
        self._contexts[request_id] = (buf, n + len(toks))
        self.response_tokens += len(toks)

    def propose(self, request_id: str, k: int) -> list[int]:
        return list(self._speculate(request_id, k, False).token_ids)

    def propose_tree(self, request_id: str, k: int) -> tuple[list[int], list[int]]:
        """Up to k draft nodes and each node's parent index (-1: a child of the last context token);
        a parent always comes before its children."""
        draft = self._speculate(request_id, k, True)
        return list(draft.token_ids), list(draft.parents)

    def _speculate(self, request_id: str, k: int, tree: bool):
        buf, n = self._contexts[request_id]
        return self.cache.speculate(request_id, buf[max(0, n - self.depth):n], max_spec_tokens=k,
                                    max_spec_factor=self.factor, min_token_prob=self.min_prob,
                                    use_tree_spec=tree)

    def end(self, request_id: str) -> None:
        self.cache.stop_request(request_id)
        del self._contexts[request_id]

    def global_bytes(self) -> int:
        """The peer's own estimate of its global tree's memory."""
        return int(self.cache._global_tree.estimate_memory())


def tree_accepted(tokens: Sequence[int], parents: Sequence[int], target: Sequence[int]) -> int:
    """Greedy verification of a draft tree (node i's parent is parents[i], -1 for the root's
    children, parents before children): the longest root path agreeing with `target`. Siblings
    carry distinct tokens, so at most one child of a node can agree."""
    children: dict[int, dict[int, int]] = {}
    for i, (tok, parent) in enumerate(zip(tokens, parents)):
        if not -1 <= parent < i:
            raise ValueError(f"node {i}'s parent {parent} does not come before it")
        children.setdefault(parent, {}).setdefault(tok, i)
    node, acc = -1, 0
    for tok in target:
        node = children.get(node, {}).get(tok, -2)
        if node == -2:
            break
        acc += 1
    return acc
