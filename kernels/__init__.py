"""Paged-attention kernels (imported as agentinfer_jax.kernels).

KV page layout (per layer): k_pages, v_pages [num_kv_heads, num_pages, page_size, head_dim];
page 0 is the null page, never owned by a sequence. See WORKSPACE.md, "KV page layout".
"""

from __future__ import annotations

import contextlib
from typing import Literal

import jax

from . import ragged
from .kv_write import write_kv, write_kv_donated
from .pallas_gpu import pallas_gpu_ragged_paged_attention
from .reference import reference_ragged_paged_attention
from .tpu import combine_kv_pages, tpu_decode_paged_attention, tpu_ragged_paged_attention

Backend = Literal["reference", "pallas_gpu", "pallas_tpu", "tpu_decode"]
BACKENDS: tuple[str, ...] = ("reference", "pallas_gpu", "pallas_tpu", "tpu_decode")
NULL_PAGE = ragged.NULL_PAGE


def default_backend() -> str:
    """pallas_gpu on GPU, pallas_tpu on TPU, reference elsewhere (CPU)."""
    platform = jax.default_backend()
    return {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu", "tpu": "pallas_tpu"}.get(
        platform, "reference")


def ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                           sm_scale: float | None = None, backend: Backend | None = None,
                           interpret: bool = False) -> jax.Array:
    """Causal GQA attention of a ragged batch of queries over a paged KV cache.

    q [T, Hq, D]; k_pages, v_pages [Hkv, num_pages, page_size, D]; kv_lens [S] int32;
    page_indices [S, P] int32; cu_q_lens [S+1] int32; num_seqs int32 scalar -> out [T, Hq, D].
    Sequence s owns query rows cu_q_lens[s]:cu_q_lens[s+1] and kv_lens[s] cached tokens (its new
    tokens included, already written) in pages page_indices[s]; its query j sees positions
    <= kv_len - q_len + j. Rows from cu_q_lens[num_seqs] on are padding and come back as zeros.
    sm_scale defaults to 1/sqrt(D). interpret=True runs the Pallas backends in interpret mode
    (TPU ones through pltpu.force_tpu_interpret_mode; call eagerly, not under an outer jit).

    When the metadata is concrete (not traced) it is validated on the host first (ValueError).
    """
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    shp = ragged.check_shapes(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    ragged.check_values(kv_lens, page_indices, cu_q_lens, num_seqs, num_tokens=shp.num_tokens,
                        num_pages=shp.num_pages, page_size=shp.page_size,
                        decode_only=backend == "tpu_decode")
    args = (q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    if backend == "reference":
        return reference_ragged_paged_attention(*args, sm_scale=sm_scale)
    if backend == "pallas_gpu":
        return pallas_gpu_ragged_paged_attention(*args, sm_scale=sm_scale, interpret=interpret)
    ctx = contextlib.nullcontext()
    if interpret:
        from jax.experimental.pallas import tpu as pltpu
        ctx = pltpu.force_tpu_interpret_mode()
    with ctx:
        if backend == "tpu_decode":
            return tpu_decode_paged_attention(*args, sm_scale=sm_scale)
        return tpu_ragged_paged_attention(*args, sm_scale=sm_scale)


__all__ = [
    "BACKENDS", "NULL_PAGE", "Backend", "combine_kv_pages", "default_backend",
    "pallas_gpu_ragged_paged_attention", "ragged", "ragged_paged_attention",
    "reference_ragged_paged_attention", "tpu_decode_paged_attention", "tpu_ragged_paged_attention",
    "write_kv", "write_kv_donated",
]
