"""Replays recorded agent turns and measures model-free drafting: tokens per verify step.

For every assistant turn of every trajectory (sessions in file order): the prompt is all earlier
messages rendered with the tokenizer's ChatML template plus the generation prompt, the "target"
output is the recorded response (+ <|im_end|>). Greedy verification: at each step the drafter
proposes k tokens, the accepted count is the longest prefix agreeing with the recording, and the
context advances by accepted + 1 tokens. Messages are tokenized one by one, so the next turn's
prompt extends the previous turn's context token for token (as in a serving engine).

Drafters: prompt-lookup n-gram; the real SuffixDecoding (arctic-inference's suffix-tree cache,
built by `make suffix-decoding`) with its defaults (`suffix_decoding`), with max_spec_factor 8
(`suffix_decoding_f8`) and, opt-in, its tree speculation at factor 8 (`suffix_decoding_tree_f8`: up
to k nodes verified as a tree, accepted = the longest root path agreeing with the recording; the
same verify width as a k-token path, but our engine verifies paths only); AgentSAM on the session
only; AgentSAM with cross-session memory (BM25-retrieved similar sessions + the global automaton of
past responses; each finished session is added to memory);
optionally `sam_retrieval_only`, the memory without the global automaton, and `sam_memory_no_ctx`,
SAM + memory whose calibrator does not condition later drafted tokens on the tokens before each.

With --json_out, a PNG beside it plots tokens per step (a panel per trace file, a bar per drafter and k).

Per drafter: tokens per step, drafting p50/p99 per step, the process's peak RSS during its replay
(`rss_mb`: the kernel's high-water mark, reset before each replay), and `bytes_per_token`, the bytes
of its cross-request store per stored token (SAM: the session memory's arena; the peer: its own
estimate of its global tree over the response tokens it holds). Every drafter replays the same
turns (`turns`). SAM + memory also reports its retrieval + build milliseconds per retrieval.

  python experiments/sam_acceptance.py --quick
  python experiments/sam_acceptance.py --all_shared --k 4,8,16 --json_out /tmp/sam.json
  python experiments/sam_acceptance.py --traces a.json --drafters suffix_decoding_f8,sam_memory,sam_retrieval_only
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import pathlib
import time
from collections.abc import Callable, Sequence

import jinja2
import numpy as np
import logging

from absl import app, flags
from tokenizers import Tokenizer
from tqdm import tqdm

from agentinfer_jax.speculation import (AcceptanceCalibrator, Drafter, PromptLookupDrafter, SAMDrafter,
                                        SessionMemory)
from agentinfer_jax.workloads.traces import Trajectory, default_trace_path, load_traces, portable_path, shared_trace_paths

import suffix_decoding_peer  # beside this script in experiments/

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "agentinfer_jax" / "assets"

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("traces", None, "Trace files/dirs (repeat or comma-separate); default: bundled sample.")
flags.DEFINE_bool("all_shared", False, "Use all 5 shared trace sources under --shared.")
flags.DEFINE_string("shared", str(pathlib.Path(__file__).resolve().parents[2] / "shared"),
                    "Shared data checkout (the ../shared beside the repository) for --all_shared.")
flags.DEFINE_string("tokenizer", str(ASSETS / "tokenizer.json"), "tokenizer.json to use.")
flags.DEFINE_list("k", ["8"], "Draft length(s) k.")
flags.DEFINE_bool("quick", False, "First 25 trajectories per trace, k = 8 only.")
flags.DEFINE_integer("limit", None, "At most this many trajectories per trace.", lower_bound=1)
flags.DEFINE_string("json_out", None, "Write results JSON here.")
flags.DEFINE_list("drafters", None, "Drafters to replay (default: prompt_lookup, suffix_decoding, suffix_decoding_f8, "
                  "sam_session, sam_memory; the peer's only when built).")
flags.DEFINE_float("memory_cap_mb", 64.0, "SessionMemory's cap on stored sessions, MB (SessionMemory's default).")
flags.register_validator("memory_cap_mb", lambda v: v > 0, "must be > 0")
flags.DEFINE_bool("gil_probe", False, "Also measure the main thread's longest stall while the memory's "
                  "worker builds a 256K-token global automaton and runs retrievals (GIL release check).")
flags.DEFINE_integer("passes", 1, "Replay each trace this many times with the same drafter (RSS flatness check).",
                     lower_bound=1)
flags.DEFINE_integer("stream_passes", 0, "Instead of the table: one drafter per k and name replays every trace "
                     "file in one stream, this many times over, as one long-running server would; prints and "
                     "writes RSS after each pass (RSS flatness over a long replay).", lower_bound=0)
flags.register_validator("k", lambda v: all(k.isdigit() and int(k) > 0 for k in v), "must be positive integers")
flags.register_validator("traces", lambda v: all(pathlib.Path(p).exists() for a in v or () for p in a.split(",") if p),
                         "no such file or directory")
flags.register_validator("tokenizer", lambda v: pathlib.Path(v).is_file(), "no such file")
flags.register_multi_flags_validator(["all_shared", "shared"],
                                     lambda f: not f["all_shared"] or pathlib.Path(f["shared"]).is_dir(),
                                     "--shared must be the shared data checkout for --all_shared")


class ChatTokenizer:
    """Tokenizes messages one at a time with the ChatML template (checked against the jinja one)."""

    def __init__(self, path: str) -> None:
        self.tok = Tokenizer.from_file(path)
        config = json.loads((pathlib.Path(path).parent / "tokenizer_config.json").read_text()) \
            if (pathlib.Path(path).parent / "tokenizer_config.json").exists() else {}
        self.template = config.get("chat_template")
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok.encode(text, add_special_tokens=False).ids
        return self._cache[text]

    def header(self, role: str) -> list[int]:
        return self.ids(f"<|im_start|>{role}\n")

    def message(self, m: dict[str, str]) -> list[int]:
        return self.header(m["role"]) + self.ids(m["content"]) + self.ids("<|im_end|>\n")

    def check_template(self, messages: Sequence[dict[str, str]]) -> None:
        """The per-message rendering must equal the template's rendering of the whole prompt."""
        if not self.template:
            return
        whole = jinja2.Template(self.template).render(messages=list(messages), add_generation_prompt=True)
        parts = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        if whole != parts + "<|im_start|>assistant\n":
            raise ValueError("tokenizer chat template is not ChatML; per-message tokenization would differ")


class Stats:
    def __init__(self) -> None:
        self.steps = self.generated = self.proposed = self.accepted = self.turns = 0
        self.rss_mb = self.bytes_per_token = 0.0
        self.extra: dict[str, float] = {}
        self.propose_ns: list[int] = []
        self.extend_ns: list[int] = []

    def summary(self) -> dict[str, float]:
        us = np.asarray(self.propose_ns, dtype=np.float64) / 1e3
        ext = np.asarray(self.extend_ns, dtype=np.float64) / 1e3
        return {"tokens_per_step": self.generated / max(self.steps, 1),
                "accept_rate": self.accepted / max(self.proposed, 1),
                "draft_us_p50": float(np.percentile(us, 50)) if len(us) else 0.0,
                "draft_us_p99": float(np.percentile(us, 99)) if len(us) else 0.0,
                "extend_us_p50": float(np.percentile(ext, 50)) if len(ext) else 0.0,
                "steps": self.steps, "generated": self.generated, "turns": self.turns,
                "rss_mb": self.rss_mb, "bytes_per_token": self.bytes_per_token, **self.extra}


def replay(drafter: Drafter, trajs: Sequence[Trajectory], chat: ChatTokenizer, k: int,
           stats: Stats, bar: tqdm, wait_memory: Callable[[str], None] | None) -> None:
    gen_header = chat.header("assistant")
    end_ids = chat.ids("<|im_end|>")
    tree = getattr(drafter, "tree", False)
    for traj in trajs:
        context: list[int] = []
        for i, m in enumerate(traj.messages):
            if m["role"] == "assistant":
                rid = f"{traj.source}/{traj.id}/{i}"
                # Tokenized before the turn begins: the tokenizer's work must not evict the drafter's
                # state from the caches between its begin and its first (timed) proposal.
                response = chat.ids(m["content"]) + end_ids
                drafter.begin(rid, context + gen_header, session_id=f"{traj.source}/{traj.id}")
                if wait_memory is not None:
                    wait_memory(rid)  # the retrieval hides behind prefill; keep replays deterministic
                pos = 0
                while pos < len(response):
                    t0 = time.perf_counter_ns()
                    if tree:
                        draft, parents = drafter.propose_tree(rid, k)
                    else:
                        draft = drafter.propose(rid, k)
                    t1 = time.perf_counter_ns()
                    if not tree:  # a path: each token hangs off the one before it
                        parents = range(-1, len(draft) - 1)
                    acc = suffix_decoding_peer.tree_accepted(draft, parents, response[pos:])
                    adv = min(acc + 1, len(response) - pos)
                    t2 = time.perf_counter_ns()
                    drafter.extend(rid, response[pos:pos + adv])
                    stats.extend_ns.append((time.perf_counter_ns() - t2) // adv)
                    stats.propose_ns.append(t1 - t0)
                    stats.steps += 1
                    stats.proposed += len(draft)
                    stats.accepted += min(acc, adv)
                    pos += adv
                stats.generated += len(response)
                stats.turns += 1
                drafter.end(rid)
                bar.update(1)
            context += chat.message(m)


def make_drafters() -> dict[str, Callable[[], tuple[Drafter, Callable[[str], None] | None, SessionMemory | None]]]:
    """Factories, so only one drafter (and its global state) is alive at a time."""

    def sam_memory(global_memory=True, token_context=True):
        memory = SessionMemory(cap_mb=FLAGS.memory_cap_mb)
        drafter = SAMDrafter(memory, global_memory=global_memory,
                             calibrator=AcceptanceCalibrator(token_context=token_context))
        return drafter, drafter.wait_for_memory, memory

    def peer(factor, tree=False):
        if not suffix_decoding_peer.available():
            raise app.UsageError("SuffixDecoding is not built: run `make suffix-decoding` first")
        return suffix_decoding_peer.SuffixDecodingDrafter(max_spec_factor=factor, tree=tree), None, None

    return {"prompt_lookup": lambda: (PromptLookupDrafter(), None, None),
            "suffix_decoding": lambda: peer(1.0),
            "suffix_decoding_f8": lambda: peer(8.0),
            "suffix_decoding_tree_f8": lambda: peer(8.0, tree=True),
            "sam_session": lambda: (SAMDrafter(), None, None),
            "sam_memory": sam_memory,
            "sam_retrieval_only": lambda: sam_memory(global_memory=False),
            "sam_memory_no_ctx": lambda: sam_memory(token_context=False)}


DEFAULT_DRAFTERS = ["prompt_lookup", "suffix_decoding", "suffix_decoding_f8", "sam_session", "sam_memory"]


def _reset_peak_rss() -> None:
    """Resets the kernel's RSS high-water mark of this process (Linux; no-op elsewhere)."""
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _rss_mb(key: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident memory of this process, MB."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _release_free_heap() -> None:
    """Returns the C heap's free pages to the OS (glibc's malloc_trim), so RSS after a pass counts
    what is live, not what the allocator keeps after freeing (which moved it by +-15% run to run)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS keeps the allocator's slack
        pass


def _store_stats(drafter, memory: SessionMemory | None) -> dict[str, float]:
    """Bytes per stored token of the drafter's cross-request store, and its size."""
    if memory is not None:
        return {"bytes_per_token": memory.bytes_per_token(), "store_mb": memory.store_bytes() / 2**20,
                "memory_mb": memory.nbytes() / 2**20}
    if hasattr(drafter, "global_bytes"):
        n = max(drafter.response_tokens, 1)
        return {"bytes_per_token": drafter.global_bytes() / n, "store_mb": drafter.global_bytes() / 2**20}
    return {}


def gil_probe(text: np.ndarray) -> dict[str, float]:
    """Longest gap between iterations of a small main-thread loop (a stand-in for the serving loop's
    steps) while SessionMemory's worker builds a global automaton over `text` (real trace tokens)
    and runs 64 retrievals, against the same loop with the worker idle. Kernels are loaded first
    (a process's first call of each loads it from the disk cache, holding the GIL once)."""
    tokens = len(text)
    with SessionMemory(global_min_rebuild=1) as warm:
        warm.add("w", text[:64])
        warm.add_response(text[:64])
        warm.retrieve(text[:64]).result()

    def loop_until(done: Callable[[], bool], min_s: float) -> tuple[float, int]:
        worst, n, t_end = 0.0, 0, time.perf_counter() + min_s
        last = time.perf_counter()
        while not done() or time.perf_counter() < t_end:
            sum(range(200))  # ~2 us of Python work, like a drafting step's own share
            now = time.perf_counter()
            worst, last, n = max(worst, now - last), now, n + 1
        return worst * 1e3, n

    idle_ms, _ = loop_until(lambda: True, 0.5)
    with SessionMemory(global_tokens=tokens, global_min_rebuild=1) as memory:
        for i in range(64):
            memory.add(f"s{i}", text[i * 2048 % len(text):][:2048])
        memory.flush()
        t0 = time.perf_counter()
        futures = [memory.add_response(text)] + [memory.retrieve(text[i * 512 % len(text):][:512]) for i in range(64)]
        del tokens
        busy_ms, _ = loop_until(lambda: all(f.done() for f in futures), 0.0)
        work_s = time.perf_counter() - t0
    return {"loop_max_gap_ms_idle": idle_ms, "loop_max_gap_ms_during_build": busy_ms,
            "build_and_retrievals_s": work_s}


def print_table(rows: list[tuple[str, int, str, dict]]) -> None:
    head = (f"{'trace':38s} {'k':>3s} {'drafter':23s} {'turns':>6s} {'tok/step':>8s} {'acc_rate':>8s} "
            f"{'us_p50':>7s} {'us_p99':>7s} {'ext_us':>6s} {'rss_mb':>7s} {'B/tok':>6s} {'mem_p99_ms':>10s}")
    print(head)
    print("-" * len(head))
    for trace, k, name, s in rows:
        mem = f"{s['memory_ms_p99']:10.2f}" if "memory_ms_p99" in s else f"{'':10s}"
        print(f"{trace[:38]:38s} {k:3d} {name:23s} {s['turns']:6d} {s['tokens_per_step']:8.3f} "
              f"{s['accept_rate']:8.3f} {s['draft_us_p50']:7.1f} {s['draft_us_p99']:7.1f} "
              f"{s['extend_us_p50']:6.1f} {s['rss_mb']:7.0f} {s['bytes_per_token']:6.1f} {mem}")


def plot(detail: dict[str, dict[str, dict[str, dict]]], path: pathlib.Path) -> None:
    """Tokens per verify step: one panel per trace file, k on the x axis, a bar per drafter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(detail), figsize=(4.5 * len(detail), 3.8), squeeze=False, sharey=True)
    for ax, (trace, by_k) in zip(axes[0], detail.items()):
        ks = list(by_k)
        names = list(by_k[ks[0]])
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(ks))]
            bars = ax.bar(xs, [by_k[k][name]["tokens_per_step"] for k in ks], width, label=name)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)  # the differences are a few percent: print them
        ax.set_xticks(range(len(ks)), [f"k = {k}" for k in ks])
        ax.set_title(trace[:40], fontsize=9)
    axes[0][0].set_ylabel("tokens per verify step")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="upper center", ncol=len(labels))
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _after_pass(drafter, memory: SessionMemory | None) -> tuple[float, dict[str, float]]:
    """RSS MB after a pass (garbage collected, free heap returned) and what the drafter's own
    arrays (and the memory's) hold then, MB."""
    gc.collect()
    _release_free_heap()
    rss = _rss_mb("VmRSS")
    held = {"drafter_mb": (drafter.nbytes if hasattr(drafter, "nbytes") else
                           drafter.global_bytes() if hasattr(drafter, "global_bytes") else 0) / 2**20}
    if memory is not None:
        held["memory_mb"] = memory.nbytes() / 2**20
    return rss, held


def stream_rss(loaded: dict[str, list[Trajectory]], ks: Sequence[int], names: Sequence[str],
               factories: dict[str, Callable], chat: ChatTokenizer, total_turns: int) -> None:
    """RSS after each pass of one drafter over every trace file in turn (`--stream_passes`)."""
    passes, result = FLAGS.stream_passes, {}
    with tqdm(total=total_turns * len(ks) * len(names) * passes, desc="stream", unit="turn") as bar:
        for k in ks:
            for dname in names:
                gc.collect()
                drafter, wait, memory = factories[dname]()
                stats, rss, held = Stats(), [], []
                for p in range(passes):
                    for trajs in loaded.values():
                        # Later passes are new sessions with the same text (memory holds the first).
                        replay(drafter, [t if p == 0 else dataclasses.replace(t, id=f"{t.id}#{p}") for t in trajs],
                               chat, k, stats, bar, wait)
                    mb, parts = _after_pass(drafter, memory)
                    rss.append(mb)
                    held.append(sum(parts.values()))
                if memory is not None:
                    memory.close()
                del drafter, wait, memory
                growth = [b / a - 1 for a, b in zip(rss, rss[1:])]
                result[f"{k}/{dname}"] = {"rss_mb_after_each_pass": rss, "held_mb_after_each_pass": held,
                                          "growth_per_pass": growth, "turns_per_pass": stats.turns // passes}
                print(f"k={k} {dname}: RSS MB after each pass " + " ".join(f"{r:.0f}" for r in rss)
                      + " (growth " + " ".join(f"{g:+.1%}" for g in growth) + "); held by the drafter (+ memory) MB "
                      + " ".join(f"{h:.0f}" for h in held))
    if FLAGS.json_out:
        out = {"stream_passes": passes, "traces": [portable_path(p) for p in loaded], "results": result}
        pathlib.Path(FLAGS.json_out).write_text(json.dumps(out, indent=1))
        print(f"wrote {FLAGS.json_out}")


def main(argv: Sequence[str]) -> None:
    del argv
    import bm25s  # noqa: F401  (imported first: it sets its logger's level on import)

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    if FLAGS.all_shared:
        paths = [str(p) for p in shared_trace_paths(FLAGS.shared)]
    elif FLAGS.traces:
        paths = [p for arg in FLAGS.traces for p in arg.split(",") if p]
    else:
        paths = [str(default_trace_path())]
    ks = [8] if FLAGS.quick else [int(k) for k in FLAGS.k]
    if any(k < 1 for k in ks):
        raise app.UsageError("--k values must be >= 1")
    limit = 25 if FLAGS.quick and FLAGS.limit is None else FLAGS.limit
    if FLAGS.passes < 1:
        raise app.UsageError("--passes must be >= 1")
    if FLAGS.stream_passes < 0:
        raise app.UsageError("--stream_passes must be >= 0 (0: the table instead)")
    chat = ChatTokenizer(FLAGS.tokenizer)
    # Tool-calling trajectories as the ChatML text turns the template renders them to.
    loaded = {p: [t.as_text_chat() for t in load_traces(p, limit=limit)] for p in paths}
    for trajs in loaded.values():
        for t in trajs[:3]:
            chat.check_template(t.messages)
    total_turns = sum(sum(1 for _ in t.assistant_turns()) for ts in loaded.values() for t in ts)
    rows, detail = [], {}
    merged: dict[int, dict[str, Stats]] = {}
    factories = make_drafters()
    names = FLAGS.drafters or DEFAULT_DRAFTERS
    if not FLAGS.drafters:
        if not suffix_decoding_peer.available():
            logging.warning("SuffixDecoding is not built (make suffix-decoding): replaying without it")
            names = [n for n in names if not n.startswith("suffix_decoding")]
    unknown = [n for n in names if n not in factories]
    if unknown:
        raise app.UsageError(f"unknown drafters {unknown}; choose from {sorted(factories)}")
    if FLAGS.stream_passes:
        stream_rss(loaded, ks, names, factories, chat, total_turns)
        return
    passes_rss: dict[str, list[float]] = {}
    passes_held: dict[str, list[dict[str, float]]] = {}  # what the drafter's own arrays hold after each pass
    with tqdm(total=total_turns * len(ks) * len(names) * FLAGS.passes, desc="replay", unit="turn") as bar:
        for path, trajs in loaded.items():
            name = pathlib.Path(path).name
            for k in ks:
                for dname in names:
                    factory = factories[dname]
                    gc.collect()
                    _reset_peak_rss()
                    drafter, wait, memory = factory()
                    stats = Stats()
                    for p in range(FLAGS.passes):
                        # Later passes are new sessions with the same text (memory holds the first).
                        replay(drafter, [t if p == 0 else dataclasses.replace(t, id=f"{t.id}#{p}") for t in trajs],
                               chat, k, stats, bar, wait)
                        mb, held = _after_pass(drafter, memory)
                        passes_rss.setdefault(f"{name}/{k}/{dname}", []).append(mb)
                        passes_held.setdefault(f"{name}/{k}/{dname}", []).append(held)
                    stats.rss_mb = _rss_mb()
                    stats.extra.update(_store_stats(drafter, memory))
                    stats.bytes_per_token = stats.extra.pop("bytes_per_token", 0.0)
                    if memory is not None:
                        t = memory.timings_ms()
                        stats.extra.update(memory_ms_p50=t["p50"], memory_ms_p99=t["p99"], memory_ms_max=t["max"],
                                           global_build_ms_p50=t["global_p50"], global_build_ms_max=t["global_max"],
                                           global_builds=t["global_n"], retrievals=t["n"])
                        memory.close()
                    del drafter, wait, memory
                    summary = stats.summary()
                    rows.append((name, k, dname, summary))
                    detail.setdefault(name, {}).setdefault(str(k), {})[dname] = summary
                    agg = merged.setdefault(k, {}).setdefault(dname, Stats())
                    agg.steps += stats.steps
                    agg.generated += stats.generated
                    agg.proposed += stats.proposed
                    agg.accepted += stats.accepted
                    agg.propose_ns += stats.propose_ns
                    agg.extend_ns += stats.extend_ns
                    agg.turns += stats.turns
                    agg.rss_mb = max(agg.rss_mb, stats.rss_mb)
                    agg.bytes_per_token = max(agg.bytes_per_token, stats.bytes_per_token)
                    for key, v in stats.extra.items():
                        agg.extra[key] = max(agg.extra.get(key, 0.0), v)
    print_table(rows)
    if FLAGS.passes > 1:
        for key, rss in passes_rss.items():
            held = passes_held[key]
            print(f"{key}: RSS MB after each pass " + " ".join(f"{r:.0f}" for r in rss) + "; held by the drafter (+ memory) MB "
                  + " ".join(f"{h['drafter_mb'] + h.get('memory_mb', 0.0):.0f}" for h in held))
    if FLAGS.gil_probe:
        text = [t for trajs in loaded.values() for traj in trajs for m in traj.messages for t in chat.message(m)]
        probe = gil_probe(np.asarray(text[:1 << 18], np.int32))
        print("GIL probe: " + ", ".join(f"{k} {v:.2f}" for k, v in probe.items()))
    if len(paths) > 1:
        print_table([("ALL", k, n, s.summary()) for k, d in merged.items() for n, s in d.items()])
    result = {"drafters": {n: s.summary() for n, s in merged[ks[0]].items()},
              "rss_mb_after_each_pass": passes_rss, "held_mb_after_each_pass": passes_held,
              "gil_probe": probe if FLAGS.gil_probe else None,
              "k": ks[0], "traces": [portable_path(p) for p in paths], "detail": detail,
              "by_k": {str(k): {n: s.summary() for n, s in d.items()} for k, d in merged.items()}}
    if FLAGS.json_out:
        out = pathlib.Path(FLAGS.json_out)
        out.write_text(json.dumps(result, indent=1))
        plot(detail, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    app.run(main)
