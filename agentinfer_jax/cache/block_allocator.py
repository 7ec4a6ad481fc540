"""Functional allocator of paged-KV blocks: a free stack and reference counts in one pytree.

The same pure functions serve two callers, each with its own backend:
- jax (any input is a jax array or a tracer): branch-free code with static shapes and `.at[]`
  updates, so a jitted decode loop can take a page when a sequence crosses a page boundary without
  a host round trip;
- numpy (host state, as `init` and `BlockPool` make): host control flow, scalar loops for short id
  lists and a handful of vectorised numpy ops for long ones, because per-call overhead matters on
  the scheduler's host path.
Both backends implement the same semantics, down to the order of the free stack; the tests run
random operation sequences through both and compare the states.

Invariants of an `AllocatorState` (kept by every function, whatever its input):
- Block 0 is the null page: its refcount is pinned at 1, it is never on the free stack and never
  handed out; masked-out slots of a returned id vector hold 0.
- `free_stack[:num_free]` holds exactly the blocks whose refcount is 0, each once; entries at
  `num_free` and beyond are stale and never read. Pops take from the top (index num_free - 1).
- num_free + num_used == num_blocks - 1.
Ids outside [1, num_blocks), masked-out ids and ids of free blocks are ignored by `release`,
`incref` and `fork` (a no-op, never a crash inside jit); `BlockPool` turns them into ValueError.
Running out of blocks is a returned `ok=False` with the state unchanged, so a scheduler can preempt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["AllocatorState", "init", "allocate", "release", "incref", "share", "fork", "num_free",
           "num_used", "BlockPool"]

Array = Any  # np.ndarray | jax.Array (tracers included)
_I32 = np.int32


class AllocatorState(NamedTuple):
    """Free stack (int32 [num_blocks]), its height `num_free` (int32 []), refcounts (int32 [num_blocks]).

    A NamedTuple, hence a pytree (jit, scan and fori_loop carry it), and cheap to build on the host.
    """

    free_stack: Array
    num_free: Array
    refcounts: Array

    @property
    def num_blocks(self) -> int:
        return self.refcounts.shape[0]


def _on_jax(state: AllocatorState, *args: Any) -> bool:
    return any(isinstance(x, jax.Array) for x in (state.free_stack, state.num_free, state.refcounts, *args))


def init(num_blocks: int) -> AllocatorState:
    """A host (numpy) state with blocks 1..num_blocks-1 free; pops hand out low ids first.
    Pass it to a jitted function as is: its leaves become jax arrays there."""
    if not isinstance(num_blocks, (int, np.integer)) or num_blocks < 2:
        raise ValueError(f"num_blocks must be an int >= 2 (block 0 is the null page), got {num_blocks!r}")
    stack = np.zeros(num_blocks, dtype=_I32)
    stack[: num_blocks - 1] = np.arange(num_blocks - 1, 0, -1, dtype=_I32)
    refcounts = np.zeros(num_blocks, dtype=_I32)
    refcounts[0] = 1  # the null page is permanently "in use"
    return AllocatorState(stack, np.asarray(num_blocks - 1, dtype=_I32), refcounts)


# ---- allocate -----------------------------------------------------------------------------------

def allocate(state: AllocatorState, n: Any, *, max_n: int) -> tuple[AllocatorState, Array, Array]:
    """Pops n blocks (0 <= n <= max_n; n may be traced). Returns (state, ids int32[max_n], ok).

    ids[:n] are the new blocks, in pop order, each with refcount 1; ids[n:] are 0. When fewer than
    n blocks are free, or n lies outside [0, max_n] under jit, the state comes back unchanged with
    ok=False and all ids 0. On the numpy path an n outside [0, max_n] raises ValueError.
    """
    if not isinstance(max_n, (int, np.integer)) or max_n < 0:
        raise ValueError(f"max_n must be a static int >= 0, got {max_n!r}")
    if _on_jax(state, n):
        return _jax_allocate(state, n, int(max_n))
    return _np_allocate(state, n, int(max_n), inplace=False)


def _np_allocate(state: AllocatorState, n: Any, max_n: int, *, inplace: bool):
    n = int(n)
    if not 0 <= n <= max_n:
        raise ValueError(f"cannot allocate n={n} blocks with max_n={max_n}")
    ids = np.zeros(max_n, dtype=_I32)
    top = int(state.num_free)
    if n > top:
        return state, ids, np.bool_(False)
    taken = state.free_stack[top - n:top][::-1]
    ids[:n] = taken
    refcounts = state.refcounts if inplace else state.refcounts.copy()
    refcounts[taken] = 1
    # allocate never writes the stack, so old and new states may share it.
    return AllocatorState(state.free_stack, np.asarray(top - n, dtype=_I32), refcounts), ids, np.bool_(True)


def _jax_allocate(state: AllocatorState, n: Any, max_n: int):
    n = jnp.asarray(n, dtype=jnp.int32)
    top = jnp.asarray(state.num_free, dtype=jnp.int32)
    ok = (n >= 0) & (n <= max_n) & (n <= top)
    take = jnp.where(ok, n, 0)
    slot = jnp.arange(max_n, dtype=jnp.int32)
    live = slot < take
    ids = jnp.where(live, jnp.asarray(state.free_stack)[jnp.maximum(top - 1 - slot, 0)], 0)
    nb = state.num_blocks
    refcounts = jnp.asarray(state.refcounts).at[jnp.where(live, ids, nb)].set(1, mode="drop")
    return AllocatorState(jnp.asarray(state.free_stack), top - take, refcounts), ids, ok


# ---- release / incref ---------------------------------------------------------------------------

def release(state: AllocatorState, ids: Any, valid_mask: Any = None) -> AllocatorState:
    """Drops one reference per valid entry of `ids`; blocks whose count reaches 0 go back on the
    free stack, pushed in ascending id order.

    Null, out-of-range, masked-out and already-free ids are no-ops. An id listed more times than it
    has references is freed once (its count saturates at 0), as if released entry by entry.
    """
    if _on_jax(state, ids, valid_mask):
        return _jax_release(state, ids, valid_mask)
    return _np_release(state, ids, valid_mask, inplace=False)


_SCALAR_MAX = 16  # up to this many ids, scalar loops beat numpy's per-call overhead on the host


def _np_selected(state: AllocatorState, ids: Any, valid_mask: Any) -> list[int] | np.ndarray:
    """The unmasked entries of `ids` in [1, num_blocks): a list when short, else an int64 array."""
    nb = state.num_blocks
    if isinstance(ids, np.ndarray):
        ids = ids.reshape(-1).tolist() if ids.size <= _SCALAR_MAX else ids
    if valid_mask is not None and np.shape(valid_mask) != np.shape(ids):
        raise ValueError(f"valid_mask has shape {np.shape(valid_mask)}, ids have shape {np.shape(ids)}")
    if not isinstance(ids, np.ndarray) and len(ids) <= _SCALAR_MAX:
        if valid_mask is None:
            return [int(b) for b in ids if 0 < b < nb]
        return [int(b) for b, m in zip(ids, np.asarray(valid_mask).tolist()) if m and 0 < b < nb]
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    keep = (arr > 0) & (arr < nb)
    if valid_mask is not None:
        keep &= np.asarray(valid_mask, dtype=bool).reshape(-1)
    return arr if keep.all() else arr[keep]


def _np_release(state: AllocatorState, ids: Any, valid_mask: Any, *, inplace: bool) -> AllocatorState:
    sel = _np_selected(state, ids, valid_mask)
    if len(sel) == 0:
        return state
    refcounts = state.refcounts if inplace else state.refcounts.copy()
    stack = state.free_stack if inplace else state.free_stack.copy()
    top = int(state.num_free)
    if isinstance(sel, list):
        for b in sorted(sel):  # entry by entry: a repeated id frees once, later repeats are no-ops
            r = refcounts[b]
            if r > 0:
                refcounts[b] = r - 1
                if r == 1:
                    stack[top] = b
                    top += 1
        return AllocatorState(stack, np.asarray(top, dtype=_I32), refcounts)
    sel = np.sort(sel)
    if (sel[1:] == sel[:-1]).any():
        blocks, counts = np.unique(sel, return_counts=True)
    else:
        blocks, counts = sel, 1
    before = refcounts[blocks]
    after = np.maximum(before - counts, 0)
    refcounts[blocks] = after
    freed = blocks[(before > 0) & (after == 0)]
    stack[top:top + freed.size] = freed
    return AllocatorState(stack, np.asarray(top + freed.size, dtype=_I32), refcounts)


def _jax_valid(state: AllocatorState, ids: Any, valid_mask: Any) -> tuple[Array, Array]:
    """(ids with invalid entries replaced by num_blocks, i.e. dropped by scatters; validity mask).
    Valid: unmasked, in [1, num_blocks) and in use (refcount > 0)."""
    nb = state.num_blocks
    ids = jnp.asarray(ids, dtype=jnp.int32).reshape(-1)
    mask = jnp.ones(ids.shape, bool) if valid_mask is None else jnp.asarray(valid_mask, bool).reshape(-1)
    if mask.shape != ids.shape:
        raise ValueError(f"valid_mask has shape {mask.shape}, ids have shape {ids.shape}")
    in_range = (ids > 0) & (ids < nb)
    valid = mask & in_range & (jnp.asarray(state.refcounts)[jnp.where(in_range, ids, 0)] > 0)
    return jnp.where(valid, ids, nb), valid


def _jax_release(state: AllocatorState, ids: Any, valid_mask: Any) -> AllocatorState:
    nb = state.num_blocks
    target, _ = _jax_valid(state, ids, valid_mask)
    if target.shape[0] == 0:
        return state
    refcounts = jnp.asarray(state.refcounts).at[target].add(-1, mode="drop").at[target].max(0, mode="drop")
    # Sorted, invalid entries (== nb) last; the first of each run of equal ids stands for the block.
    srt = jnp.sort(target)
    first = (srt < nb) & jnp.concatenate([jnp.ones((1,), bool), srt[1:] != srt[:-1]])
    freed = first & (refcounts[jnp.minimum(srt, nb - 1)] == 0)
    top = jnp.asarray(state.num_free, dtype=jnp.int32)
    pos = top + jnp.cumsum(freed.astype(jnp.int32)) - 1
    stack = jnp.asarray(state.free_stack).at[jnp.where(freed, pos, nb)].set(srt, mode="drop")
    return AllocatorState(stack, top + freed.sum(dtype=jnp.int32), refcounts)


def incref(state: AllocatorState, ids: Any, valid_mask: Any = None) -> AllocatorState:
    """Adds one reference per valid entry (a block listed twice gains two). Free blocks are skipped:
    a reference can only be shared, never put on a block that sits on the free stack."""
    if _on_jax(state, ids, valid_mask):
        target, _ = _jax_valid(state, ids, valid_mask)
        refcounts = jnp.asarray(state.refcounts).at[target].add(1, mode="drop")
        return AllocatorState(jnp.asarray(state.free_stack), jnp.asarray(state.num_free), refcounts)
    return _np_incref(state, ids, valid_mask, inplace=False)


def _np_incref(state: AllocatorState, ids: Any, valid_mask: Any, *, inplace: bool) -> AllocatorState:
    sel = _np_selected(state, ids, valid_mask)
    refcounts = state.refcounts if inplace else state.refcounts.copy()
    if isinstance(sel, list):
        for b in sel:
            if refcounts[b] > 0:
                refcounts[b] += 1
    else:
        np.add.at(refcounts, sel[refcounts[sel] > 0], 1)
    return AllocatorState(state.free_stack, state.num_free, refcounts)


share = incref  # taking a reference on a block that another sequence already uses


# ---- fork ---------------------------------------------------------------------------------------

def fork(state: AllocatorState, block_id: Any) -> tuple[AllocatorState, Array, Array, Array]:
    """Copy-on-write for a partly filled block the caller is about to write into.

    Returns (state, id, copy, ok). Refcount 1: the caller owns it; same id, copy=False. Shared: a
    new block is allocated, the caller's reference on the old one is dropped, and copy=True tells
    the caller to copy the page contents. ok=False (state unchanged, same id, copy=False) when no
    block is free or `block_id` is null, out of range or free.
    """
    if _on_jax(state, block_id):
        return _jax_fork(state, block_id)
    return _np_fork(state, block_id, inplace=False)


def _np_fork(state: AllocatorState, block_id: Any, *, inplace: bool):
    b = int(block_id)
    if not -2**31 <= b < 2**31:
        raise ValueError(f"block id {b} does not fit in int32")
    same = np.int32(b)
    if not 0 < b < state.num_blocks or state.refcounts[b] == 0:
        return state, same, np.bool_(False), np.bool_(False)
    if state.refcounts[b] == 1:
        return state, same, np.bool_(False), np.bool_(True)
    after, ids, ok = _np_allocate(state, 1, 1, inplace=inplace)
    if not ok:
        return state, same, np.bool_(False), np.bool_(False)
    refcounts = after.refcounts  # _np_allocate copied it unless inplace
    refcounts[b] -= 1  # >= 2 before, so the old block stays in use
    return AllocatorState(after.free_stack, after.num_free, refcounts), ids[0], np.bool_(True), np.bool_(True)


def _jax_fork(state: AllocatorState, block_id: Any):
    bid = jnp.asarray(block_id, dtype=jnp.int32)
    target, valid = _jax_valid(state, bid.reshape(1), None)
    shared = valid[0] & (jnp.asarray(state.refcounts)[jnp.minimum(target[0], state.num_blocks - 1)] > 1)
    after, ids, got = _jax_allocate(state, shared.astype(jnp.int32), 1)
    copy = shared & got
    refcounts = after.refcounts.at[jnp.where(copy, target[0], state.num_blocks)].add(-1, mode="drop")
    ok = (valid[0] & ~shared) | copy
    return AllocatorState(after.free_stack, after.num_free, refcounts), jnp.where(copy, ids[0], bid), copy, ok


def num_free(state: AllocatorState) -> Array:
    return state.num_free


def num_used(state: AllocatorState) -> Array:
    return state.num_blocks - 1 - state.num_free


# ---- host owner ---------------------------------------------------------------------------------

class BlockPool:
    """Host-side owner of one numpy `AllocatorState` for the scheduler and the prefix cache.

    One job: apply the allocator on its state and reject bad ids loudly. Every method either
    succeeds completely or raises before changing anything; running out of blocks is `None`.
    The pool owns its arrays and updates them in place (cost independent of num_blocks); `state`
    hands out a copy.
    """

    def __init__(self, num_blocks: int):
        self._state = init(num_blocks)
        self.num_blocks = int(num_blocks)

    @property
    def state(self) -> AllocatorState:
        """A snapshot (copy) of the current state."""
        s = self._state
        return AllocatorState(s.free_stack.copy(), s.num_free.copy(), s.refcounts.copy())

    @property
    def num_free(self) -> int:
        return int(self._state.num_free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - int(self._state.num_free)

    def refcount(self, block_id: int) -> int:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} is outside [0, {self.num_blocks})")
        return int(self._state.refcounts[block_id])

    def refcounts_of(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Refcounts of `ids` (a new array), for vectorised checks such as the prefix cache's."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        self._check_range(arr)
        return self._state.refcounts[arr]

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks (refcount 1), or None when fewer than n are free (nothing changes)."""
        n = int(n)
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        self._state, ids, ok = _np_allocate(self._state, n, n, inplace=True)
        return ids.tolist() if ok else None

    def release(self, ids: Sequence[int]) -> None:
        """Drops one reference per listed id; raises ValueError on a null, unknown or free id, or
        on an id listed more times than it is referenced."""
        ids = self._checked_in_use(ids)
        self._check_not_over_released(ids)
        self._state = _np_release(self._state, ids, None, inplace=True)

    def incref(self, ids: Sequence[int]) -> None:
        """Takes one more reference per listed id; raises ValueError on null, unknown or free ids."""
        self._state = _np_incref(self._state, self._checked_in_use(ids), None, inplace=True)

    share = incref

    def fork(self, block_id: int) -> tuple[int, bool] | None:
        """Copy-on-write: (id to write into, whether the caller must copy the page), or None when a
        copy is needed and no block is free (nothing changes)."""
        self._checked_in_use([block_id])
        state, new_id, copy, ok = _np_fork(self._state, block_id, inplace=True)
        if not ok:
            return None
        self._state = state
        return int(new_id), bool(copy)

    def _check_range(self, arr: np.ndarray) -> None:
        bad = (arr < 0) | (arr >= self.num_blocks)
        if bad.any():
            raise ValueError(f"block id {int(arr[bad][0])} is outside [0, {self.num_blocks})")

    def _checked_in_use(self, ids: Sequence[int] | np.ndarray) -> list[int] | np.ndarray:
        """`ids` as a list (short) or int64 array, after checking each names an in-use, non-null block."""
        refcounts = self._state.refcounts
        if len(ids) <= _SCALAR_MAX:
            ids = np.asarray(ids).reshape(-1).tolist() if isinstance(ids, np.ndarray) else [int(b) for b in ids]
            for b in ids:
                if not 0 < b < self.num_blocks or refcounts[b] == 0:
                    self._raise_not_in_use(b)
            return ids
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        self._check_range(arr)
        bad = (arr == 0) | (refcounts[arr] == 0)
        if bad.any():
            self._raise_not_in_use(int(arr[bad][0]))
        return arr

    def _raise_not_in_use(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} is outside [0, {self.num_blocks})")
        if block_id == 0:
            raise ValueError("block 0 is the null page; it cannot be released, shared or forked")
        raise ValueError(f"block {block_id} is free (refcount 0)")

    def _check_not_over_released(self, ids: list[int] | np.ndarray) -> None:
        if isinstance(ids, list) and len(set(ids)) == len(ids):
            return
        blocks, counts = np.unique(np.asarray(ids, dtype=np.int64), return_counts=True)
        over = counts > self._state.refcounts[blocks]
        if over.any():
            b = int(blocks[over][0])
            raise ValueError(f"block {b} released {int(counts[over][0])} times but has only "
                             f"{int(self._state.refcounts[b])} references")

    def __repr__(self) -> str:
        return f"BlockPool(num_blocks={self.num_blocks}, free={self.num_free}, used={self.num_used})"
