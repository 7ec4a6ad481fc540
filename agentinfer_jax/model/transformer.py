"""Flax NNX decoder for Llama 3.x, Qwen2/2.5 and Qwen3, with a pluggable attention backend.

The model never owns a KV cache: each call takes the caches and returns updated ones, so the hot
path `forward(graphdef, state, tokens, positions, caches, meta)` is a pure jitted function.
Parameter layouts are head-major (q: [hidden, Hq, D], o: [Hq, D, hidden]) and carry
`logical_axes` metadata for sharding.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agentinfer_jax.model.attention import AttentionBackend, ContiguousAttention, ContiguousMeta
from agentinfer_jax.model.config import ModelConfig
from agentinfer_jax.model.sharding import constrain

Caches = tuple[Any, ...]  # one backend-specific layer cache per decoder layer
CONTIGUOUS = ContiguousAttention()
_INIT_STD = 0.02


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...],
           dtype: jnp.dtype, init: str = "normal") -> nnx.Param:
    if init == "normal":
        value = _INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        value = jnp.zeros(shape, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=axes)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies [head_dim // 2] (float32), with llama3 rescaling if configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.astype(np.float32)
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = ((old_len / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, T, D] (float32) for the half-rotation RoPE convention of HF Llama/Qwen."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, D] rotated at the positions cos/sin [B, T, D] were built for."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
    return x * cos + rotated * sin


class RMSNorm(nnx.Module):
    """y = weight * (x / rms(x)), normalised in float32 like HF (cast back before the weight)."""

    def __init__(self, dim: int, eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype,
                 axis_name: str, rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = dtype
        self.weight = _param(rngs, (dim,), (axis_name,), param_dtype, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * xf.astype(self.dtype)


class Attention(nnx.Module):
    """Projections, QK-norm and RoPE; the attention itself is the backend's."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c, pd = config, config.jnp_param_dtype
        self.dtype = c.jnp_dtype
        self.q_proj = _param(rngs, (c.hidden_size, c.num_heads, c.head_dim),
                             ("embed", "heads", "head_dim"), pd)
        self.k_proj = _param(rngs, (c.hidden_size, c.num_kv_heads, c.head_dim),
                             ("embed", "kv_heads", "head_dim"), pd)
        self.v_proj = _param(rngs, (c.hidden_size, c.num_kv_heads, c.head_dim),
                             ("embed", "kv_heads", "head_dim"), pd)
        self.o_proj = _param(rngs, (c.num_heads, c.head_dim, c.hidden_size),
                             ("heads", "head_dim", "embed"), pd)
        if c.attention_bias:
            self.q_bias = _param(rngs, (c.num_heads, c.head_dim), ("heads", "head_dim"), pd, "0")
            self.k_bias = _param(rngs, (c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"),
                                 pd, "0")
            self.v_bias = _param(rngs, (c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"),
                                 pd, "0")
        if c.attention_out_bias:
            self.o_bias = _param(rngs, (c.hidden_size,), ("embed",), pd, "0")
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.jnp_dtype, pd, "head_dim", rngs)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.jnp_dtype, pd, "head_dim", rngs)
        self.attention_bias = c.attention_bias
        self.attention_out_bias = c.attention_out_bias
        self.qk_norm = c.qk_norm

    def _project(self, x: jax.Array, name: str) -> jax.Array:
        w = getattr(self, f"{name}_proj")[...].astype(self.dtype)
        y = jnp.einsum("btd,dhk->bthk", x, w)
        if self.attention_bias:
            y = y + getattr(self, f"{name}_bias")[...].astype(self.dtype)
        return y

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, layer_cache: Any,
                 meta: Any, backend: AttentionBackend) -> tuple[jax.Array, Any]:
        q = constrain(self._project(x, "q"), ("batch", "seq", "heads", "head_dim"))
        k = constrain(self._project(x, "k"), ("batch", "seq", "kv_heads", "head_dim"))
        v = constrain(self._project(x, "v"), ("batch", "seq", "kv_heads", "head_dim"))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out, layer_cache = backend(q, k, v, layer_cache, meta)
        out = constrain(out, ("batch", "seq", "heads", "head_dim"))
        y = jnp.einsum("bthk,hkd->btd", out, self.o_proj[...].astype(self.dtype))
        if self.attention_out_bias:
            y = y + self.o_bias[...].astype(self.dtype)
        return y, layer_cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c, pd = config, config.jnp_param_dtype
        self.dtype = c.jnp_dtype
        self.gate_proj = _param(rngs, (c.hidden_size, c.intermediate_size), ("embed", "mlp"), pd)
        self.up_proj = _param(rngs, (c.hidden_size, c.intermediate_size), ("embed", "mlp"), pd)
        self.down_proj = _param(rngs, (c.intermediate_size, c.hidden_size), ("mlp", "embed"), pd)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = x @ self.gate_proj[...].astype(self.dtype)
        up = x @ self.up_proj[...].astype(self.dtype)
        h = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))
        return h @ self.down_proj[...].astype(self.dtype)


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c = config
        self.input_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.jnp_dtype,
                                  c.jnp_param_dtype, "embed", rngs)
        self.attn = Attention(c, rngs)
        self.post_attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.jnp_dtype,
                                      c.jnp_param_dtype, "embed", rngs)
        self.mlp = MLP(c, rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, layer_cache: Any,
                 meta: Any, backend: AttentionBackend) -> tuple[jax.Array, Any]:
        h, layer_cache = self.attn(self.input_norm(x), cos, sin, layer_cache, meta, backend)
        x = constrain(x + h, ("batch", "seq", "embed"))
        x = constrain(x + self.mlp(self.post_attn_norm(x)), ("batch", "seq", "embed"))
        return x, layer_cache


class Transformer(nnx.Module):
    """Decoder-only LM. `__call__(tokens [B,T], positions [B,T], caches, meta, backend)` returns
    float32 logits [B, T, V] and the updated caches."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embed = _param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"),
                            c.jnp_param_dtype)
        self.layers = nnx.List([DecoderLayer(c, rngs) for _ in range(c.num_layers)])
        self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.jnp_dtype,
                                  c.jnp_param_dtype, "embed", rngs)
        if not c.tie_word_embeddings:
            self.lm_head = _param(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"),
                                  c.jnp_param_dtype)

    def __call__(self, tokens: jax.Array, positions: jax.Array, caches: Caches, meta: Any,
                 backend: AttentionBackend = CONTIGUOUS) -> tuple[jax.Array, Caches]:
        x, caches = self.hidden(tokens, positions, caches, meta, backend)
        return self.logits(x), caches

    def hidden(self, tokens: jax.Array, positions: jax.Array, caches: Caches, meta: Any,
               backend: AttentionBackend = CONTIGUOUS) -> tuple[jax.Array, Caches]:
        """The final-normed hidden states [B, T, E] (callers that need only some rows' logits
        apply `logits` to those rows) and the updated caches."""
        c = self.config
        if len(caches) != c.num_layers:
            raise ValueError(f"expected {c.num_layers} layer caches, got {len(caches)}")
        x = jnp.take(self.embed[...], tokens, axis=0).astype(c.jnp_dtype)
        x = constrain(x, ("batch", "seq", "embed"))
        cos, sin = rope_tables(positions, rope_inv_freq(c))
        new_caches = []
        for layer, layer_cache in zip(self.layers, caches):
            x, layer_cache = layer(x, cos, sin, layer_cache, meta, backend)
            new_caches.append(layer_cache)
        return self.final_norm(x), tuple(new_caches)

    def logits(self, x: jax.Array) -> jax.Array:
        """float32 logits [..., V] of final-normed hidden states [..., E]."""
        c = self.config
        if c.tie_word_embeddings:
            logits = jnp.einsum("...d,vd->...v", x, self.embed[...].astype(c.jnp_dtype),
                                preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("...d,dv->...v", x, self.lm_head[...].astype(c.jnp_dtype),
                                preferred_element_type=jnp.float32)
        if logits.ndim == 3:
            logits = constrain(logits, ("batch", "seq", "vocab"))
        return logits


def init_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """A randomly initialised model (normal(0.02) weights, unit norms, zero biases).

    Initialisation runs as one jitted program (eager init would compile one op per shape) with
    the RngBitGenerator PRNG, which compiles several times faster on CPU than threefry.
    """
    def build() -> Transformer:
        return Transformer(config, rngs=nnx.Rngs(params=jax.random.key(seed, impl="unsafe_rbg")))

    graphdef, _ = nnx.split(nnx.eval_shape(build))
    return nnx.merge(graphdef, jax.jit(lambda: nnx.state(build()))())


def init_cache(config: ModelConfig, batch: int, max_len: int,
               dtype: Any = None) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """Zeroed contiguous KV caches: per layer (k, v), each [batch, max_len, Hkv, D]."""
    if batch < 1 or max_len < 1:
        raise ValueError(f"batch and max_len must be >= 1, got {batch}, {max_len}")
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)
    dtype = jnp.dtype(dtype or config.dtype)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                 for _ in range(config.num_layers))


@functools.partial(jax.jit, static_argnames=("graphdef", "backend"), donate_argnames=("caches",))
def forward(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, positions: jax.Array,
            caches: Caches, meta: Any,
            backend: AttentionBackend = CONTIGUOUS) -> tuple[jax.Array, Caches]:
    """Pure forward step: logits float32 [B, T, V] and the updated (donated) caches."""
    model = nnx.merge(graphdef, state)
    return model(tokens, positions, caches, meta, backend)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "num_new"))
def _greedy_decode(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array,
                   lengths: jax.Array, max_len: int, num_new: int) -> jax.Array:
    """Prefill right-padded `tokens` [B, T] then decode `num_new` argmax tokens [B, num_new]
    in one compiled program (a fori_loop over single-token steps)."""
    model = nnx.merge(graphdef, state)
    batch, width = tokens.shape
    caches = init_cache(model.config, batch, max_len)
    # Padding slots (>= length) are written but invisible (kv_lens) and overwritten by decode.
    positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (batch, width))
    logits, caches = model(tokens, positions, caches, ContiguousMeta(positions, lengths))
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    first = jnp.argmax(last, axis=-1).astype(jnp.int32)
    out = jnp.zeros((batch, num_new), jnp.int32).at[:, 0].set(first)

    def step(i, carry):
        out, caches = carry
        pos = (lengths + i - 1)[:, None]
        logits, caches = model(out[:, i - 1][:, None], pos, caches,
                               ContiguousMeta(pos, lengths + i))
        token = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        return out.at[:, i].set(token), caches

    out, _ = jax.lax.fori_loop(1, num_new, step, (out, caches))
    return out


def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             max_len: int | None = None,
             eos_token_ids: Sequence[int] | None = None) -> list[list[int]]:
    """Greedy decoding with the contiguous cache: one batched prefill, then one token per step.

    Prompts are right-padded; each row's new tokens stop after its first EOS (included).
    Returns the generated tokens only (not the prompt).
    """
    config = model.config
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if min(p) < 0 or max(p) >= config.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {config.vocab_size})")
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = int(lengths.max())
    max_len = max_len or width + max_new_tokens
    if max_len < width + max_new_tokens:
        raise ValueError(f"max_len {max_len} < longest prompt {width} + {max_new_tokens} tokens")
    eos = set(config.eos_token_ids if eos_token_ids is None else eos_token_ids)

    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    graphdef, state = nnx.split(model)
    generated = np.asarray(_greedy_decode(graphdef, state, jnp.asarray(tokens),
                                          jnp.asarray(lengths), max_len, max_new_tokens))
    result = []
    for row in generated.tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        result.append(row if stop is None else row[: stop + 1])
    return result
