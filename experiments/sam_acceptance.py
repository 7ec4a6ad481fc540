"""Replays recorded agent turns and measures model-free drafting: tokens per verify step.

For every assistant turn of every trajectory (sessions in file order): the prompt is all earlier
messages rendered with the tokenizer's ChatML template plus the generation prompt, the "target"
output is the recorded response (+ <|im_end|>). Greedy verification: at each step the drafter
proposes k tokens, the accepted count is the longest prefix agreeing with the recording, and the
context advances by accepted + 1 tokens. Messages are tokenized one by one, so the next turn's
prompt extends the previous turn's context token for token (as in a serving engine).

Drafters: prompt-lookup n-gram; SuffixDecoding-style suffix tree at its reference draft-length
factor (1) and at AgentSAM's (8); AgentSAM on the session only; AgentSAM with cross-session memory
(BM25-retrieved similar sessions + the global automaton of past responses; each finished session is
added to memory); optionally `sam_retrieval_only`, the memory without the global automaton, and
`sam_memory_no_ctx`, SAM + memory whose calibrator does not condition later drafted tokens on the
one and two tokens before each, and `sam_memory_python`, the default drafter on its Python hot
paths instead of the compiled ones (identical drafts, slower).

  python experiments/sam_acceptance.py --quick
  python experiments/sam_acceptance.py --all_shared --k 4,8,16 --json_out /tmp/sam.json
  python experiments/sam_acceptance.py --traces a.json --drafters suffix_tree_f8,sam_memory,sam_retrieval_only
"""

from __future__ import annotations

import json
import pathlib
import statistics
import time
from collections.abc import Callable, Sequence

import jinja2
import numpy as np
import logging

from absl import app, flags
from tokenizers import Tokenizer
from tqdm import tqdm

from agentinfer_jax.speculation import (Drafter, PromptLookupDrafter, SAMDrafter, SessionMemory,
                                        SuffixTreeDrafter)
from agentinfer_jax.speculation import sam_drafter
from agentinfer_jax.speculation.sam_drafter import AcceptanceCalibrator
from agentinfer_jax.workloads.traces import Trajectory, default_trace_path, load_traces, portable_path, shared_trace_paths

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "agentinfer_jax" / "assets"

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("traces", None, "Trace files/dirs (repeat or comma-separate); default: bundled sample.")
flags.DEFINE_bool("all_shared", False, "Use all 5 shared trace sources under --shared.")
flags.DEFINE_string("shared", str(pathlib.Path(__file__).resolve().parents[2] / "shared"),
                    "Shared data checkout (the ../shared beside the repository) for --all_shared.")
flags.DEFINE_string("tokenizer", str(ASSETS / "tokenizer.json"), "tokenizer.json to use.")
flags.DEFINE_list("k", ["8"], "Draft length(s) k.")
flags.DEFINE_bool("quick", False, "First 25 trajectories per trace, k = 8 only.")
flags.DEFINE_integer("limit", None, "At most this many trajectories per trace.")
flags.DEFINE_string("json_out", None, "Write results JSON here.")
flags.DEFINE_list("drafters", None, "Drafters to replay (default: all but the sam_retrieval_only ablation).")


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
        self.steps = self.generated = self.proposed = self.accepted = 0
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
                "steps": self.steps, "generated": self.generated}


def replay(drafter: Drafter, trajs: Sequence[Trajectory], chat: ChatTokenizer, k: int,
           stats: Stats, bar: tqdm, wait_memory: Callable[[str], None] | None) -> None:
    gen_header = chat.header("assistant")
    end_ids = chat.ids("<|im_end|>")
    for traj in trajs:
        context: list[int] = []
        for i, m in enumerate(traj.messages):
            if m["role"] == "assistant":
                rid = f"{traj.source}/{traj.id}/{i}"
                drafter.begin(rid, context + gen_header, session_id=f"{traj.source}/{traj.id}")
                if wait_memory is not None:
                    wait_memory(rid)  # the retrieval hides behind prefill; keep replays deterministic
                response = chat.ids(m["content"]) + end_ids
                pos = 0
                while pos < len(response):
                    t0 = time.perf_counter_ns()
                    draft = drafter.propose(rid, k)
                    t1 = time.perf_counter_ns()
                    acc = 0
                    for d, r in zip(draft, response[pos:]):
                        if d != r:
                            break
                        acc += 1
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
                drafter.end(rid)
                bar.update(1)
            context += chat.message(m)


def make_drafters() -> dict[str, Callable[[], tuple[Drafter, Callable[[str], None] | None, SessionMemory | None]]]:
    """Factories, so only one drafter (and its global state) is alive at a time."""

    def sam_memory(global_memory=True, token_context=True, native=None):
        memory = SessionMemory()
        drafter = SAMDrafter(memory, global_memory=global_memory, native=native,
                             calibrator=AcceptanceCalibrator(token_context=token_context))
        return drafter, drafter.wait_for_memory, memory

    return {"prompt_lookup": lambda: (PromptLookupDrafter(), None, None),
            "suffix_tree": lambda: (SuffixTreeDrafter(), None, None),
            "suffix_tree_f8": lambda: (SuffixTreeDrafter(factor=8.0), None, None),
            "sam_session": lambda: (SAMDrafter(), None, None),
            "sam_memory": sam_memory,
            "sam_retrieval_only": lambda: sam_memory(global_memory=False),
            "sam_memory_no_ctx": lambda: sam_memory(token_context=False),
            "sam_memory_python": lambda: sam_memory(native=False)}


DEFAULT_DRAFTERS = ["prompt_lookup", "suffix_tree", "suffix_tree_f8", "sam_session", "sam_memory"]


def print_table(rows: list[tuple[str, int, str, dict]]) -> None:
    head = f"{'trace':42s} {'k':>3s} {'drafter':18s} {'tok/step':>8s} {'acc_rate':>8s} {'us_p50':>7s} {'us_p99':>7s} {'ext_us':>6s}"
    print(head)
    print("-" * len(head))
    for trace, k, name, s in rows:
        print(f"{trace[:42]:42s} {k:3d} {name:18s} {s['tokens_per_step']:8.3f} {s['accept_rate']:8.3f} "
              f"{s['draft_us_p50']:7.1f} {s['draft_us_p99']:7.1f} {s['extend_us_p50']:6.1f}")


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
    if sam_drafter._sam_native is None:
        logging.warning("agentinfer_jax.speculation._sam_native is not built: SAM drafts on its Python "
                        "hot paths (same tokens, slower); reinstall with a C compiler to build it")
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
    unknown = [n for n in names if n not in factories]
    if unknown:
        raise app.UsageError(f"unknown drafters {unknown}; choose from {sorted(factories)}")
    with tqdm(total=total_turns * len(ks) * len(names), desc="replay", unit="turn") as bar:
        for path, trajs in loaded.items():
            name = pathlib.Path(path).name
            for k in ks:
                for dname in names:
                    factory = factories[dname]
                    drafter, wait, memory = factory()
                    stats = Stats()
                    replay(drafter, trajs, chat, k, stats, bar, wait)
                    if memory is not None:
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
    print_table(rows)
    if len(paths) > 1:
        print_table([("ALL", k, n, s.summary()) for k, d in merged.items() for n, s in d.items()])
    result = {"drafters": {n: s.summary() for n, s in merged[ks[0]].items()},
              "sam_compiled": sam_drafter._sam_native is not None,
              "k": ks[0], "traces": [portable_path(p) for p in paths], "detail": detail,
              "by_k": {str(k): {n: s.summary() for n, s in d.items()} for k, d in merged.items()}}
    if FLAGS.json_out:
        pathlib.Path(FLAGS.json_out).write_text(json.dumps(result, indent=1))
        print(f"wrote {FLAGS.json_out}")


if __name__ == "__main__":
    app.run(main)
