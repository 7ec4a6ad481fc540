"""Admission policies: the order in which the scheduler tries to admit waiting requests.

The scheduler builds one `Candidate` per waiting request and a `CacheView` of capacity, calls
`policy.order(waiting, cache, now_s)` and walks the result admitting the first feasible request
while its token budget and free blocks allow. Policies are pure functions of their inputs (plus
their constructor constants), cost O(n log n) and do no I/O.

Every policy sorts with the same outer keys and differs only in its own key:
1. `priority`, higher first (user priority classes are never reordered by a policy);
2. with `speculation_first=True`, speculative candidates (short SPAgent action-speculation calls)
   before the others, as SPAgent's between-request rule asks;
3. the policy's own key (arrival, prompt length, cached prefix, AgentSched score);
4. arrival time, then request id, so every order is deterministic.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["Candidate", "CacheView", "AdmissionPolicy", "FCFS", "SJF", "LPM", "AgentSched", "make_policy",
           "POLICY_NAMES"]


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One waiting request as the scheduler sees it this step."""

    request_id: str
    prompt_tokens: int  # full prompt length in tokens
    cached_blocks: int  # hit_i: prompt blocks already in the prefix cache (full blocks)
    need_blocks: int  # need_i: new blocks it must allocate to prefill the whole prompt
    wait_s: float  # time since it became waiting
    arrival_s: float  # arrival time (FCFS key)
    speculative: bool = False  # a short SPAgent speculative call (speculation-first ordering)
    priority: int = 0  # user priority (higher first; ties broken by the policy)

    def __post_init__(self) -> None:
        if min(self.prompt_tokens, self.cached_blocks, self.need_blocks) < 0:
            raise ValueError(f"candidate {self.request_id!r}: prompt_tokens, cached_blocks and need_blocks "
                             f"must be >= 0, got {self.prompt_tokens}, {self.cached_blocks}, {self.need_blocks}")
        if not (math.isfinite(self.wait_s) and math.isfinite(self.arrival_s)):
            raise ValueError(f"candidate {self.request_id!r}: wait_s and arrival_s must be finite")


@dataclasses.dataclass(frozen=True)
class CacheView:
    """KV capacity as the scheduler sees it."""

    free_blocks: int  # blocks on the free list
    evictable_blocks: int  # cached blocks only the prefix cache holds (can be evicted on demand)
    block_size: int

    def __post_init__(self) -> None:
        if self.free_blocks < 0 or self.evictable_blocks < 0:
            raise ValueError(f"free_blocks and evictable_blocks must be >= 0, got {self.free_blocks}, "
                             f"{self.evictable_blocks}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")


@runtime_checkable
class AdmissionPolicy(Protocol):
    """Orders waiting requests; the scheduler admits the first feasible one, repeatedly."""

    name: str

    def order(self, waiting: Sequence[Candidate], cache: CacheView, now_s: float) -> list[Candidate]: ...


class _SortedPolicy:
    """Shared sort: priority, optional speculation-first, the policy key, then FCFS."""

    name = "base"

    def __init__(self, *, speculation_first: bool = False) -> None:
        self.speculation_first = bool(speculation_first)

    def _key(self, c: Candidate) -> float:
        """Smaller first. Subclasses override; `_prepare` runs before, once per call."""
        raise NotImplementedError

    def _prepare(self, waiting: Sequence[Candidate], cache: CacheView, now_s: float) -> None:
        """Per-call state (e.g. the shadow price); default: none."""

    def order(self, waiting: Sequence[Candidate], cache: CacheView, now_s: float) -> list[Candidate]:
        self._prepare(waiting, cache, now_s)
        spec = self.speculation_first
        return sorted(waiting, key=lambda c: (-c.priority, spec and not c.speculative, self._key(c),
                                               c.arrival_s, c.request_id))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(speculation_first={self.speculation_first})"


class FCFS(_SortedPolicy):
    """First come, first served: earliest arrival first."""

    name = "fcfs"

    def _key(self, c: Candidate) -> float:
        return c.arrival_s


class SJF(_SortedPolicy):
    """Shortest job first on prompt length (tokens); ties in arrival order."""

    name = "sjf"

    def _key(self, c: Candidate) -> float:
        return c.prompt_tokens


class LPM(_SortedPolicy):
    """Longest prefix match first (SGLang's `lpm`): most cached prompt blocks first.

    Like SGLang it falls back to FCFS when more than `fcfs_threshold` requests wait, where matching
    every request against the radix tree each step would cost more than it wins.
    """

    name = "lpm"

    def __init__(self, *, fcfs_threshold: int = 128, speculation_first: bool = False) -> None:
        super().__init__(speculation_first=speculation_first)
        if fcfs_threshold < 0:
            raise ValueError(f"fcfs_threshold must be >= 0, got {fcfs_threshold}")
        self.fcfs_threshold = fcfs_threshold
        self._fcfs = False

    def _prepare(self, waiting: Sequence[Candidate], cache: CacheView, now_s: float) -> None:
        self._fcfs = len(waiting) > self.fcfs_threshold

    def _key(self, c: Candidate) -> float:
        return c.arrival_s if self._fcfs else -c.cached_blocks


def _sigmoid(x: float) -> float:
    """Overflow-free logistic function (x may be +-inf)."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


class AgentSched(_SortedPolicy):
    """AgentInfer's shadow-price admission (Alg. 3; the rule in papers/DETAILS.md).

    Per call, over the waiting queue:
        H = sum hit_i,  N = free (+ evictable) blocks,  U = max(0, N - H),  D = sum need_i,
        z = D / U  (U = 0: z = inf, the tightest state; D = 0: z = 0, nothing to fit),
        lambda = lambda_max * sigmoid(k * (z - 1)),  sjf_mix = clamp(1 - lambda / lambda_max, 0, 1),
        need_eff_i = sjf_mix * prompt_tokens_i / block_size + (1 - sjf_mix) * need_i,
        score_i = a * hit_i - (b + lambda) * need_eff_i + c * wait_i,   highest first.
    Loose capacity (z << 1): lambda ~ 0 and need_eff ~ the prompt length in blocks, so the rule is
    shortest-job-first (plus small a*hit and c*wait terms). Tight capacity (z >> 1): lambda ~
    lambda_max and only uncached blocks count, at a high price, so cache hits win.

    `include_evictable` (default True) counts evictable cached blocks in N. They are allocatable on
    demand, and the formula subtracts H from N: H's blocks are cached, so they are among the
    evictable (or running-held) blocks, never on the free list. With N = free blocks only, that
    subtraction would charge the hits twice and a large cached agent context would pin z at
    infinity even with an empty pool. With evictable blocks included, U is the capacity left after
    protecting the waiting requests' hits. (H sums per request, so a prefix shared by several
    waiting requests is counted once per request: U errs on the tight side.)

    Defaults (the paper publishes none; units are blocks and seconds): a = 8 (a cached block is
    worth eight uncached ones), b = 1 (one block of work), c = 4 per second waited (a 100-block
    difference in work is repaid after 25 s; see `starvation_bound_s`), k = 8 (lambda goes from 2%
    to 98% of lambda_max between z = 0.5 and z = 1.5), lambda_max = 8 (a new block costs 9x a
    block of prompt under pressure). Why a large a: in agent workloads a new session's first call
    is the shortest prompt in the queue, so with a small a (0.5 was our first choice) the SJF side
    admits new sessions ahead of returning ones, whose contexts are evicted while they wait. On
    FireAct sessions in the simulator (kv_hit_rate.py, docs/benchmarks) a = 0.5 cost 1.08-1.11x
    FCFS's mean session latency and a = 8 saved 16-22%; with no cache hits in the queue the
    order is still SJF's.
    `last_lambda`, `last_z` and `last_sjf_mix` hold the values of the latest `order()` call.
    """

    name = "agentsched"

    def __init__(self, *, a: float = 8.0, b: float = 1.0, c: float = 4.0, k: float = 8.0,
                 lambda_max: float = 8.0, include_evictable: bool = True,
                 speculation_first: bool = False) -> None:
        super().__init__(speculation_first=speculation_first)
        for nm, v in (("a", a), ("b", b), ("c", c), ("k", k), ("lambda_max", lambda_max)):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"AgentSched: {nm} must be a finite number >= 0, got {v!r}")
        if lambda_max <= 0 or k <= 0:
            raise ValueError(f"AgentSched: lambda_max and k must be > 0, got {lambda_max}, {k}")
        self.a, self.b, self.c, self.k, self.lambda_max = float(a), float(b), float(c), float(k), float(lambda_max)
        self.include_evictable = bool(include_evictable)
        self.last_lambda = 0.0
        self.last_z = 0.0
        self.last_sjf_mix = 1.0
        self._block_size = 1

    def shadow_price(self, waiting: Sequence[Candidate], cache: CacheView) -> tuple[float, float]:
        """(z, lambda) for this queue and capacity."""
        hits = sum(c.cached_blocks for c in waiting)
        demand = sum(c.need_blocks for c in waiting)
        capacity = cache.free_blocks + (cache.evictable_blocks if self.include_evictable else 0)
        usable = max(0, capacity - hits)
        if demand == 0:
            z = 0.0
        elif usable == 0:
            z = math.inf
        else:
            z = demand / usable
        return z, self.lambda_max * _sigmoid(self.k * (z - 1.0))

    def _prepare(self, waiting: Sequence[Candidate], cache: CacheView, now_s: float) -> None:
        z, lam = self.shadow_price(waiting, cache)
        self.last_z, self.last_lambda = z, lam
        self.last_sjf_mix = min(1.0, max(0.0, 1.0 - lam / self.lambda_max))
        self._block_size = cache.block_size

    def score(self, c: Candidate) -> float:
        """score_i under the shadow price of the latest `order()` call."""
        mix = self.last_sjf_mix
        need_eff = mix * (c.prompt_tokens / self._block_size) + (1.0 - mix) * c.need_blocks
        return self.a * c.cached_blocks - (self.b + self.last_lambda) * need_eff + self.c * c.wait_s

    def _key(self, c: Candidate) -> float:
        return -self.score(c)

    def starvation_bound_s(self, max_prompt_blocks: int) -> float:
        """Seconds of waiting after which any request outranks every newly arrived one.

        A fresh request (wait 0) scores at most a * M; a request whose prompt has at most M blocks
        scores at least -(b + lambda_max) * M + c * wait. So once wait > (a + b + lambda_max) * M / c
        it is ordered first, whatever the queue and the shadow price (given c > 0), within its
        priority class and speculation class (those outer keys come first).
        """
        if self.c == 0:
            return math.inf
        return (self.a + self.b + self.lambda_max) * max_prompt_blocks / self.c

    def __repr__(self) -> str:
        return (f"AgentSched(a={self.a}, b={self.b}, c={self.c}, k={self.k}, lambda_max={self.lambda_max}, "
                f"include_evictable={self.include_evictable}, speculation_first={self.speculation_first})")


_POLICIES: dict[str, type[_SortedPolicy]] = {"fcfs": FCFS, "sjf": SJF, "lpm": LPM, "agentsched": AgentSched}
POLICY_NAMES: tuple[str, ...] = tuple(_POLICIES)


def make_policy(name: str, **kwargs: Any) -> AdmissionPolicy:
    """Builds a policy by name (fcfs, sjf, lpm, agentsched; case and '-'/'_' insensitive)."""
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in _POLICIES:
        raise ValueError(f"unknown admission policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    try:
        return _POLICIES[key](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad options for policy {key!r}: {e}") from e
