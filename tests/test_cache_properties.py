"""Stateful properties of BlockPool + PrefixCache against a plain model, and paging inside jit.

The state machine plays a scheduler: requests reuse cached prefixes, allocate (evicting when short),
share, copy-on-write and release blocks; the cache inserts, matches and evicts. The model keeps who
holds which block and what the cache holds, independently of the allocator and the trie.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from agentinfer_jax.cache import BlockPool, PrefixCache
from agentinfer_jax.cache import block_allocator as ba

NUM_BLOCKS, BS = 20, 2
# Two symbols and a few shared stems: prefixes collide, and requests extend cached paths often.
STEMS = ((), (0, 0), (0, 0, 1, 1), (1, 0, 1, 0, 1))
tokens_st = st.builds(lambda stem, tail: list(STEMS[stem]) + tail,
                      st.integers(0, len(STEMS) - 1), st.lists(st.integers(0, 1), max_size=6))
namespace_st = st.sampled_from(["", "t"])


class CacheMachine(RuleBasedStateMachine):
    requests = Bundle("requests")

    def __init__(self):
        super().__init__()
        self.pool = BlockPool(NUM_BLOCKS)
        self.cache = PrefixCache(BS, self.pool)
        self.held: dict[int, list[int]] = {}  # request -> blocks it holds one reference on each
        self.cached: dict[tuple[str, tuple[int, ...]], int] = {}  # model of the cache's contents
        self.next_id = 0
        self.stamp: dict[tuple[str, tuple[int, ...]], int] = {}  # LRU model: last touch of each key
        self.clock = 0

    # ---- model helpers --------------------------------------------------------------------------

    def model_refs(self) -> dict[int, int]:
        refs = {b: 0 for b in range(1, NUM_BLOCKS)}
        for blocks in self.held.values():
            for b in blocks:
                refs[b] += 1
        for b in self.cached.values():
            refs[b] += 1
        return refs

    def take(self, n: int) -> list[int] | None:
        ids = self.pool.allocate(n)
        if ids is None:  # short: evict unreferenced cached blocks, then retry once
            self.evict_and_check(n - self.pool.num_free)
            ids = self.pool.allocate(n)
        if ids is not None:
            refs = self.model_refs()
            assert len(set(ids)) == n and all(refs[b] == 0 for b in ids), "handed out a block in use"
        return ids

    def touch(self, tokens: list[int], ns: str, num_blocks: int) -> None:
        """LRU model: a match or insert stamps every prefix key on its path with a fresh tick."""
        if num_blocks:
            self.clock += 1
            for i in range(1, num_blocks + 1):
                self.stamp[(ns, tuple(tokens[: i * BS]))] = self.clock

    def expected_evictions(self, n: int) -> list[tuple[str, tuple[int, ...]]]:
        """Brute force: repeatedly drop the least recently stamped leaf that only the cache holds."""
        refs, left, out = self.model_refs(), dict(self.cached), []
        while len(out) < n:
            leaves = [k for k in left if not any(o[0] == k[0] and len(o[1]) > len(k[1])
                                                 and o[1][: len(k[1])] == k[1] for o in left)]
            free_leaves = [k for k in leaves if refs[left[k]] == 1]
            if not free_leaves:
                break
            victim = min(free_leaves, key=lambda k: self.stamp[k])
            out.append(victim)
            del left[victim]
        return out

    def evict_and_check(self, n: int) -> int:
        want = self.expected_evictions(n)
        freed = self.cache.evict(n)
        now = self.cache.entries()
        gone = [k for k in self.cached if k not in now]
        assert freed == len(gone) and sorted(gone) == sorted(want), "not LRU leaves-first eviction"
        for k in gone:
            assert self.pool.refcount(self.cached.pop(k)) == 0
        return freed

    def brute_match(self, tokens: list[int], ns: str) -> list[int]:
        out = []
        for i in range(1, len(tokens) // BS + 1):
            b = self.cached.get((ns, tuple(tokens[: i * BS])))
            if b is None:
                break
            out.append(b)
        return out

    # ---- rules ----------------------------------------------------------------------------------

    @rule(target=requests, tokens=tokens_st, ns=namespace_st)
    def admit(self, tokens, ns):
        hit = self.cache.match(tokens, ns)
        assert hit == self.brute_match(tokens, ns)
        self.touch(tokens, ns, len(hit))
        self.pool.incref(hit)
        rid, self.next_id = self.next_id, self.next_id + 1
        self.held[rid] = list(hit)
        fresh = self.take(math.ceil(len(tokens) / BS) - len(hit))
        if fresh is None:  # not feasible: undo, as the scheduler does
            self.pool.release(self.held.pop(rid))
            return rid  # a request that holds nothing
        self.held[rid] += fresh
        self.cache.insert(tokens, self.held[rid], ns)
        self.touch(tokens, ns, len(tokens) // BS)
        for i in range(len(tokens) // BS):
            self.cached.setdefault((ns, tuple(tokens[: (i + 1) * BS])), self.held[rid][i])
        return rid

    @rule(target=requests, rid=requests)
    def share(self, rid):
        """A new request takes references on all of an existing one's blocks (e.g. parallel samples)."""
        blocks = self.held.get(rid, [])
        self.pool.incref(blocks)
        new, self.next_id = self.next_id, self.next_id + 1
        self.held[new] = list(blocks)
        return new

    @rule(rid=requests)
    def fork_last(self, rid):
        blocks = self.held.get(rid)
        if not blocks:
            return
        old = blocks[-1]
        shared = self.model_refs()[old] > 1
        refs_before = self.model_refs()
        res = self.pool.fork(old)
        if res is None:
            assert shared and self.pool.num_free == 0
            return
        new, copy = res
        assert copy == shared
        if copy:
            assert refs_before[new] == 0, "fork handed out a block in use"
        blocks[-1] = new

    @rule(rid=consumes(requests))
    def release(self, rid):
        blocks = self.held.pop(rid, [])
        if blocks:
            self.pool.release(blocks)

    @rule(n=st.integers(0, 6))
    def evict(self, n):
        before = len(self.cache)
        evictable = self.cache.num_evictable()
        freed = self.evict_and_check(n)
        assert freed == min(n, evictable) and len(self.cache) == before - freed

    @rule(tokens=tokens_st, ns=namespace_st)
    def lookup(self, tokens, ns):
        hit = self.cache.match(tokens, ns)
        assert hit == self.brute_match(tokens, ns)
        self.touch(tokens, ns, len(hit))

    # ---- invariants -----------------------------------------------------------------------------

    @invariant()
    def blocks_are_conserved_and_counted(self):
        state = self.pool.state
        top = int(state.num_free)
        assert self.pool.num_free + self.pool.num_used == NUM_BLOCKS - 1
        refs = self.model_refs()
        assert state.refcounts[1:].tolist() == [refs[b] for b in range(1, NUM_BLOCKS)]
        free = state.free_stack[:top].tolist()
        assert len(set(free)) == top and set(free) == {b for b, r in refs.items() if r == 0}
        assert state.refcounts[0] == 1 and 0 not in free

    @invariant()
    def cache_matches_model_and_counts_evictable(self):
        assert self.cache.entries() == self.cached
        refcounts = self.pool.state.refcounts

        def evictable(key):  # its whole subtree is held by the cache alone
            ns, prefix = key
            return all(refcounts[b] == 1 for (kns, kp), b in self.cached.items()
                       if kns == ns and kp[: len(prefix)] == prefix)

        assert self.cache.num_evictable() == sum(map(evictable, self.cached))

    def teardown(self):
        for blocks in self.held.values():
            if blocks:
                self.pool.release(blocks)
        self.held.clear()
        self.cache.evict(len(self.cache))
        assert len(self.cache) == 0 and self.pool.num_used == 0 and self.pool.num_free == NUM_BLOCKS - 1


CacheMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=50, deadline=None,
                                          derandomize=True, database=None,
                                          suppress_health_check=[HealthCheck.too_slow])
TestCacheMachine = CacheMachine.TestCase


def test_jitted_decode_loop_pages_until_out_of_blocks():
    """A fori_loop decode over a batch takes a page whenever a sequence crosses a page boundary,
    inside jit; when the pool runs dry it stops with ok=False instead of raising."""
    page, batch, steps, num_blocks, max_pages = 4, 3, 40, 12, 16
    start = np.array([0, 2, 3], dtype=np.int32)  # ragged starting lengths

    @jax.jit
    def decode(state):
        def body(_, carry):
            state, lens, table, stalled_at, t = carry
            live = stalled_at < 0
            need = live & (lens % page == 0)
            state, ids, ok = ba.allocate(state, need.sum(), max_n=batch)
            rank = jnp.cumsum(need) - 1
            take = need & ok
            rows = jnp.where(take, jnp.arange(batch), batch)  # row `batch` is dropped
            table = table.at[rows, lens // page].set(ids[jnp.maximum(rank, 0)], mode="drop")
            stalled_at = jnp.where(live & ~ok, t, stalled_at)
            lens = jnp.where(live & ok, lens + 1, lens)
            return state, lens, table, stalled_at, t + 1

        init = (state, jnp.asarray(start), jnp.zeros((batch, max_pages), jnp.int32), jnp.int32(-1), jnp.int32(0))
        return jax.lax.fori_loop(0, steps, body, init)

    state, lens, table, stalled_at, _ = decode(ba.init(num_blocks))

    # Host reference: the same loop with the model's rules, one step at a time.
    free, ref_lens, ref_table, ref_stall = num_blocks - 1, start.tolist(), {}, -1
    for t in range(steps):
        if ref_stall >= 0:
            break
        need = [b for b in range(batch) if ref_lens[b] % page == 0]
        if len(need) > free:
            ref_stall = t
            break
        for b in need:
            ref_table[(b, ref_lens[b] // page)] = True
        free -= len(need)
        ref_lens = [n + 1 for n in ref_lens]
    assert int(stalled_at) == ref_stall >= 0
    assert lens.tolist() == ref_lens
    assert int(state.num_free) == free
    table = np.asarray(table)
    taken = table[table > 0]
    assert sorted(taken.tolist()) == list(range(1, num_blocks - free))  # each page handed out once
    assert {(int(b), int(p)) for b, p in zip(*np.nonzero(table))} == set(ref_table)
    refs = np.asarray(state.refcounts)
    assert (refs[taken] == 1).all() and refs[0] == 1
