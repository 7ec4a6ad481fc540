"""Online suffix automaton (SAM) over token ids, stored in flat numpy arrays, built by numba kernels.

Layout (one automaton = four arrays; every hot path is a `@njit(nogil=True, cache=True)` kernel
over them, the only implementation; tests check it against a plain-Python oracle in tests/):
- `st[s, F]` (int32, one row per state, so a walk touches one cache line per state):
  LEN (longest string of s), LINK (suffix link, -1 at the root), COUNT (occurrences, below),
  TOP_TOK / TOP_CHILD (the most frequent continuation: token and state, -1 when none),
  TOP_TOTAL (summed occurrences over s's transitions), and while the automaton can still grow
  FIRST_EDGE (head of s's edge list) and CLONE (1 for clone states).
- transitions in an open-addressing hash table: `keys[i]` = state << 32 | (token as uint32) (-1:
  empty), `vals[0, i]` = child, `vals[1, i]` = the next edge of the same state (edge lists let a
  clone copy its original's transitions). Load stays <= 1/2; a full table is doubled by `_rehash`.
- `tokens` (int32) and `meta` = [states, last state, edges, tokens].

A suffix automaton of n tokens has <= 2n - 1 states and <= 3n - 4 transitions. `nbytes` counts what
is stored (about 60-120 bytes per token while growing; `freeze()` trims to the read-only fields).

Counts (as in Blumer et al.'s online construction, plus an O(1) credit): each new token credits its
occurrence to the first `count_depth` states on the suffix-link path of its match, so COUNT[s] <=
|endpos(s)|, exact when that path is shorter than `count_depth` (almost every state of natural
text) and after `freeze()`, which recomputes all counts exactly in O(n). Top continuations are kept
online (`track_top`): every credited child's parents are on the path `extend` walks anyway, so it
refreshes at most `4 * count_depth + 16` of them per token. A top's count is read live, COUNT of
TOP_CHILD. Ties go to the more recent continuation (agents reuse their latest phrasing): online, a
credited child that equals the top's count and a new continuation of a state whose top was seen
once take over; frozen, the later-created child state wins.

After each `extend` the state LINK[last] holds the longest suffix of the text that also occurs
ending earlier, so the session's self-match is O(1) per token. `Matcher` walks a different token
stream against an automaton, O(1) amortised per token.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numba
import numpy as np

ROOT = 0
# Row fields (calibrator.py compiles some into its kernels: touch it when changing these).
LEN, LINK, COUNT, TOP_TOK, TOP_CHILD, TOP_TOTAL, FIRST_EDGE, CLONE = range(8)
FROZEN_FIELDS = 6  # the fields a frozen automaton keeps (drafting and matching read only these)
N_STATES, LAST, N_EDGES, N_TOKENS = range(4)
_EMPTY = -1
_MIX = np.uint64(0x9E3779B97F4A7C15)
_njit = numba.njit(cache=True, nogil=True)


class FrozenAutomatonError(RuntimeError):
    """An `extend` on an automaton after `freeze()`."""


# ---- kernels ------------------------------------------------------------------------------------

@numba.njit(cache=True, nogil=True, inline="always")
def _key(state, token):
    return (np.int64(state) << 32) | (np.int64(token) & 0xFFFFFFFF)


@numba.njit(cache=True, nogil=True, inline="always")
def _slot(keys, key):
    """Index of `key` in the table, or of the empty slot where it would go."""
    mask = len(keys) - 1
    i = np.int64((np.uint64(key) * _MIX) >> np.uint64(33)) & mask
    while True:
        k = keys[i]
        if k == key or k == _EMPTY:
            return i
        i = (i + 1) & mask


@numba.njit(cache=True, nogil=True, inline="always")
def get_child(keys, vals, state, token):
    """The transition state --token--> child, or -1."""
    key = _key(state, token)
    i = _slot(keys, key)
    return vals[0, i] if keys[i] == key else -1


@numba.njit(cache=True, nogil=True, inline="always")
def _set_child(st, keys, vals, meta, state, token, child):
    key = _key(state, token)
    i = _slot(keys, key)
    if keys[i] != key:  # a new edge: head of its state's edge list
        keys[i] = key
        vals[1, i] = st[state, FIRST_EDGE]
        st[state, FIRST_EDGE] = i
        meta[N_EDGES] += 1
    vals[0, i] = child


@numba.njit(cache=True, nogil=True, inline="always")
def _new_state(st, meta, length, link, count, clone):
    s = meta[N_STATES]
    meta[N_STATES] = s + 1
    st[s, LEN] = length
    st[s, LINK] = link
    st[s, COUNT] = count
    st[s, TOP_TOK] = -1
    st[s, TOP_CHILD] = -1
    st[s, TOP_TOTAL] = 0
    st[s, FIRST_EDGE] = -1
    st[s, CLONE] = clone
    return s


@numba.njit(cache=True, nogil=True, inline="always")
def _table_full(meta, slots):
    # Edges + states <= 3/4 of the slots: one token adds at most (states on its suffix path) +
    # (a clone's copied edges) edges, so it always finds free slots; edge load stays below ~0.45.
    return 4 * (meta[N_EDGES] + meta[N_STATES] + 2) > 3 * slots


@_njit
def _extend_run(new_tokens, st, keys, vals, tokens, meta, track, count_depth, refresh_cap):
    """Appends tokens until done or until the table or the state rows need growing (the caller
    grows them and calls again); returns how many tokens were appended."""
    for i in range(len(new_tokens)):
        if _table_full(meta, len(keys)) or meta[N_STATES] + 2 > st.shape[0] \
                or meta[N_TOKENS] >= len(tokens):
            return i
        token = new_tokens[i]
        pos = meta[N_TOKENS]
        tokens[pos] = token
        meta[N_TOKENS] = pos + 1
        last = meta[LAST]
        cur = _new_state(st, meta, st[last, LEN] + 1, ROOT, 1, 0)
        p = last
        while p != -1 and get_child(keys, vals, p, token) < 0:
            _set_child(st, keys, vals, meta, p, token, cur)
            if track:  # a new continuation, seen once
                st[p, TOP_TOTAL] += 1
                if token >= 0 and (st[p, TOP_CHILD] < 0 or st[st[p, TOP_CHILD], COUNT] <= 1):
                    st[p, TOP_TOK] = token
                    st[p, TOP_CHILD] = cur
            p = st[p, LINK]
        first_parent = p
        if p != -1:
            q = get_child(keys, vals, p, token)
            if st[p, LEN] + 1 == st[q, LEN]:
                st[cur, LINK] = q
            else:
                clone = _new_state(st, meta, st[p, LEN] + 1, st[q, LINK], st[q, COUNT], 1)
                st[clone, TOP_TOK] = st[q, TOP_TOK]
                st[clone, TOP_CHILD] = st[q, TOP_CHILD]
                st[clone, TOP_TOTAL] = st[q, TOP_TOTAL]
                e = st[q, FIRST_EDGE]
                while e >= 0:
                    _set_child(st, keys, vals, meta, clone, np.int32(keys[e] & 0xFFFFFFFF), vals[0, e])
                    e = vals[1, e]
                while p != -1:
                    key = _key(p, token)
                    j = _slot(keys, key)
                    if keys[j] != key or vals[0, j] != q:
                        break
                    vals[0, j] = clone
                    if track and st[p, TOP_CHILD] == q:
                        st[p, TOP_CHILD] = clone
                    p = st[p, LINK]
                st[q, LINK] = clone
                st[cur, LINK] = clone
        meta[LAST] = cur
        # Credit the new occurrence to the match and its first suffix-link ancestors.
        state = st[cur, LINK]
        depth = count_depth
        shortest = 0
        while state > ROOT and depth != 0:
            st[state, COUNT] += 1
            shortest = st[state, LEN]
            state = st[state, LINK]
            depth -= 1
        if track and first_parent != -1 and shortest:
            # Parents whose `token` child was credited gained an occurrence there: refresh tops.
            state = first_parent
            budget = refresh_cap
            while state != -1 and budget != 0:
                child = get_child(keys, vals, state, token)
                if st[child, LEN] < shortest:
                    break
                st[state, TOP_TOTAL] += 1
                top = st[state, TOP_CHILD]
                if token >= 0 and (top < 0 or top == child or st[child, COUNT] > st[top, COUNT]):
                    st[state, TOP_TOK] = token
                    st[state, TOP_CHILD] = child
                state = st[state, LINK]
                budget -= 1
    return len(new_tokens)


@_njit
def _rehash(st, keys, vals, n_states, slots):
    """The edge table moved into `slots` slots, edge lists rebuilt."""
    new_keys = np.full(slots, _EMPTY, np.int64)
    new_vals = np.empty((vals.shape[0], slots), np.int32)
    for s in range(n_states):
        st[s, FIRST_EDGE] = -1
    for i in range(len(keys)):
        key = keys[i]
        if key == _EMPTY:
            continue
        j = _slot(new_keys, key)
        new_keys[j] = key
        new_vals[0, j] = vals[0, i]
        if vals.shape[0] > 1:
            s = key >> 32
            new_vals[1, j] = st[s, FIRST_EDGE]
            st[s, FIRST_EDGE] = j
    return new_keys, new_vals


@_njit
def _freeze(st, keys, vals, n_states):
    """Exact counts (own occurrence of every non-clone state summed up the suffix-link tree, in
    order of decreasing length) and tops; returns the trimmed read-only rows and child table."""
    out = np.empty((n_states, FROZEN_FIELDS), np.int32)
    max_len = 0
    for s in range(n_states):
        for f in range(FROZEN_FIELDS):
            out[s, f] = st[s, f]
        out[s, COUNT] = 0 if (s == ROOT or st[s, CLONE]) else 1
        out[s, TOP_TOK] = -1
        out[s, TOP_CHILD] = -1
        out[s, TOP_TOTAL] = 0
        if st[s, LEN] > max_len:
            max_len = st[s, LEN]
    # Counting sort by length, then sum up the suffix-link tree from the longest states.
    bucket = np.zeros(max_len + 2, np.int64)
    for s in range(n_states):
        bucket[out[s, LEN] + 1] += 1
    for i in range(1, max_len + 2):
        bucket[i] += bucket[i - 1]
    order = np.empty(n_states, np.int64)
    for s in range(n_states):
        ln = out[s, LEN]
        order[bucket[ln]] = s
        bucket[ln] += 1
    for i in range(n_states - 1, 0, -1):
        s = order[i]
        parent = out[s, LINK]
        if parent > ROOT:
            out[parent, COUNT] += out[s, COUNT]
    child_of = np.empty((1, len(keys)), np.int32)
    for i in range(len(keys)):
        key = keys[i]
        child_of[0, i] = vals[0, i]
        if key == _EMPTY:
            continue
        s = key >> 32
        token = np.int32(key & 0xFFFFFFFF)
        c = vals[0, i]
        n = out[c, COUNT]
        out[s, TOP_TOTAL] += n
        top = out[s, TOP_CHILD]
        if token >= 0 and (top < 0 or n > out[top, COUNT] or (n == out[top, COUNT] and c > top)):
            out[s, TOP_TOK] = token
            out[s, TOP_CHILD] = c
    return out, child_of


@_njit
def build_frozen(text):
    """The frozen automaton of `text` in one call (no GIL held): (rows, keys, children)."""
    n = len(text)
    st = np.empty((2 * n + 2, 8), np.int32)
    st[ROOT, LEN] = 0
    st[ROOT, LINK] = -1
    st[ROOT, COUNT] = 0
    st[ROOT, TOP_TOK] = -1
    st[ROOT, TOP_CHILD] = -1
    st[ROOT, TOP_TOTAL] = 0
    st[ROOT, FIRST_EDGE] = -1
    st[ROOT, CLONE] = 0
    slots = 16
    while slots < 4 * n:
        slots *= 2
    keys = np.full(slots, _EMPTY, np.int64)
    vals = np.empty((2, slots), np.int32)
    tokens = np.empty(max(n, 1), np.int32)
    meta = np.zeros(4, np.int64)
    meta[N_STATES] = 1
    done = 0
    while done < n:
        done += _extend_run(text[done:], st, keys, vals, tokens, meta, False, 1, 1)
        if done < n:
            keys, vals = _rehash(st, keys, vals, meta[N_STATES], 2 * len(keys))
    out, child_of = _freeze(st, keys, vals, meta[N_STATES])
    return out, keys, child_of, meta


@_njit
def advance(st, keys, vals, state, length, token):
    """(state, length) of the longest suffix of (matched string + token) in the automaton's text;
    `state`, `length` must describe a matched suffix. Unknown tokens reset to (ROOT, 0)."""
    while state != ROOT and get_child(keys, vals, state, token) < 0:
        state = st[state, LINK]
        length = st[state, LEN]
    child = get_child(keys, vals, state, token)
    if child < 0:
        return ROOT, 0
    return child, length + 1


@_njit
def feed_run(st, keys, vals, state, length, stream):
    """`advance` over every token of `stream`; returns the final (state, length)."""
    for i in range(len(stream)):
        state, length = advance(st, keys, vals, state, length, stream[i])
    return state, length


# ---- Python wrapper -----------------------------------------------------------------------------

def as_token_array(tokens: Iterable[int] | np.ndarray) -> np.ndarray:
    """Tokens as a contiguous int32 array; ValueError if any does not fit int32."""
    if isinstance(tokens, np.ndarray) and tokens.dtype == np.int32:
        return np.ascontiguousarray(tokens)
    arr = np.asarray(tokens if isinstance(tokens, (np.ndarray, list, tuple)) else list(tokens))
    if arr.size == 0:
        return np.zeros(0, np.int32)
    if arr.dtype.kind not in "iu" or arr.ndim != 1:
        raise ValueError(f"tokens must be a 1-D sequence of ints, got dtype {arr.dtype} shape {arr.shape}")
    if arr.min() < -(1 << 31) or arr.max() >= (1 << 31):
        raise ValueError("token ids must fit in int32")
    return arr.astype(np.int32)


def _pow2_at_least(n: int) -> int:
    return 1 << max(4, int(n - 1).bit_length())


class SuffixAutomaton:
    """Suffix automaton of `tokens`, extended in place (see module docstring)."""

    def __init__(self, tokens: Iterable[int] = (), *, count_depth: int | None = 8,
                 track_top: bool = True, capacity: int = 0) -> None:
        """`count_depth=None`: exact counts online (O(path) per token); `track_top=False` skips the
        online tops (automata built only to be frozen); `capacity`: tokens to reserve room for."""
        if count_depth is not None and count_depth < 1:
            raise ValueError(f"count_depth must be >= 1 or None (exact), got {count_depth}")
        self.count_depth = count_depth
        self.track_top = track_top
        arr = as_token_array(tokens)
        cap = max(capacity, len(arr), 16)
        self.st = np.empty((2 * cap + 2, 8), np.int32)
        self.keys = np.full(_pow2_at_least(4 * cap), _EMPTY, np.int64)
        self.vals = np.empty((2, len(self.keys)), np.int32)
        self._tokens = np.empty(cap, np.int32)
        self.meta = np.zeros(4, np.int64)
        self.meta[N_STATES] = 1
        self.st[ROOT] = (0, -1, 0, -1, -1, 0, -1, 0)
        self.frozen = False
        self.extend_many(arr)

    @classmethod
    def frozen_of(cls, tokens: Sequence[int] | np.ndarray, *, copy: bool = True) -> SuffixAutomaton:
        """A read-only automaton of `tokens` with exact counts, built in one kernel call.
        `copy=False` keeps `tokens` itself (an int32 array nobody else writes) as its text."""
        arr = as_token_array(tokens)
        sam = cls.__new__(cls)
        sam.count_depth, sam.track_top, sam.frozen = 1, False, True
        sam.st, sam.keys, sam.vals, sam.meta = build_frozen(arr)
        sam._tokens = arr.copy() if copy else arr
        return sam

    # ---- views ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.meta[N_TOKENS])

    @property
    def tokens(self) -> np.ndarray:
        return self._tokens[:self.meta[N_TOKENS]]

    @property
    def num_states(self) -> int:
        return int(self.meta[N_STATES])

    @property
    def last(self) -> int:
        return int(self.meta[LAST])

    @property
    def length(self) -> np.ndarray:
        return self.st[:self.num_states, LEN]

    @property
    def link(self) -> np.ndarray:
        return self.st[:self.num_states, LINK]

    @property
    def count(self) -> np.ndarray:
        return self.st[:self.num_states, COUNT]

    @property
    def nbytes(self) -> int:
        """Bytes of every array the automaton holds."""
        return self.st.nbytes + self.keys.nbytes + self.vals.nbytes + self._tokens.nbytes + self.meta.nbytes

    def child(self, state: int, token: int) -> int:
        """The transition state --token--> child, or -1."""
        return int(get_child(self.keys, self.vals, state, token))

    def transitions(self, state: int) -> dict[int, int]:
        """{token: child} of a state (a scan of the table: for tests and inspection)."""
        mask = self.keys != _EMPTY
        keys, children = self.keys[mask], self.vals[0][mask]
        sel = (keys >> 32) == state
        return {int(np.int32(np.uint32(k & 0xFFFFFFFF))): int(c) for k, c in zip(keys[sel], children[sel])}

    def walk(self, tokens: Sequence[int]) -> int:
        """The state reached by reading `tokens` from the root, or -1 if not a substring."""
        s = ROOT
        for t in tokens:
            s = self.child(s, int(t))
            if s < 0:
                return -1
        return s

    def contains(self, tokens: Sequence[int]) -> bool:
        """True iff `tokens` is a (possibly empty) substring of the text."""
        return self.walk(tokens) >= 0

    @property
    def match_state(self) -> int:
        """The state of the longest suffix of the text that also ends earlier (ROOT if none)."""
        return int(self.st[self.last, LINK]) if self.last != ROOT else ROOT

    @property
    def match_length(self) -> int:
        return int(self.st[self.match_state, LEN])

    def top_next(self, state: int) -> tuple[int, int, int, int] | None:
        """(token, child, count[child], total) of the most frequent continuation of `state`."""
        child = int(self.st[state, TOP_CHILD])
        if child < 0:
            return None
        return (int(self.st[state, TOP_TOK]), child, int(self.st[child, COUNT]), int(self.st[state, TOP_TOTAL]))

    # ---- construction ---------------------------------------------------------------------------

    def extend(self, token: int) -> None:
        """Appends one token (O(1) amortised)."""
        self.extend_many((token,))

    def extend_many(self, tokens: Iterable[int] | np.ndarray) -> None:
        """Appends tokens (validated as int32 before anything changes)."""
        if self.frozen:
            raise FrozenAutomatonError("cannot extend a frozen suffix automaton")
        arr = as_token_array(tokens)
        depth = -1 if self.count_depth is None else self.count_depth
        refresh = -1 if self.count_depth is None else 4 * self.count_depth + 16
        done = 0
        while done < len(arr):
            done += _extend_run(arr[done:], self.st, self.keys, self.vals, self._tokens, self.meta,
                                self.track_top, depth, refresh)
            if done < len(arr):
                self._grow(len(arr) - done)

    def _grow(self, pending: int) -> None:
        n = self.num_states
        if n + 2 > self.st.shape[0]:
            st = np.empty((max(2 * self.st.shape[0], n + 2 * pending + 2), 8), np.int32)
            st[:n] = self.st[:n]
            self.st = st
        if len(self) >= len(self._tokens):
            toks = np.empty(max(2 * len(self._tokens), len(self) + pending), np.int32)
            toks[:len(self)] = self._tokens[:len(self)]
            self._tokens = toks
        if _table_full(self.meta, len(self.keys)):
            self.keys, self.vals = _rehash(self.st, self.keys, self.vals, n, 2 * len(self.keys))

    def freeze(self) -> SuffixAutomaton:
        """Exact counts and tops (O(n)), read-only from now on, trimmed; returns self."""
        if self.frozen:
            return self
        self.st, child_of = _freeze(self.st, self.keys, self.vals, self.num_states)
        self.vals = child_of
        self._tokens = self._tokens[:len(self)].copy()
        self.frozen = True
        return self


class Matcher:
    """Longest suffix of a token stream that is a substring of an automaton's text.

    Invariant after each `feed`: the last `length` tokens fed spell a string of `state`, and no
    longer suffix of the stream is a substring of the automaton's text. The automaton must not grow
    while matched (memory automata are frozen).
    """

    __slots__ = ("sam", "state", "length")

    def __init__(self, sam: SuffixAutomaton) -> None:
        self.sam = sam
        self.state = ROOT
        self.length = 0

    def feed(self, token: int) -> None:
        self.feed_many((token,))

    def feed_many(self, tokens: Iterable[int] | np.ndarray) -> None:
        sam = self.sam
        state, length = feed_run(sam.st, sam.keys, sam.vals, self.state, self.length, as_token_array(tokens))
        self.state, self.length = int(state), int(length)
