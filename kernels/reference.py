"""Pure-JAX ragged paged attention: the CPU fast path and the oracle for the Pallas kernels.

It walks the same q-blocks as the GPU kernel (a block is at most block_q query rows of ONE
sequence), but for each block it gathers the sequence's whole page list and runs an ordinary
masked softmax in float32. Invariants:
  * only page-table entries a sequence owns (< cdiv(kv_len, page_size)) are dereferenced; the
    rest are replaced by the null page and, like every slot at or past kv_len, zeroed before use,
    so NaN/garbage in pages the sequence does not own never reaches the output;
  * the mask is applied before the softmax; fully masked rows (padding) give zeros, not NaN.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from . import ragged

_HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_q", "map_batch"))
def reference_ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                                     *, sm_scale: float | None = None, block_q: int | None = None,
                                     map_batch: int = 8) -> jax.Array:
    """out [T, Hq, D] in q.dtype; see agentinfer_jax.kernels.ragged_paged_attention for the contract."""
    shp = ragged.check_shapes(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    scale = 1.0 / math.sqrt(shp.head_dim) if sm_scale is None else float(sm_scale)
    bq = block_q or ragged.default_block_q(shp.num_tokens, shp.max_seqs, shp.group)
    n = ragged.num_seqs_scalar(num_seqs)
    table = ragged.owned_page_table(kv_lens, page_indices, n, shp.page_size)
    q_lens = ragged.live_q_lens(cu_q_lens, n)
    block_seq, block_start = ragged.plan_q_blocks(cu_q_lens, n, num_tokens=shp.num_tokens, block_q=bq)
    # bq rows of padding so a block's dynamic_slice never shifts back onto other rows.
    q_pad = jnp.pad(q, ((0, bq), (0, 0), (0, 0)))
    span = shp.pages_per_seq * shp.page_size
    kpos = jnp.arange(span, dtype=jnp.int32)

    def one_block(args):
        seq, start = args
        live = seq >= 0
        s = jnp.maximum(seq, 0)
        kv_len = jnp.where(live, kv_lens[s], 0)
        q_len = jnp.where(live, q_lens[s], 0)
        rows = start + jnp.arange(bq, dtype=jnp.int32)
        row_ok = live & (rows < cu_q_lens[s] + q_len)
        qpos = kv_len - q_len + (rows - cu_q_lens[s])  # absolute position of each query row
        k_ok = kpos < kv_len
        # [Hkv, P, page, D] -> [Hkv, span, D], only the sequence's own pages (others -> null page).
        k = k_pages[:, table[s]].reshape(shp.num_kv_heads, span, shp.head_dim)
        v = v_pages[:, table[s]].reshape(shp.num_kv_heads, span, shp.head_dim)
        k = jnp.where(k_ok[None, :, None], k.astype(jnp.float32), 0.0)
        v = jnp.where(k_ok[None, :, None], v.astype(jnp.float32), 0.0)
        qb = jax.lax.dynamic_slice_in_dim(q_pad, start, bq, axis=0).astype(jnp.float32)
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
        o = o.reshape(bq, shp.num_q_heads, shp.head_dim).astype(q.dtype)
        return o, jnp.where(row_ok, rows, shp.num_tokens)  # out-of-range rows are dropped below

    outs, rows = jax.lax.map(one_block, (block_seq, block_start), batch_size=map_batch)
    out = jnp.zeros_like(q)
    return out.at[rows.reshape(-1)].set(outs.reshape(-1, shp.num_q_heads, shp.head_dim), mode="drop")
