"""An LLMClient backed by in-process ServingLoops: no HTTP, one loop per model role.

`EngineClient.complete` renders the chat template, tokenizes, submits `n` Requests (session id,
priority, speculative flag, stop strings and, for trace replay, `forced_output`) to the role's
ServingLoop and awaits them through the server's own thread-to-asyncio bridge
(`serving.streaming.RequestStream`). `stream` yields the text deltas of one request.

Invariants:
- every submitted request is finished, aborted or cancelled before `complete`/`stream` returns or
  raises (a cancelled awaiting task cancels its requests in the loop: no leaked KV blocks);
- bad arguments raise ValueError before anything is submitted; a request the engine aborts
  raises ClientError.

Replay: `replay(call) -> texts | None` (a `ReplayOracle`) may force the n outputs of a call. The
forward passes, KV writes, drafting and verification stay real; only the emitted tokens are the
recorded ones (see `Request.forced_output`), so costs are those of generating the recording.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

from agentinfer_jax.agents.clients import ClientError, Completion, Message, RecordedCall, validate_request
from agentinfer_jax.engine.engine import EngineConfig
from agentinfer_jax.serving.builder import ServerConfig, ServingStack, build_stack
from agentinfer_jax.serving.loop import ServingLoop, StreamEvent
from agentinfer_jax.serving.request import FinishReason, Request, SamplingParams
from agentinfer_jax.serving.streaming import RequestStream
from agentinfer_jax.tokenizer import Tokenizer

__all__ = ["EngineClient", "RoleEngine", "build_role_engine", "CallRecord", "EngineClientStats", "ReplayOracle"]

ReplayOracle = Callable[[RecordedCall], Sequence[str] | None]


# One model role's serving stack: the server's own (serving.builder), built in process.
RoleEngine = ServingStack


def build_role_engine(
    name: str,
    model,
    tokenizer: Tokenizer,
    engine_config: EngineConfig,
    *,
    policy: str = "fcfs",
    drafter=None,
    num_draft_tokens: int = 0,
    prefix_cache: bool = True,
    retention_ttl_s: float = 0.0,
    adaptive_draft: bool = True,
) -> RoleEngine:
    """`build_stack` for one role's model: `engine_config` sizes the engine, `drafter` (a Drafter
    object, with `num_draft_tokens` > 0) drafts, and the adaptive switch is on with it unless
    `adaptive_draft` is False. Stops on the model's EOS ids and the tokenizer's end of turn."""
    if (drafter is None) != (num_draft_tokens == 0):
        raise ValueError("give a drafter together with num_draft_tokens > 0, or neither")
    config = ServerConfig.from_engine_config(
        engine_config, model_name=name, policy=policy, prefix_cache=prefix_cache, retention_ttl_s=retention_ttl_s,
        drafter="custom" if drafter is not None else "none", num_draft_tokens=num_draft_tokens or 1,
        adaptive_draft=adaptive_draft)
    return build_stack(config, model=model, tokenizer=tokenizer, drafter=drafter)


@dataclasses.dataclass(frozen=True)
class CallRecord:
    """What one completed request produced (for lossless checks and accounting)."""

    session_id: str | None
    role: str
    speculative: bool
    prompt_tokens: int
    output_tokens: tuple[int, ...]
    text: str
    cached_tokens: int
    drafted: int
    accepted: int
    verify_steps: int
    finish_reason: str | None
    started_s: float = 0.0  # time.perf_counter() at submission
    finished_s: float = 0.0  # time.perf_counter() when the last event arrived


@dataclasses.dataclass
class EngineClientStats:
    """Totals over completed requests, per role and overall."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0
    by_role: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, r: CallRecord) -> None:
        self.requests += 1
        self.prompt_tokens += r.prompt_tokens
        self.cached_tokens += r.cached_tokens
        self.output_tokens += len(r.output_tokens)
        self.drafted += r.drafted
        self.accepted += r.accepted
        self.verify_steps += r.verify_steps
        self.by_role[r.role] = self.by_role.get(r.role, 0) + 1

    @property
    def kv_hit_rate(self) -> float:
        """Prompt tokens served from the prefix cache / prompt tokens."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def tokens_per_verify_step(self) -> float:
        """Tokens emitted per verification step (accepted drafts + the one verified token); 0 without drafting."""
        return (self.accepted + self.verify_steps) / self.verify_steps if self.verify_steps else 0.0


class EngineClient:
    """LLMClient over in-process ServingLoops keyed by role ("large", "small"); see module docstring.

    A role without its own loop falls back to `fallback_role` (default "large") when given;
    speculative calls go to `speculative_role`'s loop when it has one.
    The loops are not started or stopped here: their owner does that.
    """

    def __init__(
        self,
        loops: Mapping[str, ServingLoop],
        tokenizer: Tokenizer,
        *,
        replay: ReplayOracle | None = None,
        fallback_role: str | None = "large",
        namespace: str = "",
        keep_records: bool = True,
        speculative_role: str | None = None,
    ) -> None:
        if not loops:
            raise ValueError("EngineClient needs at least one ServingLoop")
        if fallback_role is not None and fallback_role not in loops:
            raise ValueError(f"fallback_role {fallback_role!r} has no loop (loops: {sorted(loops)})")
        self.loops = dict(loops)
        self.tokenizer = tokenizer
        self.replay = replay
        self.fallback_role = fallback_role
        self.namespace = namespace
        self.keep_records = keep_records
        # SPAgent's guesses may go to a cheaper model's loop (the speculative-action runs guess with one).
        self.speculative_role = speculative_role
        self.records: list[CallRecord] = []
        self.stats = EngineClientStats()
        self._ids = itertools.count()
        self._lock = threading.Lock()  # records/stats may be read from other threads
        self._prefix = f"ec{id(self):x}"

    def loop_for(self, role: str) -> tuple[str, ServingLoop]:
        if role in self.loops:
            return role, self.loops[role]
        if self.fallback_role is not None:
            return self.fallback_role, self.loops[self.fallback_role]
        raise ValueError(f"no serving loop for role {role!r} (loops: {sorted(self.loops)})")

    # ---- request construction ------------------------------------------------------------------

    def _requests(self, messages: list[Message], role: str, max_tokens: int, stop: list[str] | None,
                  temperature: float, n: int, session_id: str | None, priority: int,
                  speculative: bool, continue_final_message: bool = False) -> tuple[ServingLoop, list[Request], str]:
        validate_request(messages, role, max_tokens, n, temperature, continue_final_message)
        if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
            raise ValueError("stop must be a list of non-empty strings")
        use = self.speculative_role if speculative and self.speculative_role in self.loops else role
        served_role, loop = self.loop_for(use)
        prompt = self.tokenizer.encode_chat(messages, continue_final_message=continue_final_message)
        forced: list[list[int] | None] = [None] * n
        if self.replay is not None:
            call = RecordedCall([dict(m) for m in messages], role, max_tokens, stop, temperature, n, session_id,
                                priority, speculative, continue_final_message=continue_final_message)
            texts = self.replay(call)
            if texts is not None:
                if len(texts) != n:
                    raise ValueError(f"replay oracle gave {len(texts)} texts for n={n}")
                end = list(self.tokenizer.eos_token_ids[:1])  # the turn ends as the template ends it
                forced = [self.tokenizer.encode(t, add_bos=False) + end for t in texts]
        base = f"{self._prefix}-{next(self._ids)}"
        reqs = []
        for i in range(n):
            out = forced[i]
            budget = max(max_tokens, len(out)) if out is not None else max_tokens
            sampling = SamplingParams(max_tokens=budget, temperature=temperature, stop=tuple(stop or ()))
            reqs.append(Request(f"{base}-{i}", list(prompt), sampling, session_id=session_id,
                                namespace=self.namespace, priority=priority, speculative=speculative,
                                forced_output=out))
        return loop, reqs, served_role

    def _record(self, pending: RequestStream, ev: StreamEvent, role: str, started_s: float) -> CallRecord:
        req = pending.request
        rec = CallRecord(req.session_id, role, req.speculative, len(req.prompt_tokens), tuple(pending.token_ids),
                         ev.text or "", req.num_cached_tokens, req.num_drafted, req.num_accepted,
                         req.num_verify_steps, ev.finish_reason, started_s, time.perf_counter())
        with self._lock:
            self.stats.add(rec)
            if self.keep_records:
                self.records.append(rec)
        return rec

    @staticmethod
    def _check(ev: StreamEvent, request_id: str) -> None:
        if ev.error is not None:
            raise ClientError(f"request {request_id}: {ev.error}")
        if ev.finish_reason == FinishReason.ABORT.value:
            raise ClientError(f"request {request_id} was aborted by the serving loop")

    # ---- LLMClient -----------------------------------------------------------------------------

    async def complete(
        self,
        messages: list[Message],
        *,
        role: str = "large",
        max_tokens: int = 256,
        stop: list[str] | None = None,
        temperature: float = 0.0,
        n: int = 1,
        session_id: str | None = None,
        priority: int = 0,
        speculative: bool = False,
        continue_final_message: bool = False,
    ) -> Completion:
        loop, reqs, served_role = self._requests(messages, role, max_tokens, stop, temperature, n, session_id,
                                                 priority, speculative, continue_final_message)
        pending = [RequestStream(loop, r) for r in reqs]
        start = time.perf_counter()
        submitted: list[RequestStream] = []
        try:
            for p in pending:
                p.submit()  # raises InvalidRequestError (a ValueError) at once
                submitted.append(p)
            events = await asyncio.gather(*(p.final_event() for p in pending))
        finally:  # cancelled or failed part-way: no request keeps running unobserved
            for p in submitted:
                p.cancel_unless_finished()
        latency = time.perf_counter() - start
        for p, ev in zip(pending, events):
            self._check(ev, p.request_id)
        records = [self._record(p, ev, served_role, start) for p, ev in zip(pending, events)]
        return Completion(
            texts=[r.text for r in records],
            prompt_tokens=records[0].prompt_tokens,
            completion_tokens=sum(len(r.output_tokens) for r in records),
            latency_s=latency,
            cached_tokens=records[0].cached_tokens,
            model=served_role,
        )

    async def stream(
        self,
        messages: list[Message],
        *,
        role: str = "large",
        max_tokens: int = 256,
        stop: list[str] | None = None,
        temperature: float = 0.0,
        session_id: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[str]:
        """Yields text deltas of one request as the loop produces them. Closing the iterator early
        (break, cancellation) cancels the request in the serving loop."""
        loop, reqs, served_role = self._requests(messages, role, max_tokens, stop, temperature, 1, session_id,
                                                 priority, False)
        pending = RequestStream(loop, reqs[0])
        start = time.perf_counter()
        pending.submit()
        sent = ""
        try:
            while True:
                ev = await pending.next_event()
                if ev.error is None and ev.text is not None and ev.text.startswith(sent) and len(ev.text) > len(sent):
                    yield ev.text[len(sent):]
                    sent = ev.text
                if ev.finished:
                    self._check(ev, pending.request_id)
                    self._record(pending, ev, served_role, start)
                    return
        finally:
            pending.cancel_unless_finished()
