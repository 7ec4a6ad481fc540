"""A generation request and its life cycle in the serving loop.

States: WAITING -> RUNNING -> FINISHED | ABORTED, and RUNNING -> WAITING on preemption. A running
request is "prefilling" while `num_computed_tokens < num_tokens - 1` and "decoding" once only its
newest token lacks KV; the scheduler treats both the same way (feed the tokens whose KV is missing),
which is what makes chunked prefill, prefix reuse and recompute-after-preemption one code path.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence

# Defined below the engine (which samples with them); re-exported here for serving code.
from agentinfer_jax.sampling_params import InvalidRequestError, SamplingParams

__all__ = ["RequestState", "FinishReason", "InvalidRequestError", "SamplingParams", "Request"]


class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS token or stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # cancelled, or failed validation after admission


@dataclasses.dataclass(eq=False)
class Request:
    """One generation call. Mutated only by the scheduler (and the loop that owns it)."""

    request_id: str
    prompt_tokens: list[int]
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    session_id: str | None = None  # agent session: its calls share a cached prefix
    namespace: str = ""  # prefix-cache isolation key (tenant or cache salt)
    priority: int = 0  # higher first where the policy honours it
    speculative: bool = False  # a short SPAgent action-speculation call
    arrival_s: float = 0.0
    # Tokens emitted regardless of the model's choice (trace replay): Scheduler.update applies them to
    # the model's tokens; the forward pass, the KV and costs stay real. The engine never sees them.
    forced_output: Sequence[int] | None = None
    # n > 1: the id of the sibling that computes the shared prompt; this request is admitted once
    # that sibling has computed the prompt's full blocks, and starts from them (shared, refcounted).
    fork_of: str | None = None

    state: RequestState = RequestState.WAITING
    output_tokens: list[int] = dataclasses.field(default_factory=list)
    block_ids: list[int] = dataclasses.field(default_factory=list)  # block i holds positions [i*bs, (i+1)*bs)
    num_computed_tokens: int = 0  # positions whose KV is in block_ids
    num_cached_tokens: int = 0  # of the prompt, found in the prefix cache at (first) admission
    num_inflight_shared_tokens: int = 0  # cache hits it waited for while a running request prefilled them
    num_inserted_blocks: int = 0  # leading full blocks already offered to the prefix cache
    num_preemptions: int = 0
    num_drafted: int = 0
    num_accepted: int = 0
    num_verify_steps: int = 0
    admitted_s: float | None = None  # first admission
    first_token_s: float | None = None
    last_token_s: float | None = None
    finish_s: float | None = None
    finish_reason: FinishReason | None = None
    waiting_since_s: float = 0.0
    stop_text: str | None = None  # output text cut before a matched stop string
    drafter_started: bool = False  # the drafter holds state for this request
    drafter_failed: bool = False  # the drafter raised or proposed garbage for it: no more drafts
    output_logprobs: list = dataclasses.field(default_factory=list)  # TokenLogprob per output token (logprobs on)
    token_counts: dict[int, int] = dataclasses.field(default_factory=dict)  # output token counts (penalties on)
    grammar: object | None = None  # the scheduler's GrammarMatcher (structured output), advanced per token

    def __post_init__(self) -> None:
        self.waiting_since_s = self.arrival_s

    @property
    def all_tokens(self) -> list[int]:
        return self.prompt_tokens + self.output_tokens

    def tokens_from(self, start: int) -> list[int]:
        """all_tokens[start:] without building all_tokens (the scheduler's per-step slice)."""
        n = len(self.prompt_tokens)
        if start >= n:
            return self.output_tokens[start - n:]
        return self.prompt_tokens[start:] + self.output_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_tokens) + len(self.output_tokens)

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_tokens - 1

    @property
    def done(self) -> bool:
        return self.state in (RequestState.FINISHED, RequestState.ABORTED)

    def validate(self, vocab_size: int, max_model_len: int) -> None:
        """Raises InvalidRequestError naming what is wrong with the request as submitted."""
        if not self.prompt_tokens:
            raise InvalidRequestError("prompt is empty")
        bad = [t for t in self.prompt_tokens if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        self.sampling.validate()
        self.sampling.validate_ids(vocab_size)
        if len(self.prompt_tokens) >= max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(self.prompt_tokens)} tokens; the context limit is {max_model_len}")
