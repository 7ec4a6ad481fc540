"""Tensor/data parallel forward on 8 fake CPU devices equals the single-device forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from agentinfer_jax.model import ContiguousMeta, ModelConfig, forward, init_cache
from agentinfer_jax.model.checkpoint import abstract_model
from agentinfer_jax.model.sharding import (logical_to_spec, make_mesh, shard_caches,
                                           shard_state)

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


def _config(num_kv_heads: int, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=1,
                       num_heads=8, num_kv_heads=num_kv_heads, head_dim=16,
                       attention_bias=True, model_type="qwen2", **kw)


def _inputs(seed: int, batch: int = 4, width: int = 8, cache_len: int = 16):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, 256, (batch, width)), jnp.int32)
    positions = jnp.asarray(np.broadcast_to(np.arange(width), (batch, width)), jnp.int32)
    kv_lens = jnp.asarray(rng.integers(1, width + 1, batch), jnp.int32)
    return tokens, positions, kv_lens, cache_len


def _random_model(config: ModelConfig, seed: int) -> tuple[nnx.GraphDef, nnx.State]:
    """Every parameter (norms and biases too) drawn from numpy, so that a mis-sharded one
    changes the output; numpy avoids compiling a PRNG program."""
    rng = np.random.default_rng(seed)
    graphdef, abstract = abstract_model(config)
    state = jax.tree.map(
        lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape, np.float32) + 0.5), abstract)
    return graphdef, state


@needs_8
@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["kv-divisible", "kv-replicated"])
def test_sharded_logits_equal_single_device(num_kv_heads):
    config = _config(num_kv_heads)
    graphdef, state = _random_model(config, seed=num_kv_heads)
    tokens, positions, kv_lens, cache_len = _inputs(seed=num_kv_heads)
    batch = tokens.shape[0]
    meta = ContiguousMeta(positions, kv_lens)
    ref, ref_caches = forward(graphdef, state, tokens, positions,
                              init_cache(config, batch, cache_len), meta)

    mesh = make_mesh(data=2, model=4)
    sharded_state = shard_state(state, mesh)
    q_proj = sharded_state["layers"][0]["attn"]["q_proj"]
    assert q_proj.get_value().sharding.spec == PartitionSpec(None, "model", None)
    assert q_proj.get_value().addressable_shards[0].data.shape == (64, 2, 16)
    caches = shard_caches(init_cache(config, batch, cache_len), mesh)
    with jax.set_mesh(mesh):
        out, out_caches = forward(graphdef, sharded_state, tokens, positions, caches, meta)
    assert out.sharding.spec[0] == "data"
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out_caches[0][0]), np.asarray(ref_caches[0][0]),
                               rtol=1e-5, atol=1e-5)


def test_logical_to_spec_replicates_indivisible_and_reused_axes():
    mesh_shape = {"data": 2, "model": 4}
    assert logical_to_spec(("embed", "heads", "head_dim"), (64, 8, 16), mesh_shape) == \
        PartitionSpec(None, "model", None)
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh_shape) == \
        PartitionSpec(None, None, None)
    # Two logical axes mapping to "model": only the first one may use it.
    assert logical_to_spec(("heads", "mlp"), (8, 8), mesh_shape) == PartitionSpec("model", None)


def test_make_mesh_rejects_bad_sizes():
    with pytest.raises(ValueError, match="needs"):
        make_mesh(data=jax.device_count() + 1, model=1)
    with pytest.raises(ValueError, match=">= 1"):
        make_mesh(data=0, model=1)
