"""SlotEngine (prefill / insert / generate over the paged cache) is lossless and never leaks pages.

Reference: `model.transformer.generate` (dense contiguous cache, greedy). The slot engine runs
several prompts in different slots at once, with slot reuse, chunked prefill and shared prefixes,
and must emit the same tokens; every page must be back in the pool at the end.
"""

from __future__ import annotations

import importlib
import importlib.util
import random
import re

import numpy as np
import pytest

from agentinfer_jax.engine.engine import EngineConfig
from agentinfer_jax.engine.slots import FED, LENGTH, TOKEN, VALID, ContextFullError, OutOfPagesError, SlotEngine
from agentinfer_jax.model.config import ModelConfig
from agentinfer_jax.model.transformer import generate, init_model
from agentinfer_jax.serving.request import SamplingParams

CFG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=512)
# 4 slots; prompts over 32 tokens are prefilled in two chunks.
EC = EngineConfig(num_blocks=64, block_size=8, max_num_seqs=4, max_tokens_per_step=32, max_model_len=96)


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, seed=5)


@pytest.fixture(scope="module")
def engine(model):
    return SlotEngine.from_model(model, EC)


def reference(model, prompts, counts):
    rows = generate(model, prompts, max(counts), max_len=96, eos_token_ids=())
    return [row[:n] for row, n in zip(rows, counts)]


def check_pages(engine, state, live_prefixes):
    """DecodeState's invariants against the allocator: an inactive slot has length 0 and an
    all-zero row; an active one owns exactly the first cdiv(length, page_size) entries of its row;
    every page's refcount is the number of slots and live prefixes that hold it."""
    want = np.zeros(engine.config.num_blocks, np.int64)
    for slot in range(engine.num_slots):
        row, n = state.page_table[slot], int(state.lengths[slot])
        if not state.active[slot]:
            assert n == 0 and not row.any()
            continue
        owned = -(-n // engine.page_size)
        assert (row[:owned] > 0).all() and not row[owned:].any()
        np.add.at(want, row[:owned], 1)
    for prefix in live_prefixes:
        np.add.at(want, prefix.pages, 1)
    refs = np.asarray(engine._alloc.refcounts)
    np.testing.assert_array_equal(refs[1:], want[1:])


def run_slots(engine, jobs):
    """Continuous batching over the slots: jobs are (tokens, num_new, existing_prefix or None).
    A job enters the lowest free slot, decodes until it has num_new tokens, then its slot is freed
    and reused. Returns each job's tokens; checks the result columns on the way."""
    state = engine.init_decode_state()
    live = {id(e): e for _, _, e in jobs if e is not None}.values()  # shared prefixes stay live
    pending = list(enumerate(jobs))
    slot_job: dict[int, int] = {}
    out: dict[int, list[int]] = {}
    while pending or slot_job:
        for slot in range(engine.num_slots):
            if slot not in slot_job and pending:
                j, (tokens, n, existing) = pending.pop(0)
                prefix = engine.prefill(tokens, existing_prefix=existing)
                state = engine.insert(prefix, state, slot)
                slot_job[slot], out[j] = j, [prefix.first_token]
        for slot, j in list(slot_job.items()):  # one-token jobs are done after prefill
            if len(out[j]) == jobs[j][1]:
                state = engine.free(state, slot)
                del slot_job[slot]
        if not slot_job:
            continue
        state, result = engine.generate(state)
        check_pages(engine, state, live)
        result = np.asarray(result)
        for slot in range(engine.num_slots):
            assert result[slot, VALID] == (slot in slot_job)
        for slot, j in list(slot_job.items()):
            assert result[slot, FED] == out[j][-1]
            out[j].append(int(result[slot, TOKEN]))
            assert result[slot, LENGTH] == len(out[j])
            if len(out[j]) == jobs[j][1]:
                state = engine.free(state, slot)
                del slot_job[slot]
    assert not state.active.any() and not state.page_table.any()
    check_pages(engine, state, live)
    return [out[j] for j in range(len(jobs))]


def test_slots_match_reference_with_reuse_and_chunked_prefill(model, engine):
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 64) for _ in range(rng.randint(1, 45))] for _ in range(7)]
    counts = [rng.randint(1, 14) for _ in prompts]
    counts[0] = 1  # finishes at prefill
    before = engine.num_compilations
    got = run_slots(engine, [(p, n, None) for p, n in zip(prompts, counts)])
    assert got == reference(model, prompts, counts)
    assert engine.num_used_pages == 0
    # Bounded: prefill buckets (one sequence) + the generate step and the engine step inside it.
    assert 0 < engine.num_compilations - before <= len(engine.engine.token_buckets) + 2


@pytest.mark.parametrize("shared_len", [21, 24])  # partial last page / page-aligned prefix
def test_existing_prefix_shares_pages_and_matches_reference(model, engine, shared_len):
    rng = random.Random(shared_len)
    system = [rng.randrange(1, 64) for _ in range(shared_len)]
    bodies = [[rng.randrange(1, 64) for _ in range(rng.randint(1, 12))] for _ in range(3)] + [[]]
    prompts = [system + b for b in bodies]  # the last one IS the shared prefix
    counts = [rng.randint(2, 10) for _ in prompts]
    shared = engine.prefill(system)
    full_pages = (min(shared_len, len(prompts[0]) - 1)) // EC.block_size
    probe = engine.prefill(prompts[0], existing_prefix=shared)
    assert np.array_equal(probe.pages[:full_pages], shared.pages[:full_pages])
    assert not set(probe.pages[full_pages:]) & set(shared.pages)  # the rest is fresh
    used = engine.num_used_pages
    engine.release(probe)
    assert engine.num_used_pages == used - (len(probe.pages) - full_pages)  # shared pages stay with `shared`

    got = run_slots(engine, [(p, n, shared) for p, n in zip(prompts, counts)])
    assert got == reference(model, prompts, counts)
    assert engine.num_used_pages == len(shared.pages)
    engine.release(shared)
    assert engine.num_used_pages == 0


def test_sampled_tokens_do_not_depend_on_batching(engine):
    rng = random.Random(7)
    prompts = [[rng.randrange(1, 64) for _ in range(rng.randint(3, 20))] for _ in range(3)]
    sp = SamplingParams(temperature=1.0, top_k=20, seed=11)

    def decode(batch, steps=6):
        state, outs = engine.init_decode_state(), []
        for slot, p in enumerate(batch):
            prefix = engine.prefill(p, sampling=sp)
            outs.append([prefix.first_token])
            state = engine.insert(prefix, state, slot)
        for _ in range(steps):
            state, result = engine.generate(state)
            for slot in range(len(batch)):
                outs[slot].append(int(np.asarray(result)[slot, TOKEN]))
        for slot in range(len(batch)):
            state = engine.free(state, slot)
        return outs

    together = decode(prompts)
    alone = [decode([p])[0] for p in prompts]
    assert together == alone
    assert engine.num_used_pages == 0


def test_bad_calls_raise_and_leak_nothing(engine):
    state = engine.init_decode_state()
    free_before = engine.num_free_pages
    with pytest.raises(ValueError, match="outside"):
        engine.prefill([1, 2, 64])
    with pytest.raises(ValueError, match="no room"):
        engine.prefill([1] * EC.max_model_len)
    with pytest.raises(ValueError, match="non-empty"):
        engine.prefill([])
    # The slot interface samples plainly: what it cannot honour is refused, never ignored.
    from agentinfer_jax.sampling_params import InvalidRequestError, StructuredOutput
    for sp, what in [(SamplingParams(logprobs=2), "logprobs"), (SamplingParams(frequency_penalty=0.5), "penalties"),
                     (SamplingParams(presence_penalty=-0.5), "penalties"),
                     (SamplingParams(logit_bias=((3, 5.0),)), "penalties"),
                     (SamplingParams(structured=StructuredOutput("json_object")), "structured"),
                     (SamplingParams(n=2), "n")]:
        with pytest.raises(ValueError, match=f"does not support {what}"):
            engine.prefill([1, 2, 3], sampling=sp)
    with pytest.raises(InvalidRequestError, match="top_p"):
        engine.prefill([1, 2, 3], sampling=SamplingParams(top_p=0.0))
    assert engine.num_free_pages == free_before
    a = engine.prefill([1, 2, 3])
    with pytest.raises(ValueError, match="not a prefix"):
        engine.prefill([1, 5, 3, 4], existing_prefix=a)
    with pytest.raises(TypeError):
        engine.prefill([1, 2, 3, 4], existing_prefix=[1, 2, 3])
    with pytest.raises(ValueError, match="slot"):
        engine.insert(a, state, engine.num_slots)
    state = engine.insert(a, state, 0)
    with pytest.raises(ValueError, match="already inserted"):
        engine.insert(a, state, 1)
    with pytest.raises(ValueError, match="already inserted"):
        engine.release(a)
    orphan = engine.prefill([4])
    with pytest.raises(ValueError, match="occupied"):
        engine.insert(orphan, state, 0)
    with pytest.raises(ValueError, match="empty"):
        engine.free(state, 2)
    state = engine.free(state, 0)
    assert engine.num_free_pages == free_before - 1  # only the orphan's page
    engine.release(orphan)
    assert engine.num_free_pages == free_before


def test_out_of_pages_and_full_context_change_nothing(engine):
    state = engine.init_decode_state()
    for slot in range(2):  # 24 tokens each: 3 full pages; the next token starts a new page
        state = engine.insert(engine.prefill(list(range(1 + slot, 25 + slot))), state, slot)
    # Hold all but one page in prefixes that are never inserted (8 pages per 64-token prompt).
    hogs = [engine.prefill([5 + i] * 64) for i in range(engine.num_free_pages // 8)]
    hogs += [engine.prefill([9] * 8) for _ in range(engine.num_free_pages - 1)]
    assert engine.num_free_pages == 1
    with pytest.raises(OutOfPagesError, match="needs 3 pages"):
        engine.prefill(list(range(1, 20)))
    assert engine.num_free_pages == 1
    with pytest.raises(OutOfPagesError) as err:  # two slots need a page, one is free
        engine.generate(state)
    assert err.value.slots == (0, 1) and engine.num_free_pages == 1
    state = engine.free(state, 1)
    for hog in hogs:
        engine.release(hog)
    for _ in range(EC.max_model_len - 24):
        state, _ = engine.generate(state)
    with pytest.raises(ContextFullError) as err:
        engine.generate(state)
    assert err.value.slots == (0,)
    state = engine.free(state, 0)
    assert engine.num_used_pages == 0


@pytest.mark.skipif(importlib.util.find_spec("jetstream") is not None, reason="google-jetstream is installed")
def test_jetstream_adapter_without_the_extra_names_the_install_command():
    with pytest.raises(ImportError, match=re.escape("pip install -e '.[jetstream]'")):
        importlib.import_module("agentinfer_jax.engine.jetstream_adapter")
