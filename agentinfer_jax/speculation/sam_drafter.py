"""AgentSAM drafter: suffix automata over the session, similar past sessions and past responses,
choosing between them with acceptance rates learned from verification.

Sources, each a suffix automaton with a cursor (the longest suffix of the context it contains):
- OWN: one online `SuffixAutomaton` per session over its context (prompt + generated tokens). A new
  request whose prompt extends the session's last context only extends it; otherwise it is
  rebuilt. Its cursor is the automaton's self-match (longest suffix that occurred earlier, O(1)).
- MEMORY: a frozen automaton over the top-K BM25-similar finished sessions (`SessionMemory`),
  retrieved on the memory's worker thread at the request's start and when the context has grown
  `refresh_growth` times; until it is ready the request drafts without it.
- GLOBAL: the memory's frozen automaton over recent responses of all finished requests (agents
  reuse their own formats and phrasings across tasks), picked up whenever the worker rebuilds it.

Drafting: from every cursor the drafter follows the most frequent continuation (occurrence counts;
exact in frozen automata, approximate online, see SuffixAutomaton). The `AcceptanceCalibrator`
(calibrator.py) gives each drafted token a probability of acceptance from its evidence, and a
candidate's value is its expected accepted tokens, sum_j prod_{i<=j} p_i. A drafted token's evidence
class is its source, or source + AGREED while another cursor's top path agrees with the candidate's
up to and including that token (where the paths part, the evidence of agreement ends), + BOTH on top
while both other cursors' paths agree. The candidate with the highest value is drafted, cut where
its path probability falls below `min_prob` and at min(k, ceil(factor * longest match)) tokens.
Candidates are evaluated best-first and abandoned as soon as they cannot beat the best so far
(their path probability only falls).

Learning: up to the first rejection the true next tokens are known, so when the verified tokens
arrive through `extend`, every candidate's tokens there (drafted or not) are scored, and the rates
are not biased by which candidate won.

Hot paths: `draft_from_cursors` (propose: the cursors, the draft's bound and `walk_candidates`)
and `score_candidates` (the calibrator's update) are numba kernels in calibrator.py over the
automata's and the calibrator's arrays, the only implementation; the automata's own kernels are in
suffix_automaton.py. Per step the Python side makes one call to each.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from agentinfer_jax.speculation.base import UnknownRequestError, check_k, check_tokens
from agentinfer_jax.speculation.calibrator import (AGREED, GLOBAL, MEMORY, NUM_CLASSES, NUM_SOURCES, OWN,
                                                   SOURCE_NAMES, AcceptanceCalibrator, draft_from_cursors,
                                                   score_candidates)
from agentinfer_jax.speculation.session_memory import SessionMemory
from agentinfer_jax.speculation.suffix_automaton import Matcher, SuffixAutomaton, as_token_array

__all__ = ["SAMDrafter", "compile_kernels", "AcceptanceCalibrator", "OWN", "MEMORY", "GLOBAL", "SOURCE_NAMES", "AGREED",
           "NUM_CLASSES"]

_NUM_SOURCES = NUM_SOURCES
_NO_AUTOMATON = np.zeros((1, 8), np.int32)  # stands in for an absent source's rows


class _SessionState:
    """One session's automaton, its memory retrieval, the matchers and last proposal of its request."""

    __slots__ = ("session_id", "sam", "pending", "retrieval_done", "memory_matcher", "retrieved_at",
                 "active_request", "global_matcher", "global_version", "response_start", "n_cand",
                 "cand_src", "cand_len", "cand_toks", "cand_cells", "last_token", "last_token2",
                 "last_expected", "idle_bytes")

    def __init__(self, session_id: str, prompt: np.ndarray, count_depth: int) -> None:
        self.session_id = session_id
        self.sam = SuffixAutomaton(prompt, count_depth=count_depth, capacity=2 * len(prompt))
        self.pending: concurrent.futures.Future | None = None
        # Set by the retrieval's done-callback (worker thread): propose polls a flag, not the future.
        self.retrieval_done = False
        self.memory_matcher: Matcher | None = None
        self.retrieved_at = 0
        self.active_request: str | None = None
        self.global_matcher: Matcher | None = None
        self.global_version = 0
        self.response_start = len(prompt)
        self.n_cand = 0
        self.cand_src = np.zeros(_NUM_SOURCES, np.int64)
        self.cand_len = np.zeros(_NUM_SOURCES, np.int64)
        self.cand_toks = np.zeros((_NUM_SOURCES, 8), np.int32)
        self.cand_cells = np.zeros((_NUM_SOURCES, 8), np.int64)
        self.last_token = self.last_token2 = -1
        self.last_expected = 0.0
        self.idle_bytes = 0  # automaton bytes counted while the session is idle

    def mark_retrieval_done(self, _future: concurrent.futures.Future) -> None:
        self.retrieval_done = True


class SAMDrafter:
    """Drafter over suffix automata with optional cross-session memory (see module docstring).

    `min_prob`: floor on a draft's calibrated path probability (0 drafts up to the length cap and
    leaves trimming to the adaptive switch); `factor`: drafts at most ceil(factor * longest match)
    tokens; `global_memory=False`: no GLOBAL source; `warmup_tokens`: context tokens matched when a
    memory automaton is installed.
    """

    def __init__(self, memory: SessionMemory | None = None, *, min_match: int = 1, factor: float = 8.0,
                 min_prob: float = 0.0, refresh_growth: float = 2.0, warmup_tokens: int = 64,
                 max_live_sessions: int = 256, live_cap_mb: float = 16.0, count_depth: int = 8,
                 global_memory: bool = True, calibrator: AcceptanceCalibrator | None = None) -> None:
        if min_match < 1 or factor <= 0 or not 0 <= min_prob <= 1 or refresh_growth <= 1:
            raise ValueError("need min_match >= 1, factor > 0, 0 <= min_prob <= 1, refresh_growth > 1")
        if warmup_tokens < 1 or max_live_sessions < 1 or not live_cap_mb > 0:
            raise ValueError("warmup_tokens and max_live_sessions must be >= 1 and live_cap_mb > 0")
        self.memory = memory
        self.min_match, self.factor, self.min_prob = min_match, factor, min_prob
        self.refresh_growth, self.warmup_tokens = refresh_growth, warmup_tokens
        self.max_live_sessions, self.count_depth = max_live_sessions, count_depth
        # Finished sessions keep their automaton for the session's next request (an agent's next
        # call extends it) until these caps: the least recently used go first. The memory already
        # holds finished sessions for retrieval, and a session's next call comes within a tool
        # call, so the caps only need to cover the sessions between calls; an evicted session
        # rebuilds its automaton from its prompt.
        self.live_cap_bytes = int(live_cap_mb * (1 << 20))
        self._idle_bytes = 0  # automaton bytes of finished (idle) sessions
        self.global_memory = global_memory
        self.calibrator = calibrator or AcceptanceCalibrator()
        # A session is busy (a request of it runs) or idle (kept for its next request); only idle
        # ones are evicted, least recently used first, so eviction is O(1) however many are busy.
        self._busy: dict[str, _SessionState] = {}
        self._idle: OrderedDict[str, _SessionState] = OrderedDict()
        self._requests: dict[str, _SessionState] = {}
        self._out = np.zeros(8, np.int32)

    # ---- Drafter API --------------------------------------------------------------------------

    def begin(self, request_id: str, prompt_tokens: Sequence[int], session_id: str | None = None) -> None:
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} already begun")
        prompt = as_token_array(check_tokens(prompt_tokens, "prompt_tokens"))
        key = session_id if session_id is not None else f"request:{request_id}"
        if key in self._busy:
            # A concurrent request of a busy session: a private, unshared state.
            state = _SessionState(key, prompt, self.count_depth)
        else:
            state = self._idle.pop(key, None)
            if state is not None:
                self._idle_bytes -= state.idle_bytes
                state.idle_bytes = 0
            if state is not None and _extends(prompt, state.sam.tokens):
                state.sam.extend_many(prompt[len(state.sam):])
            else:
                state = _SessionState(key, prompt, self.count_depth)
            self._busy[key] = state
            self._evict_idle()
        state.active_request = request_id
        state.response_start = len(state.sam)
        state.n_cand = 0
        self._requests[request_id] = state
        self._maybe_retrieve(state)

    def extend(self, request_id: str, tokens: Sequence[int]) -> None:
        state = self._get(request_id)
        toks = as_token_array(check_tokens(tokens))
        if state.n_cand and len(toks):
            cal = self.calibrator
            cal.reserve(state.cand_toks.shape[1], state.n_cand)
            score_candidates(toks, state.n_cand, state.cand_src, state.cand_len, state.cand_toks, state.cand_cells,
                   cal.cells, cal.keys, cal.stats, cal.sizes, state.last_token, state.last_token2,
                   cal.context_positions if cal.token_context else 0, cal.max_first_tokens)
        state.n_cand = 0
        state.sam.extend_many(toks)
        for matcher in (state.memory_matcher, state.global_matcher):
            if matcher is not None:
                matcher.feed_many(toks)
        self._maybe_retrieve(state)

    def propose(self, request_id: str, k: int) -> list[int]:
        if k.__class__ is not int or k < 0:
            check_k(k)
        state = self._requests.get(request_id)
        if state is None:
            state = self._get(request_id)
        memory = self.memory
        if memory is not None and (state.retrieval_done or (
                self.global_memory and memory.global_version != state.global_version)):
            self._poll_memory(state)
        if state.cand_toks.shape[1] < k:
            state.cand_toks = np.zeros((_NUM_SOURCES, k), np.int32)
            state.cand_cells = np.zeros((_NUM_SOURCES, k), np.int64)
        if len(self._out) < k:
            self._out = np.zeros(k, np.int32)
        sam, mem, glob, cal = state.sam, state.memory_matcher, state.global_matcher, self.calibrator
        n, state.n_cand, state.last_expected, state.last_token, state.last_token2 = draft_from_cursors(
            sam.st, sam.meta, sam._tokens,
            _NO_AUTOMATON if mem is None else mem.sam.st, 0 if mem is None else mem.state,
            0 if mem is None else mem.length,
            _NO_AUTOMATON if glob is None else glob.sam.st, 0 if glob is None else glob.state,
            0 if glob is None else glob.length,
            self.min_match, self.factor, k, cal.cells, cal.keys, cal.stats, cal.prior_weight, cal.context_weight,
            cal.context_positions if cal.token_context else 0, self.min_prob, self._out,
            state.cand_src, state.cand_len, state.cand_toks, state.cand_cells)
        return self._out[:n].tolist()

    def expected_accepted(self, request_id: str) -> float:
        """Calibrated expected accepted tokens of the request's latest proposal (sum of path
        probabilities); an adaptive switch can weigh it against the cost of verifying."""
        return self._get(request_id).last_expected

    def end(self, request_id: str) -> None:
        state = self._get(request_id)
        del self._requests[request_id]
        if state.active_request == request_id:
            state.active_request = None
            if self._busy.get(state.session_id) is state:
                del self._busy[state.session_id]
                self._idle[state.session_id] = state
                state.idle_bytes = state.sam.nbytes
                self._idle_bytes += state.idle_bytes
                self._evict_idle()
        state.n_cand = 0
        # Only active requests hold a retrieved automaton (bounded memory); the session's next
        # request retrieves afresh (memory will have grown by then anyway).
        if state.pending is not None:
            state.pending.cancel()
        state.pending, state.memory_matcher, state.retrieved_at = None, None, 0
        state.global_matcher, state.global_version = None, 0
        if self.memory is not None:
            tokens = state.sam.tokens  # a view: the worker copies it, the session only appends
            self.memory.add(state.session_id, tokens)
            if self.global_memory:
                self.memory.add_response(tokens[state.response_start:])

    @property
    def nbytes(self) -> int:
        """Bytes held by live session automata, retrieved automata and the calibrator."""
        total = self.calibrator.nbytes
        for st in {id(s): s for s in [*self._idle.values(), *self._requests.values()]}.values():
            total += st.sam.nbytes
            if st.memory_matcher is not None:
                total += st.memory_matcher.sam.nbytes
        return total

    # ---- internals ----------------------------------------------------------------------------

    def _evict_idle(self) -> None:
        """Drops the least recently used idle sessions while the sessions kept (busy and idle)
        exceed max_live_sessions or the idle ones live_cap_mb; busy sessions are never dropped."""
        idle = self._idle
        while idle and (len(self._busy) + len(idle) > self.max_live_sessions
                        or self._idle_bytes > self.live_cap_bytes):
            _, old = idle.popitem(last=False)
            self._idle_bytes -= old.idle_bytes

    def _get(self, request_id: str) -> _SessionState:
        try:
            return self._requests[request_id]
        except KeyError:
            raise UnknownRequestError(f"unknown request {request_id!r}") from None

    def _maybe_retrieve(self, state: _SessionState) -> None:
        if self.memory is None or state.pending is not None:
            return
        n = len(state.sam)
        if state.retrieved_at == 0 or n >= self.refresh_growth * state.retrieved_at:
            state.retrieved_at = max(n, 1)
            state.pending = self.memory.retrieve(state.sam.tokens, exclude=state.session_id)
            state.pending.add_done_callback(state.mark_retrieval_done)

    def _poll_memory(self, state: _SessionState) -> None:
        """Installs a finished retrieval and the newest global automaton, each as a matcher warmed
        up on the context's last tokens."""
        if self.memory is None:
            return
        if self.global_memory:
            version, gsam = self.memory.global_automaton()
            if gsam is not None and version != state.global_version:
                state.global_matcher = self._warm_matcher(gsam, state)
                state.global_version = version
        fut = state.pending
        state.retrieval_done = False  # before done(): a callback firing after it sets it again
        if fut is None or not fut.done():
            return
        state.pending = None
        if fut.cancelled() or fut.exception() is not None:
            return  # memory is best effort: keep drafting from the other sources
        sam, _ = fut.result()
        if sam is not None:
            state.memory_matcher = self._warm_matcher(sam, state)

    def _warm_matcher(self, sam: SuffixAutomaton, state: _SessionState) -> Matcher:
        matcher = Matcher(sam)
        matcher.feed_many(state.sam.tokens[-self.warmup_tokens:])
        return matcher

    def wait_for_memory(self, request_id: str) -> None:
        """Blocks until the request's pending retrieval is installed (deterministic replays; the
        worker runs tasks in order, so every earlier global rebuild is visible too)."""
        state = self._get(request_id)
        if state.pending is not None:
            concurrent.futures.wait([state.pending])
        self._poll_memory(state)


def compile_kernels() -> float:
    """Runs every AgentSAM kernel (automata, calibrator, memory build and retrieval, global rebuild)
    once on a toy input, so each compiles now, or loads from numba's disk cache, instead of inside a
    first request or a measured round. Returns the seconds it took."""
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    memory = SessionMemory(cap_mb=1.0, top_k=2, global_min_rebuild=8)
    try:
        for i in range(3):
            memory.add(f"warm-{i}", rng.integers(5, 60, 300).tolist())
        memory.flush()
        drafter = SAMDrafter(memory)
        for r in range(2):  # the second request extends the session and drafts from the global store
            rid = f"warm-request-{r}"
            drafter.begin(rid, rng.integers(5, 60, 120).tolist(), session_id="warm")
            drafter.wait_for_memory(rid)
            for _ in range(4):
                drafts = drafter.propose(rid, 8)
                drafter.expected_accepted(rid)
                drafter.extend(rid, drafts[:2] or [7])
            drafter.end(rid)
            memory.flush()
    finally:
        memory.close()
    return time.perf_counter() - start


def _extends(prompt: np.ndarray, context: np.ndarray) -> bool:
    return len(prompt) >= len(context) and bool(np.array_equal(prompt[:len(context)], context))
