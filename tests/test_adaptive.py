"""AdaptiveSpeculation: thresholds, the cost model vs brute-force throughput, the EMA estimate."""

import random

import pytest

from agentinfer_jax.speculation.adaptive import AdaptiveSpeculation, StepCostTable, linear_step_cost


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


def test_step_cost_table_interpolates_measurements():
    table = StepCostTable({1: {1: 0.010, 9: 0.012}, 8: {8: 0.011, 72: 0.020}})
    assert table(1, 5) == pytest.approx(0.011)
    assert table(4, 40) == pytest.approx(0.0155)  # snaps up to batch 8
    assert table(64, 8) == pytest.approx(0.011)
    with pytest.raises(ValueError):
        StepCostTable({})
    with pytest.raises(ValueError):
        AdaptiveSpeculation(table).observe("r", 2, 3)
