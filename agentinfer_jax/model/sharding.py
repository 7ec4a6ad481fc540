"""Device mesh and logical-axis sharding (tensor parallel over heads and MLP, data over batch).

Parameters carry `logical_axes` metadata (e.g. ("embed", "heads", "head_dim")); rules map logical
names to mesh axes. A dimension whose size does not divide its mesh axis is replicated instead
(e.g. 2 KV heads on a 4-way model axis), so every config shards without error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "model")
LogicalAxes = tuple[str | None, ...]
Rules = tuple[tuple[str, str | None], ...]

DEFAULT_RULES: Rules = (
    ("batch", "data"),
    ("vocab", "model"),
    ("embed", None),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("head_dim", None),
    ("seq", None),
    ("cache_seq", None),
)


def make_mesh(data: int = 1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "model") mesh over the first data*model devices (all local ones by default)."""
    if data < 1 or model < 1:
        raise ValueError(f"mesh sizes must be >= 1, got data={data}, model={model}")
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < data * model:
        raise ValueError(f"mesh {data}x{model} needs {data * model} devices, "
                         f"only {len(devices)} available")
    grid = np.asarray(devices[: data * model], dtype=object).reshape(data, model)
    return Mesh(grid, MESH_AXES)


def logical_to_spec(logical_axes: LogicalAxes, shape: Sequence[int] | None = None,
                    mesh_shape: dict[str, int] | None = None,
                    rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; with `shape` and `mesh_shape`, a dimension not
    divisible by its mesh axis size (or whose mesh axis is already used) is replicated."""
    table = dict(rules)
    used: set[str] = set()
    spec: list[str | None] = []
    for i, name in enumerate(logical_axes):
        axis = table.get(name) if name is not None else None
        if axis is not None and mesh_shape is not None:
            if axis not in mesh_shape or axis in used:
                axis = None
            elif shape is not None and shape[i] % mesh_shape[axis]:
                axis = None
        if axis is not None:
            used.add(axis)
        spec.append(axis)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, logical_axes: LogicalAxes, rules: Rules = DEFAULT_RULES) -> jax.Array:
    """Constrains an activation's sharding under the ambient mesh (`jax.set_mesh`); a no-op
    when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    spec = logical_to_spec(logical_axes, x.shape, dict(mesh.shape), rules)
    return jax.lax.with_sharding_constraint(x, spec)


def _variable_spec(var: Any, mesh: Mesh, rules: Rules) -> NamedSharding:
    axes = var.get_metadata().get("logical_axes") if hasattr(var, "get_metadata") else None
    shape = var.get_value().shape if isinstance(var, nnx.Variable) else var.shape
    if axes is None:
        return NamedSharding(mesh, PartitionSpec())
    if len(axes) != len(shape):
        raise ValueError(f"logical_axes {axes} do not match shape {shape}")
    return NamedSharding(mesh, logical_to_spec(axes, shape, dict(mesh.shape), rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """A NamedSharding per variable of `state` (same tree structure), from its logical axes."""
    return jax.tree.map(lambda v: _variable_spec(v, mesh, rules), state,
                        is_leaf=lambda v: isinstance(v, nnx.Variable))


def shard_state(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """Places every variable of `state` on `mesh` according to its logical axes."""
    shardings = state_shardings(state, mesh, rules)
    return jax.device_put(state, shardings)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Moves a model's parameters onto `mesh` in place and returns it."""
    nnx.update(model, shard_state(nnx.state(model), mesh, rules))
    return model


CACHE_AXES: LogicalAxes = ("batch", "cache_seq", "kv_heads", "head_dim")


def cache_sharding(mesh: Mesh, shape: Sequence[int],
                   rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of one contiguous K or V cache array `[B, S, Hkv, D]`."""
    return NamedSharding(mesh, logical_to_spec(CACHE_AXES, shape, dict(mesh.shape), rules))


def shard_caches(caches: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Places contiguous KV caches (a pytree of `[B, S, Hkv, D]` arrays) on `mesh`."""
    return jax.tree.map(lambda a: jax.device_put(a, cache_sharding(mesh, a.shape, rules)), caches)


PAGED_CACHE_AXES: LogicalAxes = ("kv_heads", "kv_pages", "page_offset", "head_dim")


def paged_cache_sharding(mesh: Mesh, shape: Sequence[int], rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of one layer's K or V page pool `[Hkv, num_pages, page_size, D]`: KV heads on the
    model axis, as the K/V projections are, so each device attends with its own heads' pages and
    no page crosses devices; pages are replicated over the data axis (one flat batch per step)."""
    return NamedSharding(mesh, logical_to_spec(PAGED_CACHE_AXES, shape, dict(mesh.shape), rules))
