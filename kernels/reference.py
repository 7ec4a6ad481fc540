"""Pure-JAX ragged paged attention: the CPU fast path and the oracle for the Pallas kernels.

Loops run only over live work: a fori_loop over the num_seqs live sequences (dynamic trip count,
so padding sequences cost nothing), and for each one its cdiv(q_len, block_q) query blocks (a
block is at most block_q rows of ONE sequence, like the GPU kernel's). A sequence's pages are
gathered once and reused by its blocks; each block runs an ordinary masked softmax in float32.
The cost is live query rows x the page table's width (the engine slices the table to its step's
longest context). Invariants:
  * only page-table entries a sequence owns (< cdiv(kv_len, page_size)) are dereferenced; the
    rest are replaced by the null page and, like every slot at or past kv_len, zeroed before use,
    so NaN/garbage in pages the sequence does not own never reaches the output;
  * the mask is applied before the softmax; rows that belong to no sequence (padding) are zeros.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from . import ragged

_HIGHEST = jax.lax.Precision.HIGHEST


def reference_block_q(num_tokens: int, max_seqs: int) -> int:
    """Rows per block on CPU: the padded tokens per sequence (1 for decode), at most 64.

    Unlike a GPU matmul, a CPU matmul gains nothing from padding rows, so decode blocks are 1 row.
    """
    return int(min(64, ragged.next_pow2(-(-num_tokens // max(1, max_seqs)))))


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_q"))
def reference_ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                                     *, sm_scale: float | None = None, block_q: int | None = None) -> jax.Array:
    """out [T, Hq, D] in q.dtype; see agentinfer_jax.kernels.ragged_paged_attention for the contract."""
    shp = ragged.check_shapes(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    scale = 1.0 / math.sqrt(shp.head_dim) if sm_scale is None else float(sm_scale)
    bq = block_q or reference_block_q(shp.num_tokens, shp.max_seqs)
    n = ragged.num_seqs_scalar(num_seqs)
    table = ragged.owned_page_table(kv_lens, page_indices, n, shp.page_size)
    q_lens = ragged.live_q_lens(cu_q_lens, n)
    span = shp.pages_per_seq * shp.page_size
    kpos = jnp.arange(span, dtype=jnp.int32)
    # bq rows of padding so a block's dynamic slices never shift back onto other rows.
    q_pad = jnp.pad(q, ((0, bq), (0, 0), (0, 0))).astype(jnp.float32)
    out = jnp.zeros((shp.num_tokens + bq, shp.num_q_heads, shp.head_dim), jnp.float32)

    def one_seq(s, out):
        kv_len, q_len, first = kv_lens[s], q_lens[s], cu_q_lens[s]
        k_ok = kpos < kv_len
        # [Hkv, P, page, D] -> [Hkv, span, D], only the sequence's own pages (others -> null page).
        k = k_pages[:, table[s]].reshape(shp.num_kv_heads, span, shp.head_dim)
        v = v_pages[:, table[s]].reshape(shp.num_kv_heads, span, shp.head_dim)
        k = jnp.where(k_ok[None, :, None], k.astype(jnp.float32), 0.0)
        v = jnp.where(k_ok[None, :, None], v.astype(jnp.float32), 0.0)

        def one_block(b, out):
            start = first + b * bq
            rows = start + jnp.arange(bq, dtype=jnp.int32)
            row_ok = rows < first + q_len
            qpos = kv_len - q_len + (rows - first)  # absolute position of each query row
            qb = jax.lax.dynamic_slice_in_dim(q_pad, start, bq, axis=0)
            qb = jnp.where(row_ok[:, None, None], qb, 0.0)
            qb = qb.reshape(bq, shp.num_kv_heads, shp.group, shp.head_dim)
            logits = jnp.einsum("tkgd,kld->tkgl", qb, k, precision=_HIGHEST) * scale
            mask = row_ok[:, None] & k_ok[None, :] & (kpos[None, :] <= qpos[:, None])
            mask = mask[:, None, None, :]
            logits = jnp.where(mask, logits, -jnp.inf)
            m = jnp.max(logits, axis=-1, keepdims=True)
            p = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
            denom = jnp.sum(p, axis=-1, keepdims=True)
            p = p / jnp.where(denom > 0, denom, 1.0)
            o = jnp.einsum("tkgl,kld->tkgd", p, v, precision=_HIGHEST)
            o = o.reshape(bq, shp.num_q_heads, shp.head_dim)
            # Rows past this sequence's end keep what they hold (another sequence's output, or zeros).
            old = jax.lax.dynamic_slice_in_dim(out, start, bq, axis=0)
            return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(row_ok[:, None, None], o, old), start, 0)

        return jax.lax.fori_loop(0, (q_len + bq - 1) // bq, one_block, out)

    out = jax.lax.fori_loop(0, n, one_seq, out)
    return out[:shp.num_tokens].astype(q.dtype)
