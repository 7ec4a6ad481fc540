"""BlockAllocator: numpy and jitted-jax backends against a sequential pure-Python model; BlockPool errors."""

from __future__ import annotations

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agentinfer_jax.cache import BlockPool
from agentinfer_jax.cache import block_allocator as ba


class ModelAllocator:
    """The reference: a Python list as the free stack, a dict of counts, one entry at a time."""

    def __init__(self, num_blocks: int):
        self.nb = num_blocks
        self.stack = list(range(num_blocks - 1, 0, -1))
        self.refs = {b: 0 for b in range(1, num_blocks)}

    def allocate(self, n: int, max_n: int):
        if not 0 <= n <= max_n or n > len(self.stack):
            return [0] * max_n, False
        ids = [self.stack.pop() for _ in range(n)]
        for b in ids:
            self.refs[b] = 1
        return ids + [0] * (max_n - n), True

    def _valid(self, ids, mask):
        mask = [True] * len(ids) if mask is None else mask
        return [b for b, m in zip(ids, mask) if m and 0 < b < self.nb]

    def release(self, ids, mask=None):
        for b in sorted(self._valid(ids, mask)):
            if self.refs[b] > 0:
                self.refs[b] -= 1
                if self.refs[b] == 0:
                    self.stack.append(b)

    def incref(self, ids, mask=None):
        for b in self._valid(ids, mask):
            if self.refs[b] > 0:
                self.refs[b] += 1

    def fork(self, b: int):
        if not 0 < b < self.nb or self.refs[b] == 0:
            return b, False, False
        if self.refs[b] == 1:
            return b, False, True
        (new, *_), ok = self.allocate(1, 1)
        if not ok:
            return b, False, False
        self.refs[b] -= 1
        return new, True, True

    def assert_matches(self, state: ba.AllocatorState) -> None:
        top = int(state.num_free)
        assert top == len(self.stack)
        assert np.asarray(state.free_stack)[:top].tolist() == self.stack
        refs = np.asarray(state.refcounts)
        assert refs[0] == 1
        assert refs[1:].tolist() == [self.refs[b] for b in range(1, self.nb)]


def random_ids(rng: random.Random, nb: int, length: int) -> list[int]:
    """Mostly real ids, some repeats, the null block and out-of-range ids."""
    return [rng.choice([rng.randrange(1, nb), rng.randrange(1, nb), 0, nb + rng.randrange(3), -1])
            for _ in range(length)]


@pytest.mark.parametrize("seed", [0, 1])
def test_numpy_and_jit_backends_follow_the_model(seed):
    rng = random.Random(seed)
    nb, max_n = 12, 4
    j_alloc = jax.jit(ba.allocate, static_argnames="max_n")
    j_release, j_incref, j_fork = jax.jit(ba.release), jax.jit(ba.incref), jax.jit(ba.fork)
    model, s_np = ModelAllocator(nb), ba.init(nb)
    s_jx = jax.tree.map(jnp.asarray, ba.init(nb))
    for _ in range(150):
        op = rng.choice(["alloc", "alloc", "release", "incref", "fork"])
        if op == "alloc":
            n = rng.randrange(0, max_n + 1)
            want, want_ok = model.allocate(n, max_n)
            s_np, ids_np, ok_np = ba.allocate(s_np, n, max_n=max_n)
            s_jx, ids_jx, ok_jx = j_alloc(s_jx, jnp.int32(n), max_n=max_n)
            assert ids_np.tolist() == ids_jx.tolist() == want
            assert bool(ok_np) == bool(ok_jx) == want_ok
        elif op in ("release", "incref"):
            length = rng.choice([5, 20])  # both host paths: scalar loop and vectorised
            ids = random_ids(rng, nb, length)
            mask = [rng.random() < 0.8 for _ in ids] if rng.random() < 0.5 else None
            getattr(model, op)(ids, mask)
            fn_np, fn_jx = getattr(ba, op), (j_release if op == "release" else j_incref)
            s_np = fn_np(s_np, ids, mask)
            # One jitted shape: pad to 20 with masked-out entries (also exercises the mask).
            pad = 20 - length
            jx_mask = ([True] * length if mask is None else mask) + [False] * pad
            s_jx = fn_jx(s_jx, jnp.asarray(ids + [1] * pad, jnp.int32), jnp.asarray(jx_mask))
        else:
            b = rng.choice([rng.randrange(1, nb), 0, nb])
            want = model.fork(b)
            s_np, id_np, copy_np, ok_np = ba.fork(s_np, b)
            s_jx, id_jx, copy_jx, ok_jx = j_fork(s_jx, jnp.int32(b))
            assert (int(id_np), bool(copy_np), bool(ok_np)) == want
            assert (int(id_jx), bool(copy_jx), bool(ok_jx)) == want
        model.assert_matches(s_np)
        model.assert_matches(s_jx)


def test_pure_functions_leave_their_input_alone():
    s0 = ba.init(10)
    s1, ids, _ = ba.allocate(s0, 3, max_n=3)
    snapshot = jax.tree.map(np.copy, s1)
    ba.incref(s1, ids)
    ba.release(s1, list(ids) * 7)  # long enough for the vectorised path
    ba.fork(ba.incref(s1, ids[:1]), ids[0])
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(snapshot)):
        np.testing.assert_array_equal(a, b)
    assert int(s0.num_free) == 9


def test_allocate_out_of_blocks_is_a_value_and_changes_nothing():
    s = ba.init(4)
    s, ids, ok = ba.allocate(s, 2, max_n=2)
    assert bool(ok) and sorted(ids.tolist()) == [1, 2]
    s2, ids2, ok2 = ba.allocate(s, 2, max_n=3)
    assert not bool(ok2) and ids2.tolist() == [0, 0, 0] and s2 is s
    s3, ids3, ok3 = jax.jit(ba.allocate, static_argnames="max_n")(s, 2, max_n=3)
    assert not bool(ok3) and ids3.tolist() == [0, 0, 0] and int(s3.num_free) == 1
    with pytest.raises(ValueError, match="max_n"):
        ba.allocate(s, 4, max_n=3)
    with pytest.raises(ValueError, match="num_blocks"):
        ba.init(1)


def test_pool_rejects_bad_ids_without_changing_state():
    pool = BlockPool(8)
    ids = pool.allocate(3)
    before = pool.state
    for bad, msg in [([0], "null"), ([9], "outside"), ([-1], "outside"), ([7], "free"),
                     ([ids[0], ids[0]], "released 2 times"), (list(range(1, 8)) * 3, "free")]:
        with pytest.raises(ValueError, match=msg):
            pool.release(bad)
    for bad in ([0], [7], [100]):
        with pytest.raises(ValueError):
            pool.incref(bad)
        with pytest.raises(ValueError):
            pool.fork(bad[0])
    with pytest.raises(ValueError, match="negative"):
        pool.allocate(-1)
    after = pool.state
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)


def test_pool_counts_fork_and_exhaustion():
    pool = BlockPool(6)
    a = pool.allocate(3)
    assert (pool.num_free, pool.num_used) == (2, 3)
    assert pool.allocate(3) is None and pool.num_free == 2
    assert pool.fork(a[0]) == (a[0], False)  # sole owner writes in place
    pool.incref(a[:1])
    new, copy = pool.fork(a[0])
    assert copy and new not in a and pool.refcount(a[0]) == 1 and pool.refcount(new) == 1
    pool.incref([a[1]])
    pool.allocate(1)  # last free block
    assert pool.fork(a[1]) is None and pool.refcount(a[1]) == 2
    snapshot = pool.state
    pool.release([a[1]])
    assert int(snapshot.refcounts[a[1]]) == 2  # `state` is a copy, not a view


@pytest.mark.parametrize("seed", [0, 1])
def test_pool_in_place_updates_follow_the_model(seed):
    """BlockPool updates its arrays in place and checks ids on its own paths (a scalar loop up to
    16 ids, vectorised beyond): random valid operations, short and long id lists with repeats up to
    each block's references, against the model; over-releases are refused and change nothing."""
    rng = random.Random(seed)
    nb = 24
    pool, model = BlockPool(nb), ModelAllocator(nb)

    def in_use():
        return [b for b in range(1, nb) if model.refs[b] > 0]

    def some_refs(length):
        """Up to `length` entries naming in-use blocks, no block more often than it is referenced."""
        left = {b: model.refs[b] for b in in_use()}
        out = []
        while left and len(out) < length:
            b = rng.choice(sorted(left))
            out.append(b)
            left[b] -= 1
            if not left[b]:
                del left[b]
        return out

    for _ in range(300):
        op = rng.choice(["alloc", "alloc", "release", "incref", "fork", "over"])
        length = rng.choice([3, 16, 17, 40])
        if op == "alloc":
            n = rng.randrange(0, 6)
            want, ok = model.allocate(n, n)
            assert pool.allocate(n) == (want if ok else None)
        elif op in ("release", "incref") and in_use():
            ids = some_refs(length) if op == "release" else [rng.choice(in_use()) for _ in range(length)]
            getattr(model, op)(ids)
            getattr(pool, op)(ids)
        elif op == "fork" and in_use():
            b = rng.choice(in_use())
            new, copy, ok = model.fork(b)
            assert pool.fork(b) == ((int(new), copy) if ok else None)
        elif op == "over" and in_use():
            b = rng.choice(in_use())
            ids = some_refs(length) + [b] * (model.refs[b] + 1)
            before = pool.state
            with pytest.raises(ValueError, match="released"):
                pool.release(ids)
            for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(pool.state)):
                np.testing.assert_array_equal(x, y)
        model.assert_matches(pool.state)
        assert pool.num_free + pool.num_used == nb - 1


def test_a_mask_of_another_shape_than_the_ids_is_refused_on_both_backends():
    s = ba.init(8)
    s, ids, _ = ba.allocate(s, 3, max_n=3)
    for fn in (ba.release, ba.incref):
        with pytest.raises(ValueError, match="valid_mask"):
            fn(s, list(ids), [True, False])
        with pytest.raises(ValueError, match="valid_mask"):
            fn(jax.tree.map(jnp.asarray, s), jnp.asarray(ids), jnp.asarray([True, False]))
