"""Pallas (Triton lowering) ragged paged attention for GPUs; also runs with interpret=True.

Grid: (q-block b, KV head h). A q-block is up to block_q query tokens of ONE sequence (planned
outside the kernel by ragged.plan_q_blocks). Program (b, h) computes all G query heads that share
KV head h for those tokens, packed as block_q * Gp matmul rows (row = token * Gp + head, Gp = G
rounded up to a power of two), so decode with GQA 4 still issues 16-row matmuls. It then walks the
sequence's pages pages_per_block at a time with an online (flash) softmax:
  * page ids are read from the page table row of the sequence; ids past the pages it owns are
    replaced by the null page, and K/V slots at or past kv_len are zeroed after the load, so a
    NaN-filled foreign page cannot reach the output;
  * the loop stops at the last KV block the block's last query may see (causal), and the causal
    edge / partial last page are masked before the softmax;
  * logits, the running max/sum and the accumulator are float32; P is cast to V's dtype for the
    second matmul (bf16 tensor cores), f32 inputs use IEEE-precision dots.
Every value shape inside the kernel is a power of two (a Triton requirement): block_q, Gp,
pages_per_block * page_size and head_dim. Rows past cu_q_lens[num_seqs] come back as zeros.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import ragged

# Finite "minus infinity": keeps exp2(m_prev - m_new) finite for rows that saw no key yet.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_LOG2E = math.log2(math.e)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _kernel(block_seq_ref, block_start_ref, kv_lens_ref, cu_q_lens_ref, table_ref,  # scalars
            q_ref, k_ref, v_ref,  # q [T+bq, Hkv, Gp, D] (whole), k/v [num_pages, page, D] of head h
            o_ref,  # [T+bq, Hkv, Gp, D] (whole)
            *, block_q: int, group: int, group_pad: int, pages_per_block: int, scale_log2: float):
    b = pl.program_id(0)
    h = pl.program_id(1)
    seq = block_seq_ref[b]

    @pl.when(seq >= 0)
    def _():
        page_size, head_dim = k_ref.shape[-2], k_ref.shape[-1]
        block_k = pages_per_block * page_size
        rows = block_q * group_pad
        start = block_start_ref[b]
        q_begin = cu_q_lens_ref[seq]
        q_end = cu_q_lens_ref[seq + 1]
        kv_len = kv_lens_ref[seq]
        ctx = kv_len - (q_end - q_begin)  # position of the sequence's first query token

        tok = start + jax.lax.broadcasted_iota(jnp.int32, (rows,), 0) // group_pad
        head = jax.lax.broadcasted_iota(jnp.int32, (rows,), 0) % group_pad
        row_ok = (tok < q_end) & (head < group)
        qpos = ctx + tok - q_begin

        q = q_ref[pl.ds(start, block_q), h, :, :].reshape(rows, head_dim)
        q = jnp.where(row_ok[:, None], q, jnp.zeros((), q.dtype))
        # The last query of the block sees keys < kv_needed; later KV blocks are fully masked.
        last_tok = jnp.minimum(start + block_q, q_end)
        kv_needed = jnp.minimum(kv_len, ctx + last_tok - q_begin)
        num_blocks = (kv_needed + block_k - 1) // block_k
        owned_pages = (kv_len + page_size - 1) // page_size
        precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

        def body(j, carry):
            acc, m_prev, l_prev = carry
            page_slot = j * pages_per_block + jax.lax.broadcasted_iota(jnp.int32, (pages_per_block,), 0)
            ids = table_ref[seq, pl.ds(j * pages_per_block, pages_per_block)]
            ids = jnp.where(page_slot < owned_pages, ids, ragged.NULL_PAGE)
            kpos = j * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k,), 0)
            k_ok = kpos < kv_len
            k = k_ref[ids].reshape(block_k, head_dim)
            v = v_ref[ids].reshape(block_k, head_dim)
            k = jnp.where(k_ok[:, None], k, jnp.zeros((), k.dtype))
            v = jnp.where(k_ok[:, None], v, jnp.zeros((), v.dtype))
            s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                    preferred_element_type=jnp.float32) * scale_log2
            mask = row_ok[:, None] & k_ok[None, :] & (kpos[None, :] <= qpos[:, None])
            s = jnp.where(mask, s, _MASK_VALUE)
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
            alpha = jnp.exp2(m_prev - m_new)
            p = jnp.where(mask, jnp.exp2(s - m_new[:, None]), 0.0)
            l_new = alpha * l_prev + jnp.sum(p, axis=1)
            pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                                     preferred_element_type=jnp.float32)
            return acc * alpha[:, None] + pv, m_new, l_new

        init = (jnp.zeros((rows, head_dim), jnp.float32),
                jnp.full((rows,), _MASK_VALUE, jnp.float32),
                jnp.zeros((rows,), jnp.float32))
        acc, _, l = jax.lax.fori_loop(0, num_blocks, body, init)
        out = acc / jnp.where(l > 0.0, l, 1.0)[:, None]
        out = out.reshape(block_q, group_pad, head_dim).astype(o_ref.dtype)
        # Masked store, not read-modify-write: the block's tail rows belong to other programs.
        plgpu.store(o_ref.at[pl.ds(start, block_q), h, :, :], out,
                    mask=jnp.broadcast_to(row_ok.reshape(block_q, group_pad)[:, :, None], out.shape))


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_q", "pages_per_block", "num_warps",
                                             "num_stages", "interpret"))
def pallas_gpu_ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                                      *, sm_scale: float | None = None, block_q: int | None = None,
                                      pages_per_block: int | None = None, num_warps: int = 4,
                                      num_stages: int = 2, interpret: bool = False) -> jax.Array:
    """out [T, Hq, D] in q.dtype; see agentinfer_jax.kernels.ragged_paged_attention for the contract.

    block_q: query tokens per program (power of two; default from the batch's tokens per sequence).
    pages_per_block: pages per online-softmax step (power of two; default 64 tokens, >= 16 tokens).
    """
    shp = ragged.check_shapes(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    if not _is_pow2(shp.page_size) or not _is_pow2(shp.head_dim) or shp.head_dim < 16:
        raise ValueError(f"pallas_gpu needs power-of-two page_size and head_dim >= 16, got "
                         f"page_size={shp.page_size} head_dim={shp.head_dim}")
    group_pad = ragged.next_pow2(shp.group)
    bq = block_q or ragged.default_block_q(shp.num_tokens, shp.max_seqs, shp.group)
    ppb = pages_per_block or max(1, 64 // shp.page_size)
    if not _is_pow2(bq) or not _is_pow2(ppb):
        raise ValueError(f"block_q={bq} and pages_per_block={ppb} must be powers of two")
    if not interpret and (bq * group_pad < 16 or ppb * shp.page_size < 16):
        raise ValueError(f"Triton matmuls need >= 16 rows and keys: block_q * padded group = "
                         f"{bq * group_pad}, pages_per_block * page_size = {ppb * shp.page_size}")
    scale = 1.0 / math.sqrt(shp.head_dim) if sm_scale is None else float(sm_scale)

    n = ragged.num_seqs_scalar(num_seqs)
    block_seq, block_start = ragged.plan_q_blocks(cu_q_lens, n, num_tokens=shp.num_tokens, block_q=bq)
    table = ragged.owned_page_table(kv_lens, page_indices, n, shp.page_size)
    # Pad the page table to whole page blocks and q/out by bq rows, so no load leaves its array.
    table = jnp.pad(table, ((0, 0), (0, -shp.pages_per_seq % ppb)))
    qg = q.reshape(shp.num_tokens, shp.num_kv_heads, shp.group, shp.head_dim)
    qg = jnp.pad(qg, ((0, bq), (0, 0), (0, group_pad - shp.group), (0, 0)))
    padded_rows = shp.num_tokens + bq

    def whole(shape):
        return pl.BlockSpec(shape, lambda b, h: (0,) * len(shape))

    kv_spec = pl.BlockSpec((None, shp.num_pages, shp.page_size, shp.head_dim), lambda b, h: (h, 0, 0, 0))
    kernel = functools.partial(_kernel, block_q=bq, group=shp.group, group_pad=group_pad,
                               pages_per_block=ppb, scale_log2=scale * _LOG2E)
    compiler_params = None
    if not interpret:
        compiler_params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    out = pl.pallas_call(
        kernel,
        grid=(block_seq.shape[0], shp.num_kv_heads),
        in_specs=[whole(block_seq.shape), whole(block_start.shape), whole(kv_lens.shape),
                  whole(cu_q_lens.shape), whole(table.shape), whole(qg.shape), kv_spec, kv_spec],
        out_specs=whole(qg.shape),
        out_shape=jax.ShapeDtypeStruct((padded_rows, shp.num_kv_heads, group_pad, shp.head_dim), q.dtype),
        compiler_params=compiler_params,
        interpret=interpret,
        name="ragged_paged_attention",
    )(block_seq, block_start, kv_lens, cu_q_lens, table, qg, k_pages, v_pages)
    out = out[: shp.num_tokens, :, : shp.group].reshape(shp.num_tokens, shp.num_q_heads, shp.head_dim)
    return ragged.zero_padding_rows(out, cu_q_lens, n)
