"""AgentSAM drafter: suffix automata over the session, similar past sessions and past responses,
choosing between them with acceptance rates learned from verification.

Sources, each a suffix automaton with a cursor (the longest suffix of the context it contains):
- OWN: one online `SuffixAutomaton` per session over its context (prompt + generated tokens). A new
  request whose prompt extends the session's last context only extends it; otherwise it is
  rebuilt. Its cursor is the automaton's self-match (longest suffix that occurred earlier, O(1)).
- MEMORY: a frozen automaton over the top-K BM25-similar finished sessions (`SessionMemory`),
  retrieved on a worker thread at the request's start and when the context has grown
  `refresh_growth` times; until it is ready the request drafts without it.
- GLOBAL: the memory's frozen automaton over recent responses of all finished requests (agents
  reuse their own formats and phrasings across tasks), picked up whenever the worker rebuilds it.
Optionally each source also offers `backoff` shorter contexts (suffix-link parents of its cursor),
whose statistics are firmer. Off by default: on the FireAct replays one back-off per source left
tokens per step unchanged (2.8938 vs 2.8933 on gpt-3.5, 2.2270 vs 2.2282 on 300 multitask sessions)
and cost about a tenth of the median step, since every extra cursor reads new automaton states.
Also tried on 300 multitask sessions at k = 8 (2.2399 tokens per step before agreement classes,
below) and not kept: the most recent occurrence's continuation as a fourth candidate (2.2407) and
up to three continuations per cursor instead of the most frequent one (2.2381).

Drafting: from every cursor the drafter follows the most frequent continuation (occurrence counts;
exact in frozen automata, approximate online, see SuffixAutomaton). An `AcceptanceCalibrator` gives
each drafted token a probability of acceptance from its evidence (counts, the last context token,
optionally the tokens before each drafted one), and a candidate's value is its expected accepted
tokens, sum_j prod_{i<=j} p_i. Its evidence class is its source, or source + 3 when another
cursor's top continuation starts with the same token (another source's; with `backoff`, also a
shorter context of its own source): two independent sources agreeing on a first token are
right more often than either alone, and the calibrator learns the agreed classes' rates
separately (on the whole multitask file at k = 8: 2.4239 against 2.4159 tokens per step).
The candidate with the highest value is drafted,
cut where its path probability falls below `min_prob` and at min(k, ceil(factor * longest match))
tokens, so drafts grow with the match length and stop where recorded continuations disagree.
Candidates are evaluated lazily and abandoned as soon as they cannot beat the best so far (their
path probability only falls).

Hot paths: the candidate walk, the scoring of a proposal, the matchers' feeding and the session
automaton's extension run in `_sam_native` (C, built by setup.py where a compiler exists; `native=None` uses it when built).
They read the same Python objects and compute the same floats in the same order, so a drafter
gives identical drafts either way (tested bit for bit); the Python code here is the reference and
the fallback. Compiled, the median drafting step on 200 gpt-3.5 sessions fell from 22.6 to 9.0 us
(context levels off; 31.9 to 13.8 us with them). Over all of gpt-3.5 at k = 8, `extend` costs 7.2
us per verified token compiled and 16.3 in Python; the compiled extension still allocates Python
ints and tuples, which now dominate it.

Why learned rates instead of "the longest match wins" or raw counts: the counts are badly
calibrated and differ per source. On FireAct a session's own unique continuation after a one-token
match is accepted about half the time while its count says 1.0, and a phrase that sixteen retrieved
sessions share wins after a '.' that the session's own text continues differently. The calibrator
learns these rates online from the tokens the engine reports back through `extend`: up to the
first rejection the true next tokens are known, so every candidate's tokens there (drafted or not)
are scored, and the rates are not biased by which candidate won.
"""

from __future__ import annotations

import concurrent.futures
import math
from collections import OrderedDict
from collections.abc import Sequence

from agentinfer_jax.speculation.base import UnknownRequestError, check_k, check_tokens
from agentinfer_jax.speculation.session_memory import SessionMemory
from agentinfer_jax.speculation.suffix_automaton import Matcher, SuffixAutomaton

try:  # the compiled walk (setup.py builds it where a C compiler exists); the Python one is the reference
    from agentinfer_jax.speculation import _sam_native
except ImportError:  # pragma: no cover - depends on the install
    _sam_native = None

OWN, MEMORY, GLOBAL = 0, 1, 2
SOURCE_NAMES = ("own", "memory", "global")
# Evidence classes: source + AGREED if another cursor's top continuation starts with the same token
# (two sources agreeing on a first token are right more often than either alone). Calibrator keys
# are key * NUM_CLASSES + class; SAMDrafter.propose and _sam_native inline both numbers.
AGREED = len(SOURCE_NAMES)
NUM_CLASSES = 2 * AGREED
# The calibrator's cell index from tables (SAMDrafter.propose): 40 * log2 bin of a match length
# (for lengths < 128; larger: 280), and 5 * log2 bin of a total + its share bin (totals < 128).
_LB40 = tuple(40 * min(i.bit_length(), 7) for i in range(128))
_PART = tuple(tuple(5 * min(t.bit_length(), 7) + (4 if n == t else 4 * n // t) for n in range(t + 1))
              for t in range(128))


class AcceptanceCalibrator:
    """P(a drafted token is accepted), by the evidence behind it, learned online.

    A hierarchy of (accepted, trials) tables, each level shrunk towards the one above it:
    - cells: (evidence class, log2 match length, log2 occurrences of the matched context, the token's
      empirical share of those occurrences in 5 bins), estimated as (accepted + w * prior) /
      (trials + w) with prior = the smoothed count ratio n / (total + 1), w = `prior_weight`;
    - by the preceding token, shrunk towards the cell with weight w: for a draft's first token
      (class, last context token, token), for later ones (class, previous draft token, token).
      Which token comes before says a lot that counts cannot (after a '.' agents start a new line
      of a known format, after a name they copy the rest);
    - by the two preceding tokens (class, prev2, prev, token), shrunk towards the level above
      with weight `context_weight`.
    The last two levels beyond the first token (`token_context`, on by default) apply to the
    first `context_positions` draft positions (4 gained as much as all 8 at k = 8). On the FireAct
    replays at k = 8 they add 1.1% (gpt-3.5) and 0.6% (multitask) tokens per step. Their dict
    lookups cost about half a step more in the compiled walk (13.8 vs 9.0 us median on 200 gpt-3.5
    sessions) and nearly double the Python walk's (31.9 vs 22.6 us), which is why they were
    opt-in before the walk was compiled.
    A fresh calibrator therefore behaves like a count-based drafter and sharpens as it observes.
    Each context table holds at most `max_first_tokens` keys (a full one keeps updating the keys
    it has). Keys pack token ids below 2^21; larger ids may share keys, which only blurs estimates.
    """

    NUM_CELLS = NUM_CLASSES * 8 * 8 * 5

    def __init__(self, prior_weight: float = 4.0, max_first_tokens: int = 1 << 18,
                 context_weight: float = 2.0, token_context: bool = True,
                 context_positions: int = 4) -> None:
        if not prior_weight > 0 or not context_weight > 0 or max_first_tokens < 0 or context_positions < 1:
            raise ValueError("need prior_weight > 0, context_weight > 0, max_first_tokens >= 0 and "
                             "context_positions >= 1")
        self.prior_weight, self.context_weight = prior_weight, context_weight
        self.token_context = token_context
        # Draft positions that use the two context levels (with token_context); later tokens add
        # little to a draft's value and would cost two lookups each.
        self.context_positions = context_positions
        self.max_first_tokens = max_first_tokens
        # Every (accepted, trials) pair is one complex number, accepted + trials * 1j: a lookup on
        # the drafting path then reads one heap object instead of a list and two floats. On the
        # FireAct replays, touching these tables just before a step made it ~25% faster (cache
        # misses); as complex pairs the median step is ~7% faster.
        self.cells = [0j] * self.NUM_CELLS
        # last -> {token * 6 + class: accepted + trials * 1j}: one outer lookup per drafting step,
        # then a small dict that all of the step's candidates share.
        self.first: dict[int, dict[int, complex]] = {}
        self.first_size = 0
        # pair_key(source, prev, token) and context_key(source, prev2, prev, token) ->
        # accepted + trials * 1j: flat dicts, one lookup per drafted token.
        self.pair: dict[int, complex] = {}
        self.context: dict[int, complex] = {}

    @staticmethod
    def cell(source: int, match_len: int, n: int, total: int) -> int:
        lb, tb = match_len.bit_length(), total.bit_length()
        share = 4 if n == total else 4 * n // total
        # SAMDrafter.propose inlines this (with the _LB40 and _PART tables): keep the two in step.
        return (((source << 3) + (lb if lb < 7 else 7)) * 8 + (tb if tb < 7 else 7)) * 5 + share

    @staticmethod
    def pair_key(source: int, prev: int, token: int) -> int:
        # SAMDrafter.propose inlines the two keys: keep them in step.
        return ((prev + 1) << 21 | token) * NUM_CLASSES + source

    @staticmethod
    def context_key(source: int, prev2: int, prev: int, token: int) -> int:
        return (((prev2 + 1) << 21 | (prev + 1)) << 21 | token) * NUM_CLASSES + source

    def prob(self, cell: int, n: int, total: int) -> float:
        w = self.prior_weight
        stats = self.cells[cell]
        return (stats.real + w * n / (total + 1)) / (stats.imag + w)

    def first_prob(self, source: int, last: int, token: int, cell_prob: float) -> float:
        inner = self.first.get(last)
        stats = inner.get(token * NUM_CLASSES + source) if inner is not None else None
        return _shrink(stats, cell_prob, self.prior_weight)

    def token_prob(self, source: int, position: int, prev2: int, prev: int, token: int,
                   cell_prob: float) -> float:
        """The full hierarchy for a drafted token at `position` (0 = first) after prev2, prev."""
        if position == 0:
            q = self.first_prob(source, prev, token, cell_prob)
        elif self.token_context and position < self.context_positions:
            q = _shrink(self.pair.get(self.pair_key(source, prev, token)), cell_prob, self.prior_weight)
        else:
            return cell_prob
        if not self.token_context or position >= self.context_positions:
            return q
        return _shrink(self.context.get(self.context_key(source, prev2, prev, token)), q, self.context_weight)

    def update(self, cell: int, accepted: bool) -> None:
        self.cells[cell] += accepted + 1j

    def update_first(self, source: int, last: int, token: int, accepted: bool) -> None:
        inner = self.first.get(last)
        key = token * NUM_CLASSES + source
        stats = inner.get(key) if inner is not None else None
        if stats is None:
            if self.first_size >= self.max_first_tokens:
                return  # bounded: a full table keeps what it has learned
            if inner is None:
                inner = self.first[last] = {}
            stats = 0j
            self.first_size += 1
        inner[key] = stats + (accepted + 1j)

    def update_pair(self, source: int, prev: int, token: int, accepted: bool) -> None:
        self._update_flat(self.pair, self.pair_key(source, prev, token), accepted)

    def update_context(self, source: int, prev2: int, prev: int, token: int, accepted: bool) -> None:
        self._update_flat(self.context, self.context_key(source, prev2, prev, token), accepted)

    def _update_flat(self, table: dict[int, complex], key: int, accepted: bool) -> None:
        stats = table.get(key)
        if stats is None:
            if len(table) >= self.max_first_tokens:
                return
            stats = 0j
        table[key] = stats + (accepted + 1j)

    def table(self) -> dict[str, dict[str, float]]:
        """Observed cells by readable name (for logs and the experiment's JSON)."""
        out = {}
        for c, stats in enumerate(self.cells):
            n, acc = stats.imag, stats.real
            if n:
                rest, share = divmod(c, 5)
                rest, occ = divmod(rest, 8)
                src, length = divmod(rest, 8)
                name = SOURCE_NAMES[src % AGREED] + ("+agree" if src >= AGREED else "")
                out[f"{name}/len<2^{length}/occ<2^{occ}/share{share}"] = {
                    "accepted": acc, "trials": n, "rate": round(acc / n, 4)}
        return out


class _SessionState:
    """One session's automaton, its memory retrieval and the matchers of the active request."""

    __slots__ = ("session_id", "sam", "pending", "retrieval_done", "memory_matcher", "retrieved_at",
                 "active_request", "global_matcher", "global_version", "response_start", "last_candidates", "last_token",
                 "last_token2", "last_expected")

    def __init__(self, session_id: str, prompt: list[int], count_depth: int, native: bool) -> None:
        self.session_id = session_id
        self.sam = SuffixAutomaton(prompt, count_depth=count_depth, native=native)
        self.pending: concurrent.futures.Future | None = None
        # Set by the retrieval's done-callback (worker thread): propose polls a flag, not the future.
        self.retrieval_done = False
        self.memory_matcher: Matcher | None = None
        self.retrieved_at = 0
        self.active_request: str | None = None
        self.global_matcher: Matcher | None = None
        self.global_version = 0
        self.response_start = len(prompt)
        # The latest proposal's candidates (source, tokens, cells), scored when the verified
        # tokens arrive through extend(); the context's last two tokens when they were proposed.
        self.last_candidates: list[tuple[int, list[int], list[int]]] = []
        self.last_token = self.last_token2 = -1
        self.last_expected = 0.0

    def mark_retrieval_done(self, _future: concurrent.futures.Future) -> None:
        self.retrieval_done = True


class SAMDrafter:
    """Drafter over suffix automata with optional cross-session memory (see module docstring).

    `min_prob`: floor on a draft's calibrated path probability (0 drafts up to the length cap and
    leaves trimming to the adaptive switch); `factor`: drafts at most ceil(factor * longest match)
    tokens; `backoff`: shorter contexts tried per source; `global_memory=False`: no GLOBAL source;
    `warmup_tokens`: context tokens matched when a memory automaton is installed; `native`: use the
    compiled hot paths (None: when built; True: required, an error if not built; False: Python).
    """

    def __init__(self, memory: SessionMemory | None = None, *, min_match: int = 1, factor: float = 8.0,
                 min_prob: float = 0.0, backoff: int = 0, refresh_growth: float = 2.0, warmup_tokens: int = 64,
                 max_live_sessions: int = 1024, count_depth: int = 8, global_memory: bool = True,
                 calibrator: AcceptanceCalibrator | None = None, native: bool | None = None) -> None:
        if min_match < 1 or factor <= 0 or not 0 <= min_prob <= 1 or refresh_growth <= 1 or backoff < 0:
            raise ValueError("need min_match >= 1, factor > 0, 0 <= min_prob <= 1, refresh_growth > 1, "
                             "backoff >= 0")
        if warmup_tokens < 1 or max_live_sessions < 1:
            raise ValueError("warmup_tokens and max_live_sessions must be >= 1")
        self.memory = memory
        self.min_match, self.factor, self.min_prob, self.backoff = min_match, factor, min_prob, backoff
        self.refresh_growth, self.warmup_tokens = refresh_growth, warmup_tokens
        self.max_live_sessions, self.count_depth = max_live_sessions, count_depth
        self.global_memory = global_memory
        self.calibrator = calibrator or AcceptanceCalibrator()
        if native and _sam_native is None:
            raise RuntimeError("native=True but agentinfer_jax.speculation._sam_native is not built "
                               "(reinstall with a C compiler: pip install -e .)")
        self.native = _sam_native is not None if native is None else native
        self._sessions: OrderedDict[str, _SessionState] = OrderedDict()
        self._requests: dict[str, _SessionState] = {}

    # ---- Drafter API --------------------------------------------------------------------------

    def begin(self, request_id: str, prompt_tokens: Sequence[int], session_id: str | None = None) -> None:
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} already begun")
        prompt = check_tokens(prompt_tokens, "prompt_tokens")
        key = session_id if session_id is not None else f"request:{request_id}"
        state = self._sessions.get(key)
        if state is not None and state.active_request is None and _extends(prompt, state.sam.tokens):
            state.sam.extend_many(prompt[len(state.sam.tokens):], native=self.native)
            self._sessions.move_to_end(key)
        elif state is not None and state.active_request is not None:
            # A concurrent request of a busy session: a private, unshared state.
            state = _SessionState(key, prompt, self.count_depth, self.native)
        else:
            state = _SessionState(key, prompt, self.count_depth, self.native)
            self._sessions[key] = state
            self._sessions.move_to_end(key)
            while len(self._sessions) > self.max_live_sessions:
                old_key, old = next(iter(self._sessions.items()))
                if old.active_request is not None:
                    break
                del self._sessions[old_key]
        state.active_request = request_id
        state.response_start = len(state.sam.tokens)
        state.last_candidates = []
        self._requests[request_id] = state
        self._maybe_retrieve(state)

    def extend(self, request_id: str, tokens: Sequence[int]) -> None:
        state = self._get(request_id)
        toks = check_tokens(tokens)
        if state.last_candidates and toks:
            self._score_last_proposal(state, toks)
        state.sam.extend_many(toks, native=self.native)
        for matcher in (state.memory_matcher, state.global_matcher):
            if matcher is not None:
                if self.native:
                    _sam_native.feed(matcher, toks)
                else:
                    matcher.feed_many(toks)
        self._maybe_retrieve(state)

    def propose(self, request_id: str, k: int) -> list[int]:
        # The drafter's hot path (every verify step, in Python): helpers are inlined, cells come
        # from tables, the common case skips validation calls. Semantics as in the module docstring.
        if k.__class__ is not int or k < 0:
            check_k(k)
        state = self._requests.get(request_id)
        if state is None:
            state = self._get(request_id)
        memory = self.memory
        # _poll_memory's own conditions, checked here first: a call per step would cost more.
        if memory is not None and (state.retrieval_done or (
                self.global_memory and memory.global_version != state.global_version)):
            self._poll_memory(state)
        if self.backoff:
            cursors = self._cursors(state)
        else:  # _cursors without back-off, inlined (the exhaustive-selection test checks them equal)
            sam, min_match = state.sam, self.min_match
            cursors = []
            if sam.last:
                st = sam.link[sam.last]
                if sam.length[st] >= min_match:
                    cursors.append((OWN, sam, st, sam.length[st]))
            m = state.memory_matcher
            if m is not None and m.length >= min_match:
                cursors.append((MEMORY, m.sam, m.state, m.length))
            m = state.global_matcher
            if m is not None and m.length >= min_match:
                cursors.append((GLOBAL, m.sam, m.state, m.length))
        if not cursors or k == 0:
            state.last_candidates, state.last_expected = [], 0.0
            return []
        longest = 0
        for cur in cursors:
            if cur[3] > longest:
                longest = cur[3]
        reach = self.factor * longest
        limit = k if reach >= k else math.ceil(reach)
        cal, min_prob, lb40, part = self.calibrator, self.min_prob, _LB40, _PART
        cells_ab, w, first = cal.cells, cal.prior_weight, cal.first
        pair, context, wc, use_ctx = cal.pair, cal.context, cal.context_weight, cal.token_context
        ctx_stop = cal.context_positions  # draft positions with context levels (ctx_end below)
        tokens = state.sam.tokens
        last = tokens[-1] if tokens else -1
        last2 = tokens[-2] if len(tokens) > 1 else -1
        state.last_token, state.last_token2 = last, last2
        first_last = first.get(last)
        if self.native:
            best_toks, candidates, best_score = _sam_native.walk(
                cursors, limit, cells_ab, w, first_last, pair, context, wc, use_ctx, ctx_stop, last,
                last2, min_prob)
            state.last_candidates, state.last_expected = candidates, best_score
            return best_toks
        ctx_base = ((last2 + 1) << 21 | (last + 1)) << 21  # context_key's prefix for first tokens
        # First tokens of all candidates, then best-first extension: once a candidate's first-token
        # probability times the length cap cannot beat the best draft, neither can any later one.
        # Cell index (AcceptanceCalibrator.cell) = 320 * class + _LB40[length] + _PART[total][n].
        heads = []
        tops_of = [sam.top_table[st] for _, sam, st, _ in cursors]
        firsts = [top[0] for top in tops_of if top is not None]
        for i, (src, sam, st, length) in enumerate(cursors):
            top = tops_of[i]
            if top is None:
                continue
            tok, st, n, total = top
            if firsts.count(tok) > 1:
                src += 3  # AGREED: another cursor starts with the same token
            c = (src * 320 + (lb40[length] if length < 128 else 280)
                 + (part[total][n] if total < 128 else 35 + (4 if n == total else 4 * n // total)))
            ab = cells_ab[c]
            q = (ab.real + w * n / (total + 1)) / (ab.imag + w)
            stats = first_last.get(tok * 6 + src) if first_last is not None else None
            if stats is not None:
                q = (stats.real + w * q) / (stats.imag + w)
            if use_ctx:
                stats = context.get((ctx_base | tok) * 6 + src)
                if stats is not None:
                    q = (stats.real + wc * q) / (stats.imag + wc)
            heads.append((-q, i, src, sam, st, length + 1, tok, c))
        if len(heads) > 1:
            heads.sort()  # by probability, ties in cursor order (i is unique)
        candidates = []
        best_score, best_toks = 0.0, []
        for neg_p, _, src, sam, st, length, tok, c in heads:
            p = -neg_p
            toks, cells = [tok], [c]
            candidates.append((src, toks, cells))
            if p < min_prob or p * limit <= best_score:
                continue  # scored from its first token only (the rest would not be drafted)
            score, keep = p, 1  # keep: leading tokens whose path probability >= min_prob
            tops, base = sam.top_table, src * 320
            add_tok, add_cell = toks.append, cells.append
            prev2, prev = last, tok
            # size (tokens so far) = length - offset: one counter for both.
            offset = length - 1
            stop = limit + offset
            ctx_end = ctx_stop + offset if use_ctx else 0
            while length < stop and score + p * (stop - length) > best_score:
                top = tops[st]
                if top is None:
                    break
                tok, st, n, total = top
                c = (base + (lb40[length] if length < 128 else 280)
                     + (part[total][n] if total < 128 else 35 + (4 if n == total else 4 * n // total)))
                ab = cells_ab[c]
                q = (ab.real + w * n / (total + 1)) / (ab.imag + w)
                if length < ctx_end:
                    stats = pair.get(((prev + 1) << 21 | tok) * 6 + src)
                    if stats is not None:
                        q = (stats.real + w * q) / (stats.imag + w)
                    stats = context.get(((((prev2 + 1) << 21 | (prev + 1)) << 21) | tok) * 6 + src)
                    if stats is not None:
                        q = (stats.real + wc * q) / (stats.imag + wc)
                    prev2, prev = prev, tok
                p *= q
                length += 1
                add_tok(tok)
                add_cell(c)
                if p < min_prob:
                    break
                score += p
                keep += 1
            if score > best_score:
                best_score, best_toks = score, toks[:keep]
        state.last_candidates, state.last_expected = candidates, best_score
        return best_toks  # a fresh list (a slice), not shared with last_candidates

    def expected_accepted(self, request_id: str) -> float:
        """Calibrated expected accepted tokens of the request's latest proposal (sum of path
        probabilities); an adaptive switch can weigh it against the cost of verifying."""
        return self._get(request_id).last_expected

    def end(self, request_id: str) -> None:
        state = self._get(request_id)
        del self._requests[request_id]
        if state.active_request == request_id:
            state.active_request = None
        state.last_candidates = []
        # Only active requests hold a retrieved automaton (bounded memory); the session's next
        # request retrieves afresh (memory will have grown by then anyway).
        if state.pending is not None:
            state.pending.cancel()
        state.pending, state.memory_matcher, state.retrieved_at = None, None, 0
        state.global_matcher, state.global_version = None, 0
        if self.memory is not None:
            self.memory.add(state.session_id, state.sam.tokens)
            if self.global_memory:
                self.memory.add_response(state.sam.tokens[state.response_start:])

    # ---- internals ----------------------------------------------------------------------------

    def _get(self, request_id: str) -> _SessionState:
        try:
            return self._requests[request_id]
        except KeyError:
            raise UnknownRequestError(f"unknown request {request_id!r}") from None

    def _cursors(self, state: _SessionState) -> list[tuple[int, SuffixAutomaton, int, int]]:
        """(source, automaton, state, match length) per source with a long enough match, longest
        contexts first, then each source's `backoff` shorter ones."""
        sam, min_match, backoff = state.sam, self.min_match, self.backoff
        out = []
        if sam.last != 0:
            st = sam.link[sam.last]
            if sam.length[st] >= min_match:
                out.append((OWN, sam, st, sam.length[st]))
        for src, m in ((MEMORY, state.memory_matcher), (GLOBAL, state.global_matcher)):
            if m is not None and m.length >= min_match:
                out.append((src, m.sam, m.state, m.length))
        if backoff:
            for j in range(len(out)):
                src, a, st, _ = out[j]
                link, lengths = a.link, a.length
                for _ in range(backoff):
                    st = link[st]
                    if st <= 0 or lengths[st] < min_match:
                        break
                    out.append((src, a, st, lengths[st]))
        return out

    def _score_last_proposal(self, state: _SessionState, toks: list[int]) -> None:
        """Scores every candidate's tokens up to its first mismatch with the verified `toks` (past
        that, the true context is no longer the candidate's)."""
        cal = self.calibrator
        ctx_n = cal.context_positions if cal.token_context else 0
        if self.native:
            cal.first_size = _sam_native.score(
                state.last_candidates, toks, cal.cells, cal.first, cal.pair, cal.context, state.last_token,
                state.last_token2, ctx_n, cal.max_first_tokens, cal.first_size)
            state.last_candidates = []
            return
        for src, path, cells in state.last_candidates:
            if path:
                cal.update_first(src, state.last_token, path[0], path[0] == toks[0])
            prev2, prev = state.last_token2, state.last_token
            for j, (c, tok, true) in enumerate(zip(cells, path, toks)):
                ok = tok == true
                cal.update(c, ok)
                if j < ctx_n:
                    if j:
                        cal.update_pair(src, prev, tok, ok)
                    cal.update_context(src, prev2, prev, tok, ok)
                if not ok:
                    break
                prev2, prev = prev, tok
        state.last_candidates = []

    def _maybe_retrieve(self, state: _SessionState) -> None:
        if self.memory is None or state.pending is not None:
            return
        n = len(state.sam.tokens)
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
        warm = state.sam.tokens[-self.warmup_tokens:]
        if self.native:
            _sam_native.feed(matcher, warm)
        else:
            matcher.feed_many(warm)
        return matcher

    def wait_for_memory(self, request_id: str) -> None:
        """Blocks until the request's pending retrieval is installed (deterministic replays; the
        worker runs tasks in order, so every earlier global rebuild is visible too)."""
        state = self._get(request_id)
        if state.pending is not None:
            concurrent.futures.wait([state.pending])
        self._poll_memory(state)


def _shrink(stats: complex | None, prior: float, weight: float) -> float:
    return prior if stats is None else (stats.real + weight * prior) / (stats.imag + weight)


def _extends(prompt: list[int], context: list[int]) -> bool:
    return len(prompt) >= len(context) and prompt[:len(context)] == context
