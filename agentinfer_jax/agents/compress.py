"""AgentCompress: drop irrelevant search results early, distil long histories off the critical path.

- `SearchResultFilter` ranks a search's results by title + snippet only (BM25 against the
  question, or the small model's choice) and keeps the top n / those above a threshold, before
  the agent reads any page.
- `MemoryDistiller` watches the prompt length; past `threshold_tokens` (after a closed round) it
  starts an asyncio task that keeps thoughts and actions verbatim and compresses the tool
  observations (small model, or an extractive fallback). The loop never waits for it: `poll`
  applies the result when the task is done and at least `min_delay_rounds` rounds have passed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from agentinfer_jax.agents.clients import LLMClient, TokenCounter, builtin_token_counter
from agentinfer_jax.agents.react import StepRecord
from agentinfer_jax.agents.tools import Bm25Index, SearchResult

_WORD = re.compile(r"\w\w+")
_INDEX_LIST = re.compile(r"\d+")


class SearchResultFilter:
    """Keeps the results most relevant to the question, by BM25 or by asking the small model.

    BM25 mode: results scored over "title snippet" against the question; kept are those with
    score >= `min_score` (when set), at most `top_n`, best first. LLM mode: the small model lists
    the numbers of relevant results; an unreadable answer falls back to BM25 (counted).
    """

    def __init__(
        self,
        *,
        top_n: int = 3,
        min_score: float | None = None,
        use_llm: bool = False,
        client: LLMClient | None = None,
        role: str = "small",
    ) -> None:
        if top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {top_n}")
        if use_llm and client is None:
            raise ValueError("use_llm=True needs a client")
        self.top_n, self.min_score, self.use_llm = top_n, min_score, use_llm
        self._client, self._role = client, role
        self.llm_fallbacks = 0
        self.results_seen = 0
        self.results_dropped = 0

    def rank_bm25(self, question: str, results: Sequence[SearchResult]) -> list[tuple[SearchResult, float]]:
        """(result, score) best first; ties keep the search's order."""
        try:
            with np.errstate(invalid="ignore", divide="ignore"):  # bm25s divides by a zero mean length first
                scores = Bm25Index([f"{r.title} {r.snippet}" for r in results]).scores(question)
        except ValueError:  # bm25s cannot index results with no word at all (empty or stop words only)
            scores = [0.0] * len(results)
        order = sorted(range(len(results)), key=lambda i: (-scores[i], i))
        return [(results[i], float(scores[i])) for i in order]

    def _keep_bm25(self, question: str, results: Sequence[SearchResult]) -> list[SearchResult]:
        ranked = self.rank_bm25(question, results)
        if self.min_score is not None:
            ranked = [(r, s) for r, s in ranked if s >= self.min_score]
        return [r for r, _ in ranked[: self.top_n]]

    async def _keep_llm(self, question: str, results: Sequence[SearchResult], session_id: str | None) -> list[SearchResult]:
        listing = "\n".join(f"[{i}] {r.title}: {r.snippet}" for i, r in enumerate(results, start=1))
        prompt = (
            f"Question: {question}\nSearch results:\n{listing}\n"
            f"List the numbers of at most {self.top_n} results worth reading for this question, "
            "most relevant first, comma-separated (e.g. 2, 1). Write only the numbers."
        )
        assert self._client is not None
        completion = await self._client.complete(
            [{"role": "user", "content": prompt}], role=self._role, max_tokens=16, temperature=0.0, session_id=session_id
        )
        picked: list[int] = []
        for token in _INDEX_LIST.findall(completion.text):
            i = int(token) - 1
            if 0 <= i < len(results) and i not in picked:
                picked.append(i)
        if not picked:
            self.llm_fallbacks += 1
            return self._keep_bm25(question, results)
        return [results[i] for i in picked[: self.top_n]]

    async def filter(
        self, question: str, results: Sequence[SearchResult], *, session_id: str | None = None
    ) -> list[SearchResult]:
        if not results:
            return []
        self.results_seen += len(results)
        if self.use_llm:
            try:
                kept = await self._keep_llm(question, results, session_id)
            except Exception:  # the filter is an optimisation: a failing small model must not fail the step
                self.llm_fallbacks += 1
                kept = self._keep_bm25(question, results)
        else:
            kept = self._keep_bm25(question, results)
        self.results_dropped += len(results) - len(kept)
        return kept


def extractive_compress(observation: str, query_words: set[str], max_sentences: int = 2) -> str:
    """Keeps the first sentence and the sentences sharing most words with the query, in text order."""
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", observation.strip()) if s.strip()]
    if len(sentences) <= max_sentences:
        return observation.strip()
    overlap = [len(query_words & set(_WORD.findall(s.lower()))) for s in sentences]
    ranked = sorted(range(1, len(sentences)), key=lambda i: (-overlap[i], i))
    keep = sorted([0, *ranked[: max_sentences - 1]])
    return " ".join(sentences[i] for i in keep)


@dataclasses.dataclass
class CompressMetrics:
    distillations_started: int = 0
    distillations_applied: int = 0
    distillations_failed: int = 0
    llm_fallbacks: int = 0
    tokens_saved: int = 0
    first_applied_at_round: int | None = None
    rounds_after_first_distillation: int = 0


@dataclasses.dataclass(frozen=True)
class _Distillation:
    started_round: int
    compressed: tuple[str, ...]  # one per step 0..len-1 of the snapshot


class MemoryDistiller:
    """Asynchronous memory distillation for one session (Alg. 2 of AgentInfer, observation part).

    Invariant: only observations of steps that existed when the task started are replaced, each
    by its own compressed text; thoughts and actions are never changed, steps added meanwhile
    are kept as they are.
    """

    _ITEM = re.compile(r"^\s*\[(\d+)\]\s*(.+?)\s*$", re.MULTILINE)

    def __init__(
        self,
        client: LLMClient | None = None,
        *,
        threshold_tokens: int = 5000,
        min_delay_rounds: int = 1,
        role: str = "small",
        max_tokens: int = 512,
        token_counter: TokenCounter | None = None,
        session_id: str | None = None,
    ) -> None:
        if threshold_tokens < 1 or min_delay_rounds < 0:
            raise ValueError("threshold_tokens must be >= 1 and min_delay_rounds >= 0")
        self._client, self._role, self._max_tokens = client, role, max_tokens
        self.threshold_tokens, self.min_delay_rounds = threshold_tokens, min_delay_rounds
        self._count = token_counter or builtin_token_counter()
        self._session_id = session_id
        self._task: asyncio.Task[_Distillation] | None = None
        self._round = 0
        self.metrics = CompressMetrics()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def maybe_start(self, question: str, steps: Sequence[StepRecord], prompt_tokens: int) -> bool:
        """Called after each closed round; starts a distillation task when the prompt is too long."""
        self._round += 1
        if self.metrics.first_applied_at_round is not None:
            self.metrics.rounds_after_first_distillation += 1
        if self._task is not None or prompt_tokens < self.threshold_tokens:
            return False
        todo = [s.observation for s in steps if not s.compressed]
        if not todo:
            return False
        snapshot = tuple(dataclasses.replace(s) for s in steps)
        self._task = asyncio.create_task(self._distill(question, snapshot, self._round))
        self.metrics.distillations_started += 1
        return True

    def poll(self, steps: list[StepRecord]) -> bool:
        """Applies a finished distillation in place (if old enough); never waits. Returns True if applied."""
        task = self._task
        if task is None or not task.done():
            return False
        if task.cancelled() or task.exception() is not None:
            self.metrics.distillations_failed += 1
            self._task = None
            return False
        result = task.result()
        if self._round - result.started_round < self.min_delay_rounds:
            return False
        self._task = None
        for step, text in zip(steps, result.compressed):
            if step.compressed:
                continue
            saved = self._count(step.observation) - self._count(text)
            if saved > 0:
                self.metrics.tokens_saved += saved
                step.observation = text
            step.compressed = True
        self.metrics.distillations_applied += 1
        if self.metrics.first_applied_at_round is None:
            self.metrics.first_applied_at_round = self._round
        return True

    async def _distill(self, question: str, snapshot: tuple[StepRecord, ...], started_round: int) -> _Distillation:
        words = set(_WORD.findall(question.lower()))
        for s in snapshot:
            words |= set(_WORD.findall(s.response.lower()))
        fallback = [s.observation if s.compressed else extractive_compress(s.observation, words) for s in snapshot]
        if self._client is None:
            return _Distillation(started_round, tuple(fallback))
        listing = "\n".join(
            f"[{i}] {s.response}\nObservation: {s.observation}" for i, s in enumerate(snapshot, start=1) if not s.compressed
        )
        prompt = (
            f"Question: {question}\nBelow are an agent's steps, each with its thought, action and observation.\n"
            f"{listing}\n\nRewrite each observation keeping only facts useful for the question, at most two "
            "sentences each, one line per step as: [step number] compressed observation"
        )
        try:
            completion = await self._client.complete(
                [{"role": "user", "content": prompt}],
                role=self._role,
                max_tokens=self._max_tokens,
                temperature=0.0,
                session_id=self._session_id,
            )
            reply = completion.text
            if not isinstance(reply, str):  # a broken reply falls back like a failed call, not a failed task
                raise TypeError(f"the small model's reply is {type(reply).__name__}, not text")
        except asyncio.CancelledError:
            raise
        except Exception:
            self.metrics.llm_fallbacks += 1
            return _Distillation(started_round, tuple(fallback))
        compressed = list(fallback)
        found = 0
        for m in self._ITEM.finditer(reply):
            i = int(m.group(1)) - 1
            if 0 <= i < len(snapshot) and not snapshot[i].compressed:
                compressed[i] = m.group(2)
                found += 1
        if found == 0:
            self.metrics.llm_fallbacks += 1
        return _Distillation(started_round, tuple(compressed))

    async def aclose(self) -> None:
        """Cancels a running distillation (no task outlives its session); one that failed after the
        last poll is counted in `distillations_failed` (and its exception retrieved, not logged at GC)."""
        task, self._task = self._task, None
        if task is None:
            return
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        elif not task.cancelled() and task.exception() is not None:
            self.metrics.distillations_failed += 1
