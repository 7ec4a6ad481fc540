"""Hugging Face safetensors checkpoints (read and write) and bit-exact Orbax snapshots.

The safetensors reader is our own (8-byte little-endian header length, JSON header, raw data) so
that every failure names the file and tensor: truncated data, bad offsets, unknown dtypes.
Loading checks the whole checkpoint before building anything and reports every missing,
unexpected or mis-shaped tensor in one `CheckpointError`.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from agentinfer_jax.model.config import ModelConfig
from agentinfer_jax.model.sharding import DEFAULT_RULES, Rules, state_shardings
from agentinfer_jax.model.transformer import Transformer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_DTYPE_CODES = {v: k for k, v in _DTYPES.items()}
# Buffers some exporters keep in the state dict; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint is unreadable or does not match the model config."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """Read-only, memory-mapped view of one .safetensors file; validated on open."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: truncated (no safetensors header)")
                (header_len,) = struct.unpack("<Q", head)
                if 8 + header_len > size:
                    raise CheckpointError(f"{self.path}: truncated safetensors header "
                                          f"({header_len} bytes announced, file is {size})")
                raw = f.read(header_len)
        except OSError as e:
            raise CheckpointError(f"cannot read {self.path}: {e}") from e
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: malformed safetensors header: {e}") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: safetensors header is not a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            self.tensors[name] = self._parse_entry(name, entry, data_start, size)
        self._size = size

    def _parse_entry(self, name: str, entry: Any, data_start: int, size: int) -> TensorInfo:
        try:
            code, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed entry") from e
        if code not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {code}")
        dtype = _DTYPES[code]
        shape = tuple(int(d) for d in shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if begin < 0 or end - begin != nbytes:
            raise CheckpointError(f"{self.path}: tensor {name!r} offsets [{begin}, {end}) do not "
                                  f"hold {code}{list(shape)} ({nbytes} bytes)")
        if data_start + end > size:
            raise CheckpointError(f"{self.path}: truncated: tensor {name!r} ends at byte "
                                  f"{data_start + end} but the file has {size} bytes")
        return TensorInfo(dtype, shape, data_start + begin, data_start + end)

    def read(self, name: str) -> np.ndarray:
        """A copy of tensor `name` in its stored dtype."""
        info = self.tensors[name]
        if info.end == info.begin:
            return np.zeros(info.shape, info.dtype)
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if len(mm) < info.end:  # the file shrank after it was opened
                raise CheckpointError(f"{self.path}: truncated while reading tensor {name!r}")
            buf = mm[info.begin: info.end]
        return np.frombuffer(buf, dtype=info.dtype).reshape(info.shape).copy()


def write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes `tensors` (numpy arrays, any dtype in the safetensors table) to one file."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in _DTYPE_CODES:
            raise ValueError(f"tensor {name!r}: dtype {arr.dtype} has no safetensors code")
        header[name] = {"dtype": _DTYPE_CODES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in arrays:
            f.write(arr.tobytes())


# --- HF name <-> our parameter path ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ParamMapping:
    """How one HF tensor becomes one of our parameters (and back)."""

    path: tuple[Any, ...]  # path in nnx.State
    hf_name: str
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return x.T


def param_mappings(config: ModelConfig) -> list[ParamMapping]:
    """Every parameter of the model for `config`, with its HF name and layout transforms."""
    c = config
    h, d, nq, nkv = c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads
    maps = [ParamMapping(("embed",), "model.embed_tokens.weight", (c.vocab_size, h),
                         _identity, _identity),
            ParamMapping(("final_norm", "weight"), "model.norm.weight", (h,),
                         _identity, _identity)]
    if not c.tie_word_embeddings:
        maps.append(ParamMapping(("lm_head",), "lm_head.weight", (c.vocab_size, h),
                                 _transpose, _transpose))

    def in_proj(heads: int) -> tuple[Callable, Callable]:
        return (lambda x: x.T.reshape(h, heads, d), lambda x: x.reshape(h, heads * d).T)

    def bias(heads: int) -> tuple[Callable, Callable]:
        return (lambda x: x.reshape(heads, d), lambda x: x.reshape(heads * d))

    for i in range(c.num_layers):
        hf, ours = f"model.layers.{i}", ("layers", i)
        attn = ours + ("attn",)
        for name, heads in (("q", nq), ("k", nkv), ("v", nkv)):
            maps.append(ParamMapping(attn + (f"{name}_proj",), f"{hf}.self_attn.{name}_proj.weight",
                                     (heads * d, h), *in_proj(heads)))
            if c.attention_bias:
                maps.append(ParamMapping(attn + (f"{name}_bias",),
                                         f"{hf}.self_attn.{name}_proj.bias", (heads * d,),
                                         *bias(heads)))
        maps.append(ParamMapping(attn + ("o_proj",), f"{hf}.self_attn.o_proj.weight",
                                 (h, nq * d), lambda x: x.T.reshape(nq, d, h),
                                 lambda x: x.reshape(nq * d, h).T))
        if c.attention_out_bias:
            maps.append(ParamMapping(attn + ("o_bias",), f"{hf}.self_attn.o_proj.bias", (h,),
                                     _identity, _identity))
        if c.qk_norm:
            for name in ("q", "k"):
                maps.append(ParamMapping(attn + (f"{name}_norm", "weight"),
                                         f"{hf}.self_attn.{name}_norm.weight", (d,),
                                         _identity, _identity))
        for name, shape in (("gate_proj", (c.intermediate_size, h)),
                            ("up_proj", (c.intermediate_size, h)),
                            ("down_proj", (h, c.intermediate_size))):
            maps.append(ParamMapping(ours + ("mlp", name), f"{hf}.mlp.{name}.weight", shape,
                                     _transpose, _transpose))
        maps.append(ParamMapping(ours + ("input_norm", "weight"), f"{hf}.input_layernorm.weight",
                                 (h,), _identity, _identity))
        maps.append(ParamMapping(ours + ("post_attn_norm", "weight"),
                                 f"{hf}.post_attention_layernorm.weight", (h,),
                                 _identity, _identity))
    return maps


# --- loading ---------------------------------------------------------------------------------

def _tensor_files(directory: str) -> dict[str, str]:
    """Maps every tensor name to the file that holds it (single file or sharded index)."""
    index_path = os.path.join(directory, INDEX_FILE)
    single_path = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: malformed safetensors index: {e}") from e
        missing_files = sorted({fn for fn in weight_map.values()
                                if not os.path.isfile(os.path.join(directory, fn))})
        if missing_files:
            raise CheckpointError(f"{index_path}: shard files not found: {missing_files}")
        return {name: os.path.join(directory, fn) for name, fn in weight_map.items()}
    if os.path.isfile(single_path):
        return {name: single_path for name in SafetensorsFile(single_path).tensors}
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")


def _check_tensors(mappings: list[ParamMapping], files: dict[str, SafetensorsFile],
                   names: dict[str, str], config: ModelConfig, directory: str) -> None:
    expected = {m.hf_name: m for m in mappings}
    missing = sorted(n for n in expected if n not in names)
    unexpected = sorted(
        n for n in names if n not in expected and not n.endswith(_IGNORED_SUFFIXES)
        and not (config.tie_word_embeddings and n == "lm_head.weight"))
    wrong_shape = []
    for name, m in expected.items():
        if name in names:
            info = files[names[name]].tensors.get(name)
            if info is None:
                missing.append(f"{name} (listed in the index, absent from {names[name]})")
            elif info.shape != m.hf_shape:
                wrong_shape.append(f"{name}: expected {list(m.hf_shape)}, got {list(info.shape)}")
            elif not np.issubdtype(info.dtype, np.floating) and info.dtype != ml_dtypes.bfloat16:
                wrong_shape.append(f"{name}: dtype {info.dtype} is not floating point")
    if missing or unexpected or wrong_shape:
        lines = [f"checkpoint {directory} does not match the {config.model_type} config:"]
        if missing:
            lines.append(f"  missing tensors: {missing}")
        if unexpected:
            lines.append(f"  unexpected tensors: {unexpected}")
        if wrong_shape:
            lines.append(f"  mis-shaped tensors: {wrong_shape}")
        raise CheckpointError("\n".join(lines))


def abstract_model(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and shape-only state of the model for `config` (allocates no weights)."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))


def _with_values(abstract_state: nnx.State,
                 values: Callable[[tuple[Any, ...], nnx.Variable], jax.Array]) -> nnx.State:
    flat = nnx.to_flat_state(abstract_state)
    return nnx.from_flat_state([(path, var.replace(values(path, var))) for path, var in flat])


def load_hf_checkpoint(path: str | os.PathLike[str], *, dtype: str | None = None,
                       param_dtype: str | None = None, mesh: Mesh | None = None,
                       rules: Rules = DEFAULT_RULES) -> tuple[ModelConfig, Transformer]:
    """Loads an HF Llama/Qwen2/Qwen3 safetensors checkpoint directory (with config.json).

    Weights are converted to `param_dtype` (default: `dtype`, else the checkpoint's dtype) and,
    with `mesh`, placed shard by shard according to their logical axes.
    """
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    try:
        config = ModelConfig.from_hf(directory, dtype=dtype, param_dtype=param_dtype)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"{directory}: bad config.json: {e}") from e
    names = _tensor_files(directory)
    files = {fn: SafetensorsFile(fn) for fn in sorted(set(names.values()))}
    mappings = param_mappings(config)
    _check_tensors(mappings, files, names, config, directory)

    graphdef, abstract_state = abstract_model(config)
    by_path = {m.path: m for m in mappings}
    flat_paths = {path for path, _ in nnx.to_flat_state(abstract_state)}
    if flat_paths != set(by_path):  # a mapping bug, not a bad checkpoint
        raise AssertionError(f"param mapping mismatch: {flat_paths ^ set(by_path)}")
    shardings = (None if mesh is None else
                 dict(nnx.to_flat_state(state_shardings(abstract_state, mesh, rules))))
    target = config.jnp_param_dtype

    def load(path: tuple[Any, ...], var: nnx.Variable) -> jax.Array:
        m = by_path[path]
        arr = m.to_ours(files[names[m.hf_name]].read(m.hf_name)).astype(target)
        if shardings is None:
            return jnp.asarray(arr)
        sharding = shardings[path]
        sharding = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding
        return jax.device_put(arr, sharding)

    model = nnx.merge(graphdef, _with_values(abstract_state, load))
    return config, model


def save_hf_checkpoint(model: Transformer, config: ModelConfig, path: str | os.PathLike[str], *,
                       max_shard_bytes: int | None = None) -> None:
    """Writes config.json and safetensors (sharded with an index beyond `max_shard_bytes`)."""
    directory = os.fspath(path)
    os.makedirs(directory, exist_ok=True)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    tensors = {}
    for m in param_mappings(config):
        if m.path not in flat:
            raise ValueError(f"model has no parameter {'/'.join(map(str, m.path))} "
                             f"required by the config")
        tensors[m.hf_name] = m.to_hf(np.asarray(flat[m.path].get_value()))
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config.to_hf(), f, indent=2)
    if max_shard_bytes is None:
        write_safetensors(os.path.join(directory, SINGLE_FILE), tensors)
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        if shards[-1] and size + tensors[name].nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += tensors[name].nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(directory, filename), shard)
        weight_map.update({name: filename for name in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": weight_map}
    with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)


def iter_hf_tensors(path: str | os.PathLike[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of a checkpoint directory as (name, array in its stored dtype)."""
    names = _tensor_files(os.fspath(path))
    files = {fn: SafetensorsFile(fn) for fn in set(names.values())}
    for name in sorted(names):
        yield name, files[names[name]].read(name)


# --- Orbax -----------------------------------------------------------------------------------

def save_orbax(model: Transformer, path: str | os.PathLike[str]) -> None:
    """Snapshots the model's state with Orbax (bit-exact; `path` must not exist yet)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(os.fspath(path)), nnx.state(model))


def _leaf_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _check_orbax_shapes(directory: str, stored, expected) -> None:
    """CheckpointError naming the first parameter the checkpoint lacks, has extra or shapes differently."""
    have = {_leaf_names(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(stored)}
    want = {_leaf_names(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(expected)}
    for name, shape in want.items():
        if name not in have:
            raise CheckpointError(f"{directory}: Orbax checkpoint does not match the config: no {'.'.join(name)}")
        if have[name] != shape:
            raise CheckpointError(f"{directory}: Orbax checkpoint does not match the config: {'.'.join(name)} "
                                  f"has shape {have[name]}, the config needs {shape}")
    extra = sorted(set(have) - set(want))
    if extra:
        raise CheckpointError(f"{directory}: Orbax checkpoint does not match the config: unexpected "
                              f"{'.'.join(extra[0])}")


def restore_orbax(path: str | os.PathLike[str], config: ModelConfig, *,
                  mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES) -> Transformer:
    """Restores a model saved by `save_orbax` for the same `config`."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(path))
    if not os.path.isdir(directory):
        raise CheckpointError(f"no Orbax checkpoint at {directory}")
    graphdef, abstract_state = abstract_model(config)
    if mesh is not None:
        shardings = state_shardings(abstract_state, mesh, rules)
        abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state, shardings)
    with ocp.StandardCheckpointer() as checkpointer:
        # Checked against the stored metadata first: a restore that fails halfway leaves Orbax's
        # pending reads to be garbage-collected.
        _check_orbax_shapes(directory, checkpointer.metadata(directory).item_metadata, abstract_state)
        try:
            state = checkpointer.restore(directory, abstract_state)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{directory}: Orbax checkpoint does not match the config: "
                                  f"{e}") from e
    return nnx.merge(graphdef, state)
