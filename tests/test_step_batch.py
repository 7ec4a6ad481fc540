"""The step contract (engine/step_batch.py): plain data in, the packed layout, and the layering."""

import subprocess
import sys
import zlib
from collections import Counter

import numpy as np
import pytest

from agentinfer_jax.engine.step_batch import SeqSampling, StepBatch, StepSeq, pack_step
from agentinfer_jax.sampling_params import SamplingParams


def reference_pack(seqs, bs, max_pages, k, t_pad, s_pad):
    """An independent statement of the layout: token by token, sequence by sequence."""
    out = {name: [] for name in ("tokens", "positions", "slots")}
    kv_lens, pages, cu, rows, drafts, nd, spos, samp = [], [], [0], [], [], [], [], []
    for s in seqs:
        first_row = len(out["tokens"])
        n = len(s.tokens)
        for j, t in enumerate(s.tokens):
            p = s.start_pos + j
            out["tokens"].append(t)
            out["positions"].append(p)
            out["slots"].append(s.block_ids[p // bs] * bs + p % bs)
        kv_lens.append(s.start_pos + n)
        pages.append(list(s.block_ids) + [0] * (max_pages - len(s.block_ids)))
        cu.append(first_row + n)
        last = first_row + n - 1
        newest = last - s.num_draft
        rows.append([min(newest + j, last) for j in range(k + 1)])
        drafts.append(list(s.tokens[n - s.num_draft:]) + [0] * (k - s.num_draft))
        nd.append(s.num_draft)
        spos.append(s.start_pos + n - s.num_draft)
        samp.append((s.sampling.temperature, s.sampling.top_k, s.sampling.top_p, s.sampling.seed))
    pad_t = t_pad - len(out["tokens"])
    pad_s = s_pad - len(seqs)
    return dict(
        tokens=np.array(out["tokens"] + [0] * pad_t, np.int32),
        positions=np.array(out["positions"] + [0] * pad_t, np.int32),
        slots=np.array(out["slots"] + [-1] * pad_t, np.int32),
        kv_lens=np.array(kv_lens + [0] * pad_s, np.int32),
        pages=np.array(pages + [[0] * max_pages] * pad_s, np.int32).reshape(s_pad, max_pages),
        cu_q_lens=np.array(cu + [cu[-1]] * pad_s, np.int32),
        rows=np.array(rows + [[0] * (k + 1)] * pad_s, np.int32).reshape(s_pad, k + 1),
        drafts=np.array(drafts + [[0] * k] * pad_s, np.int32).reshape(s_pad, k),
        num_drafts=np.array(nd + [0] * pad_s, np.int32),
        sample_pos=np.array(spos + [0] * pad_s, np.int32),
        temperature=np.array([x[0] for x in samp] + [0.0] * pad_s, np.float32),
        top_k=np.array([x[1] for x in samp] + [0] * pad_s, np.int32),
        top_p=np.array([x[2] for x in samp] + [1.0] * pad_s, np.float32),
        seed=np.array([x[3] for x in samp] + [0] * pad_s, np.uint32),
    )


@pytest.mark.parametrize("seed", range(5))
def test_pack_step_matches_the_reference_layout_byte_for_byte(seed):
    rng = np.random.default_rng(seed)
    bs, max_pages, k = 4, 8, 3
    seqs = []
    for i in range(int(rng.integers(1, 5))):
        start = int(rng.integers(0, 20))
        nd = int(rng.integers(0, k + 1)) if rng.random() < 0.5 else 0
        n = (1 + nd) if nd else int(rng.integers(1, 6))
        blocks = tuple(int(b) for b in rng.choice(np.arange(1, 50), size=-(-(start + n) // bs), replace=False))
        sp = SeqSampling(float(rng.random()), int(rng.integers(0, 5)), float(rng.random()), int(rng.integers(0, 2**32)))
        seqs.append(StepSeq(f"r{i}", start, tuple(int(t) for t in rng.integers(0, 100, n)), nd, blocks, sp))
    t_pad = 32
    got = pack_step(seqs, block_size=bs, max_pages=max_pages, draft_width=k, num_tokens=t_pad, num_seqs=6)
    want = reference_pack(seqs, bs, max_pages, k, t_pad, 6)
    for name, arr in got._asdict().items():
        assert arr.dtype == want[name].dtype, name
        np.testing.assert_array_equal(arr, want[name], err_msg=name)


def test_pack_step_rejects_what_does_not_fit():
    seq = StepSeq("a", 0, (1, 2, 3), 2, (1,))
    with pytest.raises(ValueError, match="draft width"):
        pack_step([seq], block_size=4, max_pages=2, draft_width=1, num_tokens=8, num_seqs=1)
    with pytest.raises(ValueError, match="tokens"):
        pack_step([seq], block_size=4, max_pages=2, draft_width=2, num_tokens=2, num_seqs=1)
    with pytest.raises(ValueError, match="sequences"):
        pack_step([seq, seq], block_size=4, max_pages=2, draft_width=2, num_tokens=8, num_seqs=1)


def test_seed_resolution_and_batch_properties():
    assert SeqSampling.resolve(SamplingParams(seed=7), "x").seed == 7
    assert SeqSampling.resolve(SamplingParams(), "req-1").seed == zlib.crc32(b"req-1")
    batch = StepBatch([StepSeq("a", 0, (1, 2), 0, (1,)), StepSeq("b", 5, (3, 4, 5), 2, (2, 3))])
    assert batch.num_tokens == 5 and not batch.empty and batch.seqs[1].drafts == (4, 5)
    assert StepBatch([]).empty


def test_scheduler_output_is_plain_data():
    """What crosses to the executor holds no live request: ints, strings, tuples, floats."""
    from agentinfer_jax.cache import BlockPool
    from agentinfer_jax.serving.request import Request
    from agentinfer_jax.serving.scheduler import Scheduler, SchedulerConfig

    pool = BlockPool(16)
    sched = Scheduler(SchedulerConfig(block_size=4, max_num_seqs=2, max_tokens_per_step=8, vocab_size=50), pool)
    sched.add_request(Request("a", [1, 2, 3, 4, 5], SamplingParams(temperature=0.5, top_k=3)))
    out = sched.schedule()
    assert isinstance(out, StepBatch)
    [seq] = out.seqs
    assert seq == StepSeq("a", 0, (1, 2, 3, 4, 5), 0, tuple(seq.block_ids),
                          SeqSampling(0.5, 3, 1.0, zlib.crc32(b"a")), samples=True)

    def plain(x):
        if isinstance(x, (tuple, list)):
            return all(plain(v) for v in x)
        if isinstance(x, (SeqSampling,)):
            return plain([x.temperature, x.top_k, x.top_p, x.seed])
        return isinstance(x, (int, float, str, bool))

    assert all(plain(getattr(seq, f)) for f in ("request_id", "start_pos", "tokens", "num_draft", "block_ids",
                                                 "sampling", "samples"))


LAYERS = """
import importlib, pkgutil, sys
import agentinfer_jax, agentinfer_jax.{pkg} as pkg
for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
    if m.name.endswith("jetstream_adapter"):
        continue  # needs the optional jetstream extra; its imports are checked by grep below
    importlib.import_module(m.name)
bad = sorted(m for m in sys.modules if m.startswith({forbidden}))
print(bad)
sys.exit(1 if bad else 0)
"""


@pytest.mark.parametrize("pkg, forbidden", [
    ("model", ("agentinfer_jax.engine", "agentinfer_jax.serving", "agentinfer_jax.agents", "agentinfer_jax.workloads")),
    ("engine", ("agentinfer_jax.serving", "agentinfer_jax.agents", "agentinfer_jax.workloads")),
    ("cache", ("agentinfer_jax.engine", "agentinfer_jax.serving", "agentinfer_jax.agents")),
    ("speculation", ("agentinfer_jax.engine", "agentinfer_jax.serving", "agentinfer_jax.agents")),
    ("serving", ("agentinfer_jax.agents", "agentinfer_jax.workloads")),
    ("agents", ("agentinfer_jax.workloads",)),
])
def test_a_lower_layer_never_imports_a_higher_one(pkg, forbidden):
    """In a fresh interpreter: importing every module of a layer pulls in no module above it."""
    code = LAYERS.format(pkg=pkg, forbidden=forbidden)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_jetstream_adapter_imports_no_higher_layer():
    import pathlib

    import agentinfer_jax.engine as eng
    src = (pathlib.Path(eng.__path__[0]) / "jetstream_adapter.py").read_text()
    assert "agentinfer_jax.serving" not in src and "agentinfer_jax.agents" not in src


def _words(allowed: np.ndarray) -> np.ndarray:
    """Bool [rows, V] -> int32 [rows, ceil(V / 32)] with bit t % 32 of word t // 32."""
    rows, v = allowed.shape
    words = np.zeros((rows, -(-v // 32)), np.uint32)
    for t in range(v):
        words[:, t // 32] |= allowed[:, t].astype(np.uint32) << np.uint32(t % 32)
    return words.view(np.int32)


@pytest.mark.parametrize("seed", range(4))
def test_pack_extras_gives_each_row_the_openai_adjustment_and_its_mask(seed):
    """pack_extras then adjust_logits (on zero logits) against a dense float64 statement per row:
    logit_bias (repeated ids add up) minus frequency * count minus presence * [count > 0], where
    row j counts the generated tokens plus the first j drafts; the row's grammar mask, rows past
    the drafts repeating the last one; sequences that do not sample and padding get nothing."""
    import jax.numpy as jnp

    from agentinfer_jax.engine.sampling import adjust_logits
    from agentinfer_jax.engine.step_batch import pack_extras

    rng = np.random.default_rng(seed)
    v, k, s_pad = 70, 3, 6
    seqs, expect = [], []
    for i in range(int(rng.integers(1, 5))):
        nd = int(rng.integers(0, k + 1))
        toks = tuple(int(t) for t in rng.integers(0, v, nd + 1))
        generated = [int(t) for t in rng.integers(0, 12, int(rng.integers(0, 15)))]
        penalised = rng.random() < 0.7
        sp = SeqSampling(presence_penalty=float(rng.uniform(-2, 2)) if penalised else 0.0,
                         frequency_penalty=float(rng.uniform(-2, 2)) if penalised else 0.0,
                         logit_bias=tuple((int(t), float(b)) for t, b in zip(rng.integers(0, 12, 3),
                                                                              rng.uniform(-5, 5, 3))),
                         logprobs=3 if rng.random() < 0.3 else None)
        allowed = rng.random((nd + 1, v)) < 0.5 if rng.random() < 0.6 else None
        samples = rng.random() < 0.85
        seqs.append(StepSeq(f"r{i}", 10, toks, nd, (1, 2), sp, samples,
                            None if allowed is None else _words(allowed),
                            tuple(sorted(Counter(generated).items()))))
        rows = np.zeros((k + 1, v))
        ok = np.ones((k + 1, v), bool)
        if samples:
            for j in range(k + 1):
                counts = np.bincount(generated + list(toks[1:1 + j]), minlength=v)  # toks[1:]: the drafts
                rows[j] = -sp.frequency_penalty * counts - sp.presence_penalty * (counts > 0)
                for t, b in sp.logit_bias:
                    rows[j, t] += b
                if allowed is not None:
                    ok[j] = allowed[min(j, nd)]
        expect.append((rows, ok, samples))
    ex = pack_extras(seqs, num_seqs=s_pad, draft_width=k, vocab_size=v)
    assert ex.logprobs == any(s.samples and s.sampling.logprobs is not None for s in seqs)
    assert (ex.bias_ids is None) == (not any(s.samples and s.sampling.penalized for s in seqs))
    assert (ex.mask is None) == (not any(s.samples and s.allowed is not None for s in seqs))
    got = np.asarray(adjust_logits(jnp.zeros((s_pad, k + 1, v)), None if ex.mask is None else jnp.asarray(ex.mask),
                                   None if ex.bias_ids is None else jnp.asarray(ex.bias_ids),
                                   None if ex.bias_vals is None else jnp.asarray(ex.bias_vals)))
    for i in range(s_pad):
        rows, ok, _ = expect[i] if i < len(expect) else (np.zeros((k + 1, v)), np.ones((k + 1, v), bool), False)
        np.testing.assert_allclose(got[i][ok], rows[ok], rtol=1e-5, atol=1e-5)
        assert (got[i][~ok] < -1e29).all()


def test_pack_extras_rejects_a_mask_per_wrong_row_count():
    from agentinfer_jax.engine.step_batch import pack_extras

    seq = StepSeq("a", 0, (1, 2, 3), 2, (1,), allowed=_words(np.ones((2, 40), bool)))
    with pytest.raises(ValueError, match="2 mask rows for 2 drafts"):
        pack_extras([seq], num_seqs=1, draft_width=2, vocab_size=40)
