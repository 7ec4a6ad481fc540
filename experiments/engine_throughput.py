"""Engine throughput: step efficiency against a dense forward, then tokens/s and step time against
batch size and context length, without drafting, with prompt-lookup drafting and with AgentSAM
(fixed k, and with the adaptive switch choosing k from measured step times), on agent-like prompts
from the bundled FireAct traces.

Efficiency (first table): one engine step (decode, or verification of k drafts) of `batch`
sequences at `--efficiency_context` tokens against a dense forward of the same live tokens (the
same model through ContiguousAttention over a contiguous cache exactly as long as the step's
longest context, jitted, greedy argmax), both compiled and warmed alike before timing, interleaved
round by round so machine noise hits both, medians of the rounds. The engine uses fine buckets (sequence buckets
1, 2, 4, ...; token buckets from 1 and page buckets from 64 tokens, both at 1.5x steps) so padding
stays small at batch 1.
"step" is the jitted step (dispatch, run, result copy); "host" is the engine's batch building and
host-to-device copies before it, during which the device idles.

Each request's prompt is the last `context_len` tokens of a recorded ReAct context (chat template,
built-in tokenizer) and its output is forced to the recorded assistant turn (trace replay: the
forward passes, KV writes and verification are real, the emitted tokens are the record's), so draft
acceptance reflects real agent text even with random weights. Every point runs once untimed to
compile its shape buckets, then once timed. The prefix cache is off so the timed run recomputes, and
AgentSAM's cross-session memory is emptied before the timed run (it would otherwise hold the warmup's
copies of the very same turns).

  python experiments/engine_throughput.py --quick --json_out=/tmp/engine_throughput.json
  python experiments/engine_throughput.py --config=llama3_2_1b --batch_sizes=1,4,16,64 --context_lens=512,2048
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from agentinfer_jax.engine.engine import DEFAULT_CACHE_DIR, Engine, EngineConfig, StaticGraph, enable_compilation_cache
from agentinfer_jax.engine.step_batch import PREVIOUS_TOKEN, StepBatch, StepSeq
from agentinfer_jax.model.attention import ContiguousAttention, ContiguousMeta
from agentinfer_jax.model.transformer import init_cache, init_model
from agentinfer_jax.serving.builder import (ServerConfig, ServingStack, build_stack, is_model_config,
                                            load_model_config)
from agentinfer_jax.serving.request import Request, SamplingParams
from agentinfer_jax.speculation import SAMDrafter, SessionMemory
from agentinfer_jax.tokenizer import load_tokenizer
from agentinfer_jax.workloads.traces import default_trace_path, load_traces, portable_path

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "tiny", "configs/<name>.py (random weights).")
flags.DEFINE_list("batch_sizes", ["1", "4", "16"], "Concurrent requests.")
flags.DEFINE_list("context_lens", ["128", "512"], "Prompt tokens per request.")
flags.DEFINE_integer("gen_len", 64, "Output tokens per request.", lower_bound=1)
flags.DEFINE_integer("num_draft_tokens", 4, "k of the drafters (at most k with the adaptive switch).", lower_bound=1)
flags.DEFINE_list("drafters", ["none", "ngram", "sam", "sam_adaptive"],
                  "none, ngram (prompt lookup), sam (AgentSAM, fixed k), sam_adaptive (AgentSAM, adaptive k).")
flags.DEFINE_integer("block_size", 16, "Tokens per KV page.", lower_bound=1)
flags.DEFINE_integer("max_tokens_per_step", 512, "Token budget per step.", lower_bound=1)
flags.DEFINE_string("dtype", "", "Activation dtype override (default: the config's).")
flags.DEFINE_bool("quick", False, "Small sweep (< 3 min on CPU).")
flags.DEFINE_bool("efficiency", True, "Step efficiency against the dense forward.")
flags.DEFINE_bool("sweep", True, "Throughput sweep over drafters, contexts and batches.")
flags.DEFINE_list("efficiency_batches", ["1", "4", "16"], "Batches of the efficiency table.")
flags.DEFINE_integer("efficiency_context", 512, "Cached tokens per sequence before the step.", lower_bound=1)
flags.DEFINE_bool("fine_token_buckets", True, "Efficiency engine: token and page-table buckets at 1.5x steps.")
flags.DEFINE_integer("rounds", 21, "Timed rounds per efficiency point (medians).", lower_bound=1)
flags.DEFINE_string("compilation_cache_dir", DEFAULT_CACHE_DIR, "JAX persistent compilation cache ('' = off).")
flags.DEFINE_list("overlap", ["on", "off"], "Serving-loop host/device overlap settings to sweep (on, off).")
flags.DEFINE_string("json_out", "", "Write results here.")
flags.DEFINE_bool("compile_all", True, "Sweep stacks warm up as the server does: every step shape compiled and the "
                  "adaptive switch's cost cells timed before measuring (its k follows timings, so a warm-up run "
                  "need not meet every shape). Off: only the warm-up run's shapes compile (large models on an "
                  "accelerator: far fewer compilations)")


def _positive_ints(values: list[str]) -> bool:
    return all(v.isdigit() and int(v) > 0 for v in values)


DRAFTER_NAMES = ("none", "ngram", "sam", "sam_adaptive")
flags.register_validator("config", is_model_config, "no such configs/<name>.py")
flags.register_validator("drafters", lambda v: set(v) <= set(DRAFTER_NAMES), f"choose from {','.join(DRAFTER_NAMES)}")
flags.register_validator("overlap", lambda v: set(v) <= {"on", "off"}, "choose from on,off")
flags.register_validator("dtype", lambda v: v in ("", "float32", "bfloat16", "float16"),
                         "float32, bfloat16 or float16 ('' = the config's)")
for _name in ("batch_sizes", "context_lens", "efficiency_batches"):
    flags.register_validator(_name, _positive_ints, "must be positive integers")


@dataclasses.dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    records: list[list[int]]  # forced outputs (recorded assistant turns)


def trace_turns() -> list[tuple[list[int], list[int]]]:
    """(context ids, recorded reply ids) of every assistant turn in the bundled traces, longest first."""
    tok = load_tokenizer()
    turns = [(tok.encode_chat(list(earlier)), tok.encode(reply))
             for traj in load_traces(default_trace_path()) for earlier, reply in traj.assistant_turns()]
    return sorted(turns, key=lambda t: -len(t[0]))


def agent_workload(turns: list[tuple[list[int], list[int]]], num: int, context_len: int,
                   gen_len: int) -> Workload:
    """`num` (prompt, recorded reply) pairs, longest contexts first."""
    prompts, records = [], []
    for i in range(num):
        ctx, reply = turns[i % len(turns)]
        if len(ctx) < context_len:  # short traces: repeat the context, as a long agent loop would
            ctx = ctx * math.ceil(context_len / len(ctx))
        prompts.append(ctx[-context_len:])
        records.append(reply[:gen_len])
    return Workload(prompts, records)


def run_once(stack: ServingStack, work: Workload, gen_len: int, tag: str) -> dict[str, float]:
    """Runs the workload to completion through the stack's serving loop (with its host/device
    overlap setting); returns its timings."""
    engine, loop = stack.engine, stack.loop
    engine.steps.clear()
    reqs = [Request(f"{tag}-{i}", p, SamplingParams(max_tokens=gen_len, ignore_eos=True), forced_output=r)
            for i, (p, r) in enumerate(zip(work.prompts, work.records))]
    compilations = engine.num_compilations
    t0 = time.perf_counter()
    for r in reqs:
        loop.submit(r)
    loop.run_until_idle()
    wall = time.perf_counter() - t0
    if stack.pool.num_used:
        raise RuntimeError(f"{stack.pool.num_used} blocks leaked")
    host_s = sum(max(0.0, s.end_s - s.start_s - s.seconds) for s in engine.steps)
    step_s = sum(s.seconds for s in engine.steps)
    decode = [s for s in engine.steps if s.prefill_tokens == 0]
    out_tokens = sum(len(r.output_tokens) for r in reqs)
    decode_tokens = out_tokens - len(reqs)  # the first token of each request comes from its prefill step
    decode_s = sum(s.seconds for s in decode)
    verify = sum(r.num_verify_steps for r in reqs)
    return {
        "wall_s": wall, "output_tokens": out_tokens, "steps": len(engine.steps), "decode_steps": len(decode),
        "tokens_per_s": out_tokens / wall,
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s else float("nan"),
        "mean_decode_step_ms": 1e3 * decode_s / len(decode) if decode else float("nan"),
        "mean_step_ms": 1e3 * sum(s.seconds for s in engine.steps) / len(engine.steps),
        "acceptance": sum(r.num_accepted for r in reqs) / max(1, sum(r.num_drafted for r in reqs)),
        "tokens_per_verify_step": (sum(r.num_accepted for r in reqs) + verify) / verify if verify else 1.0,
        # Batch building and dispatch that the device waited for (hidden when planned ahead).
        "host_ms_per_step": 1e3 * host_s / len(engine.steps),
        # The device can be busy only between a step's start on the device (its dispatch, or the
        # end of the step before) and its result; the rest of the wall time it idles.
        "device_idle_share": max(0.0, 1.0 - step_s / wall),
        "compilations": engine.num_compilations - compilations,
    }


# ---- step efficiency: the engine's step against a dense forward of the same live tokens -------------

@functools.partial(jax.jit, static_argnames=("graph",), donate_argnames=("caches",))
def dense_step(graph, state, tokens, positions, caches, kv_lens):
    """The same model over a contiguous cache: logits of every fed token, greedy tokens out."""
    model = nnx.merge(graph.graphdef, state)
    logits, caches = model(tokens, positions, caches, ContiguousMeta(positions, kv_lens), ContiguousAttention())
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), caches


def engine_step_input(batch: int, context: int, k: int, block_size: int, pages_per_seq: int) -> StepBatch:
    """`batch` sequences with `context` cached tokens, each feeding its newest token plus k drafts."""
    seqs = []
    for i in range(batch):
        pages = tuple(range(1 + i * pages_per_seq, 1 + i * pages_per_seq + -(-(context + k) // block_size)))
        seqs.append(StepSeq(f"eff-{i}", context - 1, (5,) + tuple(7 + j for j in range(k)), k, pages))
    return StepBatch(seqs)


WARMUP_ROUNDS = 20  # untimed interleaved rounds per efficiency point


def efficiency(model_name: str, batches: list[int], context: int, ks: tuple[int, ...], rounds: int) -> dict:
    """Median step times of the engine and of the dense forward, per (batch, k); k = 0 is decode."""
    mc = load_model_config(model_name)
    if FLAGS.dtype:
        mc = mc.replace(dtype=FLAGS.dtype, param_dtype=FLAGS.dtype)
    model = init_model(mc)
    bs, kmax = FLAGS.block_size, max(ks)
    max_len = int(2 ** math.ceil(math.log2(context + kmax + 1)))
    pages = max_len // bs
    ec = EngineConfig(num_blocks=max(batches) * pages + 1, block_size=bs, max_num_seqs=max(batches),
                      max_tokens_per_step=ragged_pow2(max(batches) * (kmax + 1)), max_model_len=max_len,
                      max_draft_tokens=kmax, min_token_bucket=1, min_page_bucket_tokens=64,
                      fine_token_buckets=FLAGS.fine_token_buckets, fine_page_buckets=FLAGS.fine_token_buckets,
                      seq_buckets=tuple(2 ** i for i in range(int(math.log2(max(batches))) + 1)))
    engine = Engine(model, ec)
    graphdef, state = nnx.split(model)
    graph = StaticGraph(graphdef)  # hashed once, as the engine's (jit hashes static arguments per call)
    points = []
    for b in batches:
        for k in ks:
            out = engine_step_input(b, context, k, bs, pages)
            kv_len = context + k
            tokens = jnp.full((b, k + 1), 5, jnp.int32)
            positions = jnp.broadcast_to(jnp.arange(context - 1, kv_len, dtype=jnp.int32), (b, k + 1))
            lens = jnp.full((b,), kv_len, jnp.int32)
            caches = [init_cache(mc, b, kv_len)]

            def dense():
                t = time.perf_counter()
                toks, caches[0] = dense_step(graph, state, tokens, positions, caches[0], lens)
                np.asarray(toks)
                return time.perf_counter() - t

            # Compile, then warm both alike: a fresh process's first few dozen steps run slower
            # (measured: the first 20 rounds' median ratio 1.2-1.5 where later rounds' is 1.2).
            for _ in range(WARMUP_ROUNDS):
                engine.execute(out)
                dense()
            before = engine.num_compilations
            eng_step, eng_host, dense_s = [], [], []
            for _ in range(rounds):  # interleaved: noise hits both
                engine.execute(out)
                eng_step.append(engine.last_timing.step_s)
                eng_host.append(engine.last_timing.host_s)
                dense_s.append(dense())
            pipelined = {}
            if k == 0:  # decode as served: step n+1 dispatched (fed on device) before n is collected
                pipelined = pipelined_decode(engine, out, graph, state, tokens, positions, caches, lens, rounds)
            points.append({"batch": b, "k": k, "context": context, **pipelined,
                           "engine_step_ms": 1e3 * float(np.median(eng_step)),
                           "engine_host_ms": 1e3 * float(np.median(eng_host)),
                           "dense_ms": 1e3 * float(np.median(dense_s)),
                           # Paired per round (the same moment's load), then the median.
                           "ratio": float(np.median(np.asarray(eng_step) / np.asarray(dense_s))),
                           "compilations_in_measured_rounds": engine.num_compilations - before})
    return {"engine_config": dataclasses.asdict(ec), "points": points}


PIPELINE_DEPTH = 16  # decode steps per pipelined chain


def pipelined_decode(engine: Engine, out: StepBatch, graph, state, tokens, positions, caches, lens,
                     rounds: int) -> dict:
    """Per-step wall time of chains of decode steps, each dispatched before the previous one is
    collected and fed its token on the device: the engine through dispatch/collect and
    PREVIOUS_TOKEN (as the overlapped serving loop runs it), the dense forward by feeding its own
    argmax array. Medians over `rounds` interleaved chains."""
    ahead = StepBatch([dataclasses.replace(s, tokens=(PREVIOUS_TOKEN,)) for s in out.seqs])

    def engine_chain():
        prev = engine.dispatch(out)
        t = time.perf_counter()
        for _ in range(PIPELINE_DEPTH):
            nxt = engine.dispatch(ahead)
            engine.collect(prev)
            prev = nxt
        engine.collect(prev)
        return (time.perf_counter() - t) / PIPELINE_DEPTH

    def dense_chain():
        toks, caches[0] = dense_step(graph, state, tokens, positions, caches[0], lens)
        t = time.perf_counter()
        for _ in range(PIPELINE_DEPTH):
            nxt, caches[0] = dense_step(graph, state, toks, positions, caches[0], lens)
            np.asarray(toks)
            toks = nxt
        np.asarray(toks)
        return (time.perf_counter() - t) / PIPELINE_DEPTH

    engine_chain(), dense_chain()  # warm
    before = engine.num_compilations
    eng, dense = [], []
    for _ in range(max(3, rounds // 3)):
        eng.append(engine_chain())
        dense.append(dense_chain())
    return {"pipelined_engine_step_ms": 1e3 * float(np.median(eng)),
            "pipelined_dense_ms": 1e3 * float(np.median(dense)),
            "pipelined_ratio": float(np.median(np.asarray(eng) / np.asarray(dense))),
            "pipelined_compilations": engine.num_compilations - before}


def ragged_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def efficiency_summary(points: list[dict]) -> dict:
    """Ratios: engine / dense per batch (decode, verify k), verify(k) / decode per batch for both."""
    at = {(p["batch"], p["k"]): p for p in points}
    batches = sorted({p["batch"] for p in points})
    ks = sorted({p["k"] for p in points if p["k"]})
    out = {"decode_vs_dense": {str(b): at[b, 0]["ratio"] for b in batches},
           "pipelined_decode_vs_dense": {str(b): at[b, 0]["pipelined_ratio"] for b in batches}}
    for k in ks:
        out[f"verify{k}_vs_dense"] = {str(b): at[b, k]["ratio"] for b in batches}
    for k in ks:
        out[f"engine_verify{k}_over_decode"] = {str(b): at[b, k]["engine_step_ms"] / at[b, 0]["engine_step_ms"]
                                                for b in batches}
        out[f"dense_verify{k}_over_decode"] = {str(b): at[b, k]["dense_ms"] / at[b, 0]["dense_ms"] for b in batches}
    out["host_share_of_step"] = {f"{b}/{k}": p["engine_host_ms"] / (p["engine_host_ms"] + p["engine_step_ms"])
                                 for (b, k), p in at.items()}
    return out


def print_efficiency(eff: dict, summary: dict) -> None:
    print(f"\nstep efficiency (context {eff['points'][0]['context']}, medians; step = jitted step, "
          f"host = batch building + copies before it)")
    print(f"{'batch':>6s}{'k':>4s}{'engine ms':>11s}{'dense ms':>10s}{'ratio':>7s}{'host ms':>9s}{'host share':>12s}")
    for p in eff["points"]:
        share = p["engine_host_ms"] / (p["engine_host_ms"] + p["engine_step_ms"])
        print(f"{p['batch']:6d}{p['k']:4d}{p['engine_step_ms']:11.2f}{p['dense_ms']:10.2f}"
              f"{p['ratio']:7.2f}{p['engine_host_ms']:9.2f}{share:12.0%}")
    for p in eff["points"]:
        if "pipelined_ratio" in p:
            print(f"  pipelined decode, batch {p['batch']:3d}: engine {p['pipelined_engine_step_ms']:.2f} ms/step, "
                  f"dense {p['pipelined_dense_ms']:.2f} ms/step, ratio {p['pipelined_ratio']:.2f}")
    for name, row in summary.items():
        if name != "host_share_of_step":
            print(f"  {name:28s} " + "  ".join(f"b={b}: {r:.2f}" for b, r in row.items()))
    n = sum(p["compilations_in_measured_rounds"] + p.get("pipelined_compilations", 0) for p in eff["points"])
    print(f"compilations in measured rounds: {n}")


def main(argv):
    del argv
    if FLAGS.compilation_cache_dir:
        cache = enable_compilation_cache(FLAGS.compilation_cache_dir)
        print(f"persistent compilation cache: {cache.replace(os.path.expanduser('~'), '~', 1)}")
    eff = summary = None
    if FLAGS.efficiency:
        t0 = time.perf_counter()
        eff = efficiency(FLAGS.config, [int(b) for b in FLAGS.efficiency_batches], FLAGS.efficiency_context,
                         (0, 4, 8), FLAGS.rounds)
        summary = efficiency_summary(eff["points"])
        print_efficiency(eff, summary)
        print(f"(efficiency section: {time.perf_counter() - t0:.0f} s, compilation included)", flush=True)
    results = []
    if not FLAGS.sweep:
        write_json(eff, summary, results, 0)
        return
    batches = [1, 4] if FLAGS.quick else [int(b) for b in FLAGS.batch_sizes]
    contexts = [128, 512] if FLAGS.quick else [int(c) for c in FLAGS.context_lens]
    gen_len = 24 if FLAGS.quick else FLAGS.gen_len
    k = FLAGS.num_draft_tokens
    bs = FLAGS.block_size
    max_len = int(2 ** math.ceil(math.log2(max(contexts) + gen_len + k + 1)))
    pages = math.ceil(max_len / bs)
    turns = trace_turns()
    for drafter in FLAGS.drafters:
        if drafter not in ("none", "ngram", "sam", "sam_adaptive"):
            raise app.UsageError(f"unknown drafter {drafter!r}")
        config = ServerConfig(config=FLAGS.config, dtype=FLAGS.dtype or None, num_blocks=max(batches) * pages + 1,
                              block_size=bs, max_num_seqs=max(batches), max_model_len=max_len,
                              max_tokens_per_step=max(FLAGS.max_tokens_per_step, max(batches) * (k + 1)),
                              drafter=drafter.removesuffix("_adaptive"), num_draft_tokens=k, prefix_cache=False,
                              adaptive_draft=drafter.endswith("_adaptive"),
                              compile_at_start=FLAGS.compile_all, measure_step_costs=FLAGS.compile_all)
        stack = build_stack(config)
        stack.engine.record_steps = True
        # Quick: the synchronous loop only beside the overlapped one without drafting (steps that
        # verify drafts run synchronously anyway).
        settings = [o for o in FLAGS.overlap if o == "on" or drafter == "none" or not FLAGS.quick]
        for ctx, b, overlap in itertools.product(contexts, batches, settings):
            if overlap not in ("on", "off"):
                raise app.UsageError(f"--overlap takes on/off, got {overlap!r}")
            stack.loop.overlap = overlap == "on"
            work = agent_workload(turns, b, ctx, gen_len)
            run_once(stack, work, gen_len, "warmup")  # compiles this point's shape buckets
            if stack.session_memory is not None:  # forget the warmup's copies of these turns
                stack.session_memory.close()
                stack.session_memory = SessionMemory()
                stack.scheduler.drafter = SAMDrafter(stack.session_memory)
            row = {"drafter": drafter, "k": k if drafter != "none" else 0, "batch": b, "context": ctx,
                   "overlap": overlap, **run_once(stack, work, gen_len, "timed")}
            results.append(row)
            print(f"{drafter:12s} ctx={ctx:5d} batch={b:3d} overlap={overlap:3s} {row['tokens_per_s']:9.1f} tok/s  "
                  f"decode {row['decode_tokens_per_s']:9.1f} tok/s  step {row['mean_decode_step_ms']:7.2f} ms",
                  flush=True)
        if stack.session_memory is not None:
            stack.session_memory.close()

    header = (f"{'drafter':14s}{'ctx':>6s}{'batch':>6s}{'overlap':>8s}{'tok/s':>10s}{'dec tok/s':>11s}"
              f"{'dec step ms':>12s}{'step ms':>9s}{'accept':>8s}{'tok/verify':>11s}{'host ms':>9s}{'dev idle':>9s}{'compiles':>9s}")
    print(f"\nengine throughput: config={FLAGS.config} backend={jax.default_backend()} gen_len={gen_len} "
          f"(timed runs after a warm-up run of the same workload)\n{header}")
    for r in results:
        print(f"{r['drafter']:14s}{r['context']:6d}{r['batch']:6d}{r['overlap']:>8s}{r['tokens_per_s']:10.1f}"
              f"{r['decode_tokens_per_s']:11.1f}{r['mean_decode_step_ms']:12.2f}{r['mean_step_ms']:9.2f}"
              f"{r['acceptance']:8.2f}{r['tokens_per_verify_step']:11.2f}{r['host_ms_per_step']:9.2f}"
              f"{r['device_idle_share']:9.0%}{r['compilations']:9d}")
    print(f"compilations in measured rounds: {sum(r['compilations'] for r in results)}")
    write_json(eff, summary, results, gen_len)


def write_json(eff: dict | None, summary: dict | None, results: list[dict], gen_len: int) -> None:
    if not FLAGS.json_out:
        return
    out = {"config": FLAGS.config, "backend": jax.default_backend(), "device": str(jax.devices()[0]),
           "host": platform.node(), "gen_len": gen_len, "num_draft_tokens": FLAGS.num_draft_tokens,
           "block_size": FLAGS.block_size, "trace": portable_path(default_trace_path()), "results": results}
    if results:
        out["mean_tokens_per_s"] = float(np.mean([r["tokens_per_s"] for r in results]))
    if eff is not None:
        out["efficiency"] = summary
        out["efficiency_points"] = eff["points"]
        out["efficiency_engine_config"] = eff["engine_config"]
    path = pathlib.Path(FLAGS.json_out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
