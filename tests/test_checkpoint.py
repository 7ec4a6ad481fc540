"""HF safetensors loading/saving, config round-trips, error reporting, Orbax bit-exactness."""

from __future__ import annotations

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from agentinfer_jax.model import ContiguousMeta, ModelConfig, init_model
from agentinfer_jax.model.checkpoint import (INDEX_FILE, SINGLE_FILE, CheckpointError,
                                             SafetensorsFile, iter_hf_tensors,
                                             load_hf_checkpoint, restore_orbax,
                                             save_hf_checkpoint, save_orbax, write_safetensors)
from agentinfer_jax.model.config import Llama3RopeScaling


def _config(**kw) -> ModelConfig:
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, attention_bias=True, model_type="qwen2")
    return ModelConfig(**{**base, **kw})


def _leaves(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def _assert_bit_exact(a, b) -> None:
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A bf16 qwen2 checkpoint in the single-file format and its model."""
    config = _config(param_dtype="bfloat16", dtype="bfloat16")
    model = init_model(config, seed=3)
    directory = tmp_path_factory.mktemp("ckpt") / "single"
    save_hf_checkpoint(model, config, directory)
    return config, model, directory


def _rewrite(src, dst, edit) -> None:
    """Copies a single-file checkpoint, passing its tensors through `edit(dict)`."""
    os.makedirs(dst)
    tensors = dict(iter_hf_tensors(src))
    edit(tensors)
    write_safetensors(dst / SINGLE_FILE, tensors)
    (dst / "config.json").write_text((src / "config.json").read_text())


@pytest.mark.parametrize("shard_bytes", [None, 30_000], ids=["single", "sharded"])
def test_save_load_round_trip_is_bit_exact(saved, tmp_path, shard_bytes):
    config, model, _ = saved
    save_hf_checkpoint(model, config, tmp_path, max_shard_bytes=shard_bytes)
    assert (tmp_path / (SINGLE_FILE if shard_bytes is None else INDEX_FILE)).is_file()
    loaded_config, loaded = load_hf_checkpoint(tmp_path)
    assert loaded_config == config
    _assert_bit_exact(model, loaded)


def test_bf16_checkpoint_upcasts_exactly_to_f32(saved):
    config, model, directory = saved
    _, loaded = load_hf_checkpoint(directory, dtype="float32")
    for x, y in zip(_leaves(model), _leaves(loaded), strict=True):
        assert x.dtype == ml_dtypes.bfloat16 and y.dtype == np.float32
        np.testing.assert_array_equal(x.astype(np.float64), y.astype(np.float64))


def test_safetensors_reader_matches_reference_library(tmp_path):
    """Our writer's files read back through the `safetensors` package (independent code)."""
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32),
               "b": rng.standard_normal((7,)).astype(np.float16),
               "c": rng.integers(0, 9, (2, 2, 2)).astype(np.int64)}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    reference = load_file(tmp_path / "x.safetensors")
    ours = SafetensorsFile(tmp_path / "x.safetensors")
    for name, value in tensors.items():
        np.testing.assert_array_equal(reference[name], value)
        np.testing.assert_array_equal(ours.read(name), value)


def test_missing_unexpected_and_misshaped_tensors_are_all_named(saved, tmp_path):
    _, _, directory = saved

    def edit(tensors):
        del tensors["model.layers.1.self_attn.k_proj.bias"]
        tensors["model.layers.0.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
        tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((95, 64), np.float32)

    _rewrite(directory, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError) as err:
        load_hf_checkpoint(tmp_path / "bad")
    message = str(err.value)
    assert "missing tensors: ['model.layers.1.self_attn.k_proj.bias']" in message
    assert "unexpected tensors: ['model.layers.0.mlp.extra.weight']" in message
    assert "model.layers.0.mlp.up_proj.weight: expected [96, 64], got [95, 64]" in message


def test_truncated_file_names_file_and_tensor(saved, tmp_path):
    config, model, _ = saved
    save_hf_checkpoint(model, config, tmp_path / "c")
    path = tmp_path / "c" / SINGLE_FILE
    last = max(SafetensorsFile(path).tensors.items(), key=lambda kv: kv[1].end)[0]
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=rf"{SINGLE_FILE}: truncated: tensor '{last}'"):
        load_hf_checkpoint(tmp_path / "c")
    path.write_bytes(path.read_bytes()[:20])  # cut inside the JSON header
    with pytest.raises(CheckpointError, match="truncated safetensors header"):
        load_hf_checkpoint(tmp_path / "c")


def test_index_pointing_at_missing_shard(saved, tmp_path):
    config, model, _ = saved
    save_hf_checkpoint(model, config, tmp_path, max_shard_bytes=30_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / victim).unlink()
    with pytest.raises(CheckpointError, match=victim):
        load_hf_checkpoint(tmp_path)


def test_orbax_round_trip_is_bit_exact(saved, tmp_path):
    config, model, _ = saved
    save_orbax(model, tmp_path / "orbax")
    _assert_bit_exact(model, restore_orbax(tmp_path / "orbax", config))
    # A mismatch is named from the stored metadata, before any array is read.
    with pytest.raises(CheckpointError, match=r"does not match the config: layers\.0\.mlp\.\w+_proj\.value has shape"):
        restore_orbax(tmp_path / "orbax", config.replace(intermediate_size=64))
    with pytest.raises(CheckpointError, match=r"does not match the config: (no|unexpected) layers\.\d"):
        restore_orbax(tmp_path / "orbax", config.replace(num_layers=config.num_layers + 1))


def test_hf_config_round_trip_and_rejections():
    rng = np.random.default_rng(7)
    for _ in range(5):
        kv = int(rng.choice([1, 2, 4]))
        model_type = str(rng.choice(["llama", "qwen2", "qwen3"]))
        bias = model_type == "qwen2" or bool(rng.integers(2))
        config = _config(
            num_kv_heads=kv, head_dim=int(rng.choice([8, 16, 32])),
            rope_theta=float(rng.uniform(1e4, 1e6)), tie_word_embeddings=bool(rng.integers(2)),
            attention_bias=bias, attention_out_bias=bias and model_type != "qwen2",
            qk_norm=model_type == "qwen3", model_type=model_type,
            rope_scaling=(Llama3RopeScaling(8.0, 1.0, 4.0, 8192) if model_type == "llama"
                          else None),
            eos_token_ids=tuple(int(t) for t in rng.integers(0, 128, int(rng.integers(1, 3)))))
        assert ModelConfig.from_hf(json.loads(json.dumps(config.to_hf()))) == config
    with pytest.raises(ValueError, match="unsupported model_type 'mistral'"):
        ModelConfig.from_hf({**_config().to_hf(), "model_type": "mistral"})
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
        ModelConfig.from_hf({**_config().to_hf(), "rope_parameters": None,
                             "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        _config(num_kv_heads=3)


def test_transformers_reads_our_checkpoint(tmp_path):
    """save_hf_checkpoint output loads in transformers and gives the same logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from agentinfer_jax.model import forward, init_cache

    config = _config(model_type="llama", attention_bias=False, tie_word_embeddings=True,
                     rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 32), num_layers=1)
    model = init_model(config, seed=9)
    save_hf_checkpoint(model, config, tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    tokens = np.random.default_rng(9).integers(0, 128, (2, 10))
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor(tokens)).logits.numpy()
    positions = np.broadcast_to(np.arange(10, dtype=np.int32), (2, 10))
    graphdef, state = nnx.split(model)
    ours, _ = forward(graphdef, state, tokens.astype(np.int32), positions,
                      init_cache(config, 2, 10), ContiguousMeta(positions, np.full(2, 10)))
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-4, atol=1e-5)
