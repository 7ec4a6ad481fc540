"""AdaptiveSpeculation: thresholds, the cost model vs brute-force throughput, the EMA estimate."""

import random

import numpy as np
import pytest

from agentinfer_jax.cache import BlockPool, PrefixCache
from agentinfer_jax.serving.request import Request, SamplingParams
from agentinfer_jax.serving.scheduler import Scheduler, SchedulerConfig
from agentinfer_jax.speculation.adaptive import (AdaptiveSpeculation, MeasuredStepCost, StepCostTable,
                                                 linear_step_cost)


def test_choose_k_maximises_brute_force_throughput():
    rng = random.Random(0)
    for _ in range(20):
        fixed, per_tok, flat = rng.uniform(0.005, 0.02), rng.uniform(1e-5, 1e-3), rng.randrange(0, 256)
        cost = linear_step_cost(fixed, per_tok, flat)
        ad = AdaptiveSpeculation(cost, k_choices=(1, 2, 4, 8), max_batch_size=1024, probe_every=10**6)
        for _ in range(rng.randrange(0, 10)):
            p = rng.randrange(1, 9)
            ad.observe("r", p, rng.randrange(0, p + 1))
        batch = rng.randrange(1, 512)
        alpha = ad.alpha("r")
        # brute force: simulate expected tokens per step as a float64 sum over acceptance lengths
        def rate(k):
            exp = sum((i + 1) * (alpha ** i) * ((1 - alpha) if i < k else 1) for i in range(k + 1))
            return (batch - 1 + exp) / cost(batch, batch + k)
        best = max([0, 1, 2, 4, 8], key=rate)
        assert ad.choose_k("r", batch, 100) == best


def test_thresholds_and_probe():
    cheap = linear_step_cost(0.01, 0.0)  # verifying extra tokens is free: always draft
    ad = AdaptiveSpeculation(cheap, max_batch_size=8, max_context=1000)
    assert ad.choose_k("r", 4, 500) == 8
    assert ad.choose_k("r", 9, 500) == 0
    assert ad.choose_k("r", 4, 1001) == 0
    costly = linear_step_cost(0.01, 0.01)
    ad = AdaptiveSpeculation(costly, probe_every=4)
    for _ in range(5):
        ad.observe("r", 4, 0)
    ks = [ad.choose_k("r", 1, 10) for _ in range(8)]
    assert ks.count(0) == 6 and ks[3] == 1 and ks[7] == 1  # off, re-probed every 4th step


def test_alpha_ema_tracks_the_acceptance_probability():
    rng = random.Random(1)
    ad = AdaptiveSpeculation(linear_step_cost(0.01, 0.0), decay=0.98)
    true_alpha = 0.7
    for _ in range(2000):
        acc = 0
        while acc < 8 and rng.random() < true_alpha:
            acc += 1
        ad.observe("r", 8, acc)
    assert ad.alpha("r") == pytest.approx(true_alpha, abs=0.08)


@pytest.mark.parametrize("true_alpha", [0.05, 0.9])
def test_new_requests_start_from_the_workloads_pooled_acceptance(true_alpha):
    """After many requests, a fresh one starts near the pooled alpha: when drafts have not paid,
    it does not draft on its first step (the fixed 0.5 prior would), and when they have, it does."""
    rng = random.Random(2)
    # A 4-token verify costs 1.8x a decode step: worth it only if E(4) > 1.8, i.e. alpha > ~0.45.
    ad = AdaptiveSpeculation(linear_step_cost(0.01, 0.0025), k_choices=(4,), probe_every=10**6)
    assert ad.choose_k("first", 1, 10) == 4  # nothing observed yet: the 0.5 prior drafts
    for r in range(200):
        for _ in range(5):
            acc = 0
            while acc < 4 and rng.random() < true_alpha:
                acc += 1
            ad.observe(f"r{r}", 4, acc)
        ad.end(f"r{r}")
    assert ad.shared_alpha() == pytest.approx(true_alpha, abs=0.08)
    assert ad.alpha("fresh") == pytest.approx(true_alpha, abs=0.08)
    assert ad.choose_k("fresh", 1, 10) == (4 if true_alpha > 0.5 else 0)


def test_measured_default_k_choices_and_bad_k():
    assert AdaptiveSpeculation.measured(8).k_choices == [1, 2, 4, 8]
    assert AdaptiveSpeculation.measured(6).k_choices == [1, 2, 4, 6]
    assert isinstance(AdaptiveSpeculation.measured(1).step_cost, MeasuredStepCost)
    with pytest.raises(ValueError):
        AdaptiveSpeculation.measured(0)


def test_step_cost_table_interpolates_measurements():
    table = StepCostTable({1: {1: 0.010, 9: 0.012}, 8: {8: 0.011, 72: 0.020}})
    assert table(1, 5) == pytest.approx(0.011)
    assert table(4, 40) == pytest.approx(0.0155)  # snaps up to batch 8
    assert table(64, 8) == pytest.approx(0.011)
    with pytest.raises(ValueError):
        StepCostTable({})
    with pytest.raises(ValueError):
        AdaptiveSpeculation(table).observe("r", 2, 3)


def test_measured_step_cost_buckets_median_and_interpolation():
    cost = MeasuredStepCost(default_s=0.123, skip_first=False)
    assert cost(4, 100) == 0.123  # nothing measured yet
    cost.record(3, 20, 0.010)  # batch bucket 4, token bucket 32
    cost.record(4, 30, 0.020)  # same cell: the median of 0.010 and 0.020
    assert cost(4, 17) == pytest.approx(0.015)  # flat inside a padded bucket
    cost.record(4, 128, 0.055)
    assert cost(4, 64) == pytest.approx(0.015 + (0.055 - 0.015) * (64 - 32) / (128 - 32))
    assert cost(4, 1000) == pytest.approx(0.055) and cost(4, 1) == pytest.approx(0.015 / 32)
    assert cost(64, 32) == pytest.approx(0.015)  # unmeasured batch size: the nearest one
    cost.record(4, 0, 1.0)  # empty and untimed steps are ignored
    cost.record(4, 20, -1.0)
    assert cost(4, 20) == pytest.approx(0.015)
    with pytest.raises(ValueError):
        MeasuredStepCost(window=0)


def test_measured_step_cost_drops_each_cells_compiling_first_step():
    cost = MeasuredStepCost(default_s=0.123)
    cost.record(1, 1, 2.5)  # first step of this shape: compile time, dropped
    assert cost(1, 1) == 0.123
    cost.record(1, 1, 0.020)
    cost.record(1, 5, 3.0)  # token bucket 8: its own first step, dropped too
    cost.record(1, 6, 0.030)
    assert cost(1, 1) == pytest.approx(0.020) and cost(1, 8) == pytest.approx(0.030)


class ConstantDrafter:
    """Always drafts `token`; the test's target always emits 2."""

    def __init__(self, token):
        self.token = token

    def begin(self, rid, prompt, session_id=None):
        pass

    def extend(self, rid, toks):
        pass

    def propose(self, rid, k):
        return [self.token] * k

    def end(self, rid):
        pass


@pytest.mark.parametrize("draft_token, expect_drafting", [(2, True), (1, False)])
def test_scheduler_uses_the_adaptive_switch(draft_token, expect_drafting):
    """Verification tokens cost as much as a decode step here. Drafts the target confirms pay for
    themselves, so the switch keeps the full k; rejected ones drive alpha down and it turns drafting
    off (bar its periodic probes). Step times reach the cost model through observe_step, as the
    serving loop reports them."""
    cost = MeasuredStepCost()
    adaptive = AdaptiveSpeculation(cost, k_choices=(1, 2, 4), probe_every=8)
    cfg = SchedulerConfig(block_size=4, max_num_seqs=2, max_tokens_per_step=64, max_model_len=512,
                          vocab_size=64, num_draft_tokens=4)
    pool = BlockPool(200)
    sched = Scheduler(cfg, pool, PrefixCache(4, pool), drafter=ConstantDrafter(draft_token), adaptive=adaptive)
    sched.add_request(Request("r", [5, 6, 7], SamplingParams(max_tokens=400, ignore_eos=True)))
    drafted = []
    while sched.has_unfinished:
        out = sched.schedule()
        sched.observe_step(out, 0.01 * (1 + out.num_tokens))
        drafted += [s.num_draft for s in out.seqs]
        new = {}
        for s in out.seqs:
            if s.samples:  # the target emits 2: drafted 2s are accepted, then one more 2
                acc = next((i for i, t in enumerate(s.tokens[len(s.tokens) - s.num_draft:]) if t != 2), s.num_draft)
                new[s.request_id] = [2] * (acc + 1)
        sched.update(out, new)
    late = drafted[-40:]
    if expect_drafting:
        assert all(k == 4 for k in late[:-1])  # (the last step has no room left to draft)
    else:
        assert sum(k > 0 for k in late) <= len(late) // 8 + 1
    assert "r" not in adaptive._estimates  # ended with the request


def test_measured_step_cost_is_not_priced_by_a_few_slow_steps():
    """Interference only adds time: a minority of slow steps (a memory rebuild holding the GIL)
    must not make a bucket look expensive, or the switch would wrongly prefer verifying."""
    rng = np.random.default_rng(0)
    cost = MeasuredStepCost(skip_first=False)
    for _ in range(200):
        slow = rng.random() < 0.3
        cost.record(1, 1, (10e-3 if slow else 1e-3) * rng.uniform(0.95, 1.05))
    assert cost(1, 1) == pytest.approx(1e-3, rel=0.06)


class CostWithPenalty(StepCostTable):
    """A cost table plus the host time a verify step exposes (as MeasuredStepCost learns it)."""

    def __init__(self, measurements, penalty_s):
        super().__init__(measurements)
        self.sync_penalty_s = penalty_s


@pytest.mark.parametrize("alpha", [0.05, 0.3, 0.6, 0.8, 0.95])
@pytest.mark.parametrize("costs, penalty_ms", [
    ({1: 1.0, 2: 1.1, 4: 1.4, 8: 1.9, 16: 3.3}, 0.0),  # a CPU: verification soon costs compute
    ({1: 1.0, 2: 1.1, 4: 1.4, 8: 1.9, 16: 3.3}, 0.4),  # ... and exposes host time overlap hides
    ({1: 1.0, 16: 1.05}, 0.05),  # an accelerator: nearly flat
])
def test_drafts_to_keep_picks_the_prefix_that_pays_by_simulation(alpha, costs, penalty_ms):
    """Reference: Monte Carlo of a proposal whose tokens are each accepted with probability alpha
    given the earlier ones were; every prefix length's throughput (1 + accepted) / (cost + penalty)
    is simulated and the switch's choice must be within 2% of the best (0 = a plain step)."""
    rng = np.random.default_rng(int(alpha * 100) + len(costs))
    n = 8
    cost = CostWithPenalty({1: {t: c * 1e-3 for t, c in costs.items()}}, penalty_ms * 1e-3)
    expected = sum(alpha ** i for i in range(1, n + 1))
    first_reject = rng.geometric(1 - alpha, size=50_000) - 1  # accepted tokens before a rejection

    def simulated(j):
        if j == 0:
            return 1 / cost(1, 1)
        return (1 + np.minimum(first_reject, j).mean()) / (cost(1, 1 + j) + cost.sync_penalty_s)

    rates = [simulated(j) for j in range(n + 1)]
    keep = AdaptiveSpeculation(cost, k_choices=(n,)).drafts_to_keep(1, n, expected)
    assert 0 <= keep <= n
    assert rates[keep] >= 0.98 * max(rates), (keep, rates)


def test_drafts_to_keep_edges():
    ad = AdaptiveSpeculation(StepCostTable({1: {1: 1e-3, 9: 3e-3}}), k_choices=(8,))
    assert ad.drafts_to_keep(1, 0, 6.0) == 0  # nothing proposed: nothing to verify
    assert ad.drafts_to_keep(1, 8, 0.0) == 0 and ad.drafts_to_keep(1, 8, -1.0) == 0  # nothing expected
    assert ad.drafts_to_keep(1, 8, 8.0) == 8  # certain drafts: all of them
    assert ad.draft_budget(1, 100, 8) == 8 and ad.draft_budget(64, 100, 8) == 0  # past max_batch_size


def test_measured_step_cost_learns_the_sync_penalty_as_a_median():
    cost = MeasuredStepCost()
    assert cost.sync_penalty_s == 0.0
    for gap in (0.2e-3, 0.3e-3, 40e-3, 0.25e-3, -1.0):  # one stalled gap; a negative one is ignored
        cost.record_sync_gap(gap)
    assert cost.sync_penalty_s == pytest.approx(0.275e-3)


@pytest.mark.parametrize("max_batch, max_k, max_tokens", [(8, 8, 256), (6, 4, 64), (16, 8, 64), (1, 1, 16)])
def test_seeded_cells_price_every_step_the_switch_asks_about(max_batch, max_k, max_tokens):
    """After seeding the cells `cells_to_seed` names with a reference cost, every step the switch can
    price (batch 1..max_batch, a decode step to every sequence verifying max_k drafts, within the
    token budget) reads a seeded cell: no first choice rests on interpolation or optimism. A seeded
    cell's first served step counts (it is not a compiling one)."""
    rng = random.Random(max_batch * 100 + max_k)
    truth = {}
    cost = MeasuredStepCost()
    bucket = MeasuredStepCost._bucket
    for n, t in cost.cells_to_seed(max_batch, max_k, max_tokens):
        assert 1 <= n <= min(t, max_batch) and t <= max_tokens
        truth[bucket(n), bucket(t)] = rng.uniform(1e-3, 9e-3)
        cost.seed(n, t, truth[bucket(n), bucket(t)])
    for b in range(1, max_batch + 1):
        for t in range(b, min(max_tokens, b * (max_k + 1)) + 1):
            assert cost(b, t) == truth[bucket(b), bucket(t)], (b, t)
    cost.record(1, 1, 0.5)  # served: with the seed, the median of two samples moves
    assert cost(1, 1) == pytest.approx((truth[1, 1] + 0.5) / 2)


def test_step_cost_table_against_piecewise_linear_reference():
    """Random tables against np.interp inside the measured tokens and the end segments' slopes
    outside (a one-point curve: flat below its tokens, proportional above); batch sizes snap to
    the nearest measured one at or above, else the largest."""
    rng = np.random.default_rng(3)
    for _ in range(30):
        batches = sorted(rng.choice(np.arange(1, 65), size=int(rng.integers(1, 4)), replace=False).tolist())
        curves = {}
        for b in batches:
            toks = sorted(rng.choice(np.arange(1, 300), size=int(rng.integers(1, 5)), replace=False).tolist())
            curves[b] = {t: float(c) for t, c in zip(toks, np.sort(rng.uniform(1e-3, 9e-3, len(toks))))}
        table = StepCostTable(curves)
        for _ in range(20):
            b, t = int(rng.integers(1, 80)), int(rng.integers(0, 400))
            snap = next((x for x in batches if x >= b), batches[-1])
            xs = sorted(curves[snap])
            ys = [curves[snap][x] for x in xs]
            if len(xs) == 1:
                want = ys[0] * t / xs[0] if t > xs[0] else ys[0]
            elif t < xs[0]:
                want = ys[0] + (ys[1] - ys[0]) / (xs[1] - xs[0]) * (t - xs[0])
            elif t > xs[-1]:
                want = ys[-1] + (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) * (t - xs[-1])
            else:
                want = float(np.interp(t, xs, ys))
            assert table(b, t) == pytest.approx(max(want, 1e-12), rel=1e-9, abs=1e-15), (curves, b, t)
