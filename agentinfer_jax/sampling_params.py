"""How a request samples and when it stops: plain parameters shared by every layer.

Lives at the bottom of the package (no imports) so that the engine, which samples with them, does
not import serving, which owns the request life cycle (serving.request re-exports both names).
"""

from __future__ import annotations

import dataclasses
import hashlib

SEED_MAX = 2**32 - 1  # the engine's per-request seed is a uint32
INT32_MAX = 2**31 - 1  # the engine packs top_k as an int32
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def fold_seed(seed: int) -> int:
    """Any int64 seed as the engine's uint32: 0..2^32-1 unchanged, others hashed (deterministic).

    Raises InvalidRequestError outside the int64 range (the range OpenAI clients send).
    """
    if not INT64_MIN <= seed <= INT64_MAX:
        raise InvalidRequestError(f"seed must be a 64-bit integer, got {seed}")
    if 0 <= seed <= SEED_MAX:
        return seed
    digest = hashlib.blake2b(seed.to_bytes(8, "little", signed=True), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class InvalidRequestError(ValueError):
    """The request cannot be served as given (empty or over-long prompt, bad ids or parameters)."""


MAX_TOP_LOGPROBS = 20  # OpenAI's limit; the engine always computes this many and cuts per request
MAX_N = 16  # completions per request at most
STRUCTURED_KINDS = ("json_object", "json_schema", "regex", "lark")


@dataclasses.dataclass(frozen=True)
class StructuredOutput:
    """A grammar the output must follow (compiled by engine.structured with llguidance).

    kind: "json_object" (any JSON object; spec unused), "json_schema" (spec: the schema as JSON
    text), "regex" (spec: a regular expression) or "lark" (spec: an llguidance Lark grammar, e.g.
    `engine.structured.tool_call_grammar`).
    """

    kind: str
    spec: str = ""

    def validate(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise InvalidRequestError(f"structured output kind must be one of {STRUCTURED_KINDS}, got {self.kind!r}")
        if self.kind != "json_object" and not self.spec:
            raise InvalidRequestError(f"structured output of kind {self.kind!r} needs a spec")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop."""

    max_tokens: int = 64  # new tokens at most
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # nucleus mass; 1 = no cut
    seed: int | None = None  # per-request seed; sampling is reproducible given (seed, position)
    stop_token_ids: tuple[int, ...] = ()  # extra stop ids besides the model's EOS
    stop: tuple[str, ...] = ()  # stop strings (checked by the serving loop on decoded text)
    ignore_eos: bool = False  # keep going past EOS (benchmarks, forced replay)
    # Logprobs of each emitted token: None = off, k = the chosen token's logprob plus the k most
    # likely tokens' (0..MAX_TOP_LOGPROBS). Raw model logprobs: log_softmax of the model's logits,
    # before temperature, penalties, logit_bias and grammar masks (vLLM's default "raw_logprobs").
    logprobs: int | None = None
    # OpenAI penalties over the generated tokens: logit[t] -= frequency * count(t) + presence * (count(t) > 0).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit in [-100, 100])
    structured: StructuredOutput | None = None  # grammar the output must follow
    n: int = 1  # completions of the prompt (serving forks n requests that share the prompt's KV)

    def validate(self) -> None:
        if self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be positive, got {self.max_tokens}")
        if not self.temperature >= 0.0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.top_k <= INT32_MAX:
            raise InvalidRequestError(f"top_k must be in 0..{INT32_MAX}, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed <= SEED_MAX:
            raise InvalidRequestError(f"seed must be in 0..{SEED_MAX} (fold wider seeds with fold_seed), "
                                      f"got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {self.logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {value}")
        for tok, bias in self.logit_bias:
            if not -100.0 <= bias <= 100.0:
                raise InvalidRequestError(f"logit_bias for token {tok} must be in [-100, 100], got {bias}")
        if not 1 <= self.n <= MAX_N:
            raise InvalidRequestError(f"n must be in 1..{MAX_N}, got {self.n}")
        if self.structured is not None:
            self.structured.validate()

    def validate_ids(self, vocab_size: int) -> None:
        """The logit_bias token ids lie in the vocabulary."""
        for tok, _ in self.logit_bias:
            if not 0 <= tok < vocab_size:
                raise InvalidRequestError(f"logit_bias token id {tok} is outside the vocabulary [0, {vocab_size})")

    @property
    def penalized(self) -> bool:
        """Whether logits get an additive bias (penalties or logit_bias) before sampling."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
