"""Shared description of a ragged paged-attention batch: validation and q-block planning.

Layout contract (see WORKSPACE.md, "KV page layout"):
  q            [T, Hq, D]                      all query tokens of the step, sequence after sequence
  k_pages      [Hkv, num_pages, page_size, D]  one layer's keys; v_pages has the same shape
  kv_lens      [S] int32                       tokens cached for sequence s, its new ones included
  page_indices [S, P] int32                    page ids of sequence s, in position order
  cu_q_lens    [S + 1] int32                   sequence s owns query rows cu_q_lens[s]:cu_q_lens[s+1]
  num_seqs     int32 scalar (or shape [1])     sequences s >= num_seqs are padding

Only the first cdiv(kv_lens[s], page_size) entries of page_indices[s] are owned by s; the rest
may hold anything (backends replace them by the null page 0 before reading, or, like the reference's
vectorized path, read clamped ids whose slots all lie past kv_len and are masked).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

NULL_PAGE = 0


@dataclass(frozen=True)
class RaggedShapes:
    """Static shapes of one call, checked once at trace time."""

    num_tokens: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    num_pages: int
    page_size: int
    max_seqs: int
    pages_per_seq: int

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA ratio)."""
        return self.num_q_heads // self.num_kv_heads


def check_shapes(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs) -> RaggedShapes:
    """Raises ValueError naming the first inconsistent argument; works on tracers."""
    if q.ndim != 3:
        raise ValueError(f"q must be [T, Hq, D], got shape {q.shape}")
    if k_pages.ndim != 4:
        raise ValueError(f"k_pages must be [Hkv, num_pages, page_size, D], got shape {k_pages.shape}")
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} differ in shape")
    if k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages {k_pages.dtype} and v_pages {v_pages.dtype} differ in dtype")
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, head_dim_kv = k_pages.shape
    if head_dim != head_dim_kv:
        raise ValueError(f"q head_dim {head_dim} != k_pages head_dim {head_dim_kv}")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if num_pages < 1:
        raise ValueError("k_pages needs at least the null page 0")
    if page_indices.ndim != 2:
        raise ValueError(f"page_indices must be [S, P], got shape {page_indices.shape}")
    max_seqs, pages_per_seq = page_indices.shape
    if max_seqs < 1 or pages_per_seq < 1:
        raise ValueError(f"page_indices must have at least one sequence slot and one page column, "
                         f"got shape {page_indices.shape}")
    if kv_lens.shape != (max_seqs,):
        raise ValueError(f"kv_lens shape {kv_lens.shape} != ({max_seqs},) from page_indices")
    if cu_q_lens.shape != (max_seqs + 1,):
        raise ValueError(f"cu_q_lens shape {cu_q_lens.shape} != ({max_seqs + 1},)")
    if jnp.shape(num_seqs) not in ((), (1,)):
        raise ValueError(f"num_seqs must be a scalar or shape (1,), got shape {jnp.shape(num_seqs)}")
    for name, arr in (("kv_lens", kv_lens), ("page_indices", page_indices), ("cu_q_lens", cu_q_lens)):
        if arr.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32, got {arr.dtype}")
    return RaggedShapes(num_tokens, num_q_heads, num_kv_heads, head_dim, num_pages, page_size,
                        max_seqs, pages_per_seq)


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def check_values(kv_lens, page_indices, cu_q_lens, num_seqs, *, num_tokens: int, num_pages: int,
                 page_size: int, decode_only: bool = False) -> None:
    """Host-side check of the ragged metadata; raises ValueError naming the bad sequence.

    Skipped (returns) when any argument is a tracer: under jit the caller owns these invariants.
    """
    if not _is_concrete(kv_lens, page_indices, cu_q_lens, num_seqs):
        return
    kv_lens, page_indices, cu_q_lens = (np.asarray(a) for a in (kv_lens, page_indices, cu_q_lens))
    n = int(np.asarray(num_seqs).reshape(-1)[0])
    max_seqs, pages_per_seq = page_indices.shape
    if not 0 <= n <= max_seqs:
        raise ValueError(f"num_seqs={n} outside [0, {max_seqs}]")
    cu = cu_q_lens[: n + 1]
    if cu[0] != 0:
        raise ValueError(f"cu_q_lens[0] must be 0, got {cu[0]}")
    q_lens = np.diff(cu)
    if (q_lens < 0).any():
        raise ValueError(f"cu_q_lens decreases at sequence {int(np.argmax(q_lens < 0))}")
    if cu[-1] > num_tokens:
        raise ValueError(f"cu_q_lens[num_seqs]={cu[-1]} exceeds the {num_tokens} query rows")
    lens = kv_lens[:n]
    bad = np.nonzero(q_lens > lens)[0]
    if bad.size:
        s = int(bad[0])
        raise ValueError(f"sequence {s}: q_len {q_lens[s]} > kv_len {lens[s]}")
    if decode_only:
        bad = np.nonzero(q_lens != 1)[0]
        if bad.size:
            raise ValueError(f"decode backend needs q_len 1, sequence {int(bad[0])} has {q_lens[bad[0]]}")
    owned = -(-lens // page_size)
    if (owned > pages_per_seq).any():
        s = int(np.argmax(owned > pages_per_seq))
        raise ValueError(f"sequence {s}: kv_len {lens[s]} needs {owned[s]} pages > P={pages_per_seq}")
    for s in range(n):
        ids = page_indices[s, : owned[s]]
        if ((ids <= NULL_PAGE) | (ids >= num_pages)).any():
            raise ValueError(f"sequence {s}: owned page ids {ids.tolist()} must lie in [1, {num_pages})")


def num_seqs_scalar(num_seqs) -> jax.Array:
    return jnp.asarray(num_seqs, jnp.int32).reshape(())


def owned_page_table(kv_lens, page_indices, num_seqs, page_size: int) -> jax.Array:
    """page_indices with every entry a sequence does not own replaced by the null page.

    Padding sequences (s >= num_seqs) own nothing, so no backend can read outside a sequence's pages.
    """
    max_seqs, pages_per_seq = page_indices.shape
    live = jnp.arange(max_seqs) < num_seqs_scalar(num_seqs)
    owned = jnp.where(live, (kv_lens + page_size - 1) // page_size, 0)
    return jnp.where(jnp.arange(pages_per_seq)[None, :] < owned[:, None], page_indices, NULL_PAGE)


def live_q_lens(cu_q_lens, num_seqs) -> jax.Array:
    """[S] query count per sequence, 0 for padding sequences."""
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    return jnp.where(jnp.arange(q_lens.shape[0]) < num_seqs_scalar(num_seqs), q_lens, 0)


def max_q_blocks(num_tokens: int, max_seqs: int, block_q: int) -> int:
    """Static bound on sum_s cdiv(q_len_s, block_q) given sum_s q_len_s <= num_tokens."""
    return max(1, (num_tokens + max_seqs * (block_q - 1)) // block_q)


def plan_q_blocks(cu_q_lens, num_seqs, *, num_tokens: int, block_q: int) -> tuple[jax.Array, jax.Array]:
    """Split every sequence's query rows into blocks of at most block_q rows.

    Returns (block_seq, block_start), both [max_q_blocks] int32: block b covers rows
    block_start[b] : min(block_start[b] + block_q, cu_q_lens[block_seq[b] + 1]) of sequence
    block_seq[b]; unused blocks have block_seq = -1. A block never spans two sequences.
    """
    max_seqs = cu_q_lens.shape[0] - 1
    q_lens = live_q_lens(cu_q_lens, num_seqs)
    blocks_per_seq = (q_lens + block_q - 1) // block_q
    ends = jnp.cumsum(blocks_per_seq)  # inclusive
    starts = ends - blocks_per_seq
    nb = max_q_blocks(num_tokens, max_seqs, block_q)
    b = jnp.arange(nb, dtype=jnp.int32)
    seq = jnp.searchsorted(ends, b, side="right").astype(jnp.int32)
    valid = b < ends[-1]
    seq_c = jnp.minimum(seq, max_seqs - 1)
    start = cu_q_lens[seq_c] + (b - starts[seq_c]) * block_q
    return jnp.where(valid, seq_c, -1).astype(jnp.int32), jnp.where(valid, start, 0).astype(jnp.int32)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def default_block_q(num_tokens: int, max_seqs: int, group: int, min_rows: int = 16,
                    max_rows: int = 128) -> int:
    """Query tokens per block so that block_q * padded_group rows fill a matmul.

    Decode-like batches (about one token per sequence) get the fewest tokens that reach min_rows;
    prefill-like batches (many tokens per sequence) grow up to max_rows rows.
    """
    g = next_pow2(group)
    lo = max(1, min_rows // g)
    hi = max(lo, max_rows // g)
    avg = -(-num_tokens // max(1, max_seqs))
    return int(min(hi, max(lo, next_pow2(avg))))


def zero_padding_rows(out: jax.Array, cu_q_lens, num_seqs) -> jax.Array:
    """Zero rows at or beyond cu_q_lens[num_seqs] (they belong to no sequence)."""
    end = cu_q_lens[num_seqs_scalar(num_seqs)]
    rows = jnp.arange(out.shape[0])[:, None, None]
    return jnp.where(rows < end, out, jnp.zeros((), out.dtype))
