"""Step cost model: NNLS against brute force, recovery of known coefficients from noisy synthetic
steps, held-out relative error, the roofline prior against hand-computed numbers, persistence."""

from __future__ import annotations

import itertools
import json
import types

import numpy as np
import pytest

from agentinfer_jax.model.config import ModelConfig
from agentinfer_jax.workloads.cost_model import (DEVICES, FEATURE_NAMES, StepCostModel, StepFeatures, holdout_report,
                                                 nnls)

LLAMA3_8B = {"num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
             "intermediate_size": 14336, "vocab_size": 128256}


def brute_force_nnls(a, b):
    """Try every support set: the NNLS optimum is the unconstrained least squares on its support."""
    best, best_x = np.inf, np.zeros(a.shape[1])
    for r in range(a.shape[1] + 1):
        for support in itertools.combinations(range(a.shape[1]), r):
            x = np.zeros(a.shape[1])
            if support:
                x[list(support)] = np.linalg.lstsq(a[:, support], b, rcond=None)[0]
            if np.all(x >= -1e-12):
                res = np.linalg.norm(a @ x - b)
                if res < best:
                    best, best_x = res, x
    return best_x


def test_nnls_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(60):
        m, n = int(rng.integers(8, 40)), int(rng.integers(1, 6))
        a = rng.normal(size=(m, n)) * 10.0 ** rng.uniform(-3, 5, size=n)
        b = rng.normal(size=m) * rng.uniform(0.1, 50)
        x, ref = nnls(a, b), brute_force_nnls(a, b)
        assert np.all(x >= 0)
        assert np.linalg.norm(a @ x - b) <= np.linalg.norm(a @ ref - b) * (1 + 1e-9) + 1e-12


def test_nnls_matches_scipy():
    so = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(1)
    for _ in range(40):
        a = rng.normal(size=(50, 6)) * 10.0 ** rng.uniform(-2, 6, size=6)
        b = rng.normal(size=50)
        ref, _ = so.nnls(a, b)
        assert np.linalg.norm(a @ nnls(a, b) - b) == pytest.approx(np.linalg.norm(a @ ref - b), rel=1e-9)


def random_step(rng) -> StepFeatures:
    """A mixed step: a few prefill chunks and some decode/verify sequences with random contexts."""
    seqs = []
    for _ in range(int(rng.integers(0, 4))):
        q = int(rng.integers(16, 1024))
        seqs.append((q, q + int(rng.integers(0, 6000)), True))
    for _ in range(int(rng.integers(0 if seqs else 1, 64))):
        q = 1 + int(rng.choice([0, 0, 4, 8]))  # plain decode or draft verification
        seqs.append((q, q + int(rng.integers(0, 8000)), False))
    return StepFeatures.from_sequences(seqs)


def synthetic_truth(rng, steps) -> np.ndarray:
    """Coefficients under which every term carries a sizeable share of the mean step time."""
    x = np.array([s.vector() for s in steps])
    share = rng.dirichlet(np.ones(len(FEATURE_NAMES))) * 0.7 + 0.3 / len(FEATURE_NAMES)
    return share * 0.02 / x.mean(axis=0)  # mean step ~ 20 ms


def test_fit_recovers_exact_coefficients_without_noise():
    rng = np.random.default_rng(2)
    steps = [random_step(rng) for _ in range(120)]
    truth = synthetic_truth(rng, steps)
    model = StepCostModel.fit([(s, float(s.vector() @ truth)) for s in steps])
    np.testing.assert_allclose(model.coef, truth, rtol=1e-6)


@pytest.mark.parametrize("seed", [3, 4])
def test_fit_recovers_known_coefficients_from_noisy_steps(seed):
    rng = np.random.default_rng(seed)
    steps = [random_step(rng) for _ in range(600)]
    truth = synthetic_truth(rng, steps)
    truth[int(rng.integers(1, len(truth)))] = 0.0  # a term the device does not pay: NNLS keeps it >= 0
    noise = rng.lognormal(0.0, 0.03, size=len(steps))  # 3% multiplicative timing noise
    samples = [(s, float(s.vector() @ truth) * e) for s, e in zip(steps, noise)]
    model, report = holdout_report(samples, holdout_frac=0.25, seed=seed)
    assert np.all(model.coef >= 0)
    # Each term's contribution to the mean step is recovered to a few percent of the mean step.
    x = np.array([s.vector() for s in steps])
    contrib_err = np.abs(model.coef - truth) * x.mean(axis=0) / float((x @ truth).mean())
    assert contrib_err.max() < 0.05, dict(zip(FEATURE_NAMES, contrib_err))
    assert report["n"] == 150
    assert report["mean_rel_err"] < 0.04 and report["p90_rel_err"] < 0.08 and report["max_rel_err"] < 0.15


def test_relative_weighting_fits_short_steps():
    rng = np.random.default_rng(5)
    steps = [random_step(rng) for _ in range(300)]
    truth = synthetic_truth(rng, steps)
    # A hidden term (not a feature) that only short steps see: relative fitting spreads the error.
    secs = [float(s.vector() @ truth) + 0.002 * (s.num_seqs < 8) for s in steps]
    short = [(s, t) for s, t in zip(steps, secs) if s.num_seqs < 8]
    rel = StepCostModel.fit(list(zip(steps, secs)), relative=True).evaluate(short)["mean_rel_err"]
    absl = StepCostModel.fit(list(zip(steps, secs)), relative=False).evaluate(short)["mean_rel_err"]
    assert rel < absl


def test_features_from_sequences_and_scheduler_output():
    rng = np.random.default_rng(6)
    seqs = [(int(q), int(q + rng.integers(0, 500)), bool(p)) for q, p in zip(rng.integers(1, 64, 20),
                                                                               rng.integers(0, 2, 20))]
    f = StepFeatures.from_sequences(seqs)
    assert f.num_seqs == 20
    assert f.prefill_tokens == sum(q for q, _, p in seqs if p)
    assert f.decode_tokens == sum(q for q, _, p in seqs if not p)
    assert f.attn_ctx_tokens == sum(q * k for q, k, _ in seqs)
    assert f.kv_read_tokens == sum(k for _, k, _ in seqs)
    seq = types.SimpleNamespace
    out = seq(seqs=[seq(tokens=[1] * 30, start_pos=0, num_draft=0), seq(tokens=[5], start_pos=99, num_draft=0),
                    seq(tokens=[5, 6, 7], start_pos=40, num_draft=2)])
    g = StepFeatures.from_scheduler_output(out)
    assert (g.prefill_tokens, g.decode_tokens, g.num_seqs) == (30, 4, 3)
    assert g.attn_ctx_tokens == 30 * 30 + 100 + 3 * 43 and g.kv_read_tokens == 30 + 100 + 43
    model = StepCostModel(rng.uniform(0, 1e-3, len(FEATURE_NAMES)))
    np.testing.assert_allclose(model.predict([f, g]), [model.predict(f), model.predict(g)])


def test_roofline_prior_matches_hand_computation():
    model = StepCostModel.default_for(LLAMA3_8B, "h100")
    h100 = DEVICES["h100"]
    # Llama 3 8B has 8.03e9 parameters; the input embedding (128256 x 4096) is never a matmul.
    matmul_params = 8.03e9 - 128256 * 4096
    decode_1 = model.predict(StepFeatures.from_sequences([(1, 128, False)]))
    assert decode_1 == pytest.approx(matmul_params * 2 / (0.8 * h100.mem_bytes_per_s), rel=0.1)  # memory bound
    prefill = model.predict(StepFeatures.from_sequences([(4096, 4096, True)]))
    assert prefill == pytest.approx(2 * matmul_params * 4096 / (0.5 * h100.peak_flops), rel=0.15)  # compute bound
    # KV bytes: 32 layers x 8 kv heads x 128 dims x K and V x 2 bytes per context token.
    assert model.coefficients["kv_read_tokens"] == pytest.approx(32 * 8 * 128 * 2 * 2 / (0.8 * h100.mem_bytes_per_s))
    # A faster memory makes decode faster, a slower chip makes prefill slower.
    assert StepCostModel.default_for(LLAMA3_8B, "h200").predict(StepFeatures(0, 1, 1, 128, 128)) < decode_1
    assert StepCostModel.default_for(LLAMA3_8B, "cpu").predict(StepFeatures(4096, 0, 1, 4096**2, 4096)) > prefill
    obj = ModelConfig(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                      intermediate_size=14336, vocab_size=128256)
    np.testing.assert_allclose(StepCostModel.default_for(obj, "h100").coef, model.coef)


def test_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(7)
    model = StepCostModel(rng.uniform(0, 1e-3, len(FEATURE_NAMES)), name="m", meta={"device": "cpu"})
    path = tmp_path / "cost.json"
    model.save(path)
    back = StepCostModel.load(path)
    np.testing.assert_array_equal(back.coef, model.coef)
    assert back.name == "m" and back.meta == {"device": "cpu"}
    path.write_text("{not json")
    with pytest.raises(ValueError, match="malformed"):
        StepCostModel.load(path)
    path.write_text(json.dumps({"version": 1, "coefficients": {"const": 1.0}}))
    with pytest.raises(ValueError, match="lacks coefficients"):
        StepCostModel.load(path)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="no samples"):
        StepCostModel.fit([])
    with pytest.raises(ValueError, match="seconds"):
        StepCostModel.fit([(StepFeatures(1, 0, 1, 1, 1), 0.0)])
    with pytest.raises(ValueError, match="StepFeatures"):
        StepCostModel.fit([((1, 2), 1.0)])
    with pytest.raises(ValueError, match="prefill_tokens"):
        StepFeatures(prefill_tokens=-1)
    with pytest.raises(ValueError, match="q_len"):
        StepFeatures.from_sequences([(5, 3, True)])
    with pytest.raises(ValueError, match=">= 0"):
        StepCostModel([-1.0] + [0.0] * (len(FEATURE_NAMES) - 1))
    with pytest.raises(ValueError, match="unknown device"):
        StepCostModel.default_for(LLAMA3_8B, "tpu-v9")
    with pytest.raises(ValueError, match="lacks"):
        StepCostModel.default_for({"hidden_size": 8}, "h100")
    with pytest.raises(ValueError, match="too few"):
        holdout_report([(StepFeatures(1, 0, 1, 1, 1), 1.0)] * 4)


def test_as_step_cost_prices_verification_as_the_roofline_says():
    """For the adaptive switch: on an H100 an 8B decode step is memory-bound, so verifying 8 more
    tokens costs almost nothing; on the rough CPU spec the same model is compute-bound and a verify
    step costs several decode steps. The switch's answer must follow the device."""
    from agentinfer_jax.configs.llama3_1_8b import get_config

    h100 = StepCostModel.default_for(get_config(), "h100").as_step_cost(context_tokens=2048)
    cpu = StepCostModel.default_for(get_config(), "cpu").as_step_cost(context_tokens=2048)
    assert 1.0 < h100(1, 9) / h100(1, 1) < 1.1
    assert cpu(1, 9) / cpu(1, 1) > 2.0
    assert h100(4, 4) > h100(1, 1) and h100(1, 0) == h100(1, 1)  # no step feeds nothing
    with pytest.raises(ValueError):
        StepCostModel.default_for(get_config(), "h100").as_step_cost(context_tokens=-1)
