"""The paged attention backend: the model's attention over the engine's page pool.

The engine flattens a step's ragged batch to B = 1, T = every token of the step (prefill chunks,
decode tokens, verification tokens). Each layer writes its new K/V into the pages at
`slot_mapping`, then attends through `agentinfer_jax.kernels.ragged_paged_attention`.
"""

from __future__ import annotations

import dataclasses

import jax

from agentinfer_jax import kernels


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedMeta:
    """One step's ragged batch (device arrays; shapes padded to the engine's buckets)."""

    slot_mapping: jax.Array  # [T] page * page_size + offset per token; -1 for padding
    kv_lens: jax.Array  # [S] tokens in cache per sequence after this step's writes
    page_indices: jax.Array  # [S, P] each sequence's pages (0 = null page beyond its length)
    cu_q_lens: jax.Array  # [S+1] query row offsets
    num_seqs: jax.Array  # [] live sequences; rows and sequences beyond are padding


@dataclasses.dataclass(frozen=True)
class PagedAttention:
    """Layer cache `(k_pages, v_pages)`, each [Hkv, num_pages, page_size, D]."""

    backend: str | None = None  # kernels backend; None = the platform's default
    interpret: bool = False  # run Pallas kernels in interpret mode (CPU tests)

    def __call__(self, q, k, v, layer_cache, meta: PagedMeta):
        if q.shape[0] != 1:
            raise ValueError("the paged backend takes a flattened batch (B = 1)")
        k_pages, v_pages = kernels.write_kv(*layer_cache, k[0], v[0], meta.slot_mapping)
        out = kernels.ragged_paged_attention(q[0], k_pages, v_pages, meta.kv_lens, meta.page_indices,
                                             meta.cu_q_lens, meta.num_seqs, backend=self.backend,
                                             interpret=self.interpret)
        return out[None].astype(q.dtype), (k_pages, v_pages)
