"""The ReAct tools over a local Wikipedia-like corpus: Search, Lookup, Finish.

Tools are pure functions of (action, ToolState): the per-session page and lookup cursor travel
in `ToolState`, and every outcome carries the state it leads to. That is what lets SPAgent run a
speculative action early and apply its outcome later (or never) without touching the session.

Failures never escape: `SearchTool.run` turns injected failures into observations
"tool error: ...", and the ActionServer does the same for timeouts.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import pathlib
import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np

from agentinfer_jax.agents.react import Action, normalize_action_key, normalize_text

CORPUS_PATH = pathlib.Path(__file__).resolve().parent.parent / "assets" / "data" / "hotpotqa_corpus.json"
TOOL_ERROR_PREFIX = "tool error: "


class ToolError(RuntimeError):
    """A tool call that failed (injected failure, backend error); becomes an observation."""


@dataclasses.dataclass(frozen=True)
class ToolState:
    """A session's browsing state: the page of the last Search and where Lookup continues."""

    page: str | None = None
    keyword: str | None = None
    cursor: int = 0

    @property
    def key(self) -> str:
        return f"{self.page}|{self.keyword}|{self.cursor}"


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """One hit of a search: a title and a short snippet of its text."""

    title: str
    snippet: str


@dataclasses.dataclass(frozen=True)
class ToolOutcome:
    """What one action produced. `ok=False` outcomes carry the error text as their observation."""

    observation: str
    state: ToolState
    ok: bool = True
    latency_s: float = 0.0
    done: bool = False
    # perf_counter span of the execution that produced it (set by the ActionServer; 0 = unknown):
    # a speculative execution starts before the session waits for it.
    started_s: float = 0.0
    finished_s: float = 0.0
    answer: str | None = None
    results: tuple[SearchResult, ...] = ()
    query: str = ""
    # the state it was executed in (set by the ActionServer; None = unknown), see `reusable_in`
    from_state: ToolState | None = None


def tool_error(message: str, state: ToolState, latency_s: float = 0.0) -> ToolOutcome:
    return ToolOutcome(f"{TOOL_ERROR_PREFIX}{message}", state, ok=False, latency_s=latency_s)


def action_cache_key(action: Action, state: ToolState) -> str:
    """Equal keys give equal outcomes: Search and Finish ignore the state, Lookup depends on it."""
    key = normalize_action_key(action)
    return f"{key}@{state.key}" if action.kind == "lookup" else key


def reusable_in(outcome: ToolOutcome, state: ToolState) -> bool:
    """Whether an outcome shared under a state-free key (Search) may stand for the same action in `state`.

    A search that opened a page leads to that page wherever it ran; one that missed keeps the state
    it ran in, which would send a session in another state back there. So an outcome that left its
    state unchanged is reused only in that same state.
    """
    return outcome.from_state is None or outcome.from_state == state or outcome.state != outcome.from_state


class ToolEnvironment(Protocol):
    async def run(self, action: Action, state: ToolState) -> ToolOutcome: ...


class Bm25Index:
    """BM25 (bm25s, Lucene variant, English stop words) over a fixed list of texts."""

    def __init__(self, texts: Sequence[str]) -> None:
        import bm25s

        if not texts:
            raise ValueError("Bm25Index needs at least one text")
        self._bm25s = bm25s
        self._n = len(texts)
        self._retriever = bm25s.BM25()
        self._retriever.index(bm25s.tokenize(list(texts), stopwords="en", show_progress=False), show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """One score per text; all zeros when the query shares no indexed word."""
        tokens = self._bm25s.tokenize([query], stopwords="en", show_progress=False, return_ids=False)[0]
        tokens = [t for t in tokens if t in self._retriever.vocab_dict]
        if not tokens:
            return np.zeros(self._n, dtype=np.float64)
        return np.asarray(self._retriever.get_scores(tokens), dtype=np.float64)

    def top(self, query: str, k: int) -> list[int]:
        """Indices of the k best-scoring texts with a positive score, best first (ties by index)."""
        scores = self.scores(query)
        order = np.lexsort((np.arange(self._n), -scores))
        return [int(i) for i in order[:k] if scores[i] > 0]


def render_results(query: str, results: Sequence[SearchResult]) -> str:
    """The observation of a search miss, in the ReAct Wikipedia tool's words."""
    if not results:
        return f"Could not find {query}. No similar pages."
    return f"Could not find {query}. Similar: {[r.title for r in results]}."


class ToolLatency:
    """Seeded tool latency: lognormal around `mean_s` (sigma 0 gives a constant)."""

    def __init__(self, mean_s: float, sigma: float = 0.0, seed: int = 0) -> None:
        if mean_s < 0 or sigma < 0:
            raise ValueError("ToolLatency needs mean_s >= 0 and sigma >= 0")
        self.mean_s, self.sigma = mean_s, sigma
        self._rng = random.Random(seed)

    def __call__(self) -> float:
        if self.mean_s == 0 or self.sigma == 0:
            return self.mean_s
        # E[lognormal(mu, sigma)] = exp(mu + sigma^2/2) = mean_s
        return self._rng.lognormvariate(np.log(self.mean_s) - self.sigma**2 / 2, self.sigma)


class SearchTool:
    """Search/Lookup/Finish over a corpus `{title: [sentences]}` with injectable latency and failures.

    - Search[entity]: exact title (case, underscores and spacing normalised) -> the page's first
      paragraph; otherwise up to `num_similar` titles ranked by BM25 over title + text.
    - Lookup[keyword]: the next sentence of the current page containing keyword (case-insensitive),
      as "(Result i / n) sentence"; the cursor restarts when the keyword changes.
    - Finish[answer]: ends the episode.
    """

    def __init__(
        self,
        corpus: Mapping[str, Sequence[str]] | None = None,
        *,
        latency: Callable[[], float] | float = 0.0,
        failure_rate: float = 0.0,
        seed: int = 0,
        num_similar: int = 5,
        snippet_chars: int = 200,
    ) -> None:
        if corpus is None:
            corpus = json.loads(CORPUS_PATH.read_text(encoding="utf-8"))
        if not corpus:
            raise ValueError("SearchTool needs a non-empty corpus")
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError(f"failure_rate must be in [0, 1], got {failure_rate}")
        self._pages = {t: [s.strip() for s in sents] for t, sents in corpus.items()}
        self._titles = list(self._pages)
        self._by_key = {normalize_text(t): t for t in self._titles}
        self._index = Bm25Index([f"{t} {' '.join(s)}" for t, s in self._pages.items()])
        self._latency = latency if callable(latency) else (lambda: float(latency))
        self._failure_rate = failure_rate
        self._rng = random.Random(seed)
        self._num_similar = num_similar
        self._snippet_chars = snippet_chars
        self.invocations = 0

    def page(self, title: str) -> list[str] | None:
        return self._pages.get(title)

    def similar(self, query: str, k: int | None = None) -> list[SearchResult]:
        """BM25-ranked titles for a query, with a snippet of each page."""
        hits = self._index.top(query, self._num_similar if k is None else k)
        return [SearchResult(self._titles[i], self.snippet(self._titles[i])) for i in hits]

    def snippet(self, title: str) -> str:
        return " ".join(self._pages[title])[: self._snippet_chars]

    def execute(self, action: Action, state: ToolState) -> ToolOutcome:
        """The tool's answer without latency or failures (deterministic)."""
        if action.kind == "finish":
            return ToolOutcome("Episode finished.", state, done=True, answer=action.arg)
        if action.kind == "search":
            title = self._by_key.get(normalize_text(action.arg))
            if title is not None:
                return ToolOutcome(" ".join(self._pages[title]), ToolState(page=title))
            results = tuple(self.similar(action.arg))
            return ToolOutcome(render_results(action.arg, results), state, results=results, query=action.arg)
        return self._lookup(action.arg, state)

    def _lookup(self, keyword: str, state: ToolState) -> ToolOutcome:
        if state.page is None:
            return ToolOutcome("No page is open; Search for a page before Lookup.", state)
        needle = normalize_text(keyword)
        matches = [s for s in self._pages[state.page] if needle and needle in normalize_text(s)]
        cursor = state.cursor if normalize_text(state.keyword or "") == needle else 0
        after = dataclasses.replace(state, keyword=keyword, cursor=cursor + 1)
        if cursor >= len(matches):
            return ToolOutcome("No more results.", after)
        return ToolOutcome(f"(Result {cursor + 1} / {len(matches)}) {matches[cursor]}", after)

    async def run(self, action: Action, state: ToolState) -> ToolOutcome:
        """Executes with the injected latency (slept) and failure rate; never raises ToolError."""
        self.invocations += 1
        delay = max(0.0, float(self._latency()))
        failed = self._rng.random() < self._failure_rate
        if delay > 0:
            await asyncio.sleep(delay)
        if failed:
            return tool_error(f"{action.kind} failed (injected failure)", state, delay)
        return dataclasses.replace(self.execute(action, state), latency_s=delay)


class ReplayTool:
    """Returns the recorded observations of one session in order (for lossless trace replay)."""

    _LABEL = re.compile(r"^\s*observation\s*\d*\s*:\s*", re.IGNORECASE)

    def __init__(self, observations: Sequence[str], latencies_s: Sequence[float] | None = None) -> None:
        self._observations = collections.deque(self._LABEL.sub("", o, count=1) for o in observations)
        self._latencies = collections.deque(latencies_s or ())
        self.invocations = 0

    async def run(self, action: Action, state: ToolState) -> ToolOutcome:
        self.invocations += 1
        delay = self._latencies.popleft() if self._latencies else 0.0
        if delay > 0:
            await asyncio.sleep(delay)
        if action.kind == "finish":
            return ToolOutcome("Episode finished.", state, done=True, answer=action.arg)
        if not self._observations:
            return tool_error("replay has no recorded observation left", state)
        return ToolOutcome(self._observations.popleft(), state, latency_s=delay)
