"""Scatter a step's new K/V rows into the paged cache.

slot = page * page_size + offset addresses one token slot of the flattened page pool. Slots < 0
(padding tokens) and slots >= num_pages * page_size are dropped, never wrapped around. If two
tokens name the same slot, which one lands is unspecified (the engine never does that).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp


def write_kv(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array,
             slot_mapping: jax.Array) -> tuple[jax.Array, jax.Array]:
    """k_pages/v_pages [Hkv, N, page, D], k/v [T, Hkv, D], slot_mapping [T] int -> updated pages.

    Pure and traceable; use write_kv_donated (or jit with donate_argnums=(0, 1)) to update in place.
    """
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages {k_pages.shape} / v_pages {v_pages.shape} must both be "
                         "[Hkv, num_pages, page_size, D]")
    hkv, num_pages, page_size, head_dim = k_pages.shape
    if k.ndim != 3 or k.shape != v.shape or k.shape[1:] != (hkv, head_dim):
        raise ValueError(f"k {k.shape} / v {v.shape} must both be [T, {hkv}, {head_dim}]")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping shape {slot_mapping.shape} != ({k.shape[0]},)")
    if not jnp.issubdtype(slot_mapping.dtype, jnp.integer):
        raise ValueError(f"slot_mapping must be integer, got {slot_mapping.dtype}")
    num_slots = num_pages * page_size
    # Negative indices would wrap in .at[]; send them past the end where mode="drop" discards them.
    slots = jnp.where(slot_mapping < 0, num_slots, slot_mapping).astype(jnp.int32)
    if k.shape[0] == 1:
        # One row: XLA rewrites a one-index scatter as a dynamic-update-slice, which on CPU copies
        # the whole page pool (measured, jax 0.10.2); a second, dropped row keeps it a scatter.
        k, v = jnp.pad(k, ((0, 1), (0, 0), (0, 0))), jnp.pad(v, ((0, 1), (0, 0), (0, 0)))
        slots = jnp.pad(slots, (0, 1), constant_values=num_slots)

    def scatter(pages, new):
        flat = pages.reshape(hkv, num_slots, head_dim)  # a bitcast: the update stays in place
        flat = flat.at[:, slots].set(jnp.swapaxes(new, 0, 1).astype(pages.dtype), mode="drop")
        return flat.reshape(pages.shape)

    return scatter(k_pages, k), scatter(v_pages, v)


write_kv_donated = jax.jit(write_kv, donate_argnums=(0, 1))
write_kv_donated.__doc__ = "write_kv under jit with k_pages and v_pages donated (updated in place)."
