"""Adaptive speculation switch: chooses the draft length k (0 = off) per request and step.

Two hard thresholds (defaults are conservative starting points; the papers publish none):
- `max_batch_size` (default 32): at larger batches a decode step is compute-bound and verifying
  drafts steals throughput from other requests.
- `max_context` (default 32768 tokens): very long contexts make each verified token's attention
  expensive and automata large.

Below them, a cost model. Each request keeps a running estimate of its per-token acceptance
probability alpha (geometric model: every draft token is accepted with probability alpha given the
earlier ones were), as exponentially weighted counts of accepted tokens and of trials:
`S <- d*S + accepted`, `T <- d*T + accepted + [accepted < proposed]`, alpha = S / T; a new
request starts from the same counts pooled over all requests (decay `shared_decay`), worth
`prior_weight` trials, so short requests do not each pay to relearn what the workload already
showed (`prior_alpha` until anything is observed). With k draft tokens a step yields
E(k) = 1 + alpha + ... + alpha^k tokens for this request. The engine provides
`step_cost(batch_size, tokens_fed) -> seconds` (measured). Feeding this request k more tokens
slows the whole step from cost(B, n) to cost(B, n + k) plus the host time a verify step exposes
(below), so the step yields (B - 1 + E(k)) / (cost(B, n + k) + penalty) tokens per second; the
switch picks the k that maximises it (k = 0 when nothing beats plain decoding). A request switched
off is re-probed with the smallest k every `probe_every` steps so its estimate can recover. A
drafter that scores its own proposals (`expected_accepted`, AgentSAM's calibrator) then has each
proposal judged on that score (`drafts_to_keep`): a weak one is cut to the prefix that pays, or
dropped, before it costs a verification. A verify step also exposes the host work that overlap
hides behind a plain step; `MeasuredStepCost` learns that gap and both judgements add it to the
verify step's cost.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import statistics
from collections.abc import Callable, Mapping, Sequence

StepCost = Callable[[int, int], float]


class StepCostTable:
    """Step cost (seconds) vs (batch size, tokens fed), linear interpolation between measurements.

    Batch sizes snap to the nearest measured one at or above (or the largest); tokens interpolate
    linearly and extrapolate with the last segment's slope.
    """

    def __init__(self, measurements: Mapping[int, Mapping[int, float]]) -> None:
        if not measurements:
            raise ValueError("StepCostTable needs at least one batch size")
        self._batches = sorted(measurements)
        self._curves: dict[int, tuple[list[int], list[float]]] = {}
        for b, curve in measurements.items():
            if not curve or any(t < 1 or c <= 0 for t, c in curve.items()):
                raise ValueError(f"batch {b}: need (tokens >= 1 -> seconds > 0) measurements")
            toks = sorted(curve)
            self._curves[b] = (toks, [float(curve[t]) for t in toks])

    def __call__(self, batch_size: int, tokens_fed: int) -> float:
        i = min(bisect.bisect_left(self._batches, batch_size), len(self._batches) - 1)
        toks, costs = self._curves[self._batches[i]]
        if len(toks) == 1:
            return costs[0] * max(tokens_fed, 1) / toks[0] if tokens_fed > toks[0] else costs[0]
        j = min(max(bisect.bisect_left(toks, tokens_fed), 1), len(toks) - 1)
        t0, t1, c0, c1 = toks[j - 1], toks[j], costs[j - 1], costs[j]
        return max(c0 + (c1 - c0) * (tokens_fed - t0) / (t1 - t0), 1e-12)


class MeasuredStepCost:
    """Step cost learned online from the serving loop's timed steps (`record`).

    The engine pads each step to one of a few token buckets, so a step's cost is flat inside a
    bucket and jumps between them: verifying k more tokens is free when it stays in the bucket.
    Cells are (batch-size bucket, token bucket), both powers of two, each the median of its last
    `window` measured seconds: interference (another thread holding the GIL, a memory rebuild, a
    busy core) only ever adds time, so a mean would let a few slow steps price a whole bucket. A
    query reads its cell, else interpolates linearly in tokens between the nearest measured cells
    of its batch bucket (below them proportionally, above them flat: each unmeasured side looks
    worth a try, so it gets measured), else uses the nearest batch bucket; with no measurement at
    all every cost is `default_s`, so drafting starts on and the measurements decide.

    `skip_first` (default) drops each cell's first measurement: a jitted engine compiles a shape
    bucket on its first step, and one compile-inflated sample (seconds instead of milliseconds)
    would make that bucket look unaffordable, and so never chosen and never re-measured.
    """

    def __init__(self, window: int = 32, default_s: float = 1e-3, skip_first: bool = True) -> None:
        if window < 1 or not default_s > 0:
            raise ValueError("need window >= 1 and default_s > 0")
        self.window, self.default_s, self.skip_first = window, default_s, skip_first
        self._samples: dict[tuple[int, int], collections.deque[float]] = {}
        self._cells: dict[int, dict[int, float]] = {}  # batch bucket -> token bucket -> median seconds
        self._seen: set[tuple[int, int]] = set()  # cells whose first (compiling) step was dropped
        self._gaps: collections.deque[float] = collections.deque(maxlen=window)
        self.sync_penalty_s = 0.0  # median host time a verify step exposes (see record_sync_gap)

    def record_sync_gap(self, seconds: float) -> None:
        """Host time between the previous result and a verify step's dispatch: with host/device
        overlap a plain step hides it, a verify step cannot (its accepted count decides the next
        feed), so drafting is priced at the step's device cost plus this."""
        if seconds >= 0:
            self._gaps.append(float(seconds))
            self.sync_penalty_s = statistics.median(self._gaps)

    @staticmethod
    def _bucket(n: int) -> int:
        return 1 << max(0, int(n) - 1).bit_length()

    def record(self, batch_size: int, tokens_fed: int, seconds: float) -> None:
        if batch_size < 1 or tokens_fed < 1 or not seconds > 0:
            return  # empty or untimed steps carry no information
        b, t = self._bucket(batch_size), self._bucket(tokens_fed)
        if self.skip_first and (b, t) not in self._seen:
            self._seen.add((b, t))
            return
        samples = self._samples.setdefault((b, t), collections.deque(maxlen=self.window))
        samples.append(float(seconds))
        self._cells.setdefault(b, {})[t] = statistics.median(samples)

    def seed(self, batch_size: int, tokens_fed: int, seconds: float) -> None:
        """A sample timed before serving (the shape is compiled): it counts at once, and the cell's
        first served step is no longer dropped as a compiling one. Served samples outvote it."""
        self._seen.add((self._bucket(batch_size), self._bucket(tokens_fed)))
        self.record(batch_size, tokens_fed, seconds)

    def cells_to_seed(self, max_batch_size: int, max_k: int, max_tokens: int) -> list[tuple[int, int]]:
        """(batch size, tokens) at every cell the switch reads for batches up to `max_batch_size`
        and drafts up to `max_k`: power-of-two batches, and power-of-two token counts from a plain
        decode step (one per sequence) to every sequence verifying max_k drafts."""
        out = []
        b = 1
        while b <= self._bucket(max_batch_size):
            n, t = min(b, max_batch_size), b  # the top bucket holds up to max_batch_size
            while t <= min(max_tokens, self._bucket(n * (max_k + 1))):
                out.append((n, t))
                t *= 2
            b *= 2
        return out

    def __call__(self, batch_size: int, tokens_fed: int) -> float:
        if not self._cells:
            return self.default_s
        b = self._bucket(batch_size)
        if b not in self._cells:
            b = min(self._cells, key=lambda x: (abs(x.bit_length() - b.bit_length()), x))
        row = self._cells[b]
        t = self._bucket(tokens_fed)
        if t in row:
            return row[t]
        toks = sorted(row)
        j = bisect.bisect_left(toks, t)
        if j == 0:
            # Fewer tokens than ever measured: proportional (pessimistic for drafting, so the
            # switch runs a step without drafts and measures it).
            return row[toks[0]] * t / toks[0]
        if j == len(toks):
            return row[toks[-1]]  # more: flat (optimistic, so a larger k gets tried and measured)
        t0, t1 = toks[j - 1], toks[j]
        return row[t0] + (row[t1] - row[t0]) * (t - t0) / (t1 - t0)


def _geometric_rate(expected: float, n: int) -> float:
    """The per-token acceptance rate a with a + a^2 + ... + a^n = expected (0 <= expected <= n)."""
    if expected >= n:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(24):  # bisection: the sum rises with a; 2^-24 is far below the score's noise
        mid = 0.5 * (lo + hi)
        if mid * (1.0 - mid ** n) / (1.0 - mid) < expected:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def linear_step_cost(fixed_s: float, per_token_s: float, flat_tokens: int = 0) -> StepCost:
    """A roofline-like cost: `fixed_s` up to `flat_tokens` tokens (memory-bound), then linear."""
    if fixed_s <= 0 or per_token_s < 0 or flat_tokens < 0:
        raise ValueError("need fixed_s > 0, per_token_s >= 0, flat_tokens >= 0")
    return lambda batch_size, tokens_fed: fixed_s + per_token_s * max(tokens_fed - flat_tokens, 0)


@dataclasses.dataclass
class _Estimate:
    successes: float
    trials: float
    steps_off: int = 0
    accepted_ema: float = 0.0


class AdaptiveSpeculation:
    """Per-request choice of k (see module docstring)."""

    def __init__(self, step_cost: StepCost, *, k_choices: Sequence[int] = (1, 2, 4, 8),
                 max_batch_size: int = 32, max_context: int = 32768, decay: float = 0.8,
                 prior_alpha: float = 0.5, prior_weight: float = 2.0, probe_every: int = 16,
                 shared_decay: float = 0.99) -> None:
        if not k_choices or any(k < 1 for k in k_choices):
            raise ValueError(f"k_choices must be non-empty positive ints, got {k_choices}")
        if not 0 < decay < 1 or not 0 < shared_decay < 1 or not 0 < prior_alpha < 1 or prior_weight <= 0:
            raise ValueError("need 0 < decay < 1, 0 < shared_decay < 1, 0 < prior_alpha < 1, prior_weight > 0")
        if max_batch_size < 1 or max_context < 1 or probe_every < 1:
            raise ValueError("max_batch_size, max_context and probe_every must be >= 1")
        self.step_cost = step_cost
        self.k_choices = sorted(set(k_choices))
        self.max_batch_size, self.max_context = max_batch_size, max_context
        self.decay, self.probe_every = decay, probe_every
        self.prior_alpha, self.prior_weight, self.shared_decay = prior_alpha, prior_weight, shared_decay
        self._shared = [0.0, 0.0]  # pooled (successes, trials) over every request
        self._estimates: dict[str, _Estimate] = {}

    @classmethod
    def measured(cls, max_k: int, max_batch_size: int = 32, step_cost: StepCost | None = None) -> AdaptiveSpeculation:
        """The serving default: k in powers of two up to `max_k` (and `max_k` itself), step costs
        learned online by a `MeasuredStepCost` (fed through `Scheduler.observe_step`), or priced by
        a fixed `step_cost` (e.g. another device's cost model, for a projection)."""
        if max_k < 1:
            raise ValueError(f"max_k must be >= 1, got {max_k}")
        k_choices = sorted({min(1 << i, max_k) for i in range(max_k.bit_length())} | {max_k})
        return cls(step_cost or MeasuredStepCost(), k_choices=k_choices, max_batch_size=max_batch_size)

    def _get(self, request_id: str) -> _Estimate:
        est = self._estimates.get(request_id)
        if est is None:
            alpha = self.shared_alpha()
            est = self._estimates[request_id] = _Estimate(alpha * self.prior_weight, self.prior_weight)
        return est

    def shared_alpha(self) -> float:
        """Acceptance estimate pooled over all requests: a new request's starting point."""
        s, t = self._shared
        return s / t if t > 0 else self.prior_alpha

    def alpha(self, request_id: str) -> float:
        """Current per-token acceptance estimate of a request."""
        est = self._get(request_id)
        return est.successes / est.trials

    def accepted_per_step(self, request_id: str) -> float:
        """EMA of accepted draft tokens per verify step (for metrics)."""
        return self._get(request_id).accepted_ema

    def observe(self, request_id: str, proposed: int, accepted: int) -> None:
        """Records a verify step: `proposed` draft tokens, of which the first `accepted` matched."""
        if proposed < 0 or not 0 <= accepted <= proposed:
            raise ValueError(f"need 0 <= accepted <= proposed, got accepted={accepted}, proposed={proposed}")
        if proposed == 0:
            return
        est = self._get(request_id)
        d = self.decay
        est.successes = d * est.successes + accepted
        est.trials = d * est.trials + accepted + (1 if accepted < proposed else 0)
        est.accepted_ema = d * est.accepted_ema + (1 - d) * accepted
        g = self.shared_decay
        self._shared[0] = g * self._shared[0] + accepted
        self._shared[1] = g * self._shared[1] + accepted + (1 if accepted < proposed else 0)

    @staticmethod
    def expected_tokens(alpha: float, k: int) -> float:
        """E[tokens per step] = 1 + alpha + ... + alpha^k under the geometric acceptance model."""
        return float(sum(alpha ** i for i in range(k + 1)))

    def choose_k(self, request_id: str, batch_size: int, context_len: int, max_k: int | None = None,
                 tokens_fed: int | None = None) -> int:
        """Draft length for this request's next step (0 = do not draft).

        `tokens_fed`: tokens the step feeds without this request's drafts (default: batch_size).
        """
        if batch_size < 1 or context_len < 0:
            raise ValueError(f"need batch_size >= 1 and context_len >= 0, got {batch_size}, {context_len}")
        if batch_size > self.max_batch_size or context_len > self.max_context:
            return 0
        choices = [k for k in self.k_choices if max_k is None or k <= max_k]
        if not choices:
            return 0
        base = batch_size if tokens_fed is None else tokens_fed
        alpha = self.alpha(request_id)
        penalty = getattr(self.step_cost, "sync_penalty_s", 0.0)
        best_k, best = 0, batch_size / self.step_cost(batch_size, base)
        for k in choices:
            cost = self.step_cost(batch_size, base + k) + penalty
            rate = (batch_size - 1 + self.expected_tokens(alpha, k)) / cost
            if rate > best:
                best_k, best = k, rate
        est = self._get(request_id)
        if best_k == 0:
            est.steps_off += 1
            if est.steps_off >= self.probe_every:
                est.steps_off = 0
                return choices[0]
        else:
            est.steps_off = 0
        return best_k

    def draft_budget(self, batch_size: int, context_len: int, max_k: int) -> int:
        """The k to ask a drafter that scores its own proposals for: `max_k` below the hard
        thresholds (its proposal is then judged by `drafts_to_keep`), else 0."""
        if batch_size > self.max_batch_size or context_len > self.max_context:
            return 0
        return max(0, max_k)

    def drafts_to_keep(self, batch_size: int, num_drafts: int, expected_accepted: float,
                       tokens_fed: int | None = None) -> int:
        """How many of a proposal's `num_drafts` tokens to verify (0: none), judged by the drafter's
        own calibrated `expected_accepted` tokens for the whole proposal (the per-request alpha
        that chose k is an average over proposals; a drafter that knows this one is weak saves the
        verification). The proposal's acceptance is taken as geometric with the per-token rate
        that gives `expected_accepted` over `num_drafts` tokens, and the prefix kept is the one
        whose step throughput (batch + expected accepted of the prefix) / (cost + sync penalty)
        is highest, when it beats a plain step's. `tokens_fed`: the step's tokens without these
        drafts (default: batch_size)."""
        if num_drafts < 1 or not expected_accepted > 0:
            return 0
        base = batch_size if tokens_fed is None else tokens_fed
        rate = _geometric_rate(min(expected_accepted, num_drafts), num_drafts)
        penalty = getattr(self.step_cost, "sync_penalty_s", 0.0)
        best_n, best = 0, batch_size / self.step_cost(batch_size, base)
        expected = 0.0
        for n in range(1, num_drafts + 1):
            expected += rate ** n
            throughput = (batch_size + expected) / (self.step_cost(batch_size, base + n) + penalty)
            if throughput > best:
                best_n, best = n, throughput
        return best_n

    def end(self, request_id: str) -> None:
        self._estimates.pop(request_id, None)
