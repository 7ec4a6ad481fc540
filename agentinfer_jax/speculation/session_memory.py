"""Cross-session memory for AgentSAM: finished sessions in one bounded arena, BM25 retrieval and
automaton builds in numba kernels on a worker thread.

Store: every finished session's last `doc_tokens` context tokens, with its BM25 postings (distinct
tokens and their term frequencies), in one int32 arena of at most `cap_mb` megabytes (default 64):
per stored token 4 bytes plus 8 per distinct token of its session, so at most 12 bytes plus a
40-byte record per session (`bytes_per_token()` reports it). When the arena is full the oldest
sessions go first and the live ones are compacted to its front, so memory stays flat however long
the replay. `max_sessions` caps the count as well.

Retrieval: the top-K sessions (at most `retrieved_tokens` tokens of them, default 16K: the build
is linear in them) most similar to the query by BM25 (Lucene's idf, k1 = 1.5, b = 0.75,
over token ids as words, exact document frequencies of the live sessions) for the last
`query_tokens` distinct context tokens, returned as ONE frozen suffix automaton over their
concatenation (most similar last, so equally frequent continuations go to it (see
suffix_automaton's ties); separated by distinct negative sentinels so no match spans two
sessions). One merged automaton pools the continuation counts of all K sessions and costs one
match walk per token instead of K. Scoring is one pass over the stored postings; the build is
linear in the retrieved tokens. Both run in numba kernels that release the GIL, so the serving
loop keeps stepping while they run; `timings_ms()` reports their cost per retrieval.

Global memory: the generated tokens of finished requests (responses only) feed one frozen automaton
over the last `global_tokens` response tokens, rebuilt on the worker once the tokens added since
the last build exceed max(global_min_rebuild, rebuild_fraction x its size).

Threading: every mutation of the store and every build runs on one worker thread (a
single-thread executor), so they need no locks; callers get `concurrent.futures.Future`s. The
automata handed out are frozen (read-only) and shared safely.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import threading
import time
from collections.abc import Sequence

import numba
import numpy as np

from agentinfer_jax.speculation.suffix_automaton import SuffixAutomaton, as_token_array

_njit = numba.njit(cache=True, nogil=True)
_K1, _B = 1.5, 0.75
_RECORD_BYTES = 5 * 8  # start, tokens, postings, live, version per session


@_njit
def _postings(tokens):
    """Distinct tokens (ascending) and their counts."""
    srt = np.sort(tokens)
    n_distinct = 0
    for i in range(len(srt)):
        if i == 0 or srt[i] != srt[i - 1]:
            n_distinct += 1
    toks = np.empty(n_distinct, np.int32)
    tfs = np.empty(n_distinct, np.int32)
    j = -1
    for i in range(len(srt)):
        if i == 0 or srt[i] != srt[i - 1]:
            j += 1
            toks[j] = srt[i]
            tfs[j] = 0
        tfs[j] += 1
    return toks, tfs


@_njit
def _apply_df(df, arena, start, n_tok, n_post, delta):
    for i in range(n_post):
        df[arena[start + n_tok + i]] += delta


@_njit
def _query_terms(context, max_terms, mark):
    """The last `max_terms` distinct tokens of `context` (most recent first); `mark` is scratch
    (all zero on entry and exit) at least as long as the largest token + 1."""
    out = np.empty(min(max_terms, len(context)), np.int32)
    n = 0
    for i in range(len(context) - 1, -1, -1):
        t = context[i]
        if t < 0 or t >= len(mark) or mark[t]:
            continue
        mark[t] = 1
        out[n] = t
        n += 1
        if n == max_terms:
            break
    for i in range(n):
        mark[out[i]] = 0
    return out[:n]


@_njit
def _bm25_top(arena, rec_start, rec_ntok, rec_npost, rec_live, n_rec, df, n_docs, avgdl, terms,
              exclude, k, weight):
    """Records of the k best BM25 scores (> 0), best first. `weight` is zeroed scratch like df."""
    for t in terms:
        d = df[t]
        if d > 0:
            weight[t] = math.log(1.0 + (n_docs - d + 0.5) / (d + 0.5))
    scores = np.zeros(n_rec, np.float64)
    for r in range(n_rec):
        if not rec_live[r] or r == exclude:
            continue
        norm = _K1 * (1.0 - _B + _B * rec_ntok[r] / avgdl)
        base = rec_start[r] + rec_ntok[r]
        npost = rec_npost[r]
        s = 0.0
        for i in range(npost):
            w = weight[arena[base + i]]
            if w > 0.0:
                tf = arena[base + npost + i]
                s += w * tf * (_K1 + 1.0) / (tf + norm)
        scores[r] = s
    for t in terms:
        if t < len(weight):
            weight[t] = 0.0
    order = np.argsort(-scores, kind="mergesort")
    n = 0
    while n < min(k, n_rec) and scores[order[n]] > 0.0:
        n += 1
    return order[:n]


@_njit
def _take_within(rec_ntok, recs, budget):
    """Tokens to take from each record (in order of preference) within `budget`: whole records
    while they fit, the most recent tokens of the first one that does not, none after."""
    take = np.zeros(len(recs), np.int64)
    left = budget
    for i in range(len(recs)):
        if left <= 0:
            break
        take[i] = min(rec_ntok[recs[i]], left)
        left -= take[i]
    return take


@_njit
def _concat(arena, rec_start, rec_ntok, recs, take):
    """The last take[i] tokens of each record, one after another, each followed by its own
    negative sentinel (no match spans two sessions)."""
    total = 0
    for i in range(len(recs)):
        total += take[i] + 1
    out = np.empty(total, np.int32)
    pos = 0
    for i in range(len(recs)):
        r = recs[i]
        n = take[i]
        end = rec_start[r] + rec_ntok[r]
        out[pos:pos + n] = arena[end - n:end]
        out[pos + n] = -1 - i
        pos += n + 1
    return out


@_njit
def _select(arena, rec_start, rec_ntok, rec_npost, rec_live, n_rec, df, n_docs, avgdl, query, max_terms,
            mark, weight, exclude, k, budget):
    """One retrieval in one call (the worker takes the GIL back once): the query's terms, the top-k
    records by BM25 within the token budget, most similar last, and their text with sentinels."""
    terms = _query_terms(query, max_terms, mark)
    top = _bm25_top(arena, rec_start, rec_ntok, rec_npost, rec_live, n_rec, df, n_docs, avgdl, terms,
                    exclude, k, weight)
    take = _take_within(rec_ntok, top, budget)
    n = 0
    while n < len(top) and take[n] > 0:
        n += 1
    order = np.arange(n - 1, -1, -1)  # most similar last: ties between continuations go to it
    recs = top[:n][order]
    return recs, _concat(arena, rec_start, rec_ntok, recs, take[:n][order])


@_njit
def _compact(arena, rec_start, rec_words, rec_live, n_rec):
    """Moves live records to the arena's front in order; returns the new end."""
    end = 0
    for r in range(n_rec):
        if not rec_live[r]:
            continue
        start, n = rec_start[r], rec_words[r]
        if start != end:
            arena[end:end + n] = arena[start:start + n]
            rec_start[r] = end
        end += n
    return end


class SessionMemory:
    """Bounded store of finished sessions with asynchronous BM25 retrieval (see module doc)."""

    def __init__(self, cap_mb: float = 64.0, top_k: int = 16, query_tokens: int = 256,
                 doc_tokens: int = 4096, retrieved_tokens: int = 1 << 14, max_sessions: int = 1 << 16,
                 global_tokens: int = 1 << 18,
                 global_min_rebuild: int = 512, rebuild_fraction: float = 0.1) -> None:
        if not cap_mb > 0 or min(top_k, query_tokens, doc_tokens, retrieved_tokens, max_sessions) < 1 \
                or rebuild_fraction <= 0:
            raise ValueError("cap_mb must be > 0, top_k, query_tokens, doc_tokens, retrieved_tokens, "
                             "max_sessions >= 1 and rebuild_fraction > 0")
        if global_tokens < 0 or global_min_rebuild < 1:
            raise ValueError("global_tokens must be >= 0 (0 = off) and global_min_rebuild >= 1")
        self.cap_mb, self.top_k, self.query_tokens = cap_mb, top_k, query_tokens
        self.doc_tokens, self.max_sessions, self.rebuild_fraction = doc_tokens, max_sessions, rebuild_fraction
        self.retrieved_tokens = retrieved_tokens
        self.global_tokens, self.global_min_rebuild = global_tokens, global_min_rebuild
        self._arena_words = max(int(cap_mb * (1 << 20)) // 4, 16)
        self._arena = np.zeros(0, np.int32)  # grows (doubling) up to _arena_words
        self._end = 0
        self._recs = np.zeros((5, 64), np.int64)  # start, tokens, postings, live, words per record
        self._n_rec = 0
        self._ids: collections.OrderedDict[str, int] = collections.OrderedDict()  # oldest first
        self._rec_ids: list[str] = []  # session id of every record
        self._live_tokens = 0
        self._live_words = 0
        self._df = np.zeros(1 << 12, np.int32)
        self._scratch = np.zeros(1 << 12, np.float64)
        self._mark = np.zeros(1 << 12, np.int8)
        # Responses of finished requests, newest last (worker only), and the latest frozen automaton
        # over them: (version, automaton), replaced whole so any thread may read it without a lock.
        self._text = np.zeros(1024, np.int32)
        self._text_start = self._text_end = 0
        self._response_lens: collections.deque[int] = collections.deque()
        self._sentinels = 0
        self._response_tokens = 0
        self._unbuilt_tokens = 0
        self._global: tuple[int, SuffixAutomaton | None] = (0, None)
        self.global_version = 0
        self._timings_ns: collections.deque[int] = collections.deque(maxlen=1 << 16)
        self._global_ns: collections.deque[int] = collections.deque(maxlen=1 << 16)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sam-memory")
        self._closed = False
        self._close_lock = threading.Lock()
        self.stats: collections.Counter[str] = collections.Counter()  # written on the worker only

    # ---- public API (any thread) -------------------------------------------------------------

    def add(self, session_id: str, tokens: Sequence[int] | np.ndarray) -> concurrent.futures.Future:
        """Stores (or replaces) a session's context; evicts the oldest sessions beyond the caps."""
        if not isinstance(session_id, str):
            raise ValueError(f"session_id must be a str, got {type(session_id).__name__}")
        return self._submit(self._add, session_id, as_token_array(tokens))

    def retrieve(self, query: Sequence[int] | np.ndarray, exclude: str | None = None,
                 top_k: int | None = None) -> concurrent.futures.Future:
        """Future of (merged frozen SuffixAutomaton or None, [session ids]) for the top-K sessions
        most similar to the last `query_tokens` distinct tokens of `query`, never `exclude`.
        `query` may be a view of a growing context: only its current tokens are read."""
        k = self.top_k if top_k is None else top_k
        if k < 1:
            raise ValueError(f"top_k must be >= 1, got {k}")
        return self._submit(self._retrieve, as_token_array(query), exclude, k)

    def add_response(self, tokens: Sequence[int] | np.ndarray) -> concurrent.futures.Future:
        """Stores one finished request's generated tokens for the global automaton."""
        return self._submit(self._add_response, as_token_array(tokens))

    def global_automaton(self) -> tuple[int, SuffixAutomaton | None]:
        """(version, frozen automaton over the stored responses, or None); any thread."""
        return self._global

    def flush(self) -> None:
        """Blocks until every task submitted so far has run (tests and deterministic replays)."""
        self._submit(lambda: None).result()

    def session_ids(self) -> list[str]:
        """Stored session ids, oldest first (a consistent snapshot taken on the worker)."""
        return self._submit(lambda: list(self._ids)).result()

    def total_tokens(self) -> int:
        """Stored tokens (a consistent snapshot taken on the worker)."""
        return self._submit(lambda: self._live_tokens).result()

    def store_bytes(self) -> int:
        """Bytes the stored sessions take: tokens, postings and records."""
        return self._submit(lambda: 4 * self._live_words + _RECORD_BYTES * len(self._ids)).result()

    def bytes_per_token(self) -> float:
        """Stored bytes per stored token (tokens, postings and records)."""
        n = self.total_tokens()
        return self.store_bytes() / n if n else 0.0

    def nbytes(self) -> int:
        """Bytes of every array the memory holds: arena (its allocated part), records, document
        frequencies, scratch, the global automaton and its response tokens."""
        def count() -> int:
            g = self._global[1]
            return (self._arena.nbytes + self._recs.nbytes + self._df.nbytes + self._scratch.nbytes
                    + self._mark.nbytes + (g.nbytes if g is not None else 0)
                    + self._text.nbytes)
        return self._submit(count).result()

    def timings_ms(self) -> dict[str, float]:
        """p50 / p99 / max milliseconds of retrieval + merged build per retrieval so far, and of the
        global automaton's rebuilds (`global_*`: each covers many turns)."""
        ns, gns = self._submit(lambda: (list(self._timings_ns), list(self._global_ns))).result()
        out: dict[str, float] = {}
        for prefix, values in (("", ns), ("global_", gns)):
            ms = np.asarray(values, np.float64) / 1e6
            out.update({f"{prefix}p50": float(np.percentile(ms, 50)) if len(ms) else 0.0,
                        f"{prefix}p99": float(np.percentile(ms, 99)) if len(ms) else 0.0,
                        f"{prefix}max": float(ms.max()) if len(ms) else 0.0, f"{prefix}n": len(ms)})
        return out

    def close(self) -> None:
        """Stops the worker; pending tasks are cancelled. Idempotent."""
        with self._close_lock:
            self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> SessionMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- worker side -------------------------------------------------------------------------

    def _submit(self, fn, *args) -> concurrent.futures.Future:
        with self._close_lock:
            if self._closed:
                raise RuntimeError("SessionMemory is closed")
            return self._executor.submit(fn, *args)

    def _vocab(self, top: int) -> None:
        """Grows the per-token arrays to cover token ids up to `top`."""
        if top < len(self._df):
            return
        size = 1 << int(top).bit_length()
        for name in ("_df", "_scratch", "_mark"):
            old = getattr(self, name)
            new = np.zeros(size, old.dtype)
            new[:len(old)] = old
            setattr(self, name, new)

    def _evict_oldest(self) -> None:
        _, r = self._ids.popitem(last=False)
        self._drop(r)
        self.stats["evicted"] += 1

    def _drop(self, r: int) -> None:
        start, n_tok, n_post, _, words = self._recs[:, r]
        _apply_df(self._df, self._arena, start, n_tok, n_post, -1)
        self._recs[3, r] = 0
        self._live_tokens -= int(n_tok)
        self._live_words -= int(words)

    def _add(self, session_id: str, tokens: np.ndarray) -> None:
        tokens = tokens[-self.doc_tokens:]
        tokens = tokens[tokens >= 0]
        old = self._ids.pop(session_id, None)
        if old is not None:
            self._drop(old)
        if not len(tokens):
            return
        self._vocab(int(tokens.max()))
        toks, tfs = _postings(tokens)
        words = len(tokens) + 2 * len(toks)
        if words > self._arena_words:
            return  # larger than the whole cap (a tiny cap): not stored
        while self._ids and (len(self._ids) >= self.max_sessions or self._live_words + words > self._arena_words):
            self._evict_oldest()
        if self._end + words > len(self._arena):
            self._make_room(words)
        start = self._end
        arena = self._arena
        arena[start:start + len(tokens)] = tokens
        arena[start + len(tokens):start + len(tokens) + len(toks)] = toks
        arena[start + len(tokens) + len(toks):start + words] = tfs
        self._end += words
        if self._n_rec == self._recs.shape[1]:
            self._compact_records()
            if self._n_rec == self._recs.shape[1]:
                grown = np.zeros((5, 2 * self._n_rec), np.int64)
                grown[:, :self._n_rec] = self._recs[:, :self._n_rec]
                self._recs = grown
        r = self._n_rec
        self._recs[:, r] = (start, len(tokens), len(toks), 1, words)
        self._n_rec += 1
        self._ids[session_id] = r
        self._rec_ids.append(session_id)
        _apply_df(self._df, arena, start, len(tokens), len(toks), 1)
        self._live_tokens += len(tokens)
        self._live_words += words
        self.stats["added"] += 1

    def _make_room(self, words: int) -> None:
        """Compacts the live records to the front, growing the arena (up to the cap) if needed."""
        need = self._live_words + words
        if need > len(self._arena) and len(self._arena) < self._arena_words:
            size = min(self._arena_words, max(need, 2 * len(self._arena), 1 << 16))
            grown = np.zeros(size, np.int32)
            self._end = _compact(self._arena, self._recs[0], self._recs[4], self._recs[3], self._n_rec)
            grown[:self._end] = self._arena[:self._end]
            self._arena = grown
        else:
            self._end = _compact(self._arena, self._recs[0], self._recs[4], self._recs[3], self._n_rec)
        self.stats["compactions"] += 1

    def _compact_records(self) -> None:
        live = np.flatnonzero(self._recs[3, :self._n_rec])
        remap = {int(old): new for new, old in enumerate(live)}
        self._recs[:, :len(live)] = self._recs[:, live]
        self._n_rec = len(live)
        self._rec_ids = [self._rec_ids[r] for r in live]
        for sid, r in self._ids.items():
            self._ids[sid] = remap[r]

    def _add_response(self, tokens: np.ndarray) -> None:
        if not self.global_tokens or not len(tokens):
            return
        tokens = tokens[-self.global_tokens:]
        m = len(tokens) + 1
        if self._text_end + m > len(self._text):  # move the live text to the front, grow if needed
            live = self._text[self._text_start:self._text_end]
            buf = self._text if len(live) + m <= len(self._text) // 2 else np.empty(2 * (len(live) + m), np.int32)
            buf[:len(live)] = live
            self._text, self._text_start, self._text_end = buf, 0, len(live)
        # Each response is followed by its own sentinel: no match crosses two responses.
        self._sentinels += 1
        self._text[self._text_end:self._text_end + len(tokens)] = tokens
        self._text[self._text_end + len(tokens)] = -1 - (self._sentinels % (1 << 30))
        self._text_end += m
        self._response_lens.append(len(tokens))
        self._response_tokens += len(tokens)
        self._unbuilt_tokens += len(tokens)
        while self._response_tokens > self.global_tokens:
            n = self._response_lens.popleft()
            self._response_tokens -= n
            self._text_start += n + 1
        built = self._global[1]
        size = len(built) if built is not None else 0
        if self._unbuilt_tokens >= max(self.global_min_rebuild, self.rebuild_fraction * size):
            text = self._text[self._text_start:self._text_end]
            t0 = time.perf_counter_ns()
            self._global = (self._global[0] + 1, SuffixAutomaton.frozen_of(text))
            self._global_ns.append(time.perf_counter_ns() - t0)
            self.global_version = self._global[0]  # after _global: a reader of it sees the new one
            self._unbuilt_tokens = 0
            self.stats["global_builds"] += 1

    def _retrieve(self, query: np.ndarray, exclude: str | None,
                  k: int) -> tuple[SuffixAutomaton | None, list[str]]:
        t0 = time.perf_counter_ns()
        self.stats["retrievals"] += 1
        if not self._ids or not len(query):
            return None, []
        ex = self._ids.get(exclude, -1) if exclude is not None else -1
        recs = self._recs
        n_docs = len(self._ids)
        # The best-scored sessions within the token budget, most similar last.
        chosen, text = _select(self._arena, recs[0], recs[1], recs[2], recs[3], self._n_rec, self._df, n_docs,
                               self._live_tokens / n_docs, query, self.query_tokens, self._mark,
                               self._scratch, ex, k, self.retrieved_tokens)
        if not len(chosen):
            self._timings_ns.append(time.perf_counter_ns() - t0)
            return None, []
        ids = [self._rec_ids[r] for r in chosen]
        sam = SuffixAutomaton.frozen_of(text, copy=False)
        self._timings_ns.append(time.perf_counter_ns() - t0)
        return sam, ids
