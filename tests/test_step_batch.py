"""The step contract (engine/step_batch.py): plain data in, the packed layout, and the layering."""

import subprocess
import sys
import zlib

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
