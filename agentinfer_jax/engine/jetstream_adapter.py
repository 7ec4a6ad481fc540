"""JetStream interoperability: the slot engine as a `jetstream.engine.engine_api.Engine`.

Needs the `jetstream` extra (google-jetstream, which pulls TensorFlow through seqio); nothing else in
the package imports this module. Written against google-jetstream 0.2.x, whose orchestrator:

- calls `prefill(params=, padded_tokens=, true_length=)` on a prefill thread and
  `insert` / `generate` on a generate thread: the `SlotEngine` lock serialises them over the shared
  page pool, so one `JetStreamEngine` serves as both prefill and generate engine
  (`Driver(interleaved_mode=True)`);
- never reports the prefill's first token and never tells the engine that a request ended. So
  each result carries the token FED to the step (the previous sample, the prefill's first token at
  the first step after insert) with its 1-based index as length: the stream is complete, one step
  behind, and `length > max_tokens` stops it exactly. A slot keeps decoding after its request ends
  and is freed when the orchestrator inserts into it again;
- kills the process when an engine call raises. Requests that cannot be served (bad token ids, no
  free pages at prefill) become an empty slot whose first result is invalid, i.e. an empty answer;
  slots that cannot grow (pool exhausted, max_model_len reached) are freed and reported invalid,
  i.e. their answers end early.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

try:
    from jetstream.engine import engine_api, token_utils, tokenizer_api, tokenizer_pb2
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("agentinfer_jax.engine.jetstream_adapter needs google-jetstream; install the extra: "
                      "pip install -e '.[jetstream]'") from e

from agentinfer_jax.engine.engine import EngineConfig
from agentinfer_jax.engine.slots import (FED, LENGTH, VALID, ContextFullError, DecodeState, OutOfPagesError, Prefix,
                                         SlotEngine)
from agentinfer_jax.sampling_params import SamplingParams
from agentinfer_jax.tokenizer import ASSETS_DIR, Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

# JetStream 0.2's orchestrator deletes prefill results with `jax.tree_map`, which JAX removed in
# 0.6; without the alias its generate thread dies (and takes the process with it) at the first insert.
if not hasattr(jax, "tree_map"):
    jax.tree_map = jax.tree.map

# JetStream pads prompts to one of these lengths (token_utils.pad_tokens); max_prefill_length must be one.
_JETSTREAM_PREFILL_LENGTHS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class RejectedPrefix:
    """A prefill that could not be served; inserting it leaves the slot empty (an empty answer)."""

    def __init__(self, reason: str):
        self.reason = reason


# Leafless like Prefix, so the orchestrator's device_put and delete_pytree pass it through.
jax.tree_util.register_pytree_node(RejectedPrefix, lambda p: ((), p), lambda p, _: p)


@jax.jit
def _jetstream_columns(result):
    """SlotEngine result -> JetStream's [slots, token | valid | length]: the fed token and its index."""
    return jnp.stack([result[:, FED], result[:, VALID], result[:, LENGTH] - 1], axis=1)


class JetStreamTokenizer(tokenizer_api.Tokenizer):
    """Our tokenizer under JetStream's tokenizer API (padding as JetStream pads)."""

    def __init__(self, tokenizer: Tokenizer, *, bos_id: int, eos_ids: tuple[int, ...]):
        if not eos_ids:
            raise ValueError("JetStream needs at least one stop token id")
        if tokenizer.pad_id is None:
            raise ValueError("JetStream needs a pad token")
        self.tokenizer = tokenizer
        self._bos_id = bos_id
        self._eos_ids = tuple(eos_ids)

    def encode(self, s: str, **kwargs) -> tuple[jax.Array | np.ndarray, int]:
        ids = np.asarray(self.tokenizer.encode(s, add_bos=False), np.int32)
        return token_utils.pad_tokens(ids, self.bos_id, self.pad_id, is_bos=kwargs.pop("is_bos", True),
                                      prefill_lengths=kwargs.pop("prefill_lengths", None),
                                      max_prefill_length=kwargs.pop("max_prefill_length", None),
                                      jax_padding=kwargs.pop("jax_padding", True))

    def decode(self, token_ids: list[int], **kwargs) -> str:
        return self.tokenizer.decode(token_ids)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    @property
    def eos_id(self) -> int:
        return self._eos_ids[0]

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def stop_tokens(self) -> set[int]:
        # The model's EOS ids only: JetStream's default also stops at the pad id.
        return set(self._eos_ids)


class JetStreamEngine(engine_api.Engine):
    """A `SlotEngine` behind JetStream's Engine API; one instance is both prefill and generate engine.

    `tokenizer_path`: a tokenizer.json or its directory (None = the built-in tokenizer); it must
    match the model. `sampling`: how every request samples (JetStream's requests carry no sampling
    parameters); greedy by default.
    """

    def __init__(self, slot_engine: SlotEngine, *, tokenizer_path: str | os.PathLike[str] | None = None,
                 sampling: SamplingParams | None = None):
        self.slots = slot_engine
        self._tokenizer_path = str(tokenizer_path if tokenizer_path is not None else ASSETS_DIR)
        self._sampling = sampling or SamplingParams()
        self._sampling.validate()
        fitting = [n for n in _JETSTREAM_PREFILL_LENGTHS if n < slot_engine.max_model_len]
        if not fitting:
            raise ValueError(f"max_model_len {slot_engine.max_model_len} is too short for JetStream's "
                             f"smallest prefill length {_JETSTREAM_PREFILL_LENGTHS[0]}")
        self._max_prefill_length = fitting[-1]  # < max_model_len: room for at least one decode token
        self._device = jax.devices()[0]
        self._mesh = jax.sharding.Mesh(np.array([self._device]), ("x",))

    @classmethod
    def from_model(cls, model, config: EngineConfig, **kwargs: Any) -> JetStreamEngine:
        return cls(SlotEngine.from_model(model, config), **kwargs)

    # ---- parameters and state ------------------------------------------------------------------

    def load_params(self, *args, **kwargs) -> Any:
        """The model state the engine was built with (weights are loaded with the model)."""
        return self.slots.engine.state

    def init_decode_state(self, *args, **kwargs) -> DecodeState:
        return self.slots.init_decode_state()

    # ---- the three calls -----------------------------------------------------------------------

    def prefill(self, *, params: Any, existing_prefix: Prefix | None = None, padded_tokens: jax.Array,
                true_length: int) -> Prefix | RejectedPrefix:
        """`padded_tokens[:true_length]` come after `existing_prefix` (JetStream's convention)."""
        if isinstance(existing_prefix, RejectedPrefix):
            return existing_prefix
        tokens = np.asarray(padded_tokens)[:int(true_length)]
        if existing_prefix is not None:
            tokens = np.concatenate([existing_prefix.tokens, tokens])
        try:
            return self.slots.prefill(tokens, existing_prefix, self._sampling, params=params)
        except (ValueError, OutOfPagesError) as e:
            log.warning("prefill rejected (%s): the request gets an empty answer", e)
            return RejectedPrefix(str(e))

    def insert(self, prefix: Prefix | RejectedPrefix, decode_state: DecodeState, slot: int) -> DecodeState:
        if decode_state.active[slot]:  # the orchestrator reuses a slot without saying its request ended
            decode_state = self.slots.free(decode_state, slot)
        if isinstance(prefix, RejectedPrefix):
            return decode_state
        return self.slots.insert(prefix, decode_state, slot)

    def generate(self, params: Any, decode_state: DecodeState) -> tuple[DecodeState, engine_api.ResultTokens]:
        while True:
            try:
                decode_state, result = self.slots.generate(decode_state, params=params)
                break
            except (OutOfPagesError, ContextFullError) as e:
                log.warning("%s: ending those requests early", e)
                for slot in e.slots:
                    decode_state = self.slots.free(decode_state, slot)
        return decode_state, engine_api.ResultTokens(
            data=_jetstream_columns(result), tokens_idx=(0, 1), valid_idx=(1, 2), length_idx=(2, 3),
            samples_per_slot=1)

    # ---- tokenizer -----------------------------------------------------------------------------

    def get_tokenizer(self) -> tokenizer_pb2.TokenizerParameters:
        return tokenizer_pb2.TokenizerParameters(path=self._tokenizer_path)

    def build_tokenizer(self, metadata: tokenizer_pb2.TokenizerParameters) -> JetStreamTokenizer:
        tok = load_tokenizer(metadata.path or None)
        mc = self.slots.engine.model_config
        bos = tok.bos_id if tok.bos_id is not None else mc.bos_token_id
        if bos is None:
            raise ValueError("JetStream prepends BOS: the tokenizer or the model config must name one")
        return JetStreamTokenizer(tok, bos_id=bos, eos_ids=tuple(mc.eos_token_ids) or tok.eos_token_ids)

    # ---- topology ------------------------------------------------------------------------------

    def get_prefix_destination_sharding(self) -> Any:
        # Prefixes are host objects naming pages of the one shared pool: nothing moves.
        return jax.sharding.SingleDeviceSharding(self._device)

    @property
    def max_concurrent_decodes(self) -> int:
        return self.slots.num_slots

    @property
    def samples_per_slot(self) -> int:
        return 1

    @property
    def max_prefill_length(self) -> int:
        return self._max_prefill_length

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self._mesh

    @property
    def colocated_cpus(self) -> None:
        return None  # the engine runs on one device; JetStream uses this only for disaggregation
