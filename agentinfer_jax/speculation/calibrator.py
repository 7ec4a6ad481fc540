"""AcceptanceCalibrator: P(a drafted token is accepted) by the evidence behind it, learned online,
in flat arrays read and written by numba kernels (the drafter's walk and its scoring).

A hierarchy of (accepted, trials) tables, each level shrunk towards the one above it:
- cells: (evidence class, log2 match length, log2 occurrences of the matched context, the token's
  share of those occurrences in 5 bins), estimated as (accepted + w * prior) / (trials + w) with
  prior = the smoothed count ratio n / (total + 1), w = `prior_weight`;
- by the preceding token, shrunk towards the cell with weight w: for a draft's first token
  (FIRST: class, last context token, token), for later ones (PAIR: class, previous draft token,
  token). After a '.' agents start a new line of a known format, after a name they copy the rest;
- by the two preceding tokens (CONTEXT: class, prev2, prev, token), shrunk towards the level above
  with weight `context_weight`.
The PAIR and CONTEXT levels (`token_context`, on by default) apply to the first
`context_positions` draft positions. A fresh calibrator behaves like a count-based drafter and
sharpens as it observes.

The drafter's two hot paths live here too, beside the formulas they inline, so numba's on-disk
cache (which tracks only a kernel's own file) can never pair a kernel with stale formulas:
`draft_from_cursors` (propose: the sources' cursors, the draft's length bound, then
`walk_candidates`: every source's most frequent continuation, valued by these probabilities, best
first with pruning) and `score_candidates` (the update from verified tokens).

Storage: `cells` is a (NUM_CELLS, 2) float64 array; the three token levels share one open-addressing
table (`keys` int64, 0 = empty; `stats` (slots, 2) float64) keyed by a 64-bit hash of (level,
class, tokens), so any token ids work. Each level holds at most `max_first_tokens` keys (a full
level keeps updating the keys it has); the table doubles on the caller's thread between steps.
"""

from __future__ import annotations

import math

import numba
import numpy as np

# Row fields of an automaton (compiled into the kernels below; numba's cache does not track other
# files, so a change of these constants in suffix_automaton.py must touch this file too).
from agentinfer_jax.speculation.suffix_automaton import (COUNT, LAST, LEN, LINK, N_TOKENS, ROOT, TOP_CHILD,
                                                         TOP_TOK, TOP_TOTAL)

OWN, MEMORY, GLOBAL = 0, 1, 2
SOURCE_NAMES = ("own", "memory", "global")
NUM_SOURCES = len(SOURCE_NAMES)
# Evidence classes: source + AGREED while another cursor's top path agrees up to the drafted token,
# + BOTH as well while both other cursors' paths agree (three sources behind a token are accepted
# more often than two; replays: +0.003 tokens/step on both FireAct files, k = 8 and 16).
AGREED = len(SOURCE_NAMES)
BOTH = 2 * AGREED
NUM_CLASSES = 2 * BOTH
CELLS_PER_CLASS = 8 * 8 * 5
NUM_CELLS = NUM_CLASSES * CELLS_PER_CLASS
FIRST, PAIR, CONTEXT = 0, 1, 2
_EMPTY = 0
_njit = numba.njit(cache=True, nogil=True)
# The per-step kernels run on the serving loop's thread for a few microseconds each: they keep the
# GIL. Releasing it hands it to the memory worker between its own kernels, and the loop then waits
# out the worker's Python stretch (multitask replay: p99 of propose 89 us with the worker busy, 14 us
# holding the GIL).
_njit_step = numba.njit(cache=True, nogil=False)


@numba.njit(cache=True, nogil=True, inline="always")
def _log2_bin(x):
    b = 0
    while x > 0 and b < 7:
        x >>= 1
        b += 1
    return b


@_njit
def cell_index(cls, match_len, n, total):
    """The cell of a drafted token: class, log2 bins (capped at 7) of the match length and of the
    total count, and the share n / total in 5 bins."""
    if total < 1:
        total = 1
    if n > total:  # online counts are lower bounds; a share never exceeds 1
        n = total
    share = 4 if n == total else 4 * n // total
    return cls * CELLS_PER_CLASS + (_log2_bin(match_len) * 8 + _log2_bin(total)) * 5 + share


@numba.njit(cache=True, nogil=True, inline="always")
def _mix_in(x, v):
    # Scramble what came before, then add the next 32-bit value (XOR of raw small values collides).
    x = x * np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(29)
    return x ^ np.uint64(np.int64(v) & 0xFFFFFFFF)


@_njit
def token_key(level, cls, prev2, prev, token):
    """64-bit key of a token-level entry (never 0, the empty marker)."""
    x = np.uint64(level * NUM_CLASSES + cls + 1)
    x = _mix_in(x, prev2)
    x = _mix_in(x, prev)
    x = _mix_in(x, token)
    x = (x ^ (x >> np.uint64(32))) * np.uint64(0xD6E8FEB86659FD93)
    key = np.int64(x ^ (x >> np.uint64(32)))
    return key if key != _EMPTY else np.int64(1)


@numba.njit(cache=True, nogil=True, inline="always")
def _find(keys, key):
    mask = len(keys) - 1
    i = np.int64((np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(33)) & mask
    while True:
        k = keys[i]
        if k == key or k == _EMPTY:
            return i
        i = (i + 1) & mask


@_njit
def lookup(keys, stats, key, prior, weight):
    """(accepted + weight * prior) / (trials + weight) of `key`'s entry; `prior` if it has none."""
    i = _find(keys, key)
    if keys[i] != key:
        return prior
    return (stats[i, 0] + weight * prior) / (stats[i, 1] + weight)


@_njit
def cell_prob(cells, c, n, total, weight):
    return (cells[c, 0] + weight * n / (total + 1)) / (cells[c, 1] + weight)


@_njit
def record(keys, stats, sizes, level, key, accepted, max_keys):
    """Counts one trial of a token-level entry (a new key only while its level has room)."""
    i = _find(keys, key)
    if keys[i] != key:
        if sizes[level] >= max_keys:
            return
        keys[i] = key
        sizes[level] += 1
        sizes[3] += 1
    stats[i, 0] += accepted
    stats[i, 1] += 1.0


@_njit
def _rehash(keys, stats, slots):
    new_keys = np.zeros(slots, np.int64)
    new_stats = np.zeros((slots, 2), np.float64)
    for i in range(len(keys)):
        if keys[i] != _EMPTY:
            j = _find(new_keys, keys[i])
            new_keys[j] = keys[i]
            new_stats[j, 0] = stats[i, 0]
            new_stats[j, 1] = stats[i, 1]
    return new_keys, new_stats


@_njit_step
def walk_candidates(sts, states, lengths, limit, cells, ckeys, cstats, w, wc, ctx_stop, last, last2, min_prob,
          out, cand_src, cand_len, cand_toks, cand_cells):
    """The drafter's selection (see sam_drafter): proposes the best candidate into `out`; returns
    (draft length, candidates, expected accepted). `states[i] < 0`: source i has no cursor.
    Candidates (class, tokens, cells) are kept for `score_candidates`."""
    max_heads = NUM_SOURCES
    n_heads = 0
    h_q = np.empty(max_heads, np.float64)
    h_i = np.empty(max_heads, np.int64)
    h_tok = np.empty(max_heads, np.int64)
    for i in range(NUM_SOURCES):
        if states[i] >= 0 and sts[i][states[i], TOP_CHILD] >= 0:
            h_i[n_heads] = i
            h_tok[n_heads] = sts[i][states[i], TOP_TOK]
            n_heads += 1
    # Every head's path first (its tokens), so a token's class can say whether another source's
    # path agrees with the candidate up to and including it.
    path_len = np.zeros(max_heads, np.int64)
    for h in range(n_heads):
        st = sts[h_i[h]]
        s = states[h_i[h]]
        size = 0
        while size < limit and st[s, TOP_CHILD] >= 0:
            cand_toks[h, size] = st[s, TOP_TOK]
            s = st[s, TOP_CHILD]
            size += 1
        path_len[h] = size
    agreed = np.zeros(max_heads, np.int64)  # positions < agreed[h] are backed by another source
    agreed2 = np.zeros(max_heads, np.int64)  # positions < agreed2[h] are backed by two
    for h in range(n_heads):
        for g in range(n_heads):
            if h_i[g] != h_i[h]:
                m = 0
                while m < min(path_len[h], path_len[g]) and cand_toks[g, m] == cand_toks[h, m]:
                    m += 1
                agreed2[h] = max(agreed2[h], min(agreed[h], m))
                agreed[h] = max(agreed[h], m)
    for h in range(n_heads):
        i = h_i[h]
        st = sts[i]
        s = states[i]
        tok = h_tok[h]
        cls = i + AGREED if agreed[h] > 0 else i
        if agreed2[h] > 0:
            cls += BOTH
        n = st[st[s, TOP_CHILD], COUNT]
        total = st[s, TOP_TOTAL]
        c = cell_index(cls, lengths[i], n, total)
        q = cell_prob(cells, c, n, total, w)
        q = lookup(ckeys, cstats, token_key(FIRST, cls, -1, last, tok), q, w)
        if ctx_stop > 0:
            q = lookup(ckeys, cstats, token_key(CONTEXT, cls, last2, last, tok), q, wc)
        h_q[h] = q
        cand_src[h] = cls
        cand_len[h] = 1
        cand_toks[h, 0] = tok
        cand_cells[h, 0] = c
    # Best first (ties in source order), so weaker candidates stop early.
    order = np.argsort(-h_q[:n_heads], kind="mergesort")
    best_score = 0.0
    best_len = 0
    best_h = -1
    for r in range(n_heads):
        h = order[r]
        p = h_q[h]
        if p < min_prob or p * limit <= best_score:
            continue  # scored from its first token only
        src = h_i[h]
        st = sts[src]
        s = st[states[src], TOP_CHILD]
        length = lengths[src] + 1
        prev2, prev = last, cand_toks[h, 0]
        size = 1
        score, keep = p, 1
        while size < limit and score + p * (limit - size) > best_score:
            child = st[s, TOP_CHILD]
            if child < 0:
                break
            tok = st[s, TOP_TOK]
            n = st[child, COUNT]
            total = st[s, TOP_TOTAL]
            cls = src + AGREED if size < agreed[h] else src
            if size < agreed2[h]:
                cls += BOTH
            c = cell_index(cls, length, n, total)
            q = cell_prob(cells, c, n, total, w)
            if size < ctx_stop:
                q = lookup(ckeys, cstats, token_key(PAIR, cls, -1, prev, tok), q, w)
                q = lookup(ckeys, cstats, token_key(CONTEXT, cls, prev2, prev, tok), q, wc)
                prev2, prev = prev, tok
            p *= q
            cand_cells[h, size] = c
            size += 1
            length += 1
            s = child
            if p < min_prob:
                break
            score += p
            keep += 1
        cand_len[h] = size
        if score > best_score:
            best_score, best_len, best_h = score, keep, h
    for j in range(best_len):
        out[j] = cand_toks[best_h, j]
    return best_len, n_heads, best_score


# The drafter's one call per proposal. Gathering the cursors here rather than in Python halves a
# turn's first proposal, which runs with cold caches (multitask replay: p50 19 -> 12 us; the other
# steps 7.5 -> 4.5 us). It lives beside `walk_candidates`: numba's disk cache of a kernel tracks
# only its own file, so a caller elsewhere could keep a stale copy of the walk.
@_njit_step
def draft_from_cursors(own_st, own_meta, own_tokens, mem_st, mem_state, mem_len, glob_st, glob_state, glob_len,
                       min_match, factor, k, cells, ckeys, cstats, w, wc, ctx_stop, min_prob, out,
                       cand_src, cand_len, cand_toks, cand_cells):
    """The session's own cursor (the longest earlier-occurring suffix of its text), the memory and
    global matchers' cursors (length < min_match: none), the draft's length bound (`factor` times
    the longest match, at most k) and `walk_candidates`. Returns (drafted, candidates, expected
    accepted, last token, the one before it)."""
    n_tok = own_meta[N_TOKENS]
    last = own_tokens[n_tok - 1] if n_tok > 0 else -1
    last2 = own_tokens[n_tok - 2] if n_tok > 1 else -1
    states = np.full(NUM_SOURCES, -1, np.int64)
    lengths = np.zeros(NUM_SOURCES, np.int64)
    tail = own_meta[LAST]
    own = own_st[tail, LINK] if tail != ROOT else ROOT
    if own != ROOT and own_st[own, LEN] >= min_match:
        states[OWN], lengths[OWN] = own, own_st[own, LEN]
    if mem_len >= min_match:
        states[MEMORY], lengths[MEMORY] = mem_state, mem_len
    if glob_len >= min_match:
        states[GLOBAL], lengths[GLOBAL] = glob_state, glob_len
    longest = lengths.max()
    if longest == 0 or k == 0:
        return 0, 0, 0.0, last, last2
    reach = factor * longest
    limit = k if reach >= k else int(math.ceil(reach))
    n, n_cand, score = walk_candidates((own_st, mem_st, glob_st), states, lengths, limit, cells, ckeys, cstats, w,
                                       wc, ctx_stop, last, last2, min_prob, out, cand_src, cand_len, cand_toks,
                                       cand_cells)
    return n, n_cand, score, last, last2


@_njit_step
def score_candidates(true, n_cand, cand_src, cand_len, cand_toks, cand_cells, cells, ckeys, cstats, sizes,
           last, last2, ctx_n, max_keys):
    """Every candidate's tokens up to its first mismatch with the verified `true` tokens (past that
    the context is no longer the candidate's) count as trials of their cells and token levels."""
    for h in range(n_cand):
        cls = cand_src[h]
        size = cand_len[h]
        if size == 0 or len(true) == 0:
            continue
        record(ckeys, cstats, sizes, FIRST, token_key(FIRST, cls, -1, last, cand_toks[h, 0]),
               1.0 if cand_toks[h, 0] == true[0] else 0.0, max_keys)
        prev2, prev = last2, last
        for j in range(min(size, len(true))):
            tok = cand_toks[h, j]
            ok = tok == true[j]
            acc = 1.0 if ok else 0.0
            c = cand_cells[h, j]
            cells[c, 0] += acc
            cells[c, 1] += 1.0
            cls = c // CELLS_PER_CLASS  # the token's own class (agreement may end mid-path)
            if j < ctx_n:
                if j:
                    record(ckeys, cstats, sizes, PAIR, token_key(PAIR, cls, -1, prev, tok), acc, max_keys)
                record(ckeys, cstats, sizes, CONTEXT, token_key(CONTEXT, cls, prev2, prev, tok), acc,
                       max_keys)
            if not ok:
                break
            prev2, prev = prev, tok


class AcceptanceCalibrator:
    """Acceptance rates by evidence (see module docstring); the arrays are read by the drafter's
    compiled walk and written by its compiled scoring."""

    NUM_CELLS = NUM_CELLS

    def __init__(self, prior_weight: float = 4.0, max_first_tokens: int = 1 << 18,
                 context_weight: float = 2.0, token_context: bool = True,
                 context_positions: int = 4) -> None:
        if not prior_weight > 0 or not context_weight > 0 or max_first_tokens < 0 or context_positions < 1:
            raise ValueError("need prior_weight > 0, context_weight > 0, max_first_tokens >= 0 and "
                             "context_positions >= 1")
        self.prior_weight, self.context_weight = float(prior_weight), float(context_weight)
        self.token_context = token_context
        self.context_positions = context_positions
        self.max_first_tokens = max_first_tokens
        self.cells = np.zeros((NUM_CELLS, 2), np.float64)
        self.keys = np.zeros(1 << 12, np.int64)
        self.stats = np.zeros((1 << 12, 2), np.float64)
        self.sizes = np.zeros(4, np.int64)  # keys per level (FIRST, PAIR, CONTEXT) and in all

    @staticmethod
    def cell(source: int, match_len: int, n: int, total: int) -> int:
        return int(cell_index(source, match_len, n, total))

    def reserve(self, draft_len: int, candidates: int = NUM_SOURCES) -> None:
        """Keeps the table at most half full with room for one scoring call of `candidates` drafts
        of up to `draft_len` tokens (3 levels per token), on the caller's thread."""
        if 2 * (self.sizes[3] + 3 * candidates * (draft_len + 1)) > len(self.keys):
            self.keys, self.stats = _rehash(self.keys, self.stats, 2 * len(self.keys))

    def prob(self, cell: int, n: int, total: int) -> float:
        return float(cell_prob(self.cells, cell, n, total, self.prior_weight))

    def token_prob(self, source: int, position: int, prev2: int, prev: int, token: int,
                   cell_prob_: float) -> float:
        """The full hierarchy for a drafted token at `position` (0 = first) after prev2, prev."""
        w, wc = self.prior_weight, self.context_weight
        if position == 0:
            q = lookup(self.keys, self.stats, token_key(FIRST, source, -1, prev, token), cell_prob_, w)
        elif self.token_context and position < self.context_positions:
            q = lookup(self.keys, self.stats, token_key(PAIR, source, -1, prev, token), cell_prob_, w)
        else:
            return cell_prob_
        if not self.token_context or position >= self.context_positions:
            return float(q)
        return float(lookup(self.keys, self.stats, token_key(CONTEXT, source, prev2, prev, token), q, wc))

    def update(self, level: int, source: int, prev2: int, prev: int, token: int, accepted: bool) -> None:
        """Counts one trial of a token-level entry (FIRST ignores prev2), through the kernel the
        drafter's scoring uses (for tests and offline fitting)."""
        self.reserve(1)
        record(self.keys, self.stats, self.sizes, level,
               token_key(level, source, -1 if level == FIRST else prev2, prev, token),
               1.0 if accepted else 0.0, self.max_first_tokens)

    def level_sizes(self) -> dict[str, int]:
        return {"first": int(self.sizes[FIRST]), "pair": int(self.sizes[PAIR]), "context": int(self.sizes[CONTEXT])}

    @property
    def nbytes(self) -> int:
        return self.cells.nbytes + self.keys.nbytes + self.stats.nbytes

    def table(self) -> dict[str, dict[str, float]]:
        """Observed cells by readable name (for logs and the experiment's JSON)."""
        out = {}
        for c in np.flatnonzero(self.cells[:, 1]):
            acc, n = self.cells[c]
            rest, share = divmod(int(c), 5)
            rest, occ = divmod(rest, 8)
            src, length = divmod(rest, 8)
            name = SOURCE_NAMES[src % AGREED] + ("+agree2" if src >= BOTH else "+agree" if src % BOTH >= AGREED else "")
            out[f"{name}/len<2^{length}/occ<2^{occ}/share{share}"] = {
                "accepted": float(acc), "trials": float(n), "rate": round(float(acc / n), 4)}
        return out
