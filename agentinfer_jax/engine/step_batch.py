"""The step contract between whoever plans a step (the scheduler, the slot engine) and the engine.

Plain data only, keyed by request id: no live request objects cross this seam, so the engine never
imports serving (vLLM v1's SchedulerOutput is the model). `pack_step` is the one pure function that
turns a batch into the padded host arrays the jitted step takes; `Engine.execute` and `SlotEngine`
both use it, so every path feeds the model the same layout.

- `StepLimits`: the capacity a planner must respect (serving re-exports it as `SchedulerConfig`).
- `StepSeq`: one sequence's share of a step: tokens fed from `start_pos` (a prefill chunk, or its
  newest token plus `num_draft` drafts at the end), its block table and its sampling parameters.
- `StepBatch`: the sequences of one step. The engine answers `{request_id: tokens}` for every
  sequence that `samples`: the accepted drafts plus one token, as the model chose them.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["PREVIOUS_TOKEN", "StepLimits", "SeqSampling", "StepSeq", "StepBatch", "StepArrays", "pack_step",
           "default_seed", "StepExtras", "pack_extras", "TokenLogprob", "SampledTokens"]


# A token not yet on the host: the one its request sampled in the step dispatched just before this
# one. Only as a sequence's first token; the engine reads it on the device (host/device overlap).
PREVIOUS_TOKEN = -1


@dataclasses.dataclass(frozen=True)
class StepLimits:
    """Capacity and budgets of one engine (all counts in tokens or blocks)."""

    block_size: int = 16  # tokens per KV block (page)
    max_num_seqs: int = 32  # running requests at most (decode slots)
    max_tokens_per_step: int = 256  # prefill chunk + decode + draft tokens fed in one step
    max_model_len: int = 2048  # prompt + output tokens at most
    vocab_size: int = 4096  # token ids must lie in [0, vocab_size)
    num_draft_tokens: int = 0  # k drafted tokens per decode step (0 = no drafting)
    eos_token_ids: tuple[int, ...] = ()  # tokens that end a request (unless ignore_eos)
    # The planner's choice (the engine ignores it): a waiting request whose uncached prompt blocks a
    # running request is still prefilling waits for them to be cached instead of computing them too.
    share_inflight_prefill: bool = True

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.max_num_seqs <= 0 or self.max_tokens_per_step <= 0:
            raise ValueError("block_size, max_num_seqs and max_tokens_per_step must be positive")
        if self.max_tokens_per_step < self.max_num_seqs:
            raise ValueError("max_tokens_per_step must cover one decode token per running request")


def default_seed(key: str) -> int:
    """The seed of a request that names none: stable per key, so replays draw the same tokens."""
    return zlib.crc32(key.encode())


@dataclasses.dataclass(frozen=True)
class SeqSampling:
    """How one sequence samples; `seed` is resolved (draws are a function of (seed, position))."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None  # None = off; else top logprobs per emitted token (0..20)

    @classmethod
    def resolve(cls, params, key: str) -> SeqSampling:
        """From anything with temperature / top_k / top_p / seed (None = `default_seed(key)`) and,
        optionally, penalties, logit_bias and logprobs (SamplingParams)."""
        seed = params.seed if params.seed is not None else default_seed(key)
        return cls(params.temperature, params.top_k, params.top_p, seed,
                   getattr(params, "presence_penalty", 0.0), getattr(params, "frequency_penalty", 0.0),
                   tuple(getattr(params, "logit_bias", ())), getattr(params, "logprobs", None))

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


@dataclasses.dataclass(frozen=True)
class StepSeq:
    """One request's share of a step."""

    request_id: str
    start_pos: int  # position of tokens[0] (the request's computed tokens)
    tokens: tuple[int, ...]  # tokens fed: a prefill chunk, or (newest token,) + drafts; the newest
    # token may be PREVIOUS_TOKEN while the step that samples it still runs
    num_draft: int  # how many of `tokens` (at the end) are drafts to verify
    block_ids: tuple[int, ...]  # the block table, covering every fed position
    sampling: SeqSampling = SeqSampling()
    samples: bool = True  # the feed ends at the request's newest token, so it yields tokens
    # Grammar constraint: allowed-token bitmasks (int32 [num_draft + 1, ceil(V / 32)], bit t % 32 of
    # word t // 32) for the token after the newest one and after each draft; None = unconstrained.
    allowed: np.ndarray | None = dataclasses.field(default=None, compare=False)
    # Generated tokens so far as (token id, count) pairs: what presence/frequency penalties count.
    token_counts: tuple[tuple[int, int], ...] = ()

    @property
    def drafts(self) -> tuple[int, ...]:
        return self.tokens[len(self.tokens) - self.num_draft:]


@dataclasses.dataclass
class StepBatch:
    seqs: Sequence[StepSeq]

    @property
    def num_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.seqs)

    @property
    def empty(self) -> bool:
        return not self.seqs


class StepArrays(NamedTuple):
    """Host arrays of one padded step, in the jitted step's argument layout."""

    tokens: np.ndarray  # int32 [T]
    positions: np.ndarray  # int32 [T]
    slots: np.ndarray  # int32 [T]: page * block_size + offset; -1 = padding (written nowhere)
    kv_lens: np.ndarray  # int32 [S]
    pages: np.ndarray  # int32 [S, max_pages]
    cu_q_lens: np.ndarray  # int32 [S + 1]
    rows: np.ndarray  # int32 [S, K + 1]: the rows whose logits verify / sample
    drafts: np.ndarray  # int32 [S, K]
    num_drafts: np.ndarray  # int32 [S]
    sample_pos: np.ndarray  # int32 [S]: position of the first sampled token (seeds the draw)
    temperature: np.ndarray  # f32 [S]
    top_k: np.ndarray  # int32 [S]
    top_p: np.ndarray  # f32 [S]
    seed: np.ndarray  # uint32 [S]


def pack_step(seqs: Sequence[StepSeq], *, block_size: int, max_pages: int, draft_width: int, num_tokens: int,
              num_seqs: int) -> StepArrays:
    """The ragged batch as padded arrays: `num_tokens` token rows, `num_seqs` sequences, `draft_width` K.

    Sequence i owns token rows cu_q_lens[i]:cu_q_lens[i+1]; padding sequences own no rows and no
    pages, padding tokens write nowhere, so padding never changes a real sequence's result.
    """
    t_pad, s_pad, k, bs = num_tokens, num_seqs, draft_width, block_size
    if len(seqs) > s_pad:
        raise ValueError(f"{len(seqs)} sequences exceed the padded count {s_pad}")
    tokens = np.zeros(t_pad, np.int32)
    positions = np.zeros(t_pad, np.int32)
    slots = np.full(t_pad, -1, np.int32)
    kv_lens = np.zeros(s_pad, np.int32)
    pages = np.zeros((s_pad, max_pages), np.int32)
    cu = np.zeros(s_pad + 1, np.int32)
    rows = np.zeros((s_pad, k + 1), np.int32)
    drafts = np.zeros((s_pad, k), np.int32)
    num_drafts = np.zeros(s_pad, np.int32)
    sample_pos = np.zeros(s_pad, np.int32)
    temp = np.zeros(s_pad, np.float32)
    top_k = np.zeros(s_pad, np.int32)
    top_p = np.ones(s_pad, np.float32)
    seed = np.zeros(s_pad, np.uint32)
    at = 0
    for i, s in enumerate(seqs):
        n = len(s.tokens)
        if s.num_draft > k:
            raise ValueError(f"{s.num_draft} drafts exceed the step's draft width {k}")
        if at + n > t_pad:
            raise ValueError(f"more than {t_pad} tokens in the step")
        pos = np.arange(s.start_pos, s.start_pos + n, dtype=np.int32)
        table = np.asarray(s.block_ids, np.int32)
        tokens[at:at + n] = s.tokens
        positions[at:at + n] = pos
        slots[at:at + n] = table[pos // bs] * bs + pos % bs
        kv_lens[i] = s.start_pos + n
        pages[i, :len(table)] = table
        newest = at + n - 1 - s.num_draft  # row of the newest real token: predicts the next one
        rows[i] = np.minimum(newest + np.arange(k + 1), at + n - 1)
        drafts[i, :s.num_draft] = s.tokens[n - s.num_draft:]
        num_drafts[i] = s.num_draft
        sample_pos[i] = s.start_pos + n - s.num_draft
        sp = s.sampling
        temp[i], top_k[i], top_p[i], seed[i] = sp.temperature, sp.top_k, sp.top_p, sp.seed
        at += n
        cu[i + 1] = at
    cu[len(seqs) + 1:] = at
    return StepArrays(tokens, positions, slots, kv_lens, pages, cu, rows, drafts, num_drafts, sample_pos, temp,
                      top_k, top_p, seed)


class TokenLogprob(NamedTuple):
    """The emitted token's raw log-probability and the most likely tokens' (id, logprob), best first."""

    logprob: float
    top: tuple[tuple[int, float], ...]


class SampledTokens(list):
    """The model's tokens for one request (a plain list of ids, as the step contract promises), with
    `logprobs[i]` for token i when the request asked for them (else None)."""

    logprobs: list[TokenLogprob] | None = None


class StepExtras(NamedTuple):
    """Optional per-row arrays of a step; each is None unless some sequence of the step needs it, so a
    plain step keeps its compiled shape. Row j of sequence s predicts the token after its j-th draft."""

    mask: np.ndarray | None  # int32 [S, K + 1, ceil(V / 32)]: allowed-token bitmask (-1 = all)
    bias_ids: np.ndarray | None  # int32 [S, K + 1, P]: tokens whose logit gets bias_vals added
    bias_vals: np.ndarray | None  # f32 [S, K + 1, P] (padding: id 0, value 0)
    logprobs: bool  # whether to return logprobs of the emitted tokens

    @property
    def any(self) -> bool:
        return self.mask is not None or self.bias_ids is not None or self.logprobs


NO_EXTRAS = StepExtras(None, None, None, False)


def _row_biases(seq: StepSeq, k: int) -> list[dict[int, float]]:
    """Additive logit biases of the k + 1 rows: logit_bias, then the OpenAI penalties over the
    generated tokens, which for row j include the sequence's first j drafts (as if accepted)."""
    sp = seq.sampling
    counts = dict(seq.token_counts)
    drafts = seq.drafts
    out = []
    for j in range(k + 1):
        bias: dict[int, float] = {}
        for tok, b in sp.logit_bias:
            bias[tok] = bias.get(tok, 0.0) + b
        for tok, c in counts.items():
            if c > 0:
                bias[tok] = bias.get(tok, 0.0) - sp.frequency_penalty * c - sp.presence_penalty
        out.append(bias)
        if j < len(drafts):
            counts[drafts[j]] = counts.get(drafts[j], 0) + 1
    return out


def pack_extras(seqs: Sequence[StepSeq], *, num_seqs: int, draft_width: int, vocab_size: int,
                min_bias_width: int = 16) -> StepExtras:
    """The optional arrays of a step (grammar masks, logit biases, logprobs flag) for `seqs` as laid
    out by `pack_step`. Bias rows are padded to a power of two >= min_bias_width entries."""
    k, words = draft_width, -(-vocab_size // 32)
    live = [(i, s) for i, s in enumerate(seqs) if s.samples]
    mask = None
    if any(s.allowed is not None for _, s in live):
        mask = np.full((num_seqs, k + 1, words), -1, np.int32)
        for i, s in live:
            if s.allowed is not None:
                a = np.asarray(s.allowed).view(np.int32).reshape(-1, words)
                if a.shape[0] != s.num_draft + 1:
                    raise ValueError(f"{s.request_id}: {a.shape[0]} mask rows for {s.num_draft} drafts")
                mask[i, :a.shape[0]] = a
                mask[i, a.shape[0]:] = a[-1]  # rows past the drafts repeat the last (never emitted)
    bias_ids = bias_vals = None
    rows = {i: _row_biases(s, k) for i, s in live if s.sampling.penalized}
    if rows:
        width = max((len(b) for bs in rows.values() for b in bs), default=1)
        p = min_bias_width
        while p < width:
            p *= 2
        bias_ids = np.zeros((num_seqs, k + 1, p), np.int32)
        bias_vals = np.zeros((num_seqs, k + 1, p), np.float32)
        for i, biases in rows.items():
            for j, b in enumerate(biases):
                bias_ids[i, j, :len(b)] = list(b.keys())
                bias_vals[i, j, :len(b)] = list(b.values())
    logprobs = any(s.sampling.logprobs is not None for _, s in live)
    return StepExtras(mask, bias_ids, bias_vals, logprobs)
