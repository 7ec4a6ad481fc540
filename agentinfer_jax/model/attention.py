"""Attention backends: the decoder hands them q/k/v and they own the KV-cache layout.

A backend is a hashable, stateless object (a static argument of jit) called as
`backend(q, k, v, layer_cache, meta) -> (out, new_layer_cache)` with q `[B, T, Hq, D]`,
k/v `[B, T, Hkv, D]` (RoPE already applied) and out `[B, T, Hq, D]`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

LayerCache = Any  # backend-specific pytree of one layer's cache


class AttentionBackend(Protocol):
    """What the decoder needs from a KV-cache layout + attention implementation."""

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, layer_cache: LayerCache,
                 meta: Any) -> tuple[jax.Array, LayerCache]: ...


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ContiguousMeta:
    """Step description for `ContiguousAttention`.

    positions: [B, T] int32 cache slots written by this step (equal to the RoPE positions).
        A padding token uses a slot >= S (the cache length): its K/V are dropped.
    kv_lens: [B] int32 valid cache length of each row after this step's writes.
    """

    positions: jax.Array
    kv_lens: jax.Array


@dataclasses.dataclass(frozen=True)
class ContiguousAttention:
    """Reference backend: per-layer cache `(k, v)`, each `[B, S, Hkv, D]`.

    Query at position p of row b sees cache slots s with s <= p and s < kv_lens[b].
    A query that sees no slot (e.g. a padding row) outputs zeros, never NaN.
    """

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array,
                 layer_cache: tuple[jax.Array, jax.Array],
                 meta: ContiguousMeta) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        k_cache, v_cache = layer_cache
        batch, _, num_heads, head_dim = q.shape
        num_kv_heads = k.shape[2]
        rows = jnp.arange(batch)[:, None]
        k_cache = k_cache.at[rows, meta.positions].set(k.astype(k_cache.dtype), mode="drop")
        v_cache = v_cache.at[rows, meta.positions].set(v.astype(v_cache.dtype), mode="drop")

        group = num_heads // num_kv_heads
        qg = q.reshape(*q.shape[:2], num_kv_heads, group, head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k_cache,
                            preferred_element_type=jnp.float32) * (head_dim ** -0.5)
        slots = jnp.arange(k_cache.shape[1])
        visible = ((slots[None, None, :] <= meta.positions[:, :, None])
                   & (slots[None, None, :] < meta.kv_lens[:, None, None]))  # [B, T, S]
        visible = visible[:, None, None]
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = jnp.where(visible, probs, 0.0)  # rows with nothing visible become zeros
        out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v_cache.dtype), v_cache,
                         preferred_element_type=jnp.float32)
        out = out.reshape(q.shape).astype(q.dtype)
        return out, (k_cache, v_cache)
