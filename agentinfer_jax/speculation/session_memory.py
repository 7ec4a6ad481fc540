"""Cross-session memory for AgentSAM: finished sessions, BM25 retrieval, automata off the hot path.

`SessionMemory` keeps the token contexts of finished sessions (bounded: at most `max_sessions`
sessions and `max_tokens` tokens; the least recently added go first) and answers retrievals: the
top-K sessions most similar to a query context by BM25 (`bm25s`), returned as ONE frozen suffix
automaton over their concatenation (separated by distinct negative sentinel tokens, so no match
spans two sessions). One merged automaton pools the continuation counts of all K sessions (a
continuation that K similar sessions agree on is confident) and costs one match walk per token
instead of K.

BM25 runs over token ids as words (each id's decimal string), not decoded text: no detokenisation
on the request path, the same units the drafter matches on, any tokenizer works, and byte-level BPE
ids of a 4k-vocabulary are word pieces that BM25's IDF weights sensibly.

Global memory: the generated tokens of finished requests (responses only: agents repeat their own
formats and phrasings across tasks, while prompts carry task-specific observations) also feed one
frozen automaton over all recent responses, rebuilt on the worker as they accumulate, so a session
can draft a continuation that no retrieved session holds but many earlier responses share.

Threading: every mutation of the store and the BM25 index, and every automaton build, runs on one
worker thread (a single-thread executor), so they need no locks; callers get
`concurrent.futures.Future`s. The automata handed out are frozen (read-only) and shared safely.
A retrieval's future is "not ready yet" until the build finishes; the drafter meanwhile drafts from
the request's own automaton.
"""

from __future__ import annotations

import array
import collections
import concurrent.futures
import threading
from collections.abc import Sequence

from agentinfer_jax.speculation.suffix_automaton import SuffixAutomaton


class _Bm25Index:
    """A bm25s index over a fixed list of sessions (words = token id strings)."""

    def __init__(self, session_ids: list[str], docs: list[list[str]]) -> None:
        import bm25s  # slow to import (~3 s of CPU); only sessions with memory pay for it

        self.session_ids = session_ids
        self.index = bm25s.BM25()
        self.index.index(docs, show_progress=False)

    def search(self, query: list[str], k: int) -> list[tuple[str, float]]:
        n = min(len(self.session_ids), k)
        # numpy selection: bm25s would otherwise pick jax.lax.top_k and compile for every new
        # (documents, k) shape while the engine is serving.
        docs, scores = self.index.retrieve([query], k=n, show_progress=False, n_threads=1,
                                           backend_selection="numpy")
        return [(self.session_ids[int(d)], float(sc)) for d, sc in zip(docs[0], scores[0]) if sc > 0]


class SessionMemory:
    """Bounded store of finished sessions with asynchronous BM25 retrieval (see module doc).

    Indexing is log-structured so a retrieval never re-indexes the whole store: a main index is
    rebuilt only when the sessions added since its build exceed `rebuild_fraction` of it; newer
    sessions sit in a small delta index rebuilt when a retrieval finds it stale. Hits of both are
    merged by score; hits of evicted sessions or of superseded versions are dropped.

    Default caps: 4096 sessions and 8M tokens (~130 MB of token arrays and word lists when full).
    Agents meet the same task again long after: in FireAct's multitask file 160 of 292 repeated
    questions recur more than 512 sessions later, and raising the cap from 512 sessions lifted
    AgentSAM's tokens per step there from 2.393 to 2.401 (k = 8). A larger `top_k` is not worth its
    memory: 64 sessions gave 2.4193 against 2.4159 there (token-context calibrator), at about four
    times the retrieved automaton per active request (~840 B per retrieved token as Python objects).
    """

    def __init__(self, max_sessions: int = 4096, max_tokens: int = 1 << 23, top_k: int = 16,
                 query_tokens: int = 256, doc_tokens: int = 4096, rebuild_fraction: float = 0.1,
                 global_tokens: int = 1 << 19, global_min_rebuild: int = 512) -> None:
        if min(max_sessions, max_tokens, top_k, query_tokens, doc_tokens) < 1 or rebuild_fraction <= 0:
            raise ValueError("max_sessions, max_tokens, top_k, query_tokens, doc_tokens must be >= 1 "
                             "and rebuild_fraction > 0")
        if global_tokens < 0 or global_min_rebuild < 1:
            raise ValueError("global_tokens must be >= 0 (0 = off) and global_min_rebuild >= 1")
        self.max_sessions, self.max_tokens, self.top_k = max_sessions, max_tokens, top_k
        self.query_tokens, self.doc_tokens, self.rebuild_fraction = query_tokens, doc_tokens, rebuild_fraction
        self.global_tokens, self.global_min_rebuild = global_tokens, global_min_rebuild
        # Responses of finished requests, newest last (worker only), and the latest frozen automaton
        # over them: (version, automaton), replaced whole so any thread may read it without a lock.
        self._responses: collections.deque[list[int]] = collections.deque()
        self._response_tokens = 0
        self._unbuilt_tokens = 0
        self._global: tuple[int, SuffixAutomaton | None] = (0, None)
        # The version of _global, readable as a plain attribute (a cheap "anything new?" check).
        self.global_version = 0
        # Worker-thread-only state. _store: session -> (version, tokens, words), oldest first.
        self._store: collections.OrderedDict[str, tuple[int, array.array, list[str]]] = \
            collections.OrderedDict()
        self._version = 0
        self._total_tokens = 0
        self._main: _Bm25Index | None = None
        self._main_versions: dict[str, int] = {}
        self._delta: _Bm25Index | None = None
        self._delta_ids: list[str] = []  # sessions (re)added since the main index was built
        self._delta_stale = False
        self._word_cache: dict[int, str] = {}
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sam-memory")
        self._closed = False
        self._close_lock = threading.Lock()
        self.stats: collections.Counter[str] = collections.Counter()  # written on the worker only

    # ---- public API (any thread) -------------------------------------------------------------

    def add(self, session_id: str, tokens: Sequence[int]) -> concurrent.futures.Future:
        """Stores (or replaces) a session's context; evicts the oldest sessions beyond the caps."""
        if not isinstance(session_id, str):
            raise ValueError(f"session_id must be a str, got {type(session_id).__name__}")
        return self._submit(self._add, session_id, list(tokens))

    def retrieve(self, query: Sequence[int], exclude: str | None = None,
                 top_k: int | None = None) -> concurrent.futures.Future:
        """Future of (merged frozen SuffixAutomaton or None, [session ids]) for the top-K sessions
        most similar to the last `query_tokens` distinct tokens of `query` (BM25 query words are
        deduplicated: repeats add little and cost search time), never including `exclude`."""
        k = self.top_k if top_k is None else top_k
        if k < 1:
            raise ValueError(f"top_k must be >= 1, got {k}")
        distinct = list(dict.fromkeys(reversed(list(query))))[:self.query_tokens]
        return self._submit(self._retrieve, distinct, exclude, k)

    def add_response(self, tokens: Sequence[int]) -> concurrent.futures.Future:
        """Stores one finished request's generated tokens for the global automaton (bounded by
        `global_tokens`, oldest dropped first). The automaton is rebuilt on the worker once the
        tokens added since its build exceed max(global_min_rebuild, rebuild_fraction x its size)."""
        return self._submit(self._add_response, list(tokens))

    def global_automaton(self) -> tuple[int, SuffixAutomaton | None]:
        """(version, frozen automaton over the stored responses, or None); callable from any thread.
        The version changes with every rebuild, so a reader knows when to re-match."""
        return self._global

    def flush(self) -> None:
        """Blocks until every task submitted so far has run (tests and deterministic replays)."""
        self._submit(lambda: None).result()

    def session_ids(self) -> list[str]:
        """Stored session ids, oldest first (a consistent snapshot taken on the worker)."""
        return self._submit(lambda: list(self._store)).result()

    def total_tokens(self) -> int:
        """Stored tokens (a consistent snapshot taken on the worker)."""
        return self._submit(lambda: self._total_tokens).result()

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

    def _add(self, session_id: str, tokens: list[int]) -> None:
        tokens = tokens[-self.doc_tokens:]
        words = self._words(tokens)
        tokens = array.array("q", tokens)  # 8 bytes a token instead of a pointer to an int object
        old = self._store.pop(session_id, None)
        if old is not None:
            self._total_tokens -= len(old[1])
        self._version += 1
        self._store[session_id] = (self._version, tokens, words)
        self._total_tokens += len(tokens)
        while len(self._store) > self.max_sessions or self._total_tokens > self.max_tokens:
            _, (_, evicted, _) = self._store.popitem(last=False)
            self._total_tokens -= len(evicted)
            self.stats["evicted"] += 1
        self._delta_ids.append(session_id)
        self._delta_stale = True
        self.stats["added"] += 1

    def _words(self, tokens: list[int]) -> list[str]:
        # One shared string per token id (at most the vocabulary): a stored session costs a
        # pointer per token for its BM25 words, not a fresh string each.
        cache = self._word_cache
        return [cache[t] if t in cache else cache.setdefault(t, str(t)) for t in tokens]

    def _add_response(self, tokens: list[int]) -> None:
        if not self.global_tokens or not tokens:
            return
        tokens = tokens[-self.global_tokens:]
        self._responses.append(tokens)
        self._response_tokens += len(tokens)
        self._unbuilt_tokens += len(tokens)
        while self._response_tokens > self.global_tokens:
            self._response_tokens -= len(self._responses.popleft())
        built = self._global[1]
        size = len(built) if built is not None else 0
        if self._unbuilt_tokens >= max(self.global_min_rebuild, self.rebuild_fraction * size):
            text: list[int] = []
            for i, resp in enumerate(self._responses):
                text += resp
                text.append(-1 - i)  # sentinel: no match crosses two responses
            self._global = (self._global[0] + 1, SuffixAutomaton.frozen_of(text))
            self.global_version = self._global[0]  # after _global: a reader of it sees the new one
            self._unbuilt_tokens = 0
            self.stats["global_builds"] += 1

    def _refresh_indexes(self) -> None:
        if len(self._delta_ids) > self.rebuild_fraction * max(len(self._main_versions), 16):
            ids = list(self._store)
            self._main = _Bm25Index(ids, [self._store[s][2] for s in ids]) if ids else None
            self._main_versions = {s: self._store[s][0] for s in ids}
            self._delta, self._delta_ids, self._delta_stale = None, [], False
            self.stats["main_builds"] += 1
        elif self._delta_stale:
            ids = [s for s in dict.fromkeys(self._delta_ids) if s in self._store]
            self._delta = _Bm25Index(ids, [self._store[s][2] for s in ids]) if ids else None
            self._delta_stale = False
            self.stats["delta_builds"] += 1

    def _live(self, session_id: str, version: int | None) -> bool:
        entry = self._store.get(session_id)
        return entry is not None and (version is None or entry[0] == version)

    def _retrieve(self, query: list[int], exclude: str | None,
                  k: int) -> tuple[SuffixAutomaton | None, list[str]]:
        self._refresh_indexes()
        self.stats["retrievals"] += 1
        if not query:
            return None, []
        words = self._words(query)
        scores: dict[str, float] = {}
        if self._main is not None:
            for sid, sc in self._main.search(words, k + 1 + len(self._delta_ids)):
                if self._live(sid, self._main_versions[sid]):
                    scores[sid] = sc
        if self._delta is not None:
            for sid, sc in self._delta.search(words, k + 1):
                if self._live(sid, None):
                    scores[sid] = max(sc, scores.get(sid, 0.0))
        scores.pop(exclude, None)
        ids = sorted(scores, key=scores.__getitem__, reverse=True)[:k]
        if not ids:
            return None, []
        text: list[int] = []
        # Oldest retrieved session first, so later text is the most recent one.
        order = {s: i for i, s in enumerate(self._store)}
        for i, sid in enumerate(sorted(ids, key=order.__getitem__)):
            text += self._store[sid][1]
            text.append(-1 - i)  # a sentinel no query token equals: no match crosses sessions
        return SuffixAutomaton.frozen_of(text), ids
