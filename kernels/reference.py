"""Pure-JAX ragged paged attention: the CPU fast path and the oracle for the Pallas kernels.

Short steps run vectorized, no loop: decode-shaped ones (block_q <= 2) row by row, and steps
whose every sequence has at most cdiv(T, S) rows (a verification batch, a lone sequence's chunk)
sequence by sequence; each gathers its sequence's page-table row once (the engine cuts the table to
its step's longest context) and attends over it with batched matmuls. Otherwise every loop runs
over live work only, with dynamic trip counts: the num_seqs live sequences (padding sequences cost
nothing), each one's cdiv(q_len, block_q) query blocks (a block is at most block_q
rows of ONE sequence, like the GPU kernel's), and for each block the key chunks of kv_chunk tokens
up to its causal edge, combined with an online softmax in float32 (as the GPU kernel does). So
the looped cost is live query rows x live context, whatever the page table's width. Invariants:
  * NaN/garbage in pages a sequence does not own never reaches the output: the loop dereferences
    only the entries a sequence owns (< cdiv(kv_len, page_size)), the rest replaced by the null
    page; the vectorized path reads through the table as given (XLA clamps stray ids), and in both
    every slot at or past kv_len (which covers every page not owned) is masked, values zeroed;
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
# Vectorized path (no loop) for steps whose sequences have at most cdiv(T, S) rows each, up to
# these sizes: rows per sequence, and gathered keys (S x span x Hkv x D) / attention scores
# (S x rows x Hq x span) in values. Past them the loop's online softmax bounds the memory.
VECTOR_MAX_ROWS = 64
VECTOR_MAX_KV_VALUES = 1 << 22


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
    args = (q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, shp, scale)
    fits = block_q is None and _fits_vectorized(shp)
    if fits and shp.max_seqs == 1:  # a lone sequence owns every row: its pages gathered once
        return _vectorized(*args, per_row=False)
    # Decode-shaped: every row at once (a padding row costs less than a loop step).
    if bq <= 2:
        return _vectorized(*args, per_row=True)
    if fits:
        seq_blocks = functools.partial(_vectorized, *args, per_row=False)
        # Short steps (verification, small chunks): every sequence's rows at once when none has
        # more than its even share cdiv(T, S); else the loop below.
        within = jnp.max(ragged.live_q_lens(cu_q_lens, num_seqs)) <= -(-shp.num_tokens // shp.max_seqs)
        return jax.lax.cond(within, seq_blocks, functools.partial(_looped, *args, bq=bq, kv_chunk=kv_chunk))
    return _looped(*args, bq=bq, kv_chunk=kv_chunk)


def _fits_vectorized(shp) -> bool:
    """Whether sequences of cdiv(T, S) rows each fit the vectorized path's budgets (static)."""
    rows = -(-shp.num_tokens // shp.max_seqs)
    span = shp.pages_per_seq * shp.page_size
    return (rows <= VECTOR_MAX_ROWS
            and shp.max_seqs * span * shp.num_kv_heads * shp.head_dim <= VECTOR_MAX_KV_VALUES
            and shp.max_seqs * rows * shp.num_q_heads * span <= VECTOR_MAX_KV_VALUES)


def _looped(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, shp, scale, *, bq, kv_chunk):
    """Loops over live sequences, their q-blocks and each block's key chunks (online softmax)."""
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


def _vectorized(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, shp, scale, *, per_row: bool):
    """All rows at once, no loop. Rows are split into G groups of Q rows, each group one
    sequence's: per_row, every row is a group (decode-shaped steps: T <= 2 S); otherwise every
    sequence slot is a group of Q = cdiv(T, S) rows (a lone sequence: all of its rows), which holds
    only when no sequence has more than Q rows (the caller checks). Each group gathers its
    sequence's page-table row once and attends over the table's whole width."""
    t, hkv, g, d = shp.num_tokens, shp.num_kv_heads, shp.group, shp.head_dim
    s_max, span = shp.max_seqs, shp.pages_per_seq * shp.page_size
    n = ragged.num_seqs_scalar(num_seqs)
    q_lens = ragged.live_q_lens(cu_q_lens, n)
    rows = jnp.arange(t, dtype=jnp.int32)
    # Sequence of each row: how many sequences end at or before it (a compare, not a search loop).
    # Rows past the last sequence land on the last slot, whose rows end before them.
    row_seq = jnp.minimum(jnp.sum(cu_q_lens[None, 1:] <= rows[:, None], axis=1), s_max - 1)
    if per_row:
        num_groups, q_per, group_seq = t, 1, row_seq
        qg = q.reshape(t, 1, hkv, g, d)
        group_rows = rows[:, None]
    else:
        num_groups, q_per, group_seq = s_max, -(-t // s_max), jnp.arange(s_max, dtype=jnp.int32)
        group_rows = cu_q_lens[:-1, None] + jnp.arange(q_per, dtype=jnp.int32)[None, :]  # [S, Q]
        if s_max == 1:  # the rows are the group
            qg = q.reshape(1, t, hkv, g, d)
        else:
            qg = jnp.take(q, jnp.minimum(group_rows, t - 1).reshape(-1), axis=0).reshape(s_max, q_per, hkv, g, d)
    row_ok = group_rows < cu_q_lens[group_seq + 1][:, None]  # [G, Q]; padding rows and sequences: False
    kv_len = jnp.where(group_seq < n, kv_lens[group_seq], 0)  # [G]
    qpos = (kv_len - q_lens[group_seq])[:, None] + group_rows - cu_q_lens[group_seq][:, None]
    # Pages as rows of page_size * D values: one contiguous copy per page (a cheaper gather). The
    # table is used as given, not cut to the owned pages first (that arithmetic, fused into the
    # gathers, would rerun per gathered value): every slot of a page a sequence does not own lies
    # at or past its kv_len, so its keys are masked and its values zeroed; XLA clamps stray ids.
    pages = page_indices if not per_row else page_indices[group_seq]  # [G, P]
    flat = (hkv, shp.num_pages, shp.page_size * d)
    k = k_pages.reshape(flat)[:, pages].reshape(hkv, num_groups, span, d).astype(jnp.float32)
    v = v_pages.reshape(flat)[:, pages].reshape(hkv, num_groups, span, d).astype(jnp.float32)
    kpos = jnp.arange(span, dtype=jnp.int32)
    k_ok = kpos[None, :] < kv_len[:, None]  # [G, span]
    v = jnp.where(k_ok[None, :, :, None], v, 0.0)  # p = 0 there, but 0 * NaN = NaN
    mask = row_ok[:, :, None] & k_ok[:, None, :] & (kpos[None, None, :] <= qpos[:, :, None])  # [G, Q, span]
    mask = mask[None, :, :, None, :]  # [1, G, Q, 1, span]
    # Batched matmuls with the batch axes (KV head, group) leading on every operand.
    qk = jnp.transpose(qg.astype(jnp.float32), (2, 0, 1, 3, 4)).reshape(hkv, num_groups, q_per * g, d)
    logits = jnp.einsum("kgqd,kgld->kgql", qk, k, precision=_HIGHEST).reshape(hkv, num_groups, q_per, g, span)
    logits = jnp.where(mask, logits * scale, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))  # masked: exp(-inf) = 0
    denom = jnp.sum(p, axis=-1)
    o = jnp.einsum("kgql,kgld->kgqd", p.reshape(hkv, num_groups, q_per * g, span), v, precision=_HIGHEST)
    # Normalized after the matmul (D values per row instead of span); rows seeing nothing are 0.
    o = o.reshape(hkv, num_groups, q_per, g, d) / jnp.where(denom > 0, denom, 1.0)[..., None]
    o = jnp.transpose(o, (1, 2, 0, 3, 4)).reshape(num_groups * q_per, shp.num_q_heads, d)
    if not per_row and s_max > 1:  # back to the step's rows: row r is row r - cu[s] of group s
        at = row_seq * q_per + rows - cu_q_lens[row_seq]
        o = jnp.where((rows < cu_q_lens[n])[:, None, None], jnp.take(o, jnp.clip(at, 0, o.shape[0] - 1), axis=0), 0.0)
    return o[:t].astype(q.dtype)
