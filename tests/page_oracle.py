"""A model-free executor whose 'KV cache' is token ids stored in pages.

Its next token at position p is a hash of the tokens it reads back from the pages at positions
0..p through the request's block table, so a wrong block table, a stale or foreign page, a bad
prefix-cache hit or a lost token changes the output. The expected output is the same hash over the
request's true token sequence, computed without any paging: the independent reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from agentinfer_jax.engine.step_batch import PREVIOUS_TOKEN, StepBatch
from agentinfer_jax.serving.scheduler import Scheduler, SchedulerOutput

_MOD = (1 << 61) - 1


def next_token(context: Sequence[int], vocab: int) -> int:
    h = 7
    for t in context:
        h = (h * 1_000_003 + t + 1) % _MOD
    return h % vocab


def reference_generate(prompt: Sequence[int], n: int, vocab: int, stop_ids=()) -> list[int]:
    ctx, out = list(prompt), []
    for _ in range(n):
        t = next_token(ctx, vocab)
        out.append(t)
        ctx.append(t)
        if t in stop_ids:
            break
    return out


class PageOracleExecutor:
    def __init__(self, num_blocks: int, block_size: int, vocab: int):
        self.bs = block_size
        self.vocab = vocab
        self.pages = [[-1] * block_size for _ in range(num_blocks)]
        self.steps = 0

    def execute(self, out: SchedulerOutput) -> dict[str, list[int]]:
        self.steps += 1
        result = {}
        for seq in out.seqs:
            bt = seq.block_ids
            assert 0 not in bt, "null block in a block table"
            for j, t in enumerate(seq.tokens):
                p = seq.start_pos + j
                self.pages[bt[p // self.bs]][p % self.bs] = t
            if not seq.samples:
                continue
            # Read the whole context back through the block table.
            end = seq.start_pos + len(seq.tokens)
            ctx = [self.pages[bt[p // self.bs]][p % self.bs] for p in range(end)]
            assert -1 not in ctx, "read an unwritten slot"
            first = seq.start_pos + len(seq.tokens) - seq.num_draft - 1  # newest real token
            drafts = seq.tokens[len(seq.tokens) - seq.num_draft:]
            toks = []
            for i in range(seq.num_draft + 1):
                target = next_token(ctx[: first + i + 1], self.vocab)
                toks.append(target)
                if i == seq.num_draft or drafts[i] != target:
                    break
            result[seq.request_id] = toks
        return result


class PipelinedOracleExecutor(PageOracleExecutor):
    """The oracle with the engine's overlap contract: `dispatch` a step whose sequences may start
    with PREVIOUS_TOKEN (the request's newest token from the step dispatched just before, which the
    planner could not know), `collect` it later. A placeholder resolved wrongly changes the pages
    and so every later token."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._last: dict[str, int] = {}
        self.placeholders = 0

    def dispatch(self, out: StepBatch) -> dict[str, list[int]]:
        seqs = []
        for s in out.seqs:
            if PREVIOUS_TOKEN in s.tokens:
                assert s.tokens.index(PREVIOUS_TOKEN) == 0 and s.request_id in self._last
                s = dataclasses.replace(s, tokens=(self._last[s.request_id],) + s.tokens[1:])
                self.placeholders += 1
            seqs.append(s)
        result = self.execute(StepBatch(seqs))
        self._last = {rid: toks[-1] for rid, toks in result.items()}
        return result

    def collect(self, pending: dict[str, list[int]]) -> dict[str, list[int]]:
        return pending


def run_until_done(sched: Scheduler, ex: PageOracleExecutor, max_steps: int = 100_000, on_step=None) -> int:
    steps = 0
    while sched.has_unfinished:
        out = sched.schedule()
        assert not out.empty or not sched.has_unfinished, "scheduler stalled with work left"
        sched.update(out, ex.execute(out))
        if on_step is not None:
            on_step(steps)
        steps += 1
        assert steps < max_steps
    return steps
