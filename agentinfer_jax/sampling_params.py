"""How a request samples and when it stops: plain parameters shared by every layer.

Lives at the bottom of the package (no imports) so that the engine, which samples with them, does
not import serving, which owns the request life cycle (serving.request re-exports both names).
"""

from __future__ import annotations

import dataclasses
import hashlib

SEED_MAX = 2**32 - 1  # the engine's per-request seed is a uint32
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

    def validate(self) -> None:
        if self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be positive, got {self.max_tokens}")
        if not self.temperature >= 0.0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed <= SEED_MAX:
            raise InvalidRequestError(f"seed must be in 0..{SEED_MAX} (fold wider seeds with fold_seed), "
                                      f"got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
