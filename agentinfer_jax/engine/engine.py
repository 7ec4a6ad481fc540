"""The JAX engine: runs scheduler steps on the model over a paged KV cache.

One jitted function does a whole step: the ragged forward pass (prefill chunks, decode tokens and
verification tokens of many sequences in one call), then sampling and draft verification on device;
the result comes to host as one int32 array. Shapes are padded to power-of-two buckets of tokens
and sequences, the page table is cut to a power-of-two bucket of columns covering the step's
longest context (attention work follows the live context, not max_model_len), and the draft width
is 0 or max_draft_tokens, so the compilations are bounded by
len(token_buckets) * len(seq_buckets) * len(page_buckets) * 2; `compile_all` runs them all up front.
Steps with grammar masks, logit biases (penalties, logit_bias) or logprobs pass extra arrays (a
different pytree) and compile lazily on first use; plain steps keep their shapes and fast paths.

Input and output are plain data (engine/step_batch.py): a `StepBatch` in, the model's tokens per
request id out. What the caller does with them (trace replay, stop rules) is serving's business.
`dispatch` starts a step and returns at once, `collect` fetches its tokens; a step may feed
PREVIOUS_TOKEN, the token its request sampled in the step dispatched just before, read on device,
so a planner can build step n+1 while step n runs (`execute` = dispatch + collect).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from agentinfer_jax.engine.paged import PagedAttention, PagedMeta
from agentinfer_jax.engine.sampling import SamplingArrays, emitted_logprobs, verify_rows
from agentinfer_jax.engine.step_batch import (PREVIOUS_TOKEN, SampledTokens, StepBatch, StepLimits, StepSeq,
                                              TokenLogprob, pack_extras, pack_step)
from agentinfer_jax.model.config import ModelConfig
from agentinfer_jax.model.sharding import paged_cache_sharding, shard_state


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Sizes of the page pool and of one step."""

    num_blocks: int = 256  # KV pages in the pool (page 0 is the null page)
    block_size: int = 16  # tokens per page
    max_num_seqs: int = 16  # sequences per step
    max_tokens_per_step: int = 256  # tokens per step (prefill chunks + decode + drafts)
    max_model_len: int = 2048  # prompt + output tokens per request
    max_draft_tokens: int = 8  # k: verification width is k + 1
    min_token_bucket: int = 1  # smallest padded token count (padding rows cost; larger = fewer shapes)
    # Token buckets at 1.5x steps (2^n and 3 * 2^(n-1)) instead of 2x: at most a third of a step's
    # rows are padding instead of half, for twice the compiled shapes.
    fine_token_buckets: bool = False
    # Padded sequence counts. Default: max_num_seqs only (one shape per token bucket); padding
    # sequences have no rows and no pages, so they cost almost nothing. Add smaller buckets when
    # per-sequence work dominates (very large max_num_seqs).
    seq_buckets: tuple[int, ...] = ()
    # Smallest page-table width bucket, in tokens (rounded up to pages). Page-table widths are powers
    # of two from here up to max_model_len; smaller values cut attention work on short contexts
    # at the price of more compiled shapes.
    min_page_bucket_tokens: int = 256
    # Page-table widths at 1.5x steps as well: a decode step reads its whole table row on CPU, so
    # a context just past a power of two reads at most a third padding instead of half.
    fine_page_buckets: bool = False
    attention_backend: str | None = None  # kernels backend; None = platform default
    interpret: bool = False  # Pallas interpret mode (CPU tests of the GPU kernel)
    kv_dtype: str | None = None  # None = the model's activation dtype
    # JAX's persistent compilation cache (a folder, e.g. ~/.cache/agentinfer_jax/xla) so a second
    # process loads compiled steps instead of compiling them. None: $AGENTINFER_JAX_CACHE_DIR if
    # set, else off. The cache is process-wide; treat the folder as trusted code.
    compilation_cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.num_blocks < 2:
            raise ValueError("num_blocks must be >= 2 (page 0 is the null page)")
        if (self.num_blocks - 1) * self.block_size < self.max_model_len:
            raise ValueError(f"{self.num_blocks - 1} usable pages of {self.block_size} tokens cannot hold "
                             f"one request of max_model_len={self.max_model_len}")

    def scheduler_config(self, model: ModelConfig, num_draft_tokens: int = 0) -> StepLimits:
        """The limits a planner of this engine's steps must keep (serving's SchedulerConfig)."""
        if num_draft_tokens > self.max_draft_tokens:
            raise ValueError(f"num_draft_tokens {num_draft_tokens} > max_draft_tokens {self.max_draft_tokens}")
        return StepLimits(block_size=self.block_size, max_num_seqs=self.max_num_seqs,
                               max_tokens_per_step=self.max_tokens_per_step, max_model_len=self.max_model_len,
                               vocab_size=model.vocab_size, num_draft_tokens=num_draft_tokens,
                               eos_token_ids=tuple(model.eos_token_ids))


def _pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
    out, b = [], max(1, lo)
    while b < hi:
        out.append(b)
        b *= 2
    out.append(hi)
    return tuple(out)


def _bucket(n: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


_TRACES = [0]  # incremented at trace time: one per compilation of the step

DEFAULT_CACHE_DIR = "~/.cache/agentinfer_jax/xla"


def enable_compilation_cache(path: str = DEFAULT_CACHE_DIR) -> str:
    """Points JAX's persistent compilation cache at `path` (process-wide); returns the folder."""
    from jax.experimental.compilation_cache import compilation_cache
    path = os.path.abspath(os.path.expanduser(path))
    if jax.config.jax_compilation_cache_dir != path:
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # small models compile in < 1 s
        compilation_cache.reset_cache()  # re-read the folder even if something compiled before
    return path


@dataclasses.dataclass(frozen=True)
class StepTiming:
    """Wall time of the last `execute`, split where the device can be busy."""

    host_s: float  # batch building and host-to-device copies (the device idles)
    step_s: float  # dispatch, run and result copy of the jitted step


class StaticGraph:
    """An nnx GraphDef as a static jit argument, hashed once: jit hashes its static arguments on
    every call, and hashing a GraphDef walks the whole module tree (~0.1 ms, a sixth of a small
    decode step). Equal graphs of different engines still share compilations."""

    __slots__ = ("graphdef", "_hash")

    def __init__(self, graphdef: nnx.GraphDef):
        self.graphdef = graphdef
        self._hash = hash(graphdef)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, StaticGraph) and (
            self.graphdef is other.graphdef or (self._hash == other._hash and self.graphdef == other.graphdef))


def _step_body(graph, backend, state, kv, tokens, prev_last, prev_row, positions, meta, rows, drafts, num_drafts,
               sample_pos, sampling, adjust=(None, None, None), logprobs=False):
    """Forward over the ragged batch, then verification/sampling; returns (result, last, kv) on
    device. result: [S, 1 + K+1], column 0 the number of new tokens, then the tokens; with
    `logprobs`, (tokens, chosen logprobs [S, K+1], top ids [S, K+1, 20], top logprobs [S, K+1, 20]).
    `adjust` = (mask, bias_ids, bias_vals), each None unless a row needs it (a plain step traces
    without them). `last` [max_num_seqs]: each sequence's newest token, which the next step can feed
    without a trip to the host (token rows with prev_row >= 0 take prev_last[prev_row])."""
    _TRACES[0] += 1
    tokens = jnp.where(prev_row >= 0, prev_last[jnp.maximum(prev_row, 0)], tokens)
    model = nnx.merge(graph.graphdef, state)
    x, kv = model.hidden(tokens[None], positions[None], kv, meta, backend)
    x = x[0]
    if rows.size < x.shape[0]:  # static: the LM head only on rows that predict a token (prefill)
        x, rows = x[rows.reshape(-1)], jnp.arange(rows.size, dtype=jnp.int32).reshape(rows.shape)
    logits = model.logits(x)
    out_tokens, num_new = verify_rows(logits, rows, drafts, num_drafts, sampling, sample_pos, *adjust)
    result = jnp.concatenate([num_new[:, None], out_tokens], axis=1)
    last = jnp.take_along_axis(out_tokens, (num_new - 1)[:, None], axis=1)[:, 0]
    n = min(last.shape[0], prev_last.shape[0])
    last = jnp.zeros_like(prev_last).at[:n].set(last[:n])
    if logprobs:
        return (result, *emitted_logprobs(logits[rows], out_tokens)), last, kv
    return result, last, kv


_engine_step = functools.partial(jax.jit, static_argnames=("graph", "backend", "logprobs"),
                                 donate_argnames=("kv",))(_step_body)


class StepLayout(NamedTuple):
    """Where each host array of a packed step lies in its one int32 / one float32 buffer (static:
    every size follows from the step's buckets, so a layout is one compiled shape)."""

    tokens: int  # T
    seqs: int  # S
    draft_width: int  # K
    page_cols: int  # P

    def int_sizes(self) -> tuple[int, ...]:
        t, s, k, p = self
        # tokens, prev_row, positions, slots, kv_lens, pages, cu_q_lens, rows, drafts, num_drafts,
        # sample_pos, top_k, seed (bits), num_seqs
        return (t, t, t, t, s, s * p, s + 1, s * (k + 1), s * k, s, s, s, s, 1)


def pack_host_arrays(arrays, prev_row: np.ndarray, pages: np.ndarray, num_seqs: int) -> tuple[np.ndarray, np.ndarray]:
    """A step's host arrays as one int32 and one float32 buffer: one host-to-device copy each,
    instead of one per array (17 small arrays cost ~0.05 ms of dispatch on CPU)."""
    a = arrays
    ints = np.concatenate([a.tokens, prev_row, a.positions, a.slots, a.kv_lens, pages.ravel(), a.cu_q_lens,
                           a.rows.ravel(), a.drafts.ravel(), a.num_drafts, a.sample_pos, a.top_k,
                           a.seed.view(np.int32), np.array([num_seqs], np.int32)])
    return ints, np.concatenate([a.temperature, a.top_p])


@functools.partial(jax.jit, static_argnames=("graph", "backend", "layout", "logprobs"), donate_argnames=("kv",))
def _packed_step(graph, backend, layout: StepLayout, state, kv, ints, floats, prev_last, adjust=(None, None, None),
                 logprobs=False):
    """`_step_body` on a step packed by `pack_host_arrays` (sliced apart on device)."""
    t, s, k, p = layout
    parts, at = [], 0
    for n in layout.int_sizes():
        parts.append(ints[at:at + n])
        at += n
    (tokens, prev_row, positions, slots, kv_lens, pages, cu, rows, drafts, num_drafts, sample_pos, top_k, seed,
     num_seqs) = parts
    meta = PagedMeta(slots, kv_lens, pages.reshape(s, p), cu, num_seqs[0])
    sampling = SamplingArrays(floats[:s], top_k, floats[s:], jax.lax.bitcast_convert_type(seed, jnp.uint32))
    return _step_body(graph, backend, state, kv, tokens, prev_last, prev_row, positions, meta, rows.reshape(s, k + 1),
                      drafts.reshape(s, k), num_drafts, sample_pos, sampling, adjust, logprobs)


@dataclasses.dataclass
class PendingStep:
    """A dispatched step whose result is still on the device (`Engine.collect` fetches it)."""

    seqs: Sequence[StepSeq]
    result: Any  # [S, 1 + K+1] on device, or that and the logprob arrays
    t_pad: int
    start_s: float  # perf_counter when dispatch began (batch building)
    call_s: float  # perf_counter when the jitted call was made (the device may start then)
    logprobs: bool = False  # result carries logprobs


@dataclasses.dataclass
class StepRecord:
    """What one step computed and how long it took (cost-model samples)."""

    prefill_tokens: int
    decode_tokens: int
    num_seqs: int
    context_tokens: int  # sum of kv_len over sequences
    attended_pairs: int  # sum of q_len * kv_len
    padded_tokens: int
    seconds: float  # the jitted step (dispatch, run, result copy)
    start_s: float = 0.0  # perf_counter when its batch building began, or the step before it ended if later
    end_s: float = 0.0  # time.perf_counter() when its result was on host


class Engine:
    """The executor of `Scheduler` steps on a Flax model."""

    def __init__(self, model, config: EngineConfig, *, mesh: Mesh | None = None, record_steps: bool = False):
        """`mesh`: a ("data", "model") mesh (model.sharding.make_mesh) to shard the step over:
        parameters by their logical axes and the KV page pool by KV heads on the model axis."""
        self.model_config: ModelConfig = model.config
        self.config = config
        self.mesh = mesh
        self.graphdef, self.state = nnx.split(model)
        self.graph = StaticGraph(self.graphdef)
        mc = self.model_config
        dtype = jnp.dtype(config.kv_dtype or mc.dtype)
        shape = (mc.num_kv_heads, config.num_blocks, config.block_size, mc.head_dim)
        if mesh is None:
            self.kv = tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(mc.num_layers))
        else:
            self.state = shard_state(self.state, mesh)
            pages = paged_cache_sharding(mesh, shape)
            zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=pages)  # born sharded
            self.kv = tuple((zeros(), zeros()) for _ in range(mc.num_layers))
        self.token_buckets = _pow2_buckets(max(1, config.min_token_bucket), config.max_tokens_per_step)
        if config.fine_token_buckets:
            self.token_buckets = tuple(sorted({*self.token_buckets, *(
                3 * b // 2 for b in self.token_buckets if b % 2 == 0 and 3 * b // 2 < config.max_tokens_per_step)}))
        self.seq_buckets = tuple(sorted(set(config.seq_buckets) | {config.max_num_seqs}))
        self.max_pages = math.ceil(config.max_model_len / config.block_size)
        self.page_buckets = _pow2_buckets(math.ceil(config.min_page_bucket_tokens / config.block_size),
                                          self.max_pages)
        if config.fine_page_buckets:
            self.page_buckets = tuple(sorted({*self.page_buckets, *(
                3 * b // 2 for b in self.page_buckets if b % 2 == 0 and 3 * b // 2 < self.max_pages)}))
        self.backend = PagedAttention(config.attention_backend, config.interpret)
        self.num_compilations = 0  # traces (compilations) triggered by this engine's steps
        self.record_steps = record_steps
        self.steps: list[StepRecord] = []
        self.last_timing = StepTiming(0.0, 0.0)
        # The newest token of each sequence of the last dispatched step, on device, and the row of
        # each of its request ids: what a PREVIOUS_TOKEN placeholder in the next step reads.
        self._prev_last = jnp.zeros(self.seq_buckets[-1], jnp.int32)
        if mesh is not None:
            self._prev_last = jax.device_put(self._prev_last, jax.sharding.NamedSharding(mesh, jax.P()))
        self._prev_rows: dict[str, int] = {}
        self._last_done_s = 0.0  # when the last collected step's result reached the host
        self.num_fed_on_device = 0  # PREVIOUS_TOKEN feeds (tokens that never waited for the host)
        cache_dir = config.compilation_cache_dir or os.environ.get("AGENTINFER_JAX_CACHE_DIR")
        if cache_dir:
            enable_compilation_cache(cache_dir)

    # ---- host side -----------------------------------------------------------------------------

    def execute(self, batch: StepBatch) -> dict[str, list[int]]:
        """Runs one step; returns the model's tokens (accepted drafts + one) per sampling request id."""
        pending = self.dispatch(batch)
        return {} if pending is None else self.collect(pending)

    def dispatch(self, batch: StepBatch) -> PendingStep | None:
        """Starts one step on the device and returns without waiting for it (None for an empty batch).

        A sequence whose tokens[0] is PREVIOUS_TOKEN feeds the token its request got from the step
        dispatched just before this one, read on the device: the host can plan and dispatch step
        n+1 while step n runs. Steps run in dispatch order; collect each one exactly once.
        """
        t_start = time.perf_counter()
        seqs = batch.seqs
        if not seqs:
            return None
        cfg, bs = self.config, self.config.block_size
        # Draft width: K when any slot drafts, else 0. A K-wide step scores K+1 rows per slot even
        # without drafts, which on CPU costs ~1.6x a plain decode step; two widths double the
        # (still bounded) compilations.
        k = cfg.max_draft_tokens if any(s.num_draft for s in seqs) else 0
        t_real = sum(len(s.tokens) for s in seqs)
        t_pad = _bucket(t_real, self.token_buckets)
        s_pad = _bucket(len(seqs), self.seq_buckets)

        prev_row = np.full(t_pad, -1, np.int32)
        at = 0
        for s in seqs:
            if s.num_draft > cfg.max_draft_tokens:
                raise ValueError(f"{s.num_draft} drafts exceed the engine's max_draft_tokens={cfg.max_draft_tokens}")
            if PREVIOUS_TOKEN in s.tokens:
                if s.tokens.index(PREVIOUS_TOKEN) != 0 or s.request_id not in self._prev_rows:
                    raise ValueError(f"{s.request_id}: PREVIOUS_TOKEN must be the first token of a request "
                                     "that sampled in the step dispatched just before")
                prev_row[at] = self._prev_rows[s.request_id]
                self.num_fed_on_device += 1
            at += len(s.tokens)
        arrays = pack_step(seqs, block_size=bs, max_pages=self.max_pages, draft_width=k, num_tokens=t_pad,
                           num_seqs=s_pad)
        kv_lens, pages = arrays.kv_lens, arrays.pages

        # Only the columns up to the longest context's page count are read (bucketed).
        pages = pages[:, :_bucket(-(-int(kv_lens.max()) // bs), self.page_buckets)]
        ints, floats = pack_host_arrays(arrays, prev_row, pages, len(seqs))
        layout = StepLayout(t_pad, s_pad, k, pages.shape[1])
        extras = pack_extras(seqs, num_seqs=s_pad, draft_width=k, vocab_size=self.model_config.vocab_size)
        traces = _TRACES[0]
        t_call = time.perf_counter()
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            # Through jit, whose executable cache every engine of the same shapes shares (a
            # per-engine cache of lowered executables reloaded them from disk in each new engine).
            result, self._prev_last, self.kv = _packed_step(
                self.graph, self.backend, layout, self.state, self.kv, ints, floats, self._prev_last,
                (extras.mask, extras.bias_ids, extras.bias_vals), extras.logprobs)
        self.num_compilations += _TRACES[0] - traces
        self._prev_rows = {s.request_id: i for i, s in enumerate(seqs) if s.samples}
        return PendingStep(seqs, result, t_pad, t_start, t_call, bool(extras.logprobs))

    def collect(self, pending: PendingStep) -> dict[str, list[int]]:
        """Waits for a dispatched step; returns its tokens per sampling request id."""
        lp = None
        if pending.logprobs:
            result, *lp = jax.device_get(pending.result)  # the one device-to-host transfer of the step
        else:
            result = np.asarray(pending.result)
        t_done = time.perf_counter()
        # The device starts a step at its call or when the step before it is done, whichever is later.
        t_run = max(pending.call_s, self._last_done_s)
        # Records never overlap: a step planned ahead starts, for the record, when the one before ended.
        t_start = max(pending.start_s, self._last_done_s)
        self._last_done_s = t_done
        self.last_timing = StepTiming(pending.call_s - pending.start_s, t_done - t_run)
        if self.record_steps:
            self.steps.append(self._record(pending.seqs, pending.t_pad, t_done - t_run, t_start, t_done))
        seqs = pending.seqs
        if lp is None:
            return {s.request_id: result[i, 1:1 + result[i, 0]].tolist() for i, s in enumerate(seqs) if s.samples}
        chosen, top_ids, top_vals = lp
        out = {}
        for i, s in enumerate(seqs):
            if not s.samples:
                continue
            n = int(result[i, 0])
            toks = SampledTokens(result[i, 1:1 + n].tolist())
            k = s.sampling.logprobs
            if k is not None:
                toks.logprobs = [TokenLogprob(float(chosen[i, j]),
                                              tuple(zip(top_ids[i, j, :k].tolist(), top_vals[i, j, :k].tolist())))
                                 for j in range(n)]
            out[s.request_id] = toks
        return out

    @staticmethod
    def _record(seqs: Sequence[StepSeq], t_pad: int, seconds: float, start_s: float, end_s: float) -> StepRecord:
        prefill = sum(len(s.tokens) for s in seqs if len(s.tokens) - s.num_draft > 1)
        total = sum(len(s.tokens) for s in seqs)
        return StepRecord(prefill, total - prefill, len(seqs), sum(s.start_pos + len(s.tokens) for s in seqs),
                          sum(len(s.tokens) * (s.start_pos + len(s.tokens)) for s in seqs), t_pad, seconds,
                          start_s, end_s)

    def warmup(self) -> None:
        """Compiles the smallest step (used before timing)."""
        self.execute(StepBatch([StepSeq("warmup", 0, (0,), 0, (1,))]))

    def step_shapes(self, drafting: bool = True) -> list[tuple[int, int, int, int]]:
        """Every (token bucket, sequence bucket, draft width, page bucket) a step can have."""
        widths = (0, self.config.max_draft_tokens) if drafting and self.config.max_draft_tokens else (0,)
        return [(t, s, k, p) for t in self.token_buckets for s in self.seq_buckets for k in widths
                for p in self.page_buckets if self._shape_step(t, s, k, p) is not None]

    def compile_all(self, drafting: bool = True) -> int:
        """Runs one step of every shape in `step_shapes`, so serving never compiles; returns the
        number of compilations it triggered (0 when every shape was already compiled).

        The steps attend only to the null page and write their K/V there (finite values, never
        read as data), so the cache of live requests is untouched. drafting=False skips the
        K-wide shapes (a scheduler without drafts never produces them).
        """
        before = self.num_compilations
        for shape in self.step_shapes(drafting):
            self.execute(self._shape_step(*shape))
        return self.num_compilations - before

    def time_steps(self, shapes: Sequence[tuple[int, int]], context_tokens: int, repeats: int = 3) -> list[float]:
        """Median device seconds of a step per (sequences n, tokens t) in `shapes`: n sequences feeding t
        tokens in all, each ending at `context_tokens` of context; a sequence's feed is a verify
        (its newest token + drafts) where the drafts fit the verify width, else a prefill chunk.
        One untimed run first (it compiles the shape if needed). Like compile_all's steps these
        attend only to the null page, so live requests are untouched."""
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        out = []
        for n, t in shapes:
            if not 1 <= n <= min(t, self.config.max_num_seqs) or t > self.config.max_tokens_per_step:
                raise ValueError(f"cannot time {n} sequences feeding {t} tokens (max_num_seqs "
                                 f"{self.config.max_num_seqs}, max_tokens_per_step {self.config.max_tokens_per_step})")
            ctx = max(min(context_tokens, self.config.max_model_len), -(-t // n))
            seqs = []
            for i in range(n):
                q = t // n + (i < t % n)
                drafts = q - 1 if q - 1 <= self.config.max_draft_tokens else 0
                seqs.append(StepSeq(f"time-{i}", ctx - q, (0,) * q, drafts,
                                    (0,) * -(-ctx // self.config.block_size)))
            step = StepBatch(seqs)
            self.execute(step)
            runs = []
            for _ in range(repeats):
                self.execute(step)
                runs.append(self.last_timing.step_s)  # dispatch to result, as the serving loop times a step
            out.append(float(np.median(runs)))
        return out

    def _shape_step(self, t: int, s: int, k: int, p: int) -> StepBatch | None:
        """A step that lands exactly in these buckets (None if none can): the fewest sequences of
        bucket s, t tokens, the longest context filling page bucket p, drafts when k > 0."""
        below = lambda b, bs: max([x for x in bs if x < b], default=0)  # noqa: E731
        ctx = min(p * self.config.block_size, self.config.max_model_len)
        n = max(below(s, self.seq_buckets) + 1, -(-t // ctx))
        if n > s or n > t or (k and t == n):
            return None
        seqs = []
        for i in range(n):
            q = t // n + (i < t % n)  # q <= ctx since n * ctx >= t
            seqs.append(StepSeq(f"compile-{i}", ctx - q, (0,) * q, min(k, q - 1),
                                (0,) * -(-ctx // self.config.block_size), samples=False))
        return StepBatch(seqs)
