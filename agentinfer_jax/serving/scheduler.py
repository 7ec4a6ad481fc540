"""The executor-agnostic scheduler: who runs this step, on which blocks, with which tokens.

Each step `schedule()` returns a `SchedulerOutput`, a plain-data `StepBatch` (per request id: the
tokens to feed, their first position, the block table, any draft tokens, sampling parameters); an
executor (the JAX engine, or the discrete-event simulator) runs it and hands back the model's
tokens per request id to `update()`, which applies them (or, for trace replay, the request's
`forced_output`). The scheduler never runs a model, so the engine and the simulator share this
code, the allocator and the prefix cache exactly.

Invariants:
- A running request holds one reference on each of its `block_ids`; a finished, aborted or
  preempted request holds none. The prefix cache holds its own reference on every cached block.
- `num_computed_tokens <= num_tokens - 1` for a running request after `update()`: only its newest
  token lacks KV; a step feeds `all_tokens[num_computed_tokens:]` (capped by the budget) plus drafts.
- Running requests are served before waiting ones (decode latency first); when blocks run out the
  newest running request is preempted (its blocks released, recomputed later from its tokens).
- Full blocks are offered to the prefix cache after a prefill chunk, at finish and at preemption;
  decode blocks are cached at the end, so a running request's decode blocks are not yet shareable.
- In-flight prefix sharing (`share_inflight_prefill`): a waiting request is not admitted while a
  running request (same namespace) is still prefilling at least one full block of its prompt past
  its cached prefix; it is admitted once those blocks are cached (a hit), or as soon as no running
  request is computing them any more (finished, aborted, preempted). A request waiting so is skipped,
  never blocking the requests behind it in the policy's order.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence

from agentinfer_jax.engine.step_batch import PREVIOUS_TOKEN, SeqSampling, StepBatch, StepLimits, StepSeq
from agentinfer_jax.serving.policies import FCFS, AdmissionPolicy, CacheView, Candidate
from agentinfer_jax.serving.request import (FinishReason, InvalidRequestError, Request, RequestState,
                                            SamplingParams)

log = logging.getLogger(__name__)

__all__ = ["SchedulerConfig", "StepSeq", "SchedulerOutput", "Scheduler", "SessionRetention", "replay_tokens",
           "InvalidRequestError", "SamplingParams"]


# The step's capacity is the engine's contract; the scheduler is configured by it.
SchedulerConfig = StepLimits


def replay_tokens(seq: StepSeq, req: Request) -> list[int]:
    """Trace replay: the recorded tokens a sampling `seq` of `req` (with `forced_output`) emits.

    Drafts count as accepted exactly where they match the record; then one more recorded token
    follows. Empty once the record is exhausted (the model's own token is emitted then).
    """
    forced = req.forced_output or ()
    n0 = len(req.output_tokens)
    drafts = seq.drafts
    acc = 0
    while acc < len(drafts) and n0 + acc < len(forced) and drafts[acc] == forced[n0 + acc]:
        acc += 1
    return list(forced[n0:n0 + acc + 1])


MAX_PROPOSAL_BACKOFF = 8  # steps a request at most skips proposing after weak proposals


@dataclasses.dataclass
class SchedulerOutput(StepBatch):
    """A step for the executor (the plain `StepBatch`) plus what the scheduler did to build it."""

    preempted: list[str] = dataclasses.field(default_factory=list)  # request ids preempted meanwhile
    num_waiting: int = 0  # still waiting after admission


class SessionRetention:
    """Keeps a finished call's full blocks for `ttl_s` while its agent runs a tool.

    One job: hold one extra reference per retained block, so LRU eviction cannot take a session's
    context between its calls. Released when the session's next call is admitted, when the TTL runs
    out, or under pressure (oldest first) when the allocator has nothing else to give.
    """

    def __init__(self, pool, ttl_s: float = 30.0):
        self._pool = pool
        self.ttl_s = ttl_s
        self._held: dict[str, tuple[float, list[int]]] = {}  # session -> (expiry, blocks); insertion = age

    def hold(self, session_id: str, block_ids: Sequence[int], now_s: float) -> None:
        self.drop(session_id)
        if block_ids:
            self._pool.incref(list(block_ids))
            self._held[session_id] = (now_s + self.ttl_s, list(block_ids))

    def drop(self, session_id: str) -> None:
        held = self._held.pop(session_id, None)
        if held:
            self._pool.release(held[1])

    def expire(self, now_s: float) -> None:
        for sid in [s for s, (exp, _) in self._held.items() if exp <= now_s]:
            self.drop(sid)

    def release_oldest(self) -> bool:
        """Releases the oldest retained session; False when nothing is held."""
        if not self._held:
            return False
        self.drop(next(iter(self._held)))
        return True

    def clear(self) -> None:
        while self.release_oldest():
            pass

    @property
    def num_blocks(self) -> int:
        return sum(len(b) for _, b in self._held.values())


class Scheduler:
    """Continuous batching over a paged KV cache with prefix reuse, drafting and preemption."""

    def __init__(self, config: SchedulerConfig, pool, prefix_cache=None, policy: AdmissionPolicy | None = None,
                 drafter=None, retention: SessionRetention | None = None,
                 clock: Callable[[], float] = time.monotonic, adaptive=None, grammar=None):
        self.config = config
        self.pool = pool
        self.prefix_cache = prefix_cache
        self.policy = policy or FCFS()
        self.drafter = drafter
        self.retention = retention
        self.clock = clock
        # The adaptive switch (speculation.adaptive.AdaptiveSpeculation): per-request draft length,
        # at most config.num_draft_tokens; None drafts config.num_draft_tokens whenever it can.
        self.adaptive = adaptive
        # engine.structured.GrammarCompiler: builds each structured-output request's matcher (None:
        # such requests are refused with InvalidRequestError).
        self.grammar = grammar
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_steps = 0
        self._pending_k: dict[str, int] = {}  # k the adaptive switch chose while planning ahead
        # Scored drafters: after a proposal judged not worth verifying, the request skips proposing
        # for `backoff` steps (doubling up to MAX_PROPOSAL_BACKOFF, reset by a kept proposal): a
        # proposal costs host time every step, and weak ones come in runs.
        self._backoff: dict[str, tuple[int, int]] = {}  # request id -> (steps left to skip, backoff)
        # In-flight prefix sharing: request id -> its cached blocks when it was first held back for
        # a running request's prefill (what it gained by waiting is counted at its admission).
        self._held_for_inflight: dict[str, int] = {}
        self.num_inflight_shared_admissions = 0  # admissions that waited for an in-flight prefill
        # Tokens those gained as cache hits by waiting: at most the prefill saved (the budget might
        # have held some of them back anyway); compare runs with the flag off for the exact saving.
        self.num_inflight_shared_tokens = 0
        # Drafter calls that raised or returned garbage; each turns drafting off for its request.
        self.num_drafter_errors = 0

    # ---- requests in and out -------------------------------------------------------------------

    def add_request(self, req: Request) -> None:
        """Validates and queues a request; raises InvalidRequestError for bad input."""
        if req.request_id in self.requests:
            raise InvalidRequestError(f"duplicate request id {req.request_id!r}")
        req.validate(self.config.vocab_size, self.config.max_model_len)
        if req.sampling.structured is not None and req.grammar is None:
            if self.grammar is None:
                raise InvalidRequestError("structured outputs are not available on this server (no grammar compiler)")
            req.grammar = self.grammar.matcher(req.sampling.structured)
            for t in req.output_tokens:
                req.grammar.advance(t)
        req.state = RequestState.WAITING
        req.waiting_since_s = req.arrival_s = self.clock() if req.arrival_s == 0.0 else req.arrival_s
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: str) -> Request | None:
        """Cancels a request wherever it is; its blocks are released. Unknown ids are ignored."""
        req = self.requests.get(request_id)
        if req is None or req.done:
            return None
        self._finish(req, FinishReason.ABORT, RequestState.ABORTED)
        return req

    def stop(self, request_id: str) -> Request | None:
        """Finishes a request early with reason STOP (the serving loop matched a stop string)."""
        req = self.requests.get(request_id)
        if req is None or req.done:
            return None
        self._finish(req, FinishReason.STOP, RequestState.FINISHED)
        return req

    def forget(self, request_id: str) -> None:
        """Drops a finished request's record (the loop calls this once its result is delivered)."""
        req = self.requests.get(request_id)
        if req is not None and req.done:
            del self.requests[request_id]

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        return self._schedule(None)

    def schedule_ahead(self, inflight: StepBatch) -> SchedulerOutput | None:
        """Plans the step after `inflight` while `inflight` still runs (host/device overlap).

        Each request of `inflight` is planned as if that step had fed its tokens; one that samples
        there feeds PREVIOUS_TOKEN (the engine reads it on the device). None when the next step
        cannot be planned blind: `inflight` verifies drafts (how many are accepted is unknown), or a
        request sampling in it would draft next (drafts follow its newest token) or is constrained
        or penalised (its next mask / penalties follow the token in flight); also when a running
        request outside `inflight` would draft now (its verification joins a synchronous step).
        Planning ahead never preempts; a request that may finish in `inflight` is left out (if it
        does not finish, the next step picks it up). After this, `update(inflight)` and then
        `update(the result)`.
        """
        ahead = {}
        for seq in inflight.seqs:
            req = self.requests.get(seq.request_id)
            if req is None or req.done or req.state is not RequestState.RUNNING:
                continue
            if seq.num_draft:
                return None
            if seq.samples:
                sp = req.sampling
                if req.grammar is not None or sp.presence_penalty or sp.frequency_penalty:
                    return None
                # Decided once per step: a k > 0 is kept for the synchronous plan that follows.
                k = self._pending_k[req.request_id] = self._draft_len(req, len(inflight.seqs), ahead=True,
                                                                         stale=True)
                if k > 0:
                    return None
            ahead[seq.request_id] = seq
        if self.drafter is not None:
            # A running request outside the step in flight that would draft now: a synchronous step
            # batches its verification with everyone's decode. Sitting out instead would run it
            # alone after this step, and again after every step planned ahead while others decode.
            for req in self.running:
                if req.request_id not in ahead and req.num_tokens - req.num_computed_tokens == 1:
                    self._pending_k[req.request_id] = k = self._draft_len(req, len(self.running), ahead=True)
                    if k > 0:
                        return None
        return self._schedule(ahead)

    def _schedule(self, ahead: dict[str, StepSeq] | None) -> SchedulerOutput:
        """`ahead`: None for a step after every update; else the in-flight step's seqs by id."""
        now = self.clock()
        if self.retention is not None:
            self.retention.expire(now)
        budget = self.config.max_tokens_per_step
        seqs: list[StepSeq] = []
        preempted: list[str] = []

        # Running requests first, oldest first; growth may preempt the newest.
        # Tokens still to feed by running[i:] (suffix sums, once per step): with what is planned
        # so far, the step's width that the adaptive switch prices req's k against. Preemption
        # only shortens the list, so after one this over-counts a little (an estimate either way).
        rest = [0] * (len(self.running) + 1)
        if self.adaptive is not None:
            for j in range(len(self.running) - 1, -1, -1):
                r = self.running[j]
                rest[j] = rest[j + 1] + max(1, r.num_tokens - r.num_computed_tokens)
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            fed = min(self.config.max_tokens_per_step - budget + rest[i], self.config.max_tokens_per_step)
            if ahead is not None:
                plan = self._plan_ahead(req, ahead.get(req.request_id), budget)
                if plan is False:  # out of blocks: no preemption while a step runs
                    break
                if plan is not None:
                    seqs.append(plan)
                    budget -= len(plan.tokens)
                i += 1
                continue
            seq = self._plan_running(req, budget, fed)
            while seq is None:
                victim = self.running[-1]
                self._preempt(victim, now)
                preempted.append(victim.request_id)
                if victim is req:
                    break
                seq = self._plan_running(req, budget, fed)
            if seq is None:
                continue  # req itself was preempted (it was the last one); loop ends
            seqs.append(seq)
            budget -= len(seq.tokens)
            i += 1

        # Then admission, in the policy's order, first feasible.
        if (self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs
                and (ahead is None or i == len(self.running))):
            budget = self._admit(now, budget, seqs)
        self.num_steps += 1
        if self.grammar is not None:
            self._add_grammar_masks(seqs)
        return SchedulerOutput(seqs, preempted, len(self.waiting))

    def update(self, output: SchedulerOutput, new_tokens: dict[str, Sequence[int]]) -> list[Request]:
        """Applies an executed step. `new_tokens[id]`: the model's accepted drafts + one sampled token
        (sampling seqs only). A request with `forced_output` (trace replay) emits its record instead:
        the one place replay overrides the model. Returns the requests that finished in this step."""
        now = self.clock()
        finished = []
        for seq in output.seqs:
            req = self.requests.get(seq.request_id)
            if req is None or req.done or req.state is not RequestState.RUNNING:
                continue  # aborted while the step ran
            raw = new_tokens.get(req.request_id, ()) if seq.samples else ()
            toks = list(raw)
            logprobs = getattr(raw, "logprobs", None)
            if seq.samples and not toks:
                raise RuntimeError(f"executor returned no token for sampling request {req.request_id}")
            if seq.samples and req.forced_output is not None:
                # Past the record (max_tokens larger than the trace): the model's own next token.
                toks = replay_tokens(seq, req) or toks[:1]
                logprobs = None
            num_acc = max(0, len(toks) - 1) if seq.num_draft else 0
            if len(toks) > 1 + seq.num_draft:
                raise RuntimeError(f"executor returned {len(toks)} tokens for {seq.num_draft} drafts")
            if seq.num_draft and any(t != d for t, d in zip(toks[:num_acc], seq.tokens[-seq.num_draft:])):
                raise RuntimeError("accepted tokens disagree with the drafts")
            req.num_computed_tokens = seq.start_pos + len(seq.tokens) - seq.num_draft + num_acc
            if seq.num_draft:
                req.num_drafted += seq.num_draft
                req.num_accepted += num_acc
                req.num_verify_steps += 1
                if self.adaptive is not None:
                    self.adaptive.observe(req.request_id, seq.num_draft, num_acc)
            if toks:
                n0 = len(req.output_tokens)
                reason = self._append(req, toks, now, logprobs)
                if req.drafter_started:  # what entered the context: nothing past a stop
                    self._drafter_call(req, "extend", req.output_tokens[n0:])
            else:
                reason = None
            # Cache blocks as prefill chunks complete and at the end; decode blocks wait for the
            # finish (or a preemption), which saves a radix walk per filled decode block.
            if len(seq.tokens) - seq.num_draft > 1 or reason is not None:
                self._offer_to_cache(req)
            if reason is not None:
                self._finish(req, reason, RequestState.FINISHED)
                finished.append(req)
        return finished

    def observe_step(self, output: SchedulerOutput, seconds: float, exposed_host_s: float | None = None) -> None:
        """The executor's measured device time for `output`, and for a verify step the host time
        it exposed (the adaptive switch's cost model learns both)."""
        cost = getattr(self.adaptive, "step_cost", None)
        if hasattr(cost, "record"):
            cost.record(len(output.seqs), output.num_tokens, seconds)
        if exposed_host_s is not None and hasattr(cost, "record_sync_gap"):
            cost.record_sync_gap(exposed_host_s)

    # ---- internals ------------------------------------------------------------------------------

    def _append(self, req: Request, toks: list[int], now: float, logprobs=None) -> FinishReason | None:
        sp = req.sampling
        stops = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(self.config.eos_token_ids))
        reason = None
        count = sp.presence_penalty or sp.frequency_penalty
        for n, t in enumerate(toks):
            req.output_tokens.append(t)
            if sp.logprobs is not None:
                req.output_logprobs.append(logprobs[n] if logprobs is not None else None)
            if count:
                req.token_counts[t] = req.token_counts.get(t, 0) + 1
            # A complete grammar allows only EOS: stop here. Only a forced replay can emit a token
            # the grammar forbids: the record wins (the grammar is dropped), as it does over the model.
            if req.grammar is not None and t not in stops and not req.grammar.advance(t):
                req.grammar = None
                if req.forced_output is None:
                    reason = FinishReason.STOP
            elif req.grammar is not None and t not in stops and req.grammar.is_stopped:
                reason = FinishReason.STOP
            if reason is None and t in stops:
                reason = FinishReason.STOP
            elif reason is None and (len(req.output_tokens) >= sp.max_tokens
                                     or req.num_tokens >= self.config.max_model_len):
                reason = FinishReason.LENGTH
            if reason is not None:
                # Tokens past the stop are dropped; their KV (if any) lies beyond num_computed.
                req.num_computed_tokens = min(req.num_computed_tokens, req.num_tokens - 1)
                break
        if req.first_token_s is None:
            req.first_token_s = now
        req.last_token_s = now
        return reason

    def _add_grammar_masks(self, seqs: list[StepSeq]) -> None:
        """Constrained sampling seqs get one allowed-token mask per verification row (row j: the
        grammar's state after drafts[:j]), all computed in one batched call."""
        jobs = [(i, self.requests[s.request_id].grammar) for i, s in enumerate(seqs) if s.samples]
        jobs = [(i, g) for i, g in jobs if g is not None]
        if not jobs:
            return
        masks = self.grammar.allowed_rows_batch([(g, seqs[i].drafts) for i, g in jobs])
        for (i, _), mask in zip(jobs, masks):
            seqs[i] = dataclasses.replace(seqs[i], allowed=mask)

    def _blocks_needed(self, req: Request, upto_pos: int) -> int:
        return max(0, math.ceil(upto_pos / self.config.block_size) - len(req.block_ids))

    def _allocate(self, n: int) -> list[int] | None:
        """n blocks, evicting unreferenced cached blocks and then retained sessions if needed."""
        if n == 0:
            return []
        while True:
            ids = self.pool.allocate(n)
            if ids is not None:
                return ids
            short = n - self.pool.num_free
            if self.prefix_cache is not None and self.prefix_cache.evict(short) > 0:
                continue
            if self.retention is not None and self.retention.release_oldest():
                continue
            return None

    @property
    def _scored_drafts(self) -> bool:
        """The drafter scores each proposal (AgentSAM's calibrator) and the switch can judge it."""
        return hasattr(self.drafter, "expected_accepted") and hasattr(self.adaptive, "drafts_to_keep")

    def _draft_len(self, req: Request, step_tokens: int, ahead: bool = False, stale: bool = False) -> int:
        """k to draft for `req` in the step being planned (0: none). With a drafter that scores its
        proposals, `ahead` (deciding whether the next step can be planned while one runs) proposes
        now and judges the proposal, so a weak one keeps the overlap; `stale`: the request's newest
        token is still in flight, so the proposal is one token early (its first token predicts the
        one in flight). The step's own plan proposes again, up to date, and judges that too."""
        if self.drafter is None or req.drafter_failed:
            self._pending_k.pop(req.request_id, None)
            return 0
        if req.request_id in self._pending_k:  # already chosen for this step by schedule_ahead
            return self._pending_k.pop(req.request_id)
        room = min(req.sampling.max_tokens - len(req.output_tokens),
                   self.config.max_model_len - req.num_tokens) - 1
        k = min(self.config.num_draft_tokens, room)
        if k <= 0 or self.adaptive is None:
            return max(0, k)
        batch = max(1, len(self.running))  # a request admitted with one token left drafts before it runs
        if not self._scored_drafts:
            return max(0, self.adaptive.choose_k(req.request_id, batch, req.num_tokens, max_k=k,
                                                 tokens_fed=max(step_tokens, 1)))
        k = self.adaptive.draft_budget(batch, req.num_tokens, k)
        skip, backoff = self._backoff.get(req.request_id, (0, 0))
        if k <= 0 or skip > 0:
            if skip > 0:
                self._backoff[req.request_id] = (skip - 1, backoff)
            return 0
        if ahead:
            drafts = self._propose(req, k + stale)
            if req.drafter_failed:
                return 0
            if not self._worth_verifying(req.request_id, min(len(drafts) - stale, k), step_tokens, stale):
                return 0
        return k

    def _worth_verifying(self, request_id: str, num_drafts: int, step_tokens: int, stale: bool = False) -> int:
        """How many tokens of the drafter's latest proposal the switch keeps, judged by the
        drafter's own score (one token fewer when `stale`); 0 backs the request off proposing."""
        try:
            expected = float(self.drafter.expected_accepted(request_id)) - stale
        except Exception:  # noqa: BLE001 - a drafter's fault stays its request's: no drafts
            self._drafter_failed(self.requests[request_id], "expected_accepted")
            return 0
        keep = self.adaptive.drafts_to_keep(max(1, len(self.running)), num_drafts, expected, max(step_tokens, 1))
        if keep:
            return keep
        backoff = min(2 * self._backoff.get(request_id, (0, 0))[1] or 1, MAX_PROPOSAL_BACKOFF)
        self._backoff[request_id] = (backoff, backoff)
        return 0

    # ---- drafter calls: a drafter (possibly a custom one) that raises or proposes garbage costs
    # its request its drafts, never the request itself, the step or the serving loop.

    def _drafter_call(self, req: Request, method: str, *args) -> bool:
        """Calls drafter.begin/extend/end for `req`; False (drafting off for it) if it raised."""
        try:
            getattr(self.drafter, method)(req.request_id, *args)
            return True
        except Exception:  # noqa: BLE001
            self._drafter_failed(req, method, exc_info=True)
            return False

    def _drafter_failed(self, req: Request, what: str, exc_info: bool = True) -> None:
        """Turns drafting off for `req` (its drafter state may be out of step) and ends that state."""
        self.num_drafter_errors += 1
        log.warning("drafter %s failed for %s; it decodes without drafts", what, req.request_id, exc_info=exc_info)
        req.drafter_failed = True
        self._backoff.pop(req.request_id, None)
        if req.drafter_started:
            req.drafter_started = False
            try:
                self.drafter.end(req.request_id)
            except Exception:  # noqa: BLE001 - its state may be gone or half-built already
                pass

    def _propose(self, req: Request, k: int) -> list[int]:
        """The drafter's proposal for `req`, at most k token ids in the vocabulary; [] (and drafting
        off for `req`) when it raises or returns anything else (non-ints, ids out of range)."""
        try:
            raw = self.drafter.propose(req.request_id, k)
            drafts = list(raw)[:k]
            vocab = self.config.vocab_size
            for t in drafts:
                if isinstance(t, bool) or not hasattr(t, "__index__") or not 0 <= int(t) < vocab:
                    raise ValueError(f"draft token {t!r} is not a token id in [0, {vocab})")
            return [int(t) for t in drafts]
        except Exception:  # noqa: BLE001
            self._drafter_failed(req, "propose")
            return []

    def _plan_running(self, req: Request, budget: int, step_tokens: int = 1) -> StepSeq | None:
        """The request's next feed within `budget`, with blocks allocated; None if blocks ran out.
        `step_tokens`: the step's tokens without this request's drafts (an estimate, for pricing k)."""
        start = req.num_computed_tokens
        pending = req.tokens_from(start)
        drafts: list[int] = []
        if len(pending) == 1:
            k = min(self._draft_len(req, step_tokens), budget - 1)
            if k > 0:
                drafts = self._propose(req, k)
                if drafts and self._scored_drafts:
                    # The drafter's own score says how much of this proposal verifying pays for.
                    drafts = drafts[:self._worth_verifying(req.request_id, len(drafts), step_tokens)]
                    if drafts:
                        self._backoff.pop(req.request_id, None)
        else:
            pending = pending[:budget]
        samples = start + len(pending) == req.num_tokens
        if req.grammar is not None and samples:
            # Drafts past the first token the grammar forbids can never be accepted: cut them, so
            # drafting stays lossless. The rows' masks are added for the whole step in schedule().
            drafts = drafts[:req.grammar.valid_prefix(drafts)]
        tokens = pending + drafts
        new = self._allocate(self._blocks_needed(req, start + len(tokens)))
        if new is None:
            return None
        req.block_ids.extend(new)
        sp = req.sampling
        counts = tuple(req.token_counts.items()) if (sp.presence_penalty or sp.frequency_penalty) else ()
        return StepSeq(req.request_id, start, tuple(tokens), len(drafts), tuple(req.block_ids),
                       SeqSampling.resolve(sp, req.request_id), samples=samples, token_counts=counts)

    def _plan_ahead(self, req: Request, inflight: StepSeq | None, budget: int) -> StepSeq | None | bool:
        """`req`'s feed in the step after the in-flight one (no drafts); None when it sits this one
        out (its in-flight token may be its last, or its record's end), False when blocks ran out."""
        if inflight is None:  # not in the step in flight: schedule_ahead found it does not draft now
            seq = self._plan_running(req, budget)
            return False if seq is None else seq
        start = inflight.start_pos + len(inflight.tokens)
        self._pending_k.pop(req.request_id, None)  # its k = 0 for this step was chosen above
        if inflight.samples:
            room = min(req.sampling.max_tokens - len(req.output_tokens), self.config.max_model_len - req.num_tokens)
            if room <= 1:
                return None  # its in-flight token is its last
            forced, n_out = req.forced_output, len(req.output_tokens)
            if forced is None:
                pending = [PREVIOUS_TOKEN]
            elif n_out < len(forced):
                pending = [forced[n_out]]  # replay: update() will emit the record, so feed it
            else:
                return None  # past its record: the model's token decides
        else:
            pending = req.tokens_from(start)
        pending = pending[:budget]
        new = self._allocate(self._blocks_needed(req, start + len(pending)))
        if new is None:
            return False
        req.block_ids.extend(new)
        n_tokens = req.num_tokens + (1 if inflight.samples else 0)
        return StepSeq(req.request_id, start, tuple(pending), 0, tuple(req.block_ids),
                       SeqSampling.resolve(req.sampling, req.request_id), samples=start + len(pending) == n_tokens)

    def _cached_prefix(self, req: Request) -> list[int]:
        """Cached blocks of the request's tokens, leaving at least one token to compute."""
        if self.prefix_cache is None:
            return []
        toks = req.all_tokens
        hit = self.prefix_cache.match(toks, namespace=req.namespace)
        return hit[: (len(toks) - 1) // self.config.block_size]

    def _forked_prefix(self, req: Request) -> list[int] | None:
        """n > 1: the full prompt blocks of the sibling `req.fork_of` ([] when there is none to
        share: no sibling, it is gone or its prompt differs); None while the sibling is still
        computing them (the request then waits, so the prompt is computed once)."""
        parent = self.requests.get(req.fork_of) if req.fork_of is not None else None
        if parent is None or parent.done or parent.prompt_tokens != req.prompt_tokens:
            return []
        shared = (len(req.prompt_tokens) - 1) // self.config.block_size
        if parent.state is not RequestState.RUNNING or parent.num_computed_tokens < shared * self.config.block_size:
            return None
        return parent.block_ids[:shared]

    def _inflight_prefills(self) -> dict[str, list[Request]] | None:
        """Running requests still prefilling, by namespace; None when in-flight sharing is off (or
        there is no prefix cache to share through)."""
        if not self.config.share_inflight_prefill or self.prefix_cache is None:
            return None
        out: dict[str, list[Request]] = {}
        for r in self.running:
            if r.is_prefilling:
                out.setdefault(r.namespace, []).append(r)
        return out

    def _inflight_shared_blocks(self, req: Request, num_hit: int, prefilling: dict[str, list[Request]]) -> int:
        """Full blocks of `req`'s tokens past its `num_hit` cached ones that a running request of its
        namespace is still prefilling (and will offer to the cache): the most over such requests.
        Each comparison is one slice of `req`'s tokens, so this costs O(its tokens) per prefilling
        request of its namespace (usually few: a prefill takes whole steps' budgets)."""
        others = prefilling.get(req.namespace)
        if not others:
            return 0
        bs = self.config.block_size
        toks = req.all_tokens
        limit = (len(toks) - 1) // bs  # as _cached_prefix: at least one token left to compute
        best = 0
        for other in others:
            # Blocks below `start` are cached or already computed (then not ours to wait for); the
            # prefill offers the full blocks of all of other's tokens.
            start = max(num_hit, other.num_computed_tokens // bs)
            end = min(limit, other.num_tokens // bs)
            if end - start <= best:
                continue
            theirs = other.all_tokens
            if toks[:(start + 1) * bs] != theirs[:(start + 1) * bs]:
                continue
            n = start + 1
            while n < end and toks[n * bs:(n + 1) * bs] == theirs[n * bs:(n + 1) * bs]:
                n += 1
            best = max(best, n - start)
        return best

    def _admit(self, now: float, budget: int, seqs: list[StepSeq]) -> int:
        bs = self.config.block_size
        prefilling = self._inflight_prefills()
        cands = []
        for req in self.waiting:
            n_hit = len(self._cached_prefix(req))
            cands.append(Candidate(req.request_id, req.num_tokens, n_hit, math.ceil(req.num_tokens / bs) - n_hit,
                                   now - req.waiting_since_s, req.arrival_s, req.speculative, req.priority))
        view = CacheView(self.pool.num_free, self.prefix_cache.num_evictable() if self.prefix_cache else 0, bs)
        for cand in self.policy.order(cands, view, now):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            req = self.requests[cand.request_id]
            forked = self._forked_prefix(req)
            if forked is None:
                continue  # its sibling is still computing the shared prompt
            # Matched again: admitting an earlier candidate may have evicted blocks seen above.
            hit = self._cached_prefix(req)
            if len(forked) > len(hit):
                hit = forked
            if prefilling and self._inflight_shared_blocks(req, len(hit), prefilling) > 0:
                self._held_for_inflight.setdefault(req.request_id, len(hit))
                continue  # a running request is computing its next blocks: wait for the cache hit
            if self.retention is not None and req.session_id is not None:
                self.retention.drop(req.session_id)  # the prefix cache now serves this session
            if hit:
                self.pool.incref(hit)
            req.block_ids = list(hit)
            req.num_computed_tokens = len(hit) * self.config.block_size
            first_admission = req.admitted_s is None
            if first_admission:
                req.admitted_s = now
                req.num_cached_tokens = min(req.num_computed_tokens, len(req.prompt_tokens))
            req.num_inserted_blocks = len(hit)
            if self.drafter is not None and not req.drafter_started and not req.drafter_failed:
                req.drafter_started = True
                self._drafter_call(req, "begin", req.prompt_tokens, req.session_id)
            seq = self._plan_running(req, budget, self.config.max_tokens_per_step - budget + 1)
            if seq is None:  # not feasible now: undo and try the next candidate
                self.pool.release(req.block_ids)
                req.block_ids, req.num_computed_tokens, req.num_inserted_blocks = [], 0, 0
                continue
            self.waiting.remove(req)
            self.running.append(req)
            req.state = RequestState.RUNNING
            if prefilling is not None and req.is_prefilling:  # later candidates may share its prefill
                prefilling.setdefault(req.namespace, []).append(req)
            held_from = self._held_for_inflight.pop(req.request_id, None)
            if held_from is not None and len(hit) > held_from:
                shared = (len(hit) - held_from) * bs
                self.num_inflight_shared_admissions += 1
                self.num_inflight_shared_tokens += shared
                if first_admission:  # a part of its num_cached_tokens (prompt tokens)
                    req.num_inflight_shared_tokens = shared
            seqs.append(seq)
            budget -= len(seq.tokens)
        return budget

    def _offer_to_cache(self, req: Request) -> None:
        if self.prefix_cache is None:
            return
        full = req.num_computed_tokens // self.config.block_size
        if full > req.num_inserted_blocks:
            bs = self.config.block_size
            self.prefix_cache.insert(req.all_tokens[: full * bs], req.block_ids[:full], namespace=req.namespace)
            req.num_inserted_blocks = full

    def _release_blocks(self, req: Request) -> None:
        if req.block_ids:
            self.pool.release(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = 0
        req.num_inserted_blocks = 0

    def _preempt(self, req: Request, now: float) -> None:
        self.running.remove(req)
        self._offer_to_cache(req)  # its recompute then starts from a cache hit
        self._release_blocks(req)
        req.state = RequestState.WAITING
        req.waiting_since_s = now
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.insert(0, req)

    def _finish(self, req: Request, reason: FinishReason, state: RequestState) -> None:
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        if (self.retention is not None and req.session_id is not None and state is RequestState.FINISHED
                and req.num_inserted_blocks):
            self.retention.hold(req.session_id, req.block_ids[: req.num_inserted_blocks], self.clock())
        self._release_blocks(req)
        req.grammar = None
        req.state = state
        req.finish_reason = reason
        req.finish_s = self.clock()
        if req.drafter_started:
            req.drafter_started = False
            self._drafter_call(req, "end")
        if self.adaptive is not None:
            self.adaptive.end(req.request_id)
        self._pending_k.pop(req.request_id, None)
        self._backoff.pop(req.request_id, None)
        self._held_for_inflight.pop(req.request_id, None)
