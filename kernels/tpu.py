"""TPU backends: thin adapters onto JAX's own Pallas TPU kernels.

* pallas_tpu: jax.experimental.pallas.ops.tpu.ragged_paged_attention (mixed prefill/decode).
  It wants ONE combined cache [num_pages, page_size, 2 * Hkv, D] with K and V interleaved on the
  head axis (K of head i at 2i, V at 2i+1). Our per-layer cache is k_pages/v_pages
  [Hkv, num_pages, page_size, D], so this adapter builds the combined array on every call (a full
  copy of the layer's cache: correct, but a TPU engine that cares about speed should keep the
  combined layout natively and skip the copy). num_seqs is passed as shape [1].
* tpu_decode: jax.experimental.pallas.ops.tpu.paged_attention, for batches where every live
  sequence has q_len 1. It takes our layout as is; q is gathered to [S, Hq, D] at
  cu_q_lens[:S], and sm_scale is folded into q because that kernel has no scale argument.
Both see only owned pages (ragged.owned_page_table); padding rows come back as zeros.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from . import ragged


def combine_kv_pages(k_pages: jax.Array, v_pages: jax.Array) -> jax.Array:
    """[Hkv, N, page, D] x2 -> [N, page, 2*Hkv, D] with K at even and V at odd head slots."""
    kv = jnp.stack([k_pages, v_pages], axis=1)  # [Hkv, 2, N, page, D]
    hkv2 = 2 * k_pages.shape[0]
    return jnp.transpose(kv, (2, 3, 0, 1, 4)).reshape(k_pages.shape[1], k_pages.shape[2], hkv2,
                                                    k_pages.shape[3])


@functools.partial(jax.jit, static_argnames=("sm_scale", "num_kv_pages_per_block", "num_queries_per_block"))
def tpu_ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                               sm_scale: float | None = None, num_kv_pages_per_block: int | None = None,
                               num_queries_per_block: int | None = None) -> jax.Array:
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

    shp = ragged.check_shapes(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    scale = 1.0 / math.sqrt(shp.head_dim) if sm_scale is None else float(sm_scale)
    n = ragged.num_seqs_scalar(num_seqs)
    table = ragged.owned_page_table(kv_lens, page_indices, n, shp.page_size)
    out = ragged_paged_attention(
        q, combine_kv_pages(k_pages, v_pages), kv_lens, table, cu_q_lens, n.reshape(1),
        sm_scale=scale, num_kv_pages_per_block=num_kv_pages_per_block,
        num_queries_per_block=num_queries_per_block)
    return ragged.zero_padding_rows(out, cu_q_lens, n)


@functools.partial(jax.jit, static_argnames=("sm_scale", "pages_per_compute_block"))
def tpu_decode_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                               sm_scale: float | None = None,
                               pages_per_compute_block: int | None = None) -> jax.Array:
    """Decode-only: requires q_len == 1 for every live sequence (checked when inputs are concrete)."""
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    shp = ragged.check_shapes(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    scale = 1.0 / math.sqrt(shp.head_dim) if sm_scale is None else float(sm_scale)
    n = ragged.num_seqs_scalar(num_seqs)
    live = jnp.arange(shp.max_seqs) < n
    table = ragged.owned_page_table(kv_lens, page_indices, n, shp.page_size)
    ppcb = pages_per_compute_block or math.gcd(shp.pages_per_seq, max(1, 128 // shp.page_size))
    rows = jnp.minimum(cu_q_lens[:-1], shp.num_tokens - 1)
    q_seq = (q[rows].astype(jnp.float32) * scale).astype(q.dtype)
    o = paged_attention(q_seq, k_pages, v_pages, jnp.where(live, kv_lens, 0), table,
                        pages_per_compute_block=ppcb)
    # The kernel's output for an empty sequence is undefined; keep only live rows, drop the rest.
    dest = jnp.where(live & (kv_lens > 0), cu_q_lens[:-1], shp.num_tokens)
    out = jnp.zeros_like(q).at[dest].set(o.astype(q.dtype), mode="drop")
    return ragged.zero_padding_rows(out, cu_q_lens, n)
