"""Tiny Hugging Face checkpoints written by transformers itself, for parity and loading tests.

Every parameter is re-drawn from a seeded generator (HF's own init zeroes biases and sets norms to
one, which would hide bias/norm mapping bugs).
"""

from __future__ import annotations

import pathlib

FAMILIES = ("llama3", "qwen2", "qwen3")
VOCAB = 256
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def hf_config(family: str, *, tie: bool):
    """A tiny transformers config of `family` (hidden 64, 2 layers, GQA 4/2)."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=tie, pad_token_id=PAD_ID,
                  bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    if family == "llama3":
        return transformers.LlamaConfig(
            **common, rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                           low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=32))
    if family == "qwen2":
        return transformers.Qwen2Config(**common, rope_parameters=dict(rope_type="default",
                                                                       rope_theta=1e6))
    if family == "qwen3":
        # head_dim 32 != hidden / heads, as in real Qwen3 configs.
        return transformers.Qwen3Config(**common, head_dim=32,
                                        rope_parameters=dict(rope_type="default",
                                                             rope_theta=1e6))
    raise ValueError(f"unknown family {family!r}")


def make_hf_model(family: str, *, tie: bool, seed: int):
    """A float32 transformers CausalLM with every parameter randomised from `seed`."""
    import torch
    import transformers

    config = hf_config(family, tie=tie)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.08 * noise)
    return model.eval()


def write_hf_checkpoint(family: str, directory: pathlib.Path, *, tie: bool, seed: int,
                        max_shard_size: str | None = None):
    """Saves a randomised tiny model with `save_pretrained`; returns the torch model."""
    model = make_hf_model(family, tie=tie, seed=seed)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return model
