"""Pure-JAX ragged paged attention: the CPU fast path and the oracle for the Pallas kernels.

Decode-shaped steps (block_q <= 2) and short steps of one sequence run vectorized over the query
rows, each reading its sequence's page-table row (the engine cuts the table to its step's longest
context). Otherwise every loop runs
over live work only, with dynamic trip counts: the num_seqs live sequences (padding sequences cost
nothing), each one's cdiv(q_len, block_q) query blocks (a block is at most block_q
rows of ONE sequence, like the GPU kernel's), and for each block the key chunks of kv_chunk tokens
up to its causal edge, combined with an online softmax in float32 (as the GPU kernel does). So
the cost is live query rows x live context, whatever the page table's width. Invariants:
  * only page-table entries a sequence owns (< cdiv(kv_len, page_size)) are dereferenced; the
    rest are replaced by the null page and, like every slot at or past kv_len, masked (values
    zeroed) before use, so NaN/garbage in pages the sequence does not own never reaches the output;
  * the mask is applied before the softmax; rows that belong to no sequence (padding) are zeros.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from . import ragged

_HIGHEST = jax.lax.Precision.HIGHEST
# Keys per online-softmax step. On CPU each loop step costs tens of microseconds of op overhead,
# so a chunk should be worth about that much compute.
KV_CHUNK = 128
# Rows up to which a lone sequence's step runs vectorized (CPU, tiny model: faster than the loop
# for a k=4 verification, slower from k=8 on).
ONE_SEQUENCE_ROWS = 8


def reference_block_q(num_tokens: int, max_seqs: int) -> int:
    """Rows per block on CPU: the padded tokens per sequence, at most 64 (<= 2: the row path).

    Unlike a GPU matmul, a CPU matmul gains nothing from padding rows, so blocks stay small.
    """
    return int(min(64, ragged.next_pow2(-(-num_tokens // max(1, max_seqs)))))


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_q", "kv_chunk"))
def reference_ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                                     *, sm_scale: float | None = None, block_q: int | None = None,
                                     kv_chunk: int | None = None) -> jax.Array:
    """out [T, Hq, D] in q.dtype; see agentinfer_jax.kernels.ragged_paged_attention for the contract.

    kv_chunk: keys per online-softmax step (rounded to whole pages, at most the table's width).
    """
    shp = ragged.check_shapes(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    scale = 1.0 / math.sqrt(shp.head_dim) if sm_scale is None else float(sm_scale)
    bq = block_q or reference_block_q(shp.num_tokens, shp.max_seqs)
    # Decode-shaped (a padding row costs less than a loop), or one short sequence (a verification
    # step at batch 1: its pages gathered once, every row at once, beats a loop over key chunks).
    if bq <= 2 or (shp.max_seqs == 1 and shp.num_tokens <= ONE_SEQUENCE_ROWS):
        return _one_row_blocks(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, shp, scale)
    cp = max(1, min(shp.pages_per_seq, (kv_chunk or KV_CHUNK) // shp.page_size))  # pages per chunk
    chunk = cp * shp.page_size
    hkv, g, d = shp.num_kv_heads, shp.group, shp.head_dim
    n = ragged.num_seqs_scalar(num_seqs)
    table = ragged.owned_page_table(kv_lens, page_indices, n, shp.page_size)
    # Null-page columns so a chunk's dynamic slice never clamps back onto other pages.
    table = jnp.pad(table, ((0, 0), (0, -shp.pages_per_seq % cp)))
    q_lens = ragged.live_q_lens(cu_q_lens, n)
    # bq rows of padding so a block's dynamic slices never shift back onto other rows.
    q_pad = jnp.pad(q, ((0, bq), (0, 0), (0, 0))).astype(jnp.float32)
    out = jnp.zeros((shp.num_tokens + bq, shp.num_q_heads, d), jnp.float32)

    def one_block(s, b, out):
        kv_len, q_len, first = kv_lens[s], q_lens[s], cu_q_lens[s]
        start = first + b * bq
        rows = start + jnp.arange(bq, dtype=jnp.int32)
        row_ok = rows < first + q_len
        qpos = kv_len - q_len + (rows - first)  # absolute position of each query row
        qb = jax.lax.dynamic_slice_in_dim(q_pad, start, bq, axis=0)
        qb = jnp.where(row_ok[:, None, None], qb, 0.0).reshape(bq, hkv, g, d)
        last = jnp.minimum(kv_len, kv_len - q_len + jnp.minimum((b + 1) * bq, q_len))  # causal edge

        def one_chunk(c, carry):
            m, l, acc = carry
            pages = jax.lax.dynamic_slice_in_dim(table[s], c * cp, cp)
            k = k_pages[:, pages].reshape(hkv, chunk, d).astype(jnp.float32)
            v = v_pages[:, pages].reshape(hkv, chunk, d).astype(jnp.float32)
            kpos = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
            v = jnp.where((kpos < kv_len)[None, :, None], v, 0.0)  # p = 0 there, but 0 * NaN = NaN
            mask = row_ok[:, None] & (kpos[None, :] < kv_len) & (kpos[None, :] <= qpos[:, None])
            mask = mask[:, None, None, :]
            logits = jnp.einsum("tkgd,kld->tkgl", qb, k, precision=_HIGHEST) * scale
            logits = jnp.where(mask, logits, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(logits, axis=-1, keepdims=True))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.where(mask, jnp.exp(logits - m_safe), 0.0)
            alpha = jnp.exp(m - m_safe)  # m = -inf before any visible key: alpha = 0
            l = l * alpha + jnp.sum(p, axis=-1, keepdims=True)
            acc = acc * alpha + jnp.einsum("tkgl,kld->tkgd", p, v, precision=_HIGHEST)
            return m_new, l, acc

        init = (jnp.full((bq, hkv, g, 1), -jnp.inf), jnp.zeros((bq, hkv, g, 1)), jnp.zeros((bq, hkv, g, d)))
        _, l, acc = jax.lax.fori_loop(0, (last + chunk - 1) // chunk, one_chunk, init)
        o = (acc / jnp.where(l > 0, l, 1.0)).reshape(bq, shp.num_q_heads, d)
        # Rows past this sequence's end keep what they hold (another sequence's output, or zeros).
        old = jax.lax.dynamic_slice_in_dim(out, start, bq, axis=0)
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(row_ok[:, None, None], o, old), start, 0)

    def one_seq(s, out):
        return jax.lax.fori_loop(0, (q_lens[s] + bq - 1) // bq, functools.partial(one_block, s), out)

    out = jax.lax.fori_loop(0, n, one_seq, out)
    return out[:shp.num_tokens].astype(q.dtype)


def _one_row_blocks(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, shp, scale):
    """Decode-shaped steps (T <= 2 S): every query row is a block, all rows at once
    (vectorized: no loop overhead); each row reads its sequence's whole page-table row."""
    t, hkv, g, d = shp.num_tokens, shp.num_kv_heads, shp.group, shp.head_dim
    span = shp.pages_per_seq * shp.page_size
    n = ragged.num_seqs_scalar(num_seqs)
    table = ragged.owned_page_table(kv_lens, page_indices, n, shp.page_size)
    q_lens = ragged.live_q_lens(cu_q_lens, n)
    rows = jnp.arange(t, dtype=jnp.int32)
    row_ok = rows < cu_q_lens[n]
    # Sequence of each row: how many sequences end at or before it (a compare, not a search loop).
    seq = jnp.minimum(jnp.sum(cu_q_lens[None, 1:] <= rows[:, None], axis=1), shp.max_seqs - 1)
    kv_len = jnp.where(row_ok, kv_lens[seq], 0)
    qpos = kv_len - q_lens[seq] + (rows - cu_q_lens[seq])  # absolute position of each query row
    kpos = jnp.arange(span, dtype=jnp.int32)
    k_ok = kpos[None, :] < kv_len[:, None]  # [T, span]
    mask = (k_ok & (kpos[None, :] <= qpos[:, None]))[:, None, None, :]
    if shp.max_seqs == 1:  # one sequence: its pages gathered once, shared by every row
        k = k_pages[:, table[0]].reshape(hkv, span, d).astype(jnp.float32)
        v = v_pages[:, table[0]].reshape(hkv, span, d).astype(jnp.float32)
        v = jnp.where((kpos < jnp.where(n > 0, kv_lens[0], 0))[None, :, None], v, 0.0)  # p = 0 there, but 0 * NaN = NaN
        scores, mix = "tkgd,kld->tkgl", "tkgl,kld->tkgd"
    else:
        pages = jnp.where(row_ok[:, None], table[seq], ragged.NULL_PAGE)  # [T, P]
        k = k_pages[:, pages].reshape(hkv, t, span, d).astype(jnp.float32)
        v = v_pages[:, pages].reshape(hkv, t, span, d).astype(jnp.float32)
        v = jnp.where(k_ok[None, :, :, None], v, 0.0)
        scores, mix = "tkgd,ktld->tkgl", "tkgl,ktld->tkgd"
    qr = q.astype(jnp.float32).reshape(t, hkv, g, d)
    logits = jnp.einsum(scores, qr, k, precision=_HIGHEST) * scale
    logits = jnp.where(mask, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum(mix, p / jnp.where(denom > 0, denom, 1.0), v, precision=_HIGHEST)
    return o.reshape(t, shp.num_q_heads, d).astype(q.dtype)
