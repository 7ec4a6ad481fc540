"""PrefixCache: longest-prefix match against brute force, namespaces, LRU leaves-first eviction, counters."""

from __future__ import annotations

import math
import random

import pytest

from agentinfer_jax.cache import BlockPool, PrefixCache


def admit(pool: BlockPool, cache: PrefixCache, tokens: list[int], namespace: str = "") -> list[int]:
    """What the scheduler does: reuse the cached prefix, allocate the rest, offer the full blocks."""
    hit = cache.match(tokens, namespace)
    pool.incref(hit)
    fresh = pool.allocate(math.ceil(len(tokens) / cache.block_size) - len(hit))
    assert fresh is not None
    cache.insert(tokens, hit + fresh, namespace)
    return hit + fresh


def brute_force_match(cached: dict, tokens: list[int], bs: int, namespace: str) -> list[int]:
    out = []
    for i in range(1, len(tokens) // bs + 1):
        key = (namespace, tuple(tokens[: i * bs]))
        if key not in cached:
            break
        out.append(cached[key])
    return out


@pytest.mark.parametrize("seed,bs", [(0, 1), (1, 2), (2, 4)])
def test_longest_prefix_match_against_brute_force(seed, bs):
    rng = random.Random(seed)
    pool = BlockPool(2000)
    cache = PrefixCache(bs, pool)
    cached: dict[tuple[str, tuple[int, ...]], int] = {}  # first writer of each full-block prefix wins
    stems = [[rng.randrange(3) for _ in range(rng.randrange(12))] for _ in range(4)]
    for _ in range(60):
        ns = rng.choice(["", "", "tenant"])
        toks = rng.choice(stems) + [rng.randrange(3) for _ in range(rng.randrange(10))]
        if rng.random() < 0.5:
            assert cache.match(toks, ns) == brute_force_match(cached, toks, bs, ns)
            continue
        blocks = admit(pool, cache, toks, ns)
        for i in range(len(toks) // bs):
            cached.setdefault((ns, tuple(toks[: (i + 1) * bs])), blocks[i])
        assert cache.entries() == cached
    assert len(cache) == len(cached)


def test_namespaces_never_share_prefixes():
    pool = BlockPool(32)
    cache = PrefixCache(2, pool)
    toks = [5, 6, 7, 8, 9]
    a = admit(pool, cache, toks, namespace="alice")
    assert cache.match(toks, "alice") == a[:2]
    assert cache.match(toks, "bob") == [] and cache.match(toks) == []
    b = admit(pool, cache, toks, namespace="bob")
    assert not set(a) & set(b)
    assert cache.match(toks, "bob") == b[:2]
    with pytest.raises(TypeError, match="namespace"):
        cache.match(toks, namespace=3)


def test_partial_blocks_are_neither_cached_nor_matched():
    pool = BlockPool(16)
    cache = PrefixCache(4, pool)
    blocks = admit(pool, cache, [1, 2, 3, 4, 5, 6])  # one full block, one partial
    assert len(cache) == 1 and cache.match([1, 2, 3, 4, 5, 6, 7, 8]) == blocks[:1]
    assert cache.match([1, 2, 3]) == []


def test_lru_evicts_least_recent_leaves_first_and_only_unreferenced():
    pool = BlockPool(32)
    cache = PrefixCache(2, pool)
    seqs = {name: [i, i, i + 1, i + 1, i + 2, i + 2] for name, i in (("a", 10), ("b", 20), ("c", 30))}
    blocks = {name: admit(pool, cache, toks) for name, toks in seqs.items()}
    for name in seqs:
        pool.release(blocks[name])  # requests done: only the cache holds them
    assert cache.num_evictable() == 9
    cache.match(seqs["a"])  # a becomes the most recent; b is now the oldest
    assert cache.evict(1) == 1
    assert cache.match(seqs["b"]) == blocks["b"][:2]  # b's leaf went first, and this touches b
    assert pool.refcount(blocks["b"][2]) == 0
    pool.incref(blocks["c"])  # a running request holds c
    assert cache.num_evictable() == 5  # a: 3, b: 2
    assert cache.evict(100) == 5
    assert cache.match(seqs["a"]) == [] and cache.match(seqs["b"]) == []
    assert cache.match(seqs["c"]) == blocks["c"]
    assert cache.num_evictable() == 0 and cache.evict(3) == 0
    pool.release(blocks["c"])
    assert cache.evict(3) == 3 and len(cache) == 0 and pool.num_used == 0


def test_parent_held_by_request_whose_child_is_cached_blocks_eviction_of_the_path():
    pool = BlockPool(16)
    cache = PrefixCache(1, pool)
    first = admit(pool, cache, [1, 2])
    pool.release(first[1:])  # the request keeps only block 0 (a retained session, say)
    assert cache.num_evictable() == 1  # the leaf; its parent is in use
    assert cache.evict(5) == 1 and cache.match([1, 2]) == first[:1]


def test_duplicate_chunk_keeps_cached_block_and_request_keeps_its_own():
    pool = BlockPool(16)
    cache = PrefixCache(2, pool)
    toks = [1, 2, 3, 4]
    first = admit(pool, cache, toks)
    mine = pool.allocate(2)  # computed the same prefix without a hit (e.g. concurrently)
    assert cache.insert(toks, mine) == 0
    assert cache.match(toks) == first
    assert [pool.refcount(b) for b in mine] == [1, 1]  # not cached: freed with the request
    pool.release(mine)
    assert all(pool.refcount(b) == 0 for b in mine)
    # A longer request whose second block duplicates a cached one still caches its new tail.
    longer = pool.allocate(3)
    assert cache.insert(toks + [5, 6], [first[0], longer[1], longer[2]]) == 1
    assert cache.match(toks + [5, 6]) == [first[0], first[1], longer[2]]


def test_counters():
    pool = BlockPool(32)
    cache = PrefixCache(2, pool)
    blocks = admit(pool, cache, [1, 2, 3, 4, 5])  # lookup of 5 tokens, 0 hit; inserts 2
    cache.match([1, 2, 3, 9])  # 4 queried, 2 hit
    cache.match([7])  # 1 queried
    pool.release(blocks)
    cache.evict(1)
    s = cache.stats
    assert (s.lookups, s.queried_tokens, s.hit_tokens, s.inserted_blocks, s.evicted_blocks) == (3, 10, 2, 2, 1)
    assert s.hit_rate == pytest.approx(0.2)


def test_bad_inserts_raise_and_change_nothing():
    pool = BlockPool(16)
    cache = PrefixCache(2, pool)
    held = pool.allocate(3)
    cache.insert([1, 2], held[:1])
    cases = [
        (([3, 4, 5, 6], held[1:2]), "block ids"),  # too few ids
        (([3, 4], [0]), "null"),
        (([3, 4], [15]), "free"),
        (([3, 4], [99]), "outside"),
        (([3, 4, 5, 6], [held[1], held[1]]), "distinct"),
        (([7, 8], held[:1]), "already cached"),
    ]
    for (toks, ids), msg in cases:
        with pytest.raises(ValueError, match=msg):
            cache.insert(toks, ids)
    assert len(cache) == 1 and pool.refcount(held[0]) == 2 and pool.refcount(held[1]) == 1
    with pytest.raises(ValueError, match="num_blocks"):
        cache.evict(-1)
    with pytest.raises(ValueError, match="block_size"):
        PrefixCache(0, pool)


def test_scheduler_style_repeated_lookups_keep_the_lru_heap_bounded():
    pool = BlockPool(64)
    cache = PrefixCache(2, pool)
    blocks = admit(pool, cache, list(range(20)))
    for _ in range(2000):
        cache.match(list(range(20)))
    assert len(cache._leaf_heap) <= 4 * len(cache) + 64
    pool.release(blocks)
    assert cache.evict(100) == 10 and pool.num_used == 0


def test_match_refreshes_the_whole_path_so_a_parent_outlives_older_leaves():
    pool = BlockPool(16)
    cache = PrefixCache(1, pool)
    ab = admit(pool, cache, [1, 2])  # path a -> b
    c = admit(pool, cache, [3])  # a newer leaf c
    cache.match([1, 2])  # refreshes a and b: both now newer than c
    pool.release(ab)
    assert cache.evict(1) == 1 and pool.refcount(ab[1]) == 0  # c is in use, so b goes
    pool.release(c)
    assert cache.evict(1) == 1 and pool.refcount(c[0]) == 0  # c is older than a (a was refreshed)
    assert cache.match([1, 2]) == ab[:1]


def test_extending_a_cached_leaf_then_evicting_takes_the_new_leaf_not_its_parent():
    pool = BlockPool(16)
    cache = PrefixCache(1, pool)
    a = admit(pool, cache, [1])
    ab = admit(pool, cache, [1, 2])  # hits a, caches b under it
    pool.release(a)
    pool.release(ab)
    assert cache.evict(1) == 1 and cache.match([1, 2]) == a
