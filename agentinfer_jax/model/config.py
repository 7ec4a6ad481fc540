"""Model hyper-parameters, read from and written back to Hugging Face `config.json`.

Invariants: `ModelConfig` is frozen and hashable (it is a static argument of jitted functions);
`num_heads % num_kv_heads == 0`; dtypes are stored as names ("float32", "bfloat16") so the config
round-trips through JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
                "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """The `rope_type: llama3` frequency rescaling of Llama 3.1+ (wavelength-dependent)."""

    factor: float  # divisor applied to the low frequencies (long wavelengths)
    low_freq_factor: float  # wavelengths above original_max / low_freq_factor are fully scaled
    high_freq_factor: float  # wavelengths below original_max / high_freq_factor are untouched
    original_max_position_embeddings: int  # context length the base model was trained with

    def to_hf(self) -> dict[str, Any]:
        return {"rope_type": "llama3", **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of a Llama 3.x / Qwen2 / Qwen2.5 / Qwen3 decoder."""

    vocab_size: int  # rows of the embedding table and columns of the LM head
    hidden_size: int  # width of the residual stream
    intermediate_size: int  # width of the SwiGLU MLP
    num_layers: int  # number of decoder blocks
    num_heads: int  # query heads per layer
    num_kv_heads: int  # key/value heads per layer (GQA when < num_heads)
    head_dim: int  # width of one attention head
    rms_norm_eps: float = 1e-6  # epsilon inside every RMSNorm
    rope_theta: float = 10000.0  # RoPE base frequency
    rope_scaling: Llama3RopeScaling | None = None  # None, or the llama3 rescaling
    tie_word_embeddings: bool = False  # LM head reuses the embedding table
    attention_bias: bool = False  # bias on the q/k/v projections (Qwen2/2.5)
    attention_out_bias: bool = False  # bias on the output projection (llama/qwen3 attention_bias)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    max_position_embeddings: int = 8192  # longest context the model supports
    dtype: str = "float32"  # activation / compute dtype
    param_dtype: str = "float32"  # dtype the weights are stored in
    bos_token_id: int | None = None  # beginning-of-sequence token, if the model uses one
    eos_token_ids: tuple[int, ...] = ()  # tokens that end generation
    model_type: str = "llama"  # HF model_type written back by to_hf()

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {self.model_type!r}; "
                             f"expected one of {SUPPORTED_MODEL_TYPES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        for name in ("dtype", "param_dtype"):
            object.__setattr__(self, name, _canonical_dtype(getattr(self, name), name))
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike[str], *,
                dtype: str | None = None, param_dtype: str | None = None) -> ModelConfig:
        """Builds a config from an HF config.json dict, file, or checkpoint directory.

        `dtype`/`param_dtype` override the checkpoint's `torch_dtype`/`dtype` entry.
        """
        cfg = _read_hf_config(config)
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; "
                             f"expected one of {SUPPORTED_MODEL_TYPES}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}; only 'silu'")
        if cfg.get("mlp_bias", False):
            raise ValueError("mlp_bias=True is not supported")
        if model_type in ("qwen2", "qwen3") and cfg.get("use_sliding_window", False):
            raise ValueError("use_sliding_window=True is not supported")
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or hidden // heads
        rope_theta, rope_scaling = _parse_rope(cfg)
        hf_bias = bool(cfg.get("attention_bias", False))
        checkpoint_dtype = _canonical_dtype(cfg.get("torch_dtype") or cfg.get("dtype")
                                            or "float32", "torch_dtype")
        eos = cfg.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias and none on o_proj; llama/qwen3 apply theirs to all four.
            attention_bias=True if model_type == "qwen2" else hf_bias,
            attention_out_bias=False if model_type == "qwen2" else hf_bias,
            qk_norm=model_type == "qwen3",
            max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
            dtype=dtype or checkpoint_dtype,
            param_dtype=param_dtype or dtype or checkpoint_dtype,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            model_type=model_type,
        )

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict transformers reads back into an equivalent model."""
        if self.model_type == "qwen2" and (not self.attention_bias or self.attention_out_bias):
            raise ValueError("qwen2 requires attention_bias=True and attention_out_bias=False")
        if self.model_type != "qwen2" and self.attention_bias != self.attention_out_bias:
            raise ValueError(f"{self.model_type} uses one attention_bias for q/k/v/o")
        if self.qk_norm != (self.model_type == "qwen3"):
            raise ValueError("qk_norm is exactly the qwen3 model_type")
        architectures = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                         "qwen3": "Qwen3ForCausalLM"}
        rope = self.rope_scaling.to_hf() if self.rope_scaling else {"rope_type": "default"}
        out: dict[str, Any] = {
            "architectures": [architectures[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf() if self.rope_scaling else None,
            "rope_parameters": {**rope, "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "torch_dtype": self.param_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (self.eos_token_ids[0] if len(self.eos_token_ids) == 1
                             else list(self.eos_token_ids) or None),
        }
        if self.model_type != "qwen2":
            out["attention_bias"] = self.attention_bias
        return out


def _canonical_dtype(name: Any, field: str) -> str:
    key = str(name).removeprefix("torch.").removeprefix("jnp.")
    if key not in _DTYPE_NAMES:
        raise ValueError(f"unsupported {field} {name!r}; expected float32, bfloat16 or float16")
    return _DTYPE_NAMES[key]


def _read_hf_config(config: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    path = os.fspath(config)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no HF config.json at {path}")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed config.json {path}: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"config.json {path} is not a JSON object")
    return cfg


def _parse_rope(cfg: Mapping[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    """Reads rope settings from `rope_theta`/`rope_scaling` (transformers 4) or
    `rope_parameters` (transformers 5)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope_scaling type {rope_type!r}; "
                         "only 'default' and 'llama3'")
    try:
        return theta, Llama3RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
    except KeyError as e:
        raise ValueError(f"llama3 rope_scaling is missing {e.args[0]!r}") from e
