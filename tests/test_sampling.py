"""Sampling filters and speculative verification against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agentinfer_jax.engine.sampling import (SamplingArrays, filtered_log_probs, greedy_tokens, sample, verify,
                                             verify_full, verify_rows)


def np_filtered_probs(logits, t, k, p):
    x = logits / (t if t > 0 else 1.0)
    order = np.argsort(-x, kind="stable")
    keep = np.zeros_like(x, dtype=bool)
    kk = len(x) if k == 0 else min(k, len(x))
    probs = np.exp(x[order[:kk]] - x[order[0]])
    probs /= probs.sum()
    mass = 0.0
    for i in range(kk):
        if mass < p:
            keep[order[i]] = True
        mass += probs[i]
    y = np.where(keep, np.exp(x - x.max()), 0.0)
    return y / y.sum()


def arrays(n, t=0.0, k=0, p=1.0, seed0=0):
    return SamplingArrays(jnp.full((n,), t, jnp.float32), jnp.full((n,), k, jnp.int32),
                          jnp.full((n,), p, jnp.float32), jnp.arange(seed0, seed0 + n, dtype=jnp.uint32))


@pytest.mark.parametrize("t,k,p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 10, 0.6), (1.0, 1, 1.0)])
def test_filters_match_numpy(t, k, p):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 50)).astype(np.float32) * 2
    got = np.exp(np.asarray(filtered_log_probs(jnp.asarray(logits), jnp.full((6,), t), jnp.full((6,), k),
                                               jnp.full((6,), p))))
    for r in range(6):
        np.testing.assert_allclose(got[r], np_filtered_probs(logits[r].astype(np.float64), t, k, p), atol=1e-5)


def test_greedy_sample_is_argmax():
    logits = jax.random.normal(jax.random.key(1), (9, 33))
    np.testing.assert_array_equal(sample(logits, arrays(9), jnp.arange(9)), np.argmax(logits, -1))


def test_greedy_tokens_pick_the_first_maximum_like_numpy():
    rng = np.random.default_rng(5)
    # Few distinct values so most rows have tied maxima; masked (-1e30) and -inf entries as the
    # grammar and the filters leave them; one row entirely masked.
    logits = rng.integers(-3, 3, size=(40, 4096)).astype(np.float32)
    logits[rng.random(logits.shape) < 0.3] = -1e30
    logits[rng.random(logits.shape) < 0.1] = -np.inf
    logits[7] = -1e30
    np.testing.assert_array_equal(jax.jit(greedy_tokens)(jnp.asarray(logits)), np.argmax(logits, -1))
    np.testing.assert_array_equal(greedy_tokens(jnp.asarray(logits.reshape(4, 10, 4096))),
                                  np.argmax(logits.reshape(4, 10, 4096), -1))
    # A row of NaNs (a diverged model) matches no maximum: the documented last id, never out of range.
    nan_rows = np.full((2, 4096), np.nan, np.float32)
    np.testing.assert_array_equal(jax.jit(greedy_tokens)(jnp.asarray(nan_rows)), [4095, 4095])


def test_greedy_verify_keeps_longest_agreeing_prefix():
    rng = np.random.default_rng(2)
    s, k, v = 16, 5, 11
    logits = rng.normal(size=(s, k + 1, v)).astype(np.float32)
    target = logits.argmax(-1)
    drafts = np.where(rng.random((s, k)) < 0.7, target[:, :k], rng.integers(0, v, (s, k)))
    nd = rng.integers(0, k + 1, s)
    toks, n_new = verify(jnp.asarray(logits), jnp.asarray(drafts, jnp.int32), jnp.asarray(nd, jnp.int32),
                         arrays(s), jnp.zeros(s, jnp.int32))
    for i in range(s):
        acc = 0
        while acc < nd[i] and drafts[i, acc] == target[i, acc]:
            acc += 1
        assert n_new[i] == acc + 1
        assert list(np.asarray(toks[i, :acc + 1])) == list(drafts[i, :acc]) + [target[i, acc]]


def test_rejection_sampling_preserves_target_distribution():
    """With a deterministic draft, the first emitted token is distributed exactly as the target."""
    v, n = 6, 20000
    logits = jnp.log(jnp.asarray([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
    for draft_tok in (0, 3):
        lg = jnp.broadcast_to(logits, (n, 2, v))
        drafts = jnp.full((n, 1), draft_tok, jnp.int32)
        toks, _ = verify(lg, drafts, jnp.ones(n, jnp.int32), arrays(n, t=1.0, seed0=7), jnp.zeros(n, jnp.int32))
        freq = np.bincount(np.asarray(toks[:, 0]), minlength=v) / n
        np.testing.assert_allclose(freq, np.exp(np.asarray(logits)), atol=0.015)


def test_verified_tokens_follow_the_filtered_target_at_every_position():
    """Two drafts under temperature and top-k: the first token follows row 0's filtered
    distribution, the token after an accepted draft row 1's, the bonus token after both row 2's
    (each row its own distribution), against np_filtered_probs in float64."""
    v, n, t, k = 7, 30000, 0.7, 4
    rng = np.random.default_rng(9)
    rows = rng.normal(size=(3, v)) * 1.5
    drafts = (int(np.argsort(-rows[0])[1]), int(np.argsort(-rows[1])[0]))  # likely, not certain
    lg = jnp.broadcast_to(jnp.asarray(rows, jnp.float32), (n, 3, v))
    toks, num_new = verify(lg, jnp.broadcast_to(jnp.asarray(drafts, jnp.int32), (n, 2)), jnp.full(n, 2, jnp.int32),
                           arrays(n, t=t, k=k, seed0=11), jnp.zeros(n, jnp.int32))
    toks, num_new = np.asarray(toks), np.asarray(num_new)
    want = [np_filtered_probs(r, t, k, 1.0) for r in rows]
    np.testing.assert_allclose(np.bincount(toks[:, 0], minlength=v) / n, want[0], atol=0.015)
    first_ok = toks[:, 0] == drafts[0]
    np.testing.assert_array_equal(num_new == 1, ~first_ok)  # one token exactly when draft 0 is rejected
    second = toks[first_ok, 1]
    np.testing.assert_allclose(np.bincount(second, minlength=v) / len(second), want[1], atol=0.02)
    both = first_ok & (toks[:, 1] == drafts[1])
    np.testing.assert_array_equal(num_new[first_ok] == 3, both[first_ok])
    bonus = toks[both, 2]
    assert len(bonus) > 2000
    np.testing.assert_allclose(np.bincount(bonus, minlength=v) / len(bonus), want[2], atol=0.03)


def test_sampling_is_a_function_of_seed_and_position():
    """A row draws the same token whatever its batch index and neighbours (another order, other
    rows with other filters around it), and verification likewise; the draws vary with position
    and with the seed."""
    rng = np.random.default_rng(3)
    n, v = 6, 40
    sample_, verify_ = jax.jit(sample), jax.jit(verify)  # one compilation per shape, not op by op
    logits = rng.normal(size=(n, v)).astype(np.float32) * 2
    seeds = rng.integers(0, 2**32, n, dtype=np.uint32)
    pos = rng.integers(0, 1000, n).astype(np.int32)

    def params(idx):
        return SamplingArrays(jnp.ones(len(idx)), jnp.zeros(len(idx), jnp.int32), jnp.ones(len(idx)),
                              jnp.asarray(seeds[idx]))

    alone = [int(sample_(jnp.asarray(logits[[i]]), params([i]), jnp.asarray(pos[[i]]))[0]) for i in range(n)]
    perm = rng.permutation(n)
    # Two extra rows in front (greedy, and sampled with top-k) shift every row and force the sort.
    p = params(perm)
    mixed = SamplingArrays(jnp.concatenate([jnp.asarray([0.0, 0.5]), p.temperature]),
                           jnp.concatenate([jnp.asarray([0, 5], jnp.int32), p.top_k]),
                           jnp.concatenate([jnp.ones(2), p.top_p]),
                           jnp.concatenate([jnp.asarray([1, 2], jnp.uint32), p.seed]))
    batch_logits = np.concatenate([rng.normal(size=(2, v)).astype(np.float32), logits[perm]])
    got = np.asarray(sample_(jnp.asarray(batch_logits), mixed, jnp.asarray(np.concatenate([[5, 6], pos[perm]]))))
    assert got[2:].tolist() == [alone[i] for i in perm]

    s = 5
    vlogits, vdrafts, vnd = _random_verify_case(4, s=s, k=3, v=v, agree=0.3)
    vpos = jnp.asarray(rng.integers(0, 1000, s), jnp.int32)
    vparams = SamplingArrays(jnp.full((s,), 0.9), jnp.zeros(s, jnp.int32), jnp.full((s,), 0.95),
                             jnp.asarray(rng.integers(0, 2**32, s, dtype=np.uint32)))
    toks_all, num_all = (np.asarray(a) for a in verify_(vlogits, vdrafts, vnd, vparams, vpos))
    for i in range(s):
        one = jax.tree.map(lambda a: a[i:i + 1], vparams)
        toks, num = verify_(vlogits[i:i + 1], vdrafts[i:i + 1], vnd[i:i + 1], one, vpos[i:i + 1])
        assert int(num[0]) == num_all[i]
        assert np.asarray(toks)[0, :num_all[i]].tolist() == toks_all[i, :num_all[i]].tolist()

    # Flat logits (40 equal choices): the draws vary with position under one seed, and with the seed.
    flat = jnp.zeros((64, 40))
    one_seed = SamplingArrays(jnp.ones(64), jnp.zeros(64, jnp.int32), jnp.ones(64), jnp.zeros(64, jnp.uint32))
    assert len(set(np.asarray(sample(flat, one_seed, jnp.arange(64))).tolist())) > 10
    many = SamplingArrays(jnp.ones(64), jnp.zeros(64, jnp.int32), jnp.ones(64), jnp.arange(64, dtype=jnp.uint32))
    assert len(set(np.asarray(sample(flat, many, jnp.zeros(64, jnp.int32))).tolist())) > 10


def _random_verify_case(seed, s=12, k=6, v=97, agree=0.6):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(s, k + 1, v)).astype(np.float32)
    target = logits.argmax(-1)
    drafts = np.where(rng.random((s, k)) < agree, target[:, :k], rng.integers(0, v, (s, k)))
    nd = rng.integers(0, k + 1, s)
    return jnp.asarray(logits), jnp.asarray(drafts, jnp.int32), jnp.asarray(nd, jnp.int32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_fast_path_equals_full_path(seed):
    logits, drafts, nd = _random_verify_case(seed)
    s = logits.shape[0]
    pos = jnp.arange(s, dtype=jnp.int32) * 3
    want = verify_full(logits, drafts, nd, arrays(s), pos)
    got = verify(logits, drafts, nd, arrays(s), pos)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Same through the row-gathering entry point, on token logits in another order with extra rows.
    kp1, v = logits.shape[1:]
    perm = np.random.default_rng(seed).permutation(s * kp1 + 5)
    flat = np.zeros((s * kp1 + 5, v), np.float32)
    flat[perm[:s * kp1]] = np.asarray(logits).reshape(-1, v)
    rows = jnp.asarray(perm[:s * kp1].reshape(s, kp1), jnp.int32)
    got = verify_rows(jnp.asarray(flat), rows, drafts, nd, arrays(s), pos)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(sample(logits[:, 0], arrays(s), pos), np.asarray(logits[:, 0]).argmax(-1))


def test_mixed_batch_takes_the_full_path():
    """One sampled row sends the whole batch through the full path; greedy rows are unchanged."""
    logits, drafts, nd = _random_verify_case(5)
    s = logits.shape[0]
    params = arrays(s)
    params.temperature = params.temperature.at[3].set(0.8)
    pos = jnp.zeros(s, jnp.int32)
    got = verify(logits, drafts, nd, params, pos)
    want = verify_full(logits, drafts, nd, params, pos)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    greedy = verify_full(logits, drafts, nd, arrays(s), pos)
    keep = np.arange(s) != 3
    np.testing.assert_array_equal(np.asarray(got[0])[keep], np.asarray(greedy[0])[keep])
    mixed = sample(logits[:, 0], params, pos)
    np.testing.assert_array_equal(np.asarray(mixed)[keep], np.asarray(logits[:, 0]).argmax(-1)[keep])


def test_rows_without_cuts_draw_the_same_beside_rows_with_cuts():
    """A row with top_k=0, top_p=1 gets identical log-probs (so identical draws) whether or not
    another row of the batch forces the sorting path."""
    logits = jax.random.normal(jax.random.key(8), (5, 300)) * 3
    t = jnp.full((5,), 0.9)
    plain = filtered_log_probs(logits, t, jnp.zeros(5, jnp.int32), jnp.ones(5))
    mixed = filtered_log_probs(logits, t, jnp.asarray([0, 0, 7, 0, 0]), jnp.asarray([1.0, 1.0, 1.0, 0.5, 1.0]))
    for r in (0, 1, 4):
        np.testing.assert_array_equal(np.asarray(plain[r]), np.asarray(mixed[r]))
    a = sample(logits, SamplingArrays(t, jnp.zeros(5, jnp.int32), jnp.ones(5), jnp.arange(5, dtype=jnp.uint32)),
               jnp.arange(5))
    b = sample(logits, SamplingArrays(t, jnp.asarray([0, 0, 7, 0, 0]), jnp.asarray([1.0, 1.0, 1.0, 0.5, 1.0]),
                                      jnp.arange(5, dtype=jnp.uint32)), jnp.arange(5))
    np.testing.assert_array_equal(np.asarray(a)[[0, 1, 4]], np.asarray(b)[[0, 1, 4]])


def test_adjusted_logits_match_numpy():
    """Bias (repeated ids add up) then the bitmask (bit t % 32 of word t // 32), against numpy."""
    from agentinfer_jax.engine.sampling import adjust_logits
    rng = np.random.default_rng(6)
    s, kp1, v, p = 3, 2, 70, 5
    logits = rng.normal(size=(s, kp1, v)).astype(np.float32)
    ids = rng.integers(0, v, (s, kp1, p)).astype(np.int32)
    vals = rng.normal(size=(s, kp1, p)).astype(np.float32)
    allowed = rng.random((s, kp1, v)) < 0.4
    words = np.zeros((s, kp1, -(-v // 32)), np.uint32)
    for t in range(v):
        words[..., t // 32] |= allowed[..., t].astype(np.uint32) << np.uint32(t % 32)
    got = np.asarray(adjust_logits(jnp.asarray(logits), jnp.asarray(words.view(np.int32)), jnp.asarray(ids),
                                   jnp.asarray(vals)))
    want = logits.astype(np.float64)
    for a in range(s):
        for b in range(kp1):
            for t, x in zip(ids[a, b], vals[a, b]):
                want[a, b, t] += x
    np.testing.assert_allclose(got[allowed], want[allowed], rtol=1e-6, atol=1e-6)
    assert (got[~allowed] < -1e29).all()
