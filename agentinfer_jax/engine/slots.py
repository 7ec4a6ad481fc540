"""Slot engine: the JetStream-style interface (prefill / insert / generate) over the engine's page pool.

`Engine.execute` serves the scheduler; `SlotEngine` serves callers that think in decode slots, as
JetStream's orchestrator does:

- `prefill(tokens, existing_prefix)` computes the prompt's KV into freshly allocated pages (only
  the suffix when a prefix of these tokens is already computed: its full pages are shared) and
  samples the first token. The result, a `Prefix`, owns one reference on each of its pages.
- `insert(prefix, state, slot)` moves those references into a decode slot.
- `generate(state)` feeds every active slot its newest token in ONE jitted ragged step and returns
  one int32 array `[slots, 4]` (columns `TOKEN`, `VALID`, `LENGTH`, `FED`).
- `free(state, slot)` drops the slot's references; `release(prefix)` drops a prefix never inserted.

Both steps are the engine's `_engine_step` (the same forward, page pool and sampling rule as the
scheduler path), so a request's tokens do not depend on which interface ran it. The page pool and
its functional allocator (numpy backend) belong to the engine, not to the decode state: JetStream
runs prefill and generate on different threads, and prefill allocates without a decode state. A
lock serialises allocator updates and every step that writes the pool.

Host/device split of the decode state: page tables, lengths and sampling parameters live on the
host (a slot grows by exactly one token per step, so page needs are known without reading device
results); the newest sampled token of each slot stays on device. `generate` therefore never waits
for the previous step: the caller decides when to move the result to host (`np.asarray`), e.g.
after dispatching the next step.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import threading
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from agentinfer_jax.cache import block_allocator as alloc
from agentinfer_jax.engine import engine as engine_mod
from agentinfer_jax.engine.engine import Engine, EngineConfig, _bucket, _engine_step
from agentinfer_jax.engine.paged import PagedMeta
from agentinfer_jax.engine.sampling import SamplingArrays
from agentinfer_jax.engine.step_batch import SeqSampling, StepSeq, pack_step
from agentinfer_jax.sampling_params import SamplingParams

# Columns of generate's result array.
TOKEN = 0  # the token sampled this step
VALID = 1  # 1 where the slot was active (the other columns are meaningless elsewhere)
LENGTH = 2  # tokens sampled so far for the slot, the prefill's first one and TOKEN included
FED = 3  # the token fed this step (the previous sample): lets a consumer that learns the first
#          token only through generate (JetStream 0.2's orchestrator) stream every token
NUM_COLUMNS = 4


class OutOfPagesError(RuntimeError):
    """Too few free pages for a prefill or a decode step; nothing was changed. `slots` names the
    decode slots that needed a page (empty for a prefill)."""

    def __init__(self, message: str, slots: Sequence[int] = ()):
        super().__init__(message)
        self.slots = tuple(int(s) for s in slots)


class ContextFullError(RuntimeError):
    """Slots whose cache reached max_model_len cannot take another token; nothing was changed."""

    def __init__(self, message: str, slots: Sequence[int]):
        super().__init__(message)
        self.slots = tuple(int(s) for s in slots)


@dataclasses.dataclass(frozen=True, eq=False)
class Prefix:
    """A computed prompt. Its KV sits in `pages` of the engine's pool; the prefix owns one reference
    on each until `insert` moves them into a slot or `release` drops them (exactly one of the two).

    Host-only by design: a pytree without leaves, so JetStream's device_put (transfer) and
    delete_pytree (after insert) leave the page references alone.
    """

    prefix_id: int
    tokens: np.ndarray  # int32 [length]: the prompt
    pages: np.ndarray  # int32 [cdiv(length, page_size)]
    first_token: int  # sampled after the prompt
    sampling: SamplingParams
    seed: int  # resolved sampling seed: draws are a function of (seed, position)

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])


jax.tree_util.register_pytree_node(Prefix, lambda p: ((), p), lambda p, _: p)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """What the slots hold. Every method consumes its state argument and returns the next one (the
    pages they name are shared with the engine's allocator): use only the newest state.

    Invariants: an inactive slot has length 0, an all-zero page-table row and no pages; an active
    slot owns exactly the first cdiv(lengths[s], page_size) entries of its row, one reference each.
    Arrays are never written in place once a state is returned: a dispatched step may still read
    them (on CPU, jnp.asarray can alias a numpy array).
    """

    page_table: np.ndarray  # int32 [S, P]
    lengths: np.ndarray  # int32 [S]: tokens whose KV is in the cache
    active: np.ndarray  # bool [S]
    num_sampled: np.ndarray  # int32 [S]: tokens sampled so far (the prefill's first included)
    next_token: jax.Array  # int32 [S], device: the newest sample, fed by the next generate
    inserted_token: np.ndarray  # int32 [S]: set by insert (the prefill's token) until fed; -1 = none
    temperature: np.ndarray  # f32 [S]
    top_k: np.ndarray  # i32 [S]
    top_p: np.ndarray  # f32 [S]
    seed: np.ndarray  # u32 [S]

    @property
    def num_slots(self) -> int:
        return int(self.active.shape[0])

    def _copy(self, **changes) -> DecodeState:
        host = {f.name: np.array(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "next_token"}
        host.update(changes)
        return dataclasses.replace(self, **host)


_GENERATE_TRACES = [0]  # incremented at trace time of _generate_step


def _no_previous(tokens):
    """The engine step's overlap inputs when no token comes from a previous step (slots fill
    their tokens themselves)."""
    return jnp.zeros(1, jnp.int32), jnp.full(tokens.shape, -1, jnp.int32)


@functools.partial(jax.jit, static_argnames=("graph", "backend"), donate_argnames=("kv",))
def _generate_step(graph, backend, state, kv, next_token, inserted_token, seq_slot, step, meta, sampling, active,
                   num_sampled):
    """One decode token per active slot. Sequence i of the ragged step (`pack_step`'s arrays `step`,
    tokens left as placeholders) is slot seq_slot[i] (i < meta.num_seqs) and owns query row i; its
    token, the slot's previous sample, is filled in here on device. Returns ([slots, NUM_COLUMNS],
    next_token, kv)."""
    _GENERATE_TRACES[0] += 1
    num_slots = next_token.shape[0]
    seqs = seq_slot.shape[0]
    fed_by_slot = jnp.where(inserted_token >= 0, inserted_token, next_token)
    live = jnp.arange(seqs) < meta.num_seqs
    fed = jnp.where(live, fed_by_slot[seq_slot], 0)
    tokens = step.tokens.at[:seqs].set(fed)
    out, _, kv = _engine_step(graph, backend, state, kv, tokens, *_no_previous(tokens), step.positions, meta,
                              step.rows, step.drafts, step.num_drafts, step.sample_pos, sampling)
    target = jnp.where(live, seq_slot, num_slots)  # padding sequences scatter nowhere
    new_token = next_token.at[target].set(out[:, 1], mode="drop")
    fed_col = jnp.zeros(num_slots, jnp.int32).at[target].set(fed, mode="drop")
    result = jnp.stack([new_token, active.astype(jnp.int32), num_sampled, fed_col], axis=1)
    return result, new_token, kv


class SlotEngine:
    """prefill / insert / generate / free over an `Engine`'s page pool and jitted step.

    Slots: `config.max_num_seqs`. Prefill runs in chunks of at most `max_tokens_per_step` tokens,
    padded to the engine's token buckets; generate has one shape. Compilations are therefore bounded
    by len(token_buckets) + 2 (generate traces its own function and the inner step once).
    The engine's pool must not be driven by a scheduler (`Engine.execute`) at the same time.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        cfg = engine.config
        self.config: EngineConfig = cfg
        self.page_size = cfg.block_size
        self.num_slots = cfg.max_num_seqs
        self.max_pages = engine.max_pages
        self.max_model_len = cfg.max_model_len
        self.vocab_size = engine.model_config.vocab_size
        self._alloc = alloc.init(cfg.num_blocks)
        self._lock = threading.Lock()
        self._live_prefixes: set[int] = set()
        self._ids = itertools.count(1)
        self.num_compilations = 0

    @classmethod
    def from_model(cls, model, config: EngineConfig) -> SlotEngine:
        return cls(Engine(model, config))

    # ---- pages ---------------------------------------------------------------------------------

    @property
    def num_free_pages(self) -> int:
        return int(self._alloc.num_free)

    @property
    def num_used_pages(self) -> int:
        return int(alloc.num_used(self._alloc))

    def _allocate(self, n: int) -> np.ndarray | None:
        state, ids, ok = alloc.allocate(self._alloc, n, max_n=n)
        if not ok:
            return None
        self._alloc = state
        return np.asarray(ids, np.int32)

    def _release(self, pages: np.ndarray) -> None:
        self._alloc = alloc.release(self._alloc, np.asarray(pages, np.int32))

    # ---- prefill -------------------------------------------------------------------------------

    def prefill(self, tokens: Sequence[int] | np.ndarray, existing_prefix: Prefix | None = None,
                sampling: SamplingParams | None = None, *, params=None) -> Prefix:
        """Computes the KV of `tokens` and samples the token after them.

        `existing_prefix`: a live Prefix whose tokens start `tokens`; its full pages are shared
        (one more reference each) and only the rest is computed, from the first position that is
        not on a shared page (the partial last page is recomputed, never written in place).
        `sampling`: temperature, top_k, top_p, seed (when to stop is the caller's decision).
        `params`: model state to run with (JetStream passes load_params()' result); None = the
        engine's. Raises ValueError on bad input and OutOfPagesError when the pool is short;
        neither changes anything.
        """
        tokens = self._check_tokens(tokens)
        sampling = sampling or SamplingParams()
        sampling.validate()
        unsupported = [name for name, on in (("logprobs", sampling.logprobs is not None),
                                             ("penalties/logit_bias", sampling.penalized),
                                             ("structured", sampling.structured is not None), ("n", sampling.n > 1))
                       if on]
        if unsupported:  # the slot interface samples plainly; refuse rather than ignore
            raise ValueError(f"SlotEngine does not support {', '.join(unsupported)}")
        n = tokens.shape[0]
        shared = 0
        if existing_prefix is not None:
            if not isinstance(existing_prefix, Prefix):
                raise TypeError(f"existing_prefix must be a Prefix, got {type(existing_prefix).__name__}")
            m = existing_prefix.length
            if m > n or not np.array_equal(existing_prefix.tokens, tokens[:m]):
                raise ValueError("existing_prefix is not a prefix of tokens")
            shared = min(m, n - 1) // self.page_size  # keep >= 1 token to compute: it gives the logits
        prefix_id = next(self._ids)
        seed = SeqSampling.resolve(sampling, f"prefix-{prefix_id}").seed
        with self._lock:
            if existing_prefix is not None:
                self._check_live(existing_prefix)  # under the lock: no release between check and share
            fresh = self._allocate(math.ceil(n / self.page_size) - shared)
            if fresh is None:
                raise OutOfPagesError(f"prefill of {n} tokens needs {math.ceil(n / self.page_size) - shared} "
                                      f"pages, {self.num_free_pages} free")
            shared_pages = np.zeros(0, np.int32)
            if shared:
                shared_pages = existing_prefix.pages[:shared]
                self._alloc = alloc.incref(self._alloc, shared_pages)
            pages = np.concatenate([shared_pages, fresh]).astype(np.int32)
            try:
                result = self._run_prefill(tokens, shared * self.page_size, pages, sampling, seed, params)
            except BaseException:
                self._release(pages)
                raise
            self._live_prefixes.add(prefix_id)
        prefix = Prefix(prefix_id, tokens, pages, -1, sampling, seed)
        try:
            first = int(np.asarray(result)[0, 1])  # outside the lock: generate can dispatch meanwhile
        except BaseException:
            self.release(prefix)
            raise
        return dataclasses.replace(prefix, first_token=first)

    def _run_prefill(self, tokens, start, pages, sampling, seed, params):
        """Chunks of tokens[start:] through the step (one sequence each); the last chunk's sample is
        the first token. Caller holds the lock."""
        eng = self.engine
        chunk = self.config.max_tokens_per_step
        seq_sampling = SeqSampling(sampling.temperature, sampling.top_k, sampling.top_p, seed)
        block_ids = tuple(pages.tolist())
        result = None
        for lo in range(start, tokens.shape[0], chunk):
            part = tokens[lo:lo + chunk]
            seq = StepSeq(f"prefill-{lo}", lo, tuple(part.tolist()), 0, block_ids, seq_sampling)
            a = pack_step([seq], block_size=self.page_size, max_pages=self.max_pages, draft_width=0,
                          num_tokens=_bucket(part.shape[0], eng.token_buckets), num_seqs=1)
            meta = PagedMeta(jnp.asarray(a.slots), jnp.asarray(a.kv_lens), jnp.asarray(a.pages),
                             jnp.asarray(a.cu_q_lens), jnp.asarray(1, jnp.int32))
            sampling_arrays = SamplingArrays(jnp.asarray(a.temperature), jnp.asarray(a.top_k), jnp.asarray(a.top_p),
                                             jnp.asarray(a.seed))
            [result, _] = self._count(lambda: _engine_step(
                eng.graph, eng.backend, eng.state if params is None else params, eng.kv,
                jnp.asarray(a.tokens), *_no_previous(a.tokens), jnp.asarray(a.positions), meta, jnp.asarray(a.rows), jnp.asarray(a.drafts),
                jnp.asarray(a.num_drafts), jnp.asarray(a.sample_pos), sampling_arrays))
        return result

    def _count(self, step) -> list:
        """Runs a step (outputs..., new pool), counts the compilations it triggered, installs the
        new pool and returns the other outputs."""
        before = engine_mod._TRACES[0] + _GENERATE_TRACES[0]
        *outputs, self.engine.kv = step()
        self.num_compilations += engine_mod._TRACES[0] + _GENERATE_TRACES[0] - before
        return outputs

    # ---- slots ---------------------------------------------------------------------------------

    def init_decode_state(self) -> DecodeState:
        s, p = self.num_slots, self.max_pages
        return DecodeState(np.zeros((s, p), np.int32), np.zeros(s, np.int32), np.zeros(s, bool),
                           np.zeros(s, np.int32), jnp.zeros(s, jnp.int32), np.full(s, -1, np.int32),
                           np.zeros(s, np.float32), np.zeros(s, np.int32), np.ones(s, np.float32),
                           np.zeros(s, np.uint32))

    def insert(self, prefix: Prefix, state: DecodeState, slot: int) -> DecodeState:
        """Puts `prefix` into the empty `slot`; its page references move to the slot."""
        self._check_slot(state, slot)
        if state.active[slot]:
            raise ValueError(f"slot {slot} is occupied; free it first")
        with self._lock:  # check and take in one step: a concurrent release cannot slip between
            self._check_live(prefix)
            self._live_prefixes.remove(prefix.prefix_id)
        new = state._copy()
        new.page_table[slot] = 0
        new.page_table[slot, :len(prefix.pages)] = prefix.pages
        new.lengths[slot] = prefix.length
        new.active[slot] = True
        new.num_sampled[slot] = 1
        new.inserted_token[slot] = prefix.first_token
        sp = prefix.sampling
        new.temperature[slot], new.top_k[slot], new.top_p[slot] = sp.temperature, sp.top_k, sp.top_p
        new.seed[slot] = prefix.seed
        return new

    def free(self, state: DecodeState, slot: int) -> DecodeState:
        """Ends `slot`: drops its page references and empties it."""
        self._check_slot(state, slot)
        if not state.active[slot]:
            raise ValueError(f"slot {slot} is empty")
        owned = state.page_table[slot, :math.ceil(int(state.lengths[slot]) / self.page_size)]
        with self._lock:
            self._release(owned)
        new = state._copy()
        new.page_table[slot] = 0
        new.lengths[slot] = 0
        new.active[slot] = False
        new.num_sampled[slot] = 0
        new.inserted_token[slot] = -1
        return new

    def release(self, prefix: Prefix) -> None:
        """Drops a prefix that will not be inserted (e.g. a shared system prompt no longer needed)."""
        with self._lock:
            self._check_live(prefix)
            self._live_prefixes.remove(prefix.prefix_id)
            self._release(prefix.pages)

    # ---- generate ------------------------------------------------------------------------------

    def generate(self, state: DecodeState, *, params=None) -> tuple[DecodeState, jax.Array]:
        """One token for every active slot, in one jitted step.

        Returns the next state and the result, one device int32 array [slots, NUM_COLUMNS]
        (`np.asarray(result)` is the step's one device-to-host transfer). Raises ContextFullError
        or OutOfPagesError (naming the slots) before touching anything when a slot cannot grow.
        """
        bs = self.page_size
        active = np.asarray(state.active, bool)
        pos = state.lengths  # where each slot's fed token goes
        full = np.flatnonzero(active & (pos >= self.max_model_len))
        if full.size:
            raise ContextFullError(f"slots {full.tolist()} reached max_model_len {self.max_model_len}", full)
        need = np.flatnonzero(active & (pos % bs == 0))  # the fed token starts a new page
        new = state._copy()
        with self._lock:
            fresh = self._allocate(need.size)
            if fresh is None:
                raise OutOfPagesError(f"slots {need.tolist()} need {need.size} pages, "
                                      f"{self.num_free_pages} free", need)
            new.page_table[need, pos[need] // bs] = fresh
            new.lengths[active] += 1
            new.num_sampled[active] += 1
            try:
                result, next_token = self._run_generate(new, active, pos, params)
            except BaseException:
                self._release(fresh)
                raise
        # A new array, not an in-place write: on CPU the step may still be reading the old one
        # (jnp.asarray of a numpy array can alias it, and dispatch is asynchronous).
        inserted = np.where(active, -1, new.inserted_token).astype(np.int32)
        return dataclasses.replace(new, next_token=next_token, inserted_token=inserted), result

    def _run_generate(self, new: DecodeState, active: np.ndarray, pos: np.ndarray, params):
        eng, s = self.engine, self.num_slots
        idx = np.flatnonzero(active)
        seq_slot = np.zeros(s, np.int32)
        seq_slot[:idx.size] = idx
        # Each active slot feeds one token at its length; the token itself is filled in on device.
        seqs = [StepSeq(str(i), int(pos[i]), (0,), 0, tuple(new.page_table[i].tolist()),
                        SeqSampling(float(new.temperature[i]), int(new.top_k[i]), float(new.top_p[i]),
                                    int(new.seed[i]))) for i in idx]
        a = pack_step(seqs, block_size=self.page_size, max_pages=self.max_pages, draft_width=0,
                      num_tokens=_bucket(s, eng.token_buckets), num_seqs=s)
        meta = PagedMeta(jnp.asarray(a.slots), jnp.asarray(a.kv_lens), jnp.asarray(a.pages), jnp.asarray(a.cu_q_lens),
                         jnp.asarray(idx.size, jnp.int32))
        sampling = SamplingArrays(jnp.asarray(a.temperature), jnp.asarray(a.top_k), jnp.asarray(a.top_p),
                                  jnp.asarray(a.seed))
        step = a._replace(slots=None, kv_lens=None, pages=None, cu_q_lens=None, temperature=None, top_k=None,
                          top_p=None, seed=None)  # those travel in meta / sampling
        step = jax.tree.map(jnp.asarray, step)
        result, next_token = self._count(lambda: _generate_step(
            eng.graph, eng.backend, eng.state if params is None else params, eng.kv,
            new.next_token, jnp.asarray(new.inserted_token), jnp.asarray(seq_slot), step, meta, sampling,
            jnp.asarray(active), jnp.asarray(new.num_sampled)))
        return result, next_token

    # ---- checks --------------------------------------------------------------------------------

    def _check_tokens(self, tokens) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim != 1 or arr.shape[0] == 0:
            raise ValueError(f"tokens must be a non-empty 1-D sequence, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"tokens must be integers, got {arr.dtype}")
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            raise ValueError(f"token ids outside [0, {self.vocab_size})")
        if arr.shape[0] >= self.max_model_len:
            raise ValueError(f"{arr.shape[0]} prompt tokens leave no room under max_model_len {self.max_model_len}")
        return arr.astype(np.int32)

    def _check_live(self, prefix: Prefix) -> None:
        if not isinstance(prefix, Prefix):
            raise TypeError(f"expected a Prefix, got {type(prefix).__name__}")
        if prefix.prefix_id not in self._live_prefixes:
            raise ValueError(f"prefix {prefix.prefix_id} was already inserted or released")

    def _check_slot(self, state: DecodeState, slot: int) -> None:
        if state.num_slots != self.num_slots:
            raise ValueError(f"decode state has {state.num_slots} slots, the engine {self.num_slots}")
        if not isinstance(slot, (int, np.integer)) or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot must be an int in [0, {self.num_slots}), got {slot!r}")
