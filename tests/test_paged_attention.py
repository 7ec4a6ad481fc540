"""Ragged paged attention: every backend against a float64 numpy oracle over the gathered pages.

Each batch is random (seeded) and hostile: pages a sequence does not own, the null page and the
unwritten tail of every last page hold NaN; page-table entries past a sequence's pages point at
other sequences' pages or at -1; query rows past cu_q_lens[num_seqs] hold NaN. A backend that
reads outside a sequence's pages / kv_len returns NaN or a wrong value.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agentinfer_jax import kernels
from agentinfer_jax.kernels import ragged

F32_TOL = dict(rtol=1e-5, atol=1e-5)
BF16_TOL = dict(rtol=0.0, atol=2e-2)


@dataclass
class Batch:
    q: np.ndarray
    k_pages: np.ndarray
    v_pages: np.ndarray
    kv_lens: np.ndarray
    page_indices: np.ndarray
    cu_q_lens: np.ndarray
    num_seqs: int

    def args(self):
        return (jnp.asarray(self.q), jnp.asarray(self.k_pages), jnp.asarray(self.v_pages),
                jnp.asarray(self.kv_lens), jnp.asarray(self.page_indices), jnp.asarray(self.cu_q_lens),
                jnp.int32(self.num_seqs))


def make_batch(seed, q_lens, kv_lens, *, page_size, group, head_dim, num_kv_heads=2, dtype=np.float32,
               pad_seqs=1, pad_tokens=3, fill=np.nan) -> Batch:
    rng = np.random.default_rng(seed)
    n = len(q_lens)
    owned = [-(-kv // page_size) for kv in kv_lens]
    pages_per_seq = max(owned + [1]) + 1
    num_pages = 1 + sum(owned) + 3  # null page, owned pages, 3 never-owned pages
    k_pages = np.full((num_kv_heads, num_pages, page_size, head_dim), fill, np.float32)
    v_pages = k_pages.copy()
    ids = rng.permutation(np.arange(1, num_pages))
    max_seqs = n + pad_seqs
    table = np.full((max_seqs, pages_per_seq), -1, np.int32)
    used = 0
    for s, kv in enumerate(kv_lens):
        for i in range(owned[s]):
            page = ids[used]
            used += 1
            table[s, i] = page
            valid = min(page_size, kv - i * page_size)
            k_pages[:, page, :valid] = rng.standard_normal((num_kv_heads, valid, head_dim))
            v_pages[:, page, :valid] = rng.standard_normal((num_kv_heads, valid, head_dim))
    # Entries past a sequence's pages: other sequences' pages (finite!) or garbage ids.
    for s in range(max_seqs):
        start = owned[s] if s < n else 0
        for i in range(start, pages_per_seq):
            table[s, i] = ids[rng.integers(len(ids))] if rng.random() < 0.5 else -1
    cu = np.zeros(max_seqs + 1, np.int32)
    cu[1: n + 1] = np.cumsum(q_lens)
    cu[n + 1:] = cu[n]
    kv_arr = np.zeros(max_seqs, np.int32)
    kv_arr[:n] = kv_lens
    kv_arr[n:] = rng.integers(0, 5, size=pad_seqs)  # junk lengths of padding sequences
    num_q_heads = num_kv_heads * group
    q = rng.standard_normal((int(cu[n]) + pad_tokens, num_q_heads, head_dim)).astype(np.float32)
    q[cu[n]:] = np.nan
    cast = (lambda a: np.asarray(jnp.asarray(a, dtype))) if dtype != np.float32 else (lambda a: a)
    return Batch(cast(q), cast(k_pages), cast(v_pages), kv_arr, table, cu, n)


def dense_f64(b: Batch, sm_scale=None) -> np.ndarray:
    """Plain causal softmax attention per sequence over its gathered pages, in float64."""
    q = np.asarray(b.q, np.float64)
    kp, vp = np.asarray(b.k_pages, np.float64), np.asarray(b.v_pages, np.float64)
    num_kv_heads, _, page_size, head_dim = kp.shape
    group = q.shape[1] // num_kv_heads
    scale = 1 / np.sqrt(head_dim) if sm_scale is None else sm_scale
    out = np.zeros_like(q)
    for s in range(b.num_seqs):
        lo, hi, kv = b.cu_q_lens[s], b.cu_q_lens[s + 1], b.kv_lens[s]
        pages = b.page_indices[s, : -(-kv // page_size)]
        k = kp[:, pages].reshape(num_kv_heads, -1, head_dim)[:, :kv]
        v = vp[:, pages].reshape(num_kv_heads, -1, head_dim)[:, :kv]
        for j in range(hi - lo):
            visible = kv - (hi - lo) + j + 1
            for h in range(q.shape[1]):
                logits = k[h // group, :visible] @ q[lo + j, h] * scale
                w = np.exp(logits - logits.max())
                out[lo + j, h] = (w / w.sum()) @ v[h // group, :visible]
    return out


# (q_lens, kv_lens) builders; every mix has q_len 0 / kv_len 0 and kv_len on a page boundary.
def scenario(name: str, page_size: int, rng: np.random.Generator):
    ps = page_size
    if name == "decode":
        kv = [1, ps, 2 * ps, int(rng.integers(2, 3 * ps)), 3 * ps + 1]
        return [1] * len(kv), kv
    if name == "verify":  # 1 + k draft tokens
        kv = [5, 2 * ps, int(rng.integers(6, 3 * ps)), ps + 4]
        return [1 + 3, 1 + 5, 1 + 2, 1 + 4], kv
    if name == "prefill":  # a chunk over a cached prefix, a fresh prompt, an empty slot
        return [19, 2 * ps, 0, 7], [19 + 2 * ps, 2 * ps, 0, 7 + ps - 7 % ps]
    if name == "mixed":
        return [1, 0, 6, 0, 13, 1], [ps, 0, 2 * ps + 3, 3, 13 + ps, 1]
    raise ValueError(name)


def check(out, b: Batch, dtype):
    out = np.asarray(out, np.float64)
    assert np.isfinite(out).all()
    assert (out[b.cu_q_lens[b.num_seqs]:] == 0).all(), "padding rows must be zeros"
    np.testing.assert_allclose(out, dense_f64(b), **(F32_TOL if dtype == np.float32 else BF16_TOL))


KERNEL_CASES = [
    # page_size, group, head_dim, dtype, scenario: covers page sizes 8/16/32, GQA 1/4/8 (and a
    # padded 6), head dims 64/128, q_len 1 / 1+k / chunks, f32 and bf16.
    (8, 1, 64, np.float32, "mixed"),
    (16, 4, 128, np.float32, "mixed"),
    (32, 8, 64, np.float32, "prefill"),
    (8, 6, 64, np.float32, "verify"),  # non-power-of-two group (padded to 8 rows per token)
    (16, 4, 128, jnp.bfloat16, "decode"),
    (8, 8, 128, jnp.bfloat16, "verify"),
    (32, 2, 64, jnp.bfloat16, "mixed"),
]

def _ids(case):
    ps, g, d, dt, sc = case
    return f"ps{ps}-g{g}-d{d}-{np.dtype(dt).name}-{sc}"


@pytest.mark.parametrize("case", KERNEL_CASES, ids=_ids)
def test_reference_and_pallas_gpu_interpret_match_float64(case):
    ps, g, d, dt, sc = case
    rng = np.random.default_rng(zlib.crc32(_ids(case).encode()) + 1)
    b = make_batch(int(rng.integers(1 << 30)), *scenario(sc, ps, rng), page_size=ps, group=g, head_dim=d,
                   dtype=dt)
    ref = kernels.ragged_paged_attention(*b.args(), backend="reference")
    check(ref, b, dt)
    out = kernels.ragged_paged_attention(*b.args(), backend="pallas_gpu", interpret=True)
    check(out, b, dt)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               **(F32_TOL if dt == np.float32 else BF16_TOL))


def test_pallas_gpu_small_blocks_walk_many_q_and_kv_blocks():
    """Many q-blocks per sequence and many KV steps: the causal loop bound and online softmax."""
    b = make_batch(7, [11, 1, 0, 9], [11 + 16, 8, 0, 9], page_size=8, group=2, head_dim=64)
    out = kernels.pallas_gpu_ragged_paged_attention(*b.args(), block_q=2, pages_per_block=1,
                                                    interpret=True)
    check(out, b, np.float32)


def test_reference_with_sm_scale_and_all_padding():
    b = make_batch(3, [2, 1], [9, 4], page_size=8, group=2, head_dim=64)
    out = kernels.ragged_paged_attention(*b.args(), sm_scale=0.3, backend="reference")
    np.testing.assert_allclose(np.asarray(out), dense_f64(b, sm_scale=0.3), **F32_TOL)
    # num_seqs = 0: nothing is live, every row is padding.
    q, kp, vp, kv, pi, cu, _ = b.args()
    assert (np.asarray(kernels.ragged_paged_attention(q, kp, vp, kv, pi, cu, jnp.int32(0))) == 0).all()


def test_default_backend_on_cpu_is_reference_and_works_under_jit():
    assert kernels.default_backend() == "reference"
    b = make_batch(11, [3, 1], [3, 17], page_size=16, group=4, head_dim=64)
    jitted = jax.jit(lambda *a: kernels.ragged_paged_attention(*a))
    check(jitted(*b.args()), b, np.float32)


def test_combined_layout_matches_jax_tpu_reference():
    """combine_kv_pages gives the layout JAX's TPU ragged kernel (and its reference) expects."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention

    b = make_batch(5, [1, 6], [9, 22], page_size=8, group=2, head_dim=64, pad_seqs=0, pad_tokens=0,
                   fill=0.0)
    q, kp, vp, kv, _, cu, n = b.args()
    table = ragged.owned_page_table(kv, jnp.asarray(b.page_indices), n, 8)
    theirs = ref_ragged_paged_attention(q, kernels.combine_kv_pages(kp, vp), kv, table, cu, n.reshape(1),
                                        sm_scale=1 / 8.0)
    np.testing.assert_allclose(np.asarray(theirs), dense_f64(b), **F32_TOL)


def test_tpu_decode_in_tpu_interpret_mode():
    """JAX's TPU decode kernel: TPU-default matmul precision (bf16 passes), so a bf16 tolerance.

    It reads whole compute blocks of pages and multiplies masked probabilities by V, so unowned
    slots must be finite (the engine keeps the null page and fresh pages zeroed).
    """
    rng = np.random.default_rng(17)
    b = make_batch(19, *scenario("decode", 16, rng), page_size=16, group=4, head_dim=128,
                   dtype=jnp.bfloat16, fill=1e3)
    out = kernels.ragged_paged_attention(*b.args(), backend="tpu_decode", interpret=True)
    out = np.asarray(out, np.float64)
    assert (out[b.cu_q_lens[b.num_seqs]:] == 0).all()
    np.testing.assert_allclose(out, dense_f64(b), **BF16_TOL)


def test_pallas_gpu_lowers_to_triton_for_cuda():
    """Export for CUDA runs the Pallas->Triton lowering without a GPU (power-of-two shapes, ops)."""
    from jax import export

    sds = jax.ShapeDtypeStruct
    t, s, hkv, g, d, ps = 64, 32, 8, 4, 128, 16
    args = (sds((t, hkv * g, d), jnp.bfloat16), sds((hkv, 97, ps, d), jnp.bfloat16),
            sds((hkv, 97, ps, d), jnp.bfloat16), sds((s,), jnp.int32), sds((s, 9), jnp.int32),
            sds((s + 1,), jnp.int32), sds((), jnp.int32))
    exported = export.export(kernels.pallas_gpu_ragged_paged_attention, platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    assert "xla.gpu.triton" in exported.mlir_module()


def _good():
    return make_batch(23, [2, 1], [5, 9], page_size=8, group=2, head_dim=64)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.__setitem__(3, a[3].at[0].set(1)), "q_len 2 > kv_len 1"),
    (lambda a: a.__setitem__(4, a[4].at[1, 0].set(0)), "owned page ids"),
    (lambda a: a.__setitem__(4, a[4].at[1, 1].set(10_000)), "owned page ids"),
    (lambda a: a.__setitem__(5, a[5].at[2].set(100)), "exceeds"),
    (lambda a: a.__setitem__(5, a[5].at[1].set(4)), "decreases"),
    (lambda a: a.__setitem__(3, a[3].astype(jnp.int16)), "kv_lens must be int32"),
    (lambda a: a.__setitem__(0, a[0][:, :3]), "multiple of num_kv_heads"),
    (lambda a: a.__setitem__(2, a[2][:, :-1]), "differ in shape"),
    (lambda a: a.__setitem__(2, a[2].astype(jnp.bfloat16)), "differ in dtype"),
    (lambda a: a.__setitem__(0, a[0][..., :32]), "head_dim"),
    (lambda a: a.__setitem__(6, jnp.int32(4)), "outside"),  # num_seqs past the 3 sequence slots
    (lambda a: a.__setitem__(6, jnp.int32(-1)), "outside"),
    (lambda a: a.__setitem__(5, a[5] + 1), "must be 0"),
    # kv_len 17 needs 3 pages of 8 but the table has 2 columns: a read past the table.
    (lambda a: (a.__setitem__(3, a[3].at[1].set(17)), a.__setitem__(4, a[4][:, :2])), "needs 3 pages"),
    (lambda a: a.__setitem__(6, jnp.asarray([2, 2], jnp.int32)), "scalar"),
])
def test_bad_input_raises_value_error(mutate, match):
    args = list(_good().args())
    mutate(args)
    with pytest.raises(ValueError, match=match):
        kernels.ragged_paged_attention(*args, backend="reference")


def test_bad_backend_and_decode_only_violations_raise():
    b = _good()
    with pytest.raises(ValueError, match="unknown backend"):
        kernels.ragged_paged_attention(*b.args(), backend="cuda")
    with pytest.raises(ValueError, match="q_len 1"):
        kernels.ragged_paged_attention(*b.args(), backend="tpu_decode", interpret=True)
    q, kp, vp, kv, pi, cu, n = b.args()
    with pytest.raises(ValueError, match="power-of-two page_size"):
        kernels.pallas_gpu_ragged_paged_attention(q, kp[:, :, :6], vp[:, :, :6], kv, pi, cu, n, interpret=True)


def test_plan_q_blocks_covers_every_row_once():
    rng = np.random.default_rng(29)
    max_seqs, num_tokens = 6, 70
    for bq in (1, 2, 4, 8):
        plan = jax.jit(lambda cu, n: ragged.plan_q_blocks(cu, n, num_tokens=num_tokens, block_q=bq))
        for _ in range(5):
            n = int(rng.integers(0, max_seqs + 1))
            cu = np.zeros(max_seqs + 1, np.int32)
            cu[1: n + 1] = np.cumsum(rng.integers(0, 12, size=n))
            cu[n + 1:] = cu[n]
            seq, start = (np.asarray(a) for a in plan(jnp.asarray(cu), jnp.int32(n)))
            covered = []
            for s_, st in zip(seq, start):
                if s_ >= 0:
                    covered += [(s_, r) for r in range(st, min(st + bq, cu[s_ + 1]))]
            want = [(s_, r) for s_ in range(n) for r in range(cu[s_], cu[s_ + 1])]
            assert sorted(covered) == want


@pytest.mark.parametrize("sc", ["decode", "verify", "prefill", "mixed"])
def test_reference_paths_match_float64(sc):
    """Both reference paths: one-row blocks (vectorized) and looped blocks with chunked keys,
    including chunks of one page and chunks wider than the page table."""
    rng = np.random.default_rng(zlib.crc32(sc.encode()))
    b = make_batch(int(rng.integers(1 << 30)), *scenario(sc, 8, rng), page_size=8, group=2, head_dim=64)
    for block_q, kv_chunk in ((1, 128), (2, 8), (4, 16), (8, 1024)):
        out = kernels.reference_ragged_paged_attention(*b.args(), block_q=block_q, kv_chunk=kv_chunk)
        check(out, b, np.float32)


@pytest.mark.parametrize("q_lens, kv_lens, pad_seqs, pad_tokens", [
    ([9], [9 + 37], 0, 3),  # a lone sequence's k=8 verification (T padded to 12)
    ([5], [5], 0, 0),
    ([12], [12 + 17], 0, 4),
    ([3], [40], 0, 61),  # 64 rows: the most the vectorized path takes
    ([9, 1, 9, 4], [9 + 40, 17, 9, 4 + 16], 0, 13),  # every sequence within cdiv(T, S) = 9 rows
    ([9, 0, 9, 4], [9 + 40, 3, 9, 4 + 16], 1, 22),  # ... with an empty and a padding sequence
    ([12, 1, 2], [12 + 30, 8, 2], 1, 1),  # 12 rows > cdiv(16, 4): the looped path under the same program
])
def test_reference_vectorized_sequence_path_matches_float64(q_lens, kv_lens, pad_seqs, pad_tokens):
    """Short steps (a lone sequence's verification or chunk, several sequences' verifications) run
    every sequence's rows at once; padding rows stay zeros and pages a sequence does not own (NaN)
    are never read. A step where one sequence has more rows than its share takes the loop."""
    rng = np.random.default_rng(sum(q_lens) * 1000 + sum(kv_lens))
    b = make_batch(int(rng.integers(1 << 30)), q_lens, kv_lens, page_size=8, group=2, head_dim=32,
                   pad_seqs=pad_seqs, pad_tokens=pad_tokens)
    args = b.args()
    shp = ragged.check_shapes(*args)
    assert kernels.reference._fits_vectorized(shp) and kernels.reference.reference_block_q(
        shp.num_tokens, shp.max_seqs) > 2
    check(kernels.ragged_paged_attention(*args, backend="reference"), b, np.float32)
    check(jax.jit(kernels.reference_ragged_paged_attention)(*args), b, np.float32)
