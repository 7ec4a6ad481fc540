"""Step cost model: the time of one engine step from its composition.

A step runs prefill chunks, decode tokens and verification tokens of several sequences at once. Its
time is modelled as a non-negative combination of
    const           fixed per-step cost (weight reads, launches, host work),
    prefill_tokens  tokens fed as prompt chunks (matmul FLOPs),
    decode_tokens   tokens fed as decode or draft verification (matmul FLOPs + logits),
    num_seqs        sequences in the step (per-sequence bookkeeping, sampling),
    attn_ctx_tokens sum over sequences of kv_len * q_len (attention FLOPs),
    kv_read_tokens  sum over sequences of kv_len (KV bytes read).
The coefficients are fitted by non-negative least squares to measured `(features, seconds)` samples,
by default on relative error (rows weighted by 1 / seconds), or come from `default_for`, an
analytical roofline prior for a model config on a named device, for sweeps with nothing measured.
The sum (not max) of compute and memory terms overestimates mixed steps a little; the fit absorbs it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["FEATURE_NAMES", "StepFeatures", "DeviceSpec", "DEVICES", "StepCostModel", "nnls", "relative_errors",
           "holdout_report"]

FEATURE_NAMES: tuple[str, ...] = ("const", "prefill_tokens", "decode_tokens", "num_seqs", "attn_ctx_tokens",
                                  "kv_read_tokens")
_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class StepFeatures:
    """What one engine step computes (all counts >= 0)."""

    prefill_tokens: int = 0
    decode_tokens: int = 0  # decode and verification (draft) tokens
    num_seqs: int = 0
    attn_ctx_tokens: int = 0  # sum of kv_len * q_len over sequences
    kv_read_tokens: int = 0  # sum of kv_len over sequences

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not (isinstance(v, (int, np.integer)) and v >= 0):
                raise ValueError(f"StepFeatures.{f.name} must be an integer >= 0, got {v!r}")

    @classmethod
    def from_sequences(cls, seqs: Iterable[tuple[int, int, bool]]) -> StepFeatures:
        """From `(q_len, kv_len, is_prefill)` per sequence; kv_len counts the step's new tokens too."""
        pre = dec = n = attn = kv = 0
        for q_len, kv_len, is_prefill in seqs:
            if q_len < 1 or kv_len < q_len:
                raise ValueError(f"need 1 <= q_len <= kv_len, got q_len={q_len}, kv_len={kv_len}")
            n += 1
            attn += q_len * kv_len
            kv += kv_len
            if is_prefill:
                pre += q_len
            else:
                dec += q_len
        return cls(pre, dec, n, attn, kv)

    @classmethod
    def from_scheduler_output(cls, output: Any) -> StepFeatures:
        """From a `SchedulerOutput`: a sequence feeding its newest token (plus drafts) decodes; any
        other feed is a prefill chunk. A one-token prompt chunk counts as decode: it costs the same."""
        seqs = []
        for s in output.seqs:
            q = len(s.tokens)
            seqs.append((q, s.start_pos + q, not (s.num_draft > 0 or q == 1)))
        return cls.from_sequences(seqs)

    def vector(self) -> np.ndarray:
        """[1, prefill, decode, seqs, attn_ctx, kv_read] as float64, in FEATURE_NAMES order."""
        return np.array([1.0, self.prefill_tokens, self.decode_tokens, self.num_seqs, self.attn_ctx_tokens,
                         self.kv_read_tokens], dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Peak rates of an accelerator for the roofline prior (dense bf16 FLOP/s, memory bytes/s)."""

    name: str
    peak_flops: float
    mem_bytes_per_s: float
    step_overhead_s: float  # launches, host scheduling and sampling per step
    seq_overhead_s: float  # per-sequence bookkeeping per step


# Public datasheet peaks (dense, no sparsity); "cpu" is a rough 2-core AVX2 float32 host.
DEVICES: dict[str, DeviceSpec] = {d.name: d for d in (
    DeviceSpec("h100", 989e12, 3.35e12, 3e-4, 2e-6),
    DeviceSpec("h200", 989e12, 4.8e12, 3e-4, 2e-6),
    DeviceSpec("a100", 312e12, 2.04e12, 3e-4, 2e-6),
    DeviceSpec("l4", 121e12, 0.3e12, 3e-4, 2e-6),
    DeviceSpec("tpu-v4", 275e12, 1.2e12, 2e-4, 2e-6),
    DeviceSpec("tpu-v5e", 197e12, 0.82e12, 2e-4, 2e-6),
    DeviceSpec("tpu-v5p", 459e12, 2.76e12, 2e-4, 2e-6),
    DeviceSpec("cpu", 1e11, 2e10, 1e-4, 1e-6),
)}


def nnls(a: np.ndarray, b: np.ndarray, *, max_iter: int | None = None, tol: float = 1e-12) -> np.ndarray:
    """argmin ||a x - b||_2 subject to x >= 0 (Lawson-Hanson active set), numpy only.

    Columns are rescaled to unit norm first so features spanning many orders of magnitude (tokens vs
    kv_len * q_len) are treated alike; all-zero columns get coefficient 0.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.shape != (a.shape[0],):
        raise ValueError(f"nnls needs a [m, n] matrix and an [m] vector, got {a.shape} and {b.shape}")
    norms = np.linalg.norm(a, axis=0)
    live = norms > 0
    x = np.zeros(a.shape[1])
    if not live.any():
        return x
    s = a[:, live] / norms[live]
    n = s.shape[1]
    passive = np.zeros(n, dtype=bool)
    z = np.zeros(n)
    max_iter = max_iter or 30 * n
    thresh = tol * max(1.0, float(np.abs(s.T @ b).max()))
    for _ in range(max_iter):
        w = s.T @ (b - s @ z)
        if passive.all() or w[~passive].max() <= thresh:
            break
        passive[np.argmax(np.where(passive, -np.inf, w))] = True
        while True:  # inner loop: keep the passive-set solution feasible
            y = np.zeros(n)
            y[passive] = np.linalg.lstsq(s[:, passive], b, rcond=None)[0]
            if (y[passive] > 0).all():
                z = y
                break
            neg = passive & (y <= 0)
            alpha = np.min(z[neg] / (z[neg] - y[neg]))
            z = z + alpha * (y - z)
            passive &= z > tol
            z[~passive] = 0.0
    x[live] = z / norms[live]
    return x


def relative_errors(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """|predicted - measured| / measured, elementwise."""
    return np.abs(np.asarray(predicted) - np.asarray(measured)) / np.asarray(measured)


def _check_samples(samples: Sequence[tuple[StepFeatures, float]]) -> tuple[np.ndarray, np.ndarray]:
    if len(samples) == 0:
        raise ValueError("no samples: need measured (StepFeatures, seconds) pairs")
    x, y = [], []
    for i, pair in enumerate(samples):
        try:
            feats, secs = pair
        except (TypeError, ValueError):
            raise ValueError(f"sample {i} is not a (StepFeatures, seconds) pair") from None
        if not isinstance(feats, StepFeatures):
            raise ValueError(f"sample {i}: features must be StepFeatures, got {type(feats).__name__}")
        if not (isinstance(secs, (int, float, np.floating)) and math.isfinite(secs) and secs > 0):
            raise ValueError(f"sample {i}: seconds must be a finite number > 0, got {secs!r}")
        x.append(feats.vector())
        y.append(float(secs))
    return np.stack(x), np.asarray(y)


class StepCostModel:
    """seconds(step) = coef . [1, prefill, decode, seqs, attn_ctx, kv_read], with coef >= 0."""

    def __init__(self, coef: Sequence[float] | Mapping[str, float], *, name: str = "",
                 meta: Mapping[str, Any] | None = None) -> None:
        if isinstance(coef, Mapping):
            unknown = set(coef) - set(FEATURE_NAMES)
            if unknown:
                raise ValueError(f"unknown cost-model features {sorted(unknown)}; known: {FEATURE_NAMES}")
            coef = [float(coef.get(k, 0.0)) for k in FEATURE_NAMES]
        arr = np.asarray(coef, dtype=np.float64)
        if arr.shape != (len(FEATURE_NAMES),):
            raise ValueError(f"need {len(FEATURE_NAMES)} coefficients ({', '.join(FEATURE_NAMES)}), got {arr.shape}")
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise ValueError(f"coefficients must be finite and >= 0, got {arr.tolist()}")
        self.coef = arr
        self.name = name
        self.meta = dict(meta or {})

    @property
    def coefficients(self) -> dict[str, float]:
        return dict(zip(FEATURE_NAMES, self.coef.tolist()))

    # --- fitting and prediction ---

    @classmethod
    def fit(cls, samples: Sequence[tuple[StepFeatures, float]], *, relative: bool = True,
            name: str = "fitted") -> StepCostModel:
        """NNLS fit; `relative` weights each row by 1 / seconds (minimises relative, not absolute,
        error, so short decode steps count as much as long prefills)."""
        x, y = _check_samples(samples)
        w = 1.0 / y if relative else np.ones_like(y)
        coef = nnls(x * w[:, None], y * w)
        model = cls(coef, name=name, meta={"num_samples": len(y), "relative": relative})
        model.meta["train_mean_rel_err"] = float(relative_errors(x @ coef, y).mean())
        return model

    def predict(self, features: StepFeatures | Sequence[StepFeatures]) -> float | np.ndarray:
        """Seconds for one step, or an array for a sequence of steps."""
        if isinstance(features, StepFeatures):
            return float(features.vector() @ self.coef)
        return np.array([f.vector() for f in features]).reshape(-1, len(FEATURE_NAMES)) @ self.coef

    def as_step_cost(self, context_tokens: int = 1024):
        """`(batch_size, tokens_fed) -> seconds` for the adaptive switch: a decode or verify step of
        `batch_size` sequences of `context_tokens` each, feeding `tokens_fed` tokens in all."""
        if context_tokens < 0:
            raise ValueError(f"context_tokens must be >= 0, got {context_tokens}")

        def step_cost(batch_size: int, tokens_fed: int) -> float:
            b, t = max(int(batch_size), 1), max(int(tokens_fed), 1)
            return self.predict(StepFeatures(0, t, b, t * (context_tokens + 1), b * context_tokens + t))

        return step_cost

    def evaluate(self, samples: Sequence[tuple[StepFeatures, float]]) -> dict[str, float]:
        """Relative error on `samples`: mean, median, p90, max, and the count."""
        x, y = _check_samples(samples)
        err = relative_errors(x @ self.coef, y)
        return {"n": float(len(y)), "mean_rel_err": float(err.mean()), "median_rel_err": float(np.median(err)),
                "p90_rel_err": float(np.quantile(err, 0.9)), "max_rel_err": float(err.max())}

    # --- the analytical prior ---

    @classmethod
    def default_for(cls, config: Any, device: str | DeviceSpec = "h100", *, dtype_bytes: int = 2,
                    mfu: float = 0.5, mbu: float = 0.8) -> StepCostModel:
        """Roofline prior for a decoder `config` (ModelConfig, or an HF config.json dict) on `device`.

        Per step: all weights are read once (const); every token costs 2 FLOPs per matmul weight
        (decode tokens also pay the vocabulary projection); attention costs 4 * layers * heads *
        head_dim FLOPs per (query, key) pair; every context token's K and V are read once. Compute runs
        at `mfu` of peak FLOP/s and memory at `mbu` of peak bandwidth.
        """
        dev = device if isinstance(device, DeviceSpec) else DEVICES.get(str(device).lower())
        if dev is None:
            raise ValueError(f"unknown device {device!r}; known: {', '.join(DEVICES)} (or pass a DeviceSpec)")
        if not (0 < mfu <= 1 and 0 < mbu <= 1) or dtype_bytes <= 0:
            raise ValueError(f"need 0 < mfu, mbu <= 1 and dtype_bytes > 0, got {mfu}, {mbu}, {dtype_bytes}")
        shape = _decoder_shape(config)
        layers, hidden, heads, kv_heads, head_dim, inter, vocab = (
            shape[k] for k in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab"))
        layer_params = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * inter  # attn + gated MLP
        matmul_params = layers * layer_params
        flops, bw = dev.peak_flops * mfu, dev.mem_bytes_per_s * mbu
        coef = {
            "const": (matmul_params + hidden * vocab) * dtype_bytes / bw + dev.step_overhead_s,
            "prefill_tokens": 2 * matmul_params / flops,
            "decode_tokens": 2 * (matmul_params + hidden * vocab) / flops,
            "num_seqs": dev.seq_overhead_s,
            "attn_ctx_tokens": 4 * layers * heads * head_dim / flops,
            "kv_read_tokens": 2 * layers * kv_heads * head_dim * dtype_bytes / bw,
        }
        return cls(coef, name=f"roofline:{dev.name}", meta={"device": dev.name, "mfu": mfu, "mbu": mbu,
                                                             "dtype_bytes": dtype_bytes, **shape})

    # --- persistence ---

    def to_dict(self) -> dict[str, Any]:
        return {"version": _FORMAT_VERSION, "name": self.name, "coefficients": self.coefficients, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StepCostModel:
        if not isinstance(d, Mapping) or d.get("version") != _FORMAT_VERSION or "coefficients" not in d:
            raise ValueError(f"not a step cost model (version {_FORMAT_VERSION} with 'coefficients')")
        missing = set(FEATURE_NAMES) - set(d["coefficients"])
        if missing:
            raise ValueError(f"cost model file lacks coefficients {sorted(missing)}")
        return cls(d["coefficients"], name=str(d.get("name", "")), meta=d.get("meta") or {})

    def save(self, path: str | pathlib.Path) -> None:
        pathlib.Path(path).write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: str | pathlib.Path) -> StepCostModel:
        try:
            d = json.loads(pathlib.Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed cost model JSON ({e.msg})") from e
        return cls.from_dict(d)

    def __repr__(self) -> str:
        terms = ", ".join(f"{k}={v:.3g}" for k, v in self.coefficients.items())
        return f"StepCostModel({self.name!r}: {terms})"


def _decoder_shape(config: Any) -> dict[str, int]:
    """Layer/head/width counts from a ModelConfig-like object or an HF config.json dict."""
    def get(*names: str, default: Any = None) -> Any:
        for n in names:
            v = config.get(n) if isinstance(config, Mapping) else getattr(config, n, None)
            if v is not None:
                return v
        if default is None:
            raise ValueError(f"model config lacks {' / '.join(names)}")
        return default

    hidden = int(get("hidden_size", "d_model", "emb_dim"))
    heads = int(get("num_attention_heads", "num_heads", "num_query_heads"))
    shape = {
        "layers": int(get("num_hidden_layers", "num_layers")),
        "hidden": hidden,
        "heads": heads,
        "kv_heads": int(get("num_key_value_heads", "num_kv_heads", default=heads)),
        "head_dim": int(get("head_dim", default=hidden // heads)),
        "intermediate": int(get("intermediate_size", "mlp_dim", "ffn_dim")),
        "vocab": int(get("vocab_size")),
    }
    if min(shape.values()) <= 0:
        raise ValueError(f"model config has non-positive sizes: {shape}")
    return shape


def holdout_report(samples: Sequence[tuple[StepFeatures, float]], *, holdout_frac: float = 0.25, seed: int = 0,
                   relative: bool = True) -> tuple[StepCostModel, dict[str, float]]:
    """Fits on a random (1 - holdout_frac) of `samples`, reports relative error on the rest."""
    if not 0 < holdout_frac < 1:
        raise ValueError(f"holdout_frac must lie in (0, 1), got {holdout_frac}")
    n = len(samples)
    n_test = int(round(n * holdout_frac))
    if n_test < 1 or n - n_test < len(FEATURE_NAMES):
        raise ValueError(f"{n} samples are too few to hold out {holdout_frac:.0%} and fit {len(FEATURE_NAMES)} terms")
    perm = np.random.default_rng(seed).permutation(n)
    test = [samples[i] for i in perm[:n_test]]
    model = StepCostModel.fit([samples[i] for i in perm[n_test:]], relative=relative)
    return model, model.evaluate(test)
