"""Our decoder vs transformers (PyTorch CPU, float32) on checkpoints written by save_pretrained."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import hf_fixtures as hf  # noqa: E402
from agentinfer_jax.model import ContiguousMeta, forward, generate, init_cache  # noqa: E402
from agentinfer_jax.model.checkpoint import load_hf_checkpoint  # noqa: E402

# (family, tied embeddings, sharded index format) -- every family, tied and untied, both formats.
CASES = [("llama3", False, False), ("llama3", True, True), ("qwen2", False, True),
         ("qwen2", True, False), ("qwen3", False, False), ("qwen3", True, True)]
# Greedy decoding compiles a second program, so it runs once per family.
GENERATE_CASES = [("llama3", False, False), ("qwen2", True, False), ("qwen3", False, False)]
BATCH, WIDTH, CACHE_LEN = 3, 12, 16
_LOADED: dict[tuple[str, bool, bool], tuple] = {}


def _case_id(case):
    return f"{case[0]}-tie{case[1]}-sharded{case[2]}"


@pytest.fixture
def loaded(request, tmp_path_factory):
    """(torch model, our config, our model, rng) for `case`; built once per module run."""
    case = request.param
    if case not in _LOADED:
        _LOADED[case] = _load(case, tmp_path_factory)
    torch_model, config, model = _LOADED[case]
    return torch_model, config, model, np.random.default_rng(CASES.index(case) + 11)


def _load(case, tmp_path_factory):
    family, tie, sharded = case
    seed = CASES.index(case) + 11
    directory = tmp_path_factory.mktemp(f"{family}_{tie}")
    torch_model = hf.write_hf_checkpoint(family, directory, tie=tie, seed=seed,
                                         max_shard_size="40KB" if sharded else None)
    if sharded:
        assert (directory / "model.safetensors.index.json").is_file()
    config, model = load_hf_checkpoint(directory, dtype="float32")
    return torch_model, config, model


def _our_logits(config, model, tokens, positions, kv_lens):
    graphdef, state = nnx.split(model)
    logits, _ = forward(graphdef, state, jnp.asarray(tokens, jnp.int32),
                        jnp.asarray(positions, jnp.int32), init_cache(config, BATCH, CACHE_LEN),
                        ContiguousMeta(jnp.asarray(positions, jnp.int32),
                                       jnp.asarray(kv_lens, jnp.int32)))
    return np.asarray(logits)


def _assert_close_on_valid(ours, ref, valid):
    assert not np.isnan(ours).any()
    for b in range(ours.shape[0]):
        o, r = ours[b][valid[b]], ref[b][valid[b]]
        np.testing.assert_allclose(o, r, rtol=1e-4, atol=1e-4 * np.abs(r).max())


@pytest.mark.parametrize("loaded", CASES, ids=_case_id, indirect=True)
def test_config_matches_hf(loaded):
    torch_model, config, _, _ = loaded
    hf_cfg = torch_model.config
    assert config.num_layers == hf_cfg.num_hidden_layers
    expected_head_dim = (getattr(hf_cfg, "head_dim", None)
                         or hf_cfg.hidden_size // hf_cfg.num_attention_heads)
    assert config.head_dim == expected_head_dim
    assert config.rope_theta == hf_cfg.rope_parameters["rope_theta"]
    assert config.tie_word_embeddings == hf_cfg.tie_word_embeddings
    assert config.qk_norm == (hf_cfg.model_type == "qwen3")
    assert config.attention_bias == (hf_cfg.model_type == "qwen2")
    if hf_cfg.model_type == "llama":
        rope = hf_cfg.rope_parameters
        assert config.rope_scaling.factor == rope["factor"]
        assert (config.rope_scaling.original_max_position_embeddings
                == rope["original_max_position_embeddings"])
    else:
        assert config.rope_scaling is None


@pytest.mark.parametrize("loaded", CASES, ids=_case_id, indirect=True)
def test_logits_right_padding(loaded):
    torch_model, config, model, rng = loaded
    tokens = rng.integers(3, config.vocab_size, (BATCH, WIDTH))
    lens = rng.permutation([WIDTH, rng.integers(2, WIDTH), 1])
    valid = np.arange(WIDTH)[None] < lens[:, None]
    tokens = np.where(valid, tokens, hf.PAD_ID)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(tokens),
                          attention_mask=torch.tensor(valid.astype(np.int64))).logits.numpy()
    positions = np.broadcast_to(np.arange(WIDTH), (BATCH, WIDTH))
    _assert_close_on_valid(_our_logits(config, model, tokens, positions, lens), ref, valid)


@pytest.mark.parametrize("loaded", CASES, ids=_case_id, indirect=True)
def test_logits_left_padding_drops_pad_writes(loaded):
    torch_model, config, model, rng = loaded
    tokens = rng.integers(3, config.vocab_size, (BATCH, WIDTH))
    lens = rng.permutation([WIDTH, rng.integers(2, WIDTH), 1])
    valid = np.arange(WIDTH)[None] >= (WIDTH - lens)[:, None]
    tokens = np.where(valid, tokens, hf.PAD_ID)
    hf_positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(tokens),
                          attention_mask=torch.tensor(valid.astype(np.int64)),
                          position_ids=torch.tensor(hf_positions)).logits.numpy()
    # Padding tokens get an out-of-cache slot: their K/V must be dropped, not clobber slot 0.
    positions = np.where(valid, hf_positions, CACHE_LEN + 5)
    _assert_close_on_valid(_our_logits(config, model, tokens, positions, lens), ref, valid)


@pytest.mark.parametrize("loaded", GENERATE_CASES, ids=_case_id, indirect=True)
def test_greedy_generate_matches_hf(loaded):
    torch_model, config, model, rng = loaded
    lens = [9, 4]
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in lens]
    ours = generate(model, prompts, 32)
    width = max(lens)
    ids = np.full((len(prompts), width), hf.PAD_ID)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):  # HF decoder-only generation wants left padding
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    with torch.no_grad():
        out = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                   max_new_tokens=32, do_sample=False, pad_token_id=hf.PAD_ID,
                                   eos_token_id=hf.EOS_ID).numpy()[:, width:]
    for row, mine in zip(out.tolist(), ours):
        expected = row[: row.index(hf.EOS_ID) + 1] if hf.EOS_ID in row else row
        assert mine == expected
