"""write_kv: scatter of new K/V rows into pages, checked against a per-token numpy loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agentinfer_jax.kernels import ragged_paged_attention, write_kv, write_kv_donated


def _numpy_write(pages, new, slots):
    pages = pages.copy()
    _, num_pages, page_size, _ = pages.shape
    for t, slot in enumerate(slots):
        if 0 <= slot < num_pages * page_size:
            pages[:, slot // page_size, slot % page_size] = new[t]
    return pages


@pytest.mark.parametrize("page_size,dtype", [(8, np.float32), (16, jnp.bfloat16)], ids=["ps8-f32", "ps16-bf16"])
def test_write_kv_matches_numpy_and_drops_padding(page_size, dtype):
    rng = np.random.default_rng(page_size)
    hkv, num_pages, d, t = 2, 6, 32, 13
    k_pages = np.asarray(jnp.asarray(rng.standard_normal((hkv, num_pages, page_size, d)), dtype))
    v_pages = np.asarray(jnp.asarray(rng.standard_normal((hkv, num_pages, page_size, d)), dtype))
    k = np.asarray(jnp.asarray(rng.standard_normal((t, hkv, d)), dtype))
    v = np.asarray(jnp.asarray(rng.standard_normal((t, hkv, d)), dtype))
    slots = rng.permutation(num_pages * page_size)[:t].astype(np.int32)
    slots[[2, 7]] = -1  # padding tokens
    slots[5] = num_pages * page_size + 3  # past the pool: dropped, not wrapped
    new_k, new_v = write_kv(jnp.asarray(k_pages), jnp.asarray(v_pages), jnp.asarray(k), jnp.asarray(v),
                            jnp.asarray(slots))
    np.testing.assert_array_equal(np.asarray(new_k), _numpy_write(k_pages, k, slots))
    np.testing.assert_array_equal(np.asarray(new_v), _numpy_write(v_pages, v, slots))


def test_write_kv_donated_updates_in_place_semantics():
    rng = np.random.default_rng(1)
    k_pages = jnp.asarray(rng.standard_normal((1, 4, 8, 16)), jnp.float32)
    v_pages = jnp.asarray(rng.standard_normal((1, 4, 8, 16)), jnp.float32)
    expect_k = np.asarray(k_pages)
    k = rng.standard_normal((3, 1, 16)).astype(np.float32)
    slots = np.array([9, -5, 31], np.int32)
    new_k, _ = write_kv_donated(k_pages, v_pages, jnp.asarray(k), jnp.asarray(k), jnp.asarray(slots))
    np.testing.assert_array_equal(np.asarray(new_k), _numpy_write(expect_k, k, slots))


@pytest.mark.parametrize("slot", [13, -1, 4 * 8])
def test_write_kv_one_row_under_jit_writes_one_slot_or_none(slot):
    """A one-token step (batch-1 decode): one slot written, or none for padding / past the pool."""
    rng = np.random.default_rng(slot + 7)
    k_pages, v_pages = (rng.standard_normal((2, 4, 8, 16)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((1, 2, 16)).astype(np.float32) for _ in range(2))
    slots = np.array([slot], np.int32)
    new_k, new_v = jax.jit(write_kv)(*(jnp.asarray(a) for a in (k_pages, v_pages, k, v, slots)))
    np.testing.assert_array_equal(np.asarray(new_k), _numpy_write(k_pages, k, slots))
    np.testing.assert_array_equal(np.asarray(new_v), _numpy_write(v_pages, v, slots))


def test_write_kv_rejects_bad_shapes():
    pages = jnp.zeros((2, 4, 8, 16))
    with pytest.raises(ValueError, match="must both be \\[T, 2, 16\\]"):
        write_kv(pages, pages, jnp.zeros((3, 1, 16)), jnp.zeros((3, 1, 16)), jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="slot_mapping shape"):
        write_kv(pages, pages, jnp.zeros((3, 2, 16)), jnp.zeros((3, 2, 16)), jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        write_kv(pages, pages, jnp.zeros((3, 2, 16)), jnp.zeros((3, 2, 16)), jnp.zeros(3))


def test_prefill_then_decode_through_write_kv_equals_dense_causal_attention():
    """Pages filled by write_kv, read by ragged attention == dense causal attention in float64."""
    rng = np.random.default_rng(2)
    hkv, group, d, ps, length = 2, 2, 32, 8, 21
    k_all = rng.standard_normal((length, hkv, d)).astype(np.float32)
    v_all = rng.standard_normal((length, hkv, d)).astype(np.float32)
    q_all = rng.standard_normal((length, hkv * group, d)).astype(np.float32)
    pages = [5, 2, 7]  # scattered, never the null page 0
    slot = np.array([pages[p // ps] * ps + p % ps for p in range(length)], np.int32)
    k_pages = jnp.zeros((hkv, 8, ps, d))
    v_pages = jnp.zeros((hkv, 8, ps, d))
    table = jnp.asarray([pages + [0]], jnp.int32)
    step = jax.jit(write_kv, donate_argnums=(0, 1))
    outs = []
    # A prefill chunk of 16 tokens, then 5 single-token decode steps.
    for lo, hi in [(0, 16)] + [(p, p + 1) for p in range(16, length)]:
        k_pages, v_pages = step(k_pages, v_pages, jnp.asarray(k_all[lo:hi]), jnp.asarray(v_all[lo:hi]),
                                jnp.asarray(slot[lo:hi]))
        outs.append(ragged_paged_attention(
            jnp.asarray(q_all[lo:hi]), k_pages, v_pages, jnp.asarray([hi], jnp.int32), table,
            jnp.asarray([0, hi - lo], jnp.int32), jnp.int32(1), backend="reference"))
    got = np.concatenate([np.asarray(o) for o in outs])
    q64, k64, v64 = (a.astype(np.float64) for a in (q_all, k_all, v_all))
    want = np.zeros_like(q64)
    for t in range(length):
        for h in range(hkv * group):
            logits = k64[: t + 1, h // group] @ q64[t, h] / np.sqrt(d)
            w = np.exp(logits - logits.max())
            want[t, h] = (w / w.sum()) @ v64[: t + 1, h // group]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
