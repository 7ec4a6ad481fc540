"""Radix prefix cache: (namespace, block-aligned token chunks) -> KV block ids, with LRU eviction.

A pygtrie trie whose key steps are the namespace string, then one tuple of `block_size` tokens per
block; the node of chunk i holds the block with the KV of tokens [i*bs, (i+1)*bs) of every prompt
that starts with that path. Only full blocks are cached.

Invariants:
- Prefix-closed: a cached node's ancestors are all cached (insert adds whole paths, eviction
  removes leaves only), so the longest cached prefix is one walk down the trie.
- The cache holds exactly one pool reference on every block it caches, and each block is cached
  under one key at most.
- A node is evicted only when it has no cached children and its block's refcount is 1 (nobody
  but the cache uses it); eviction drops the cache's reference, which frees the block.
- Keys of different namespaces never share a node below the root, so prefixes never match across
  namespaces (tenants or cache salts).

`match` does NOT take references: a caller that keeps the matched blocks increfs them through the
pool (the scheduler does, on admission). The LRU clock is logical: every match or insert stamps the
nodes on its path with a fresh tick, so an ancestor's stamp is never older than its descendants'.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Sequence

import numpy as np
import pygtrie

from agentinfer_jax.cache.block_allocator import BlockPool

__all__ = ["PrefixCache", "PrefixCacheStats"]


@dataclasses.dataclass
class PrefixCacheStats:
    lookups: int = 0
    queried_tokens: int = 0
    hit_tokens: int = 0
    inserted_blocks: int = 0
    evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        """Fraction of queried tokens served from the cache."""
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


@dataclasses.dataclass(eq=False, slots=True)
class _Node:
    """The value stored at one cached trie node."""

    block_id: int
    parent: _Node | None  # None for the first chunk of a namespace
    namespace: str
    chunk: tuple[int, ...]
    depth: int  # index of this chunk in the prompt (0 = first block)
    last_access: int
    num_children: int = 0
    cached: bool = True  # False once evicted (heap entries for it are then stale)

    def key(self) -> tuple:
        """The trie key (namespace, chunk_0, ..., chunk_depth); O(depth)."""
        chunks = []
        node: _Node | None = self
        while node is not None:
            chunks.append(node.chunk)
            node = node.parent
        return (self.namespace, *reversed(chunks))


class _LazyChunkKey(Sequence):
    """(namespace, chunk_0, chunk_1, ...) building each chunk tuple only when the trie walk asks for
    it, so a lookup costs O(matched blocks), not O(prompt length)."""

    __slots__ = ("_namespace", "_tokens", "_bs", "_n")

    def __init__(self, namespace: str, tokens: Sequence[int], block_size: int):
        self._namespace, self._tokens, self._bs = namespace, tokens, block_size
        self._n = len(tokens) // block_size

    def __len__(self) -> int:
        return self._n + 1

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return tuple(self[j] for j in range(*i.indices(len(self))))
        if not 0 <= i <= self._n:
            raise IndexError(i)
        if i == 0:
            return self._namespace
        start = (i - 1) * self._bs
        return tuple(self._tokens[start:start + self._bs])


class PrefixCache:
    """Block-granular radix cache over a `BlockPool` (see the module docstring for invariants)."""

    def __init__(self, block_size: int, pool: BlockPool):
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.block_size = block_size
        self.pool = pool
        self.stats = PrefixCacheStats()
        self._trie: pygtrie.Trie = pygtrie.Trie()
        self._by_block: dict[int, _Node] = {}
        self._clock = itertools.count(1)
        self._seq = itertools.count()  # heap tie-breaker, so nodes are never compared
        self._leaf_heap: list[tuple[int, int, _Node]] = []  # (stamp, seq, node); lazy deletion

    # ---- queries -------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of cached blocks."""
        return len(self._by_block)

    def __contains__(self, block_id: int) -> bool:
        return block_id in self._by_block

    def match(self, tokens: Sequence[int], namespace: str = "") -> list[int]:
        """Block ids of the longest cached block-aligned prefix of `tokens` (full blocks only).

        Touches the matched path for LRU. Takes no references: incref what you keep.
        """
        tokens = _as_tokens(tokens)
        _check_namespace(namespace)
        self.stats.lookups += 1
        self.stats.queried_tokens += len(tokens)
        if len(tokens) < self.block_size:
            return []
        step = self._trie.longest_prefix(_LazyChunkKey(namespace, tokens, self.block_size))
        node = step.get() if step else None
        if node is None:
            return []
        path = self._touch_path(node)
        self.stats.hit_tokens += len(path) * self.block_size
        return [n.block_id for n in path]

    def num_evictable(self) -> int:
        """Blocks that `evict` could free now: cached nodes whose whole subtree only the cache uses.

        Vectorised refcount read, then a walk up from each block someone else holds; a node reached
        by such a walk is pinned (it or a descendant is in use). O(cached) numpy + O(pinned) steps.
        """
        if not self._by_block:
            return 0
        ids = np.fromiter(self._by_block, dtype=np.int64, count=len(self._by_block))
        pinned: set[int] = set()
        for b in ids[self.pool.refcounts_of(ids) > 1].tolist():
            node: _Node | None = self._by_block[b]
            while node is not None and node.block_id not in pinned:
                pinned.add(node.block_id)
                node = node.parent
        return len(ids) - len(pinned)

    def entries(self) -> dict[tuple[str, tuple[int, ...]], int]:
        """{(namespace, flat token prefix): block id} of every cached block (for tests and debugging)."""
        out = {}
        for key, node in self._trie.iteritems():
            out[(key[0], tuple(itertools.chain.from_iterable(key[1:])))] = node.block_id
        return out

    # ---- updates -------------------------------------------------------------------------------

    def insert(self, tokens: Sequence[int], block_ids: Sequence[int], namespace: str = "") -> int:
        """Caches the full blocks of `tokens` (block i holds tokens [i*bs, (i+1)*bs)).

        `block_ids[i]` is the request's block for chunk i; ids past the last full block are ignored.
        Chunks already cached keep their cached block (a request's duplicate stays its own); new
        chunks are cached under the request's block and the cache takes one reference on each.
        Returns how many blocks were newly cached. Raises ValueError (changing nothing) when a new
        block is null, free, listed twice, or already cached under another prefix.
        """
        tokens = _as_tokens(tokens)
        _check_namespace(namespace)
        bs = self.block_size
        n = len(tokens) // bs
        if len(block_ids) < n:
            raise ValueError(f"{n} full blocks of tokens but only {len(block_ids)} block ids")
        if n == 0:
            return 0
        key = (namespace, *(tuple(tokens[i * bs:(i + 1) * bs]) for i in range(n)))
        step = self._trie.longest_prefix(key)
        deepest: _Node | None = step.get() if step else None
        m = deepest.depth + 1 if deepest is not None else 0
        new_ids = [int(b) for b in block_ids[m:n]]
        self._check_new_blocks(new_ids)

        stamp = next(self._clock)
        if deepest is not None:
            self._touch_path(deepest, stamp)
        if not new_ids:
            return 0
        parent, created = deepest, []
        for depth, block in enumerate(new_ids, start=m):
            node = _Node(block, parent, namespace, key[depth + 1], depth, stamp)
            if parent is not None:
                parent.num_children += 1
            created.append(node)
            parent = node
        self._trie[key] = created[-1]
        # Fill the intermediate trie nodes the assignment above created, in one walk.
        for pos, step in enumerate(self._trie.walk_towards(key)):
            if pos >= m + 2:  # pos 0 is the root, pos 1 the namespace, pos i+2 chunk i
                step.value = created[pos - m - 2]
        self.pool.incref(new_ids)
        for node in created:
            self._by_block[node.block_id] = node
        self._push_leaf(created[-1])
        self.stats.inserted_blocks += len(created)
        return len(created)

    def evict(self, num_blocks: int) -> int:
        """Frees up to `num_blocks` cached blocks that only the cache references, least recently
        used leaves first (a parent becomes a candidate once its last child is gone). Returns how
        many were freed."""
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        freed: list[_Node] = []
        in_use: dict[int, _Node] = {}
        while len(freed) < num_blocks and self._leaf_heap:
            stamp, _, node = heapq.heappop(self._leaf_heap)
            if not node.cached or node.num_children or node.last_access != stamp or node.block_id in in_use:
                continue  # stale entry
            refs = self.pool.refcount(node.block_id)
            if refs > 1:
                in_use[node.block_id] = node  # someone runs on it; it stays a candidate for later
                continue
            if refs != 1:
                raise RuntimeError(f"cached block {node.block_id} has refcount {refs}; the cache's "
                                   "reference was released by someone else")
            self._detach(node)
            freed.append(node)
            if node.parent is not None and node.parent.num_children == 0:
                self._push_leaf(node.parent)
        for node in in_use.values():
            self._push_leaf(node)
        # The evicted nodes form whole subtrees (leaves first); one trie deletion per subtree root.
        for node in freed:
            if node.parent is None or node.parent.cached:
                del self._trie[node.key():]
        if freed:
            self.pool.release([node.block_id for node in freed])
            self.stats.evicted_blocks += len(freed)
        return len(freed)

    # ---- internals -----------------------------------------------------------------------------

    def _check_new_blocks(self, ids: list[int]) -> None:
        if not ids:
            return
        if len(set(ids)) != len(ids):
            raise ValueError(f"block ids to cache are not distinct: {ids}")
        for b in ids:
            if b in self._by_block:
                raise ValueError(f"block {b} is already cached under another prefix")
        refs = self.pool.refcounts_of(ids)  # also rejects ids outside the pool
        if (np.asarray(ids) == 0).any():
            raise ValueError("block 0 is the null page; it cannot be cached")
        if (refs < 1).any():
            raise ValueError(f"block {ids[int(np.argmax(refs < 1))]} is free; only blocks in use can be cached")

    def _touch_path(self, node: _Node, stamp: int | None = None) -> list[_Node]:
        """Stamps `node` and its ancestors; returns the path root-first."""
        stamp = next(self._clock) if stamp is None else stamp
        path = []
        cur: _Node | None = node
        while cur is not None:
            cur.last_access = stamp
            path.append(cur)
            cur = cur.parent
        if node.num_children == 0:
            self._push_leaf(node)
        path.reverse()
        return path

    def _push_leaf(self, node: _Node) -> None:
        heapq.heappush(self._leaf_heap, (node.last_access, next(self._seq), node))
        if len(self._leaf_heap) > 4 * len(self._by_block) + 64:
            self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        """Drops stale entries (amortised O(1) per push): one entry per current leaf."""
        self._leaf_heap = [(n.last_access, next(self._seq), n) for n in self._by_block.values()
                           if n.num_children == 0]
        heapq.heapify(self._leaf_heap)

    def _detach(self, node: _Node) -> None:
        """Drops a leaf from the bookkeeping; `evict` deletes it from the trie afterwards."""
        del self._by_block[node.block_id]
        node.cached = False
        if node.parent is not None:
            node.parent.num_children -= 1

    def __repr__(self) -> str:
        return f"PrefixCache(block_size={self.block_size}, blocks={len(self)}, {self.stats})"


def _as_tokens(tokens: Sequence[int] | np.ndarray) -> Sequence[int]:
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        return tokens.tolist()
    return tokens


def _check_namespace(namespace: str) -> None:
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be a str, got {type(namespace).__name__}")
