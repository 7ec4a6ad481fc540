"""End-to-end agent experiment: real trace sessions through the whole stack, in REPLAY mode.

Every session of a real trace (default: the bundled FireAct sample) runs through ReActAgent ->
EngineClient -> ServingLoop -> Engine (real forward passes over the paged KV cache, every emitted
token forced to the recorded response with `Request.forced_output`); tools return the recorded
observations after a seeded simulated latency; sessions arrive concurrently (Poisson). Each model
role runs the server's own stack (`serving.builder.build_stack` from a `ServerConfig`); the
replay pieces are `agentinfer_jax.workloads.replay`. Configs:

  baseline   FCFS, prefix cache, no drafting, large model only, no compression, no speculation
  agentsched AgentSched admission + session KV retention over tool calls
  sam        AgentSAM drafting with cross-session memory (pre-filled with other trace sessions) and
             the adaptive switch, as served (drafter="sam")
  collab     AgentCollab: a smaller random model runs the steps the controller gives it; the
             PROGRESS signal comes from the trace (see TraceProgressController)
  compress   AgentCompress: BM25 search-result filtering + extractive memory distillation
  spagent    SPAgent verified phase: a guess of the next action (the reasoning prompt with the reply
             forced to start "Action:"; right with the real hit rate of the bundled
             speculative-action data, per action type and step) runs through the ActionServer in
             parallel with the reasoning call; a match is served from the ActionBuffer (the guess
             call runs on the small model when one is loaded, i.e. in "all")
  all        everything together

Drafting configs time their step-cost cells before each round (as the server's warm-up does).

Checks: final answers identical across configs; lossless configs (agentsched, sam, spagent)
leave every output token of every reasoning call identical to the baseline.

    python experiments/agent_e2e.py --quick          # the README demo (make demo)
    python experiments/agent_e2e.py --num_sessions 16 --tool_latency_mean 1.5
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import math
import pathlib
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags

from agentinfer_jax.agents.action_buffer import ActionBuffer
from agentinfer_jax.agents.compress import MemoryDistiller, SearchResultFilter
from agentinfer_jax.agents.engine_client import EngineClient
from agentinfer_jax.agents.loop import AgentConfig, AgentFeatures, AgentResult, ReActAgent
from agentinfer_jax.agents.react import DEFAULT_INSTRUCTION
from agentinfer_jax.agents.spagent import SpeculationConfig
from agentinfer_jax.agents.tools import ToolLatency
from agentinfer_jax.engine.engine import DEFAULT_CACHE_DIR, EngineConfig, enable_compilation_cache
from agentinfer_jax.model.transformer import init_model
from agentinfer_jax.serving.builder import (ServerConfig, ServingStack, build_engine, build_stack, is_model_config,
                                            load_model_config)
from agentinfer_jax.speculation import SessionMemory
from agentinfer_jax.speculation.sam_drafter import compile_kernels
from agentinfer_jax.tokenizer import Tokenizer, load_tokenizer
from agentinfer_jax.workloads.cost_model import StepCostModel, StepFeatures
from agentinfer_jax.workloads.projection import (CallWindow, StepTimeline, TimedStep, ToolWait, project_session,
                                                 project_span)
from agentinfer_jax.workloads.replay import (HIT_RATES_PATH, HitRates, RecordedSession, TraceProgressController,
                                             TraceReplay, TraceTool, derive_hit_rates, record_session)
from agentinfer_jax.workloads.sessions import poisson_arrivals
from agentinfer_jax.workloads.traces import default_trace_path, load_traces, portable_path

CONFIG_NAMES = ("baseline", "agentsched", "sam", "collab", "compress", "spagent", "all")
LOSSLESS = ("agentsched", "sam", "spagent")

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "small run for the demo (few short sessions, tool latency mean 0.5 s)")
flags.DEFINE_string("json_out", "experiments/results/agent_e2e.json", "where to write the JSON (plot beside it)")
flags.DEFINE_string("traces", None, "trace file/dir (default: the bundled FireAct sample)")
flags.DEFINE_integer("num_sessions", None, "sessions to replay (default 12; quick: 4)", lower_bound=1)
flags.DEFINE_float("tool_latency_mean", None, "mean simulated tool latency in s (default 1.5; quick: 0.5)",
                  lower_bound=0.0)
flags.DEFINE_float("arrival_rate", 1.0, "Poisson session arrivals per second")
flags.DEFINE_integer("max_turns", None, "only sessions with at most this many LLM calls (default 6; quick: 3)",
                     lower_bound=1)
flags.DEFINE_string("model", "cpu_demo", "configs/<name>.py of the large role, random weights (cpu_demo: decode is "
                    "bound by streaming weights, as on an accelerator; tiny: compute-bound on a CPU)")
flags.DEFINE_integer("num_draft_tokens", 8, "k drafted tokens per verify step (AgentSAM)", lower_bound=1)
flags.DEFINE_integer("memory_sessions", 60, "other trace sessions pre-loaded into AgentSAM's cross-session memory",
                     lower_bound=0)
flags.DEFINE_list("configs", list(CONFIG_NAMES), "configs to run (baseline always runs)")
flags.DEFINE_integer("repeats", 1, "rounds per config, in alternating order; fields are medians over rounds",
                     lower_bound=1)
flags.DEFINE_bool("projection_switch", True, "drafting configs replay once more with the adaptive switch pricing k "
                  "at the projection target's step costs; their projection uses that replay")
flags.DEFINE_integer("seed", 0, "seed of arrivals, tool latencies and action guesses")
flags.DEFINE_string("compilation_cache", DEFAULT_CACHE_DIR,
                    "JAX persistent compilation cache dir ('' = off)")
flags.DEFINE_string("derive_hit_rates_from", None,
                    "speculative-action run_metrics dir: re-derive the bundled hit-rate JSON from it and exit")
flags.register_validator("arrival_rate", lambda v: 0 < v < float("inf"), "must be a positive number of sessions per s")
flags.register_validator("configs", lambda v: set(v) <= set(CONFIG_NAMES), f"choose from {','.join(CONFIG_NAMES)}")
flags.register_validator("traces", lambda v: v is None or pathlib.Path(v).exists(), "no such file or directory")
flags.register_validator("derive_hit_rates_from", lambda v: v is None or pathlib.Path(v).is_dir(), "no such directory")


flags.register_validator("model", is_model_config, "no such configs/<name>.py")


# ---------------------------------------------------------------------------------------------
# Stack and runs


@dataclasses.dataclass(frozen=True)
class RunConfig:
    name: str
    policy: str = "fcfs"
    retention_ttl_s: float = 0.0
    sam: bool = False
    collab: bool = False
    compress: bool = False
    speculate: bool = False


def run_configs(names: Sequence[str]) -> list[RunConfig]:
    table = {
        "baseline": RunConfig("baseline"),
        "agentsched": RunConfig("agentsched", policy="agentsched", retention_ttl_s=30.0),
        "sam": RunConfig("sam", sam=True),
        "collab": RunConfig("collab", collab=True),
        "compress": RunConfig("compress", compress=True),
        "spagent": RunConfig("spagent", speculate=True),
        "all": RunConfig("all", policy="agentsched", retention_ttl_s=30.0, sam=True, collab=True, compress=True,
                         speculate=True),
    }
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown configs {unknown}; choose from {list(table)}")
    return [table["baseline"]] + [table[n] for n in names if n != "baseline"]


def small_model_config(large):
    """The "small" role: half the width and a quarter of the layers (at least one) of the large
    model, over the same tokenizer (about an eighth of its weights, like Llama-3.2-1B to 3.1-8B)."""
    return large.replace(hidden_size=large.hidden_size // 2, intermediate_size=large.intermediate_size // 2,
                         num_layers=max(1, large.num_layers // 4), num_heads=max(1, large.num_heads // 2),
                         num_kv_heads=max(1, large.num_kv_heads // 2))


@dataclasses.dataclass
class Setup:
    tokenizer: Tokenizer
    large: Any
    small: Any
    engine_config: EngineConfig
    num_draft_tokens: int
    memory_contexts: list[tuple[str, list[int]]]


def role_config(cfg: RunConfig, setup: Setup, name: str) -> ServerConfig:
    """One role's stack, as the server would be configured for this run."""
    return ServerConfig.from_engine_config(setup.engine_config, model_name=name, policy=cfg.policy,
                                           retention_ttl_s=cfg.retention_ttl_s, drafter="sam" if cfg.sam else "none",
                                           num_draft_tokens=setup.num_draft_tokens)


def build_roles(cfg: RunConfig, setup: Setup, draft_costs: dict[str, Any] | None = None) -> dict[str, ServingStack]:
    """The server's stack (serving.builder) per AgentCollab role, in process. `draft_costs`: per role,
    the step cost the adaptive switch prices k at (default: measured step times, as served)."""
    def memory():
        if not cfg.sam:
            return None
        memory = SessionMemory(top_k=4)
        for sid, tokens in setup.memory_contexts:
            memory.add(sid, tokens)
        memory.flush()  # pre-filled before the round, as a deployment's memory is: not built while measuring
        return memory

    def config(name: str) -> ServerConfig:
        # A switch pricing k at measured costs starts from costs timed before the round, as served.
        measured = cfg.sam and (draft_costs or {}).get(name) is None
        return dataclasses.replace(role_config(cfg, setup, name), measure_step_costs=measured)

    models = {"large": setup.large, **({"small": setup.small} if cfg.collab else {})}
    return {name: build_stack(config(name), model=model, tokenizer=setup.tokenizer,
                              session_memory=memory(),
                              draft_step_cost=(draft_costs or {}).get(name) if cfg.sam else None)
            for name, model in models.items()}


async def run_sessions(cfg: RunConfig, client: EngineClient, sessions: list[RecordedSession], arrivals: list[float],
                       progress=None) -> list[AgentResult]:
    features = AgentFeatures(collab=cfg.collab, filter_results=cfg.compress, distill_memory=cfg.compress,
                             speculate=cfg.speculate)
    buffer = ActionBuffer()
    start = time.perf_counter()

    async def one(s: RecordedSession, at: float) -> AgentResult:
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
        agent = ReActAgent(
            client, TraceTool(s), features=features, buffer=buffer,
            config=AgentConfig(max_steps=len(s.responses), max_tokens=256),
            collab_factory=lambda: TraceProgressController(warmup_large_steps=1, escalation_steps=1),
            result_filter=SearchResultFilter(top_n=3) if cfg.compress else None,
            distiller_factory=lambda sid: MemoryDistiller(None, threshold_tokens=600, min_delay_rounds=1),
            speculation=SpeculationConfig(k=1, aggressive=False, verified=True, temperature=0.0),
            instruction=DEFAULT_INSTRUCTION,
        )
        try:
            return await agent.run(s.question, session_id=s.session_id)
        finally:
            await agent.aclose()
            if progress is not None:
                progress.update(1)

    return await asyncio.gather(*(one(s, t) for s, t in zip(sessions, arrivals)))


# The projection's target: each role's steps at the roofline cost of a real model shape on one H100.
PROJECTION_DEVICE = "h100"
PROJECTION_SHAPES = {"large": "llama3_1_8b", "small": "llama3_2_1b"}


class CompilationCounter:
    """Counts XLA compilations of any function in this process (persistent-cache hits included)."""

    def __init__(self) -> None:
        import jax

        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration_s: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


def projection_cost_models() -> dict[str, StepCostModel]:
    return {role: StepCostModel.default_for(load_model_config(name), PROJECTION_DEVICE)
            for role, name in PROJECTION_SHAPES.items()}


def record_steps(roles: dict[str, ServingStack]) -> None:
    """Turns on each role engine's step records (wall-clock window and composition of every step)."""
    for stack in roles.values():
        stack.engine.steps.clear()
        stack.engine.record_steps = True


def timed_steps(roles: dict[str, ServingStack]) -> dict[str, list[TimedStep]]:
    return {name: [TimedStep(r.start_s, r.end_s, StepFeatures(r.prefill_tokens, r.decode_tokens, r.num_seqs,
                                                              r.attended_pairs, r.context_tokens))
                   for r in stack.engine.steps] for name, stack in roles.items()}


def session_calls(client: EngineClient) -> dict[str | None, list[Any]]:
    """Each session's LLM calls (CallRecords), in the order they were made."""
    calls: dict[str | None, list[Any]] = collections.defaultdict(list)
    for rec in client.records:
        calls[rec.session_id].append(rec)
    return calls


def projected_latencies(results: list[AgentResult], calls: dict[str | None, list[Any]],
                        timelines: dict[str, StepTimeline]) -> list[float]:
    """Each session's latency on the virtual clock (workloads.projection): PROJECTION, not measured."""
    return [project_session(r.metrics.wall_s, [CallWindow(c.role, c.started_s, c.finished_s)
                                               for c in calls[r.metrics.session_id]], timelines,
                            [ToolWait(*w) for w in r.metrics.tool_waits]) for r in results]


def critical_paths(results: list[AgentResult], calls: dict[str | None, list[Any]],
                   timelines: dict[str, StepTimeline]) -> tuple[list[float], list[float]]:
    """Per session, a floor under its latency in this run, on the wall clock and on the virtual
    clock: its tools ran one after another (each action needs the observation before
    it), and its answering call came after the last of them with no tool left to hide behind. So
    the session took at least its tools' recorded durations plus that last call."""
    wall, projected = [], []
    for r in results:
        recs = calls[r.metrics.session_id]
        tools = sum(end - start for _, _, start, end in r.metrics.tool_waits)
        last = max((c for c in recs if not c.speculative), key=lambda c: c.started_s, default=None)
        if last is None or any(end_wait > last.finished_s for _, end_wait, _, _ in r.metrics.tool_waits):
            # no answering call after the last tool (the session stopped at max_steps): tools only
            wall.append(tools)
            projected.append(tools)
            continue
        windows = [CallWindow(c.role, c.started_s, c.finished_s) for c in recs]
        wall.append(tools + last.finished_s - last.started_s)
        projected.append(tools + project_span(last.started_s, last.finished_s, windows, timelines))
    return wall, projected


def percentile(xs: Sequence[float], q: float) -> float:
    ys = sorted(xs)
    if not ys:
        return 0.0
    return ys[min(len(ys) - 1, max(0, math.ceil(q / 100 * len(ys)) - 1))]


def summarize(cfg: RunConfig, results: list[AgentResult], client: EngineClient, makespan_s: float) -> dict[str, Any]:
    m = [r.metrics for r in results]
    walls = [x.wall_s for x in m]
    # A hit: the real action found its speculated outcome buffered or still running (joined).
    spec = [x.speculation or {} for x in m]
    hits = sum(s.get("buffer_hits", 0) + s.get("inflight_hits", 0) for s in spec)
    lookups = hits + sum(s.get("buffer_misses", 0) for s in spec)
    st = client.stats
    small_steps = sum((x.collab or {}).get("steps", {}).get("small", 0) for x in m)
    return {
        "mean_session_latency_s": sum(walls) / len(walls),
        "p50_session_latency_s": percentile(walls, 50),
        "p99_session_latency_s": percentile(walls, 99),
        "makespan_s": makespan_s,
        "mean_llm_time_s": sum(x.llm_time_s for x in m) / len(m),
        "mean_tool_time_s": sum(x.tool_time_s for x in m) / len(m),
        "llm_calls": st.requests,
        "prompt_tokens": st.prompt_tokens,
        "cached_tokens": st.cached_tokens,
        "output_tokens": st.output_tokens,
        "kv_hit_rate": st.kv_hit_rate,
        "tokens_per_verify_step": st.tokens_per_verify_step,
        "action_buffer_hit_rate": hits / lookups if lookups else 0.0,
        "small_model_steps": small_steps,
        "compress_tokens_saved": sum((x.compress or {}).get("tokens_saved", 0) for x in m),
        "errors": [x.error for x in m if x.error],
        "answers": {x.session_id: x.answer for x in m},
    }


def reasoning_outputs(client: EngineClient) -> dict[str, list[tuple[int, ...]]]:
    """Per session, the output tokens of its non-speculative calls in order."""
    out: dict[str, list[tuple[int, ...]]] = collections.defaultdict(list)
    for r in client.records:
        if not r.speculative and r.session_id is not None:
            out[r.session_id].append(r.output_tokens)
    return dict(out)


def warm_up(setup: Setup, cfgs: list[RunConfig]) -> int:
    """Compiles every step shape each model's engine can produce (Engine.compile_all), so the measured
    rounds compile nothing; engines of equal shape share the jit cache. Returns the compilations."""
    import bm25s  # noqa: F401 - its import compiles a jax top_k probe; do that here, not while measuring

    models = [setup.large] + ([setup.small] if any(c.collab for c in cfgs) else [])
    drafting = any(c.sam for c in cfgs)
    if drafting:
        compile_kernels()  # AgentSAM's numba kernels: compiled (or loaded from disk) here, not while measuring
    config = ServerConfig.from_engine_config(setup.engine_config, model_name="warmup")
    return sum(build_engine(config, model).compile_all(drafting) for model in models)


def experiment(cfg_names: Sequence[str], *, traces: str | None, num_sessions: int, tool_latency_mean: float,
               arrival_rate: float, max_turns: int, num_draft_tokens: int, memory_sessions: int, seed: int,
               engine_config: EngineConfig | None = None, show_progress: bool = True,
               repeats: int = 1, projection_switch: bool = True, model: str = "cpu_demo") -> dict[str, Any]:
    cfgs = run_configs(cfg_names)
    trajs = load_traces(traces or default_trace_path())
    hit_rates = HitRates.bundled()
    rng = random.Random(seed)
    latency = ToolLatency(tool_latency_mean, sigma=0.5, seed=seed)
    recorded = [s for t in trajs if (s := record_session(t, latency, hit_rates, rng)) is not None]
    chosen = [s for s in recorded if len(s.responses) <= max_turns][:num_sessions]
    if not chosen:
        raise ValueError(f"no replayable session with at most {max_turns} turns in {traces or default_trace_path()}")
    chosen_ids = {s.session_id for s in chosen}
    tokenizer = load_tokenizer()
    large_cfg = load_model_config(model)
    setup = Setup(tokenizer, init_model(large_cfg, seed=seed), init_model(small_model_config(large_cfg), seed=seed + 1),
                  engine_config or EngineConfig(num_blocks=512, block_size=16, max_num_seqs=8, max_tokens_per_step=256,
                                                max_model_len=1536, max_draft_tokens=num_draft_tokens,
                                                min_token_bucket=1),
                  num_draft_tokens, [])
    # Cross-session memory: past sessions of the same deployment (trace sessions not replayed here).
    for s in recorded:
        if s.session_id in chosen_ids or len(setup.memory_contexts) >= memory_sessions:
            continue
        msgs = [{"role": "user", "content": f"Question: {s.question}"}]
        for resp, obs in zip(s.responses, s.observations):
            msgs += [{"role": "assistant", "content": resp}, {"role": "user", "content": f"Observation: {obs}"}]
        setup.memory_contexts.append((s.session_id, tokenizer.encode_chat(msgs)))
    arrivals = [float(t) for t in poisson_arrivals(len(chosen), arrival_rate, seed=seed)]

    t0 = time.perf_counter()
    warmup_compilations = warm_up(setup, cfgs)
    compile_s = time.perf_counter() - t0
    by_id = {s.session_id: s for s in chosen}
    report: dict[str, Any] = {"configs": {}}
    outputs: dict[str, dict[str, list[tuple[int, ...]]]] = {}
    bar = None
    rounds = max(1, repeats)
    if show_progress:
        from tqdm import tqdm
        runs = len(cfgs) + (sum(c.sam for c in cfgs) if projection_switch else 0)
        bar = tqdm(total=rounds * runs * len(chosen), desc="sessions", unit="session", file=sys.stderr)
    per_round: dict[str, list[dict[str, Any]]] = {cfg.name: [] for cfg in cfgs}
    cost_models = projection_cost_models()
    draft_costs = {role: m.as_step_cost() for role, m in cost_models.items()}
    compilations, measured_compilations = CompilationCounter(), 0

    def replay(cfg: RunConfig, switch_costs: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict, int]:
        """One round of `cfg`: its summary (projection included), reasoning outputs, compilations.
        `switch_costs`: per role, the step cost the adaptive switch prices k at (default: measured)."""
        roles = build_roles(cfg, setup, switch_costs)
        for r in roles.values():
            r.start()
        client = EngineClient({k: r.loop for k, r in roles.items()}, tokenizer, replay=TraceReplay(by_id),
                              speculative_role="small")
        record_steps(roles)
        try:
            compiled_before = compilations.count
            start = time.perf_counter()
            results = asyncio.run(run_sessions(cfg, client, chosen, arrivals, bar))
            makespan = time.perf_counter() - start
            compiled = compilations.count - compiled_before
        finally:
            for r in roles.values():
                r.shutdown()
        summary = summarize(cfg, results, client, makespan)
        steps = timed_steps(roles)
        # Each step's predicted time once, for the projection and the critical path alike.
        timelines = {role: StepTimeline(role_steps, cost_models[role]) for role, role_steps in steps.items()}
        calls = session_calls(client)
        projected = projected_latencies(results, calls, timelines)
        summary["projected_mean_session_latency_s"] = sum(projected) / len(projected)
        floor, projected_floor = critical_paths(results, calls, timelines)
        summary["critical_path_s"] = sum(floor) / len(floor)
        summary["projected_critical_path_s"] = sum(projected_floor) / len(projected_floor)
        summary["steps"] = sum(len(v) for v in steps.values())
        return summary, reasoning_outputs(client), compiled

    # Rounds alternate the config order (ABC, CBA, ...) so slow drift of the machine's load does
    # not land on one config; every numeric field is then the median over rounds.
    for rnd in range(rounds):
        for cfg in (cfgs if rnd % 2 == 0 else list(reversed(cfgs))):
            summary, outputs[cfg.name], compiled = replay(cfg)
            measured_compilations += compiled
            if cfg.sam and projection_switch:
                # The switch's k follows step costs, and the CPU's are not the target's (a verify
                # step costs 1.5-3x a decode here, about 1x on an H100): the projection of a drafting
                # config replays it once more with k priced at the target's cost model.
                target, outputs[f"{cfg.name}@target"], compiled = replay(cfg, draft_costs)
                measured_compilations += compiled
                summary["projected_mean_session_latency_s"] = target["projected_mean_session_latency_s"]
                summary["projected_critical_path_s"] = target["projected_critical_path_s"]
                summary["projection_tokens_per_verify_step"] = target["tokens_per_verify_step"]
                summary["projection_answers"] = target["answers"]
                summary["projection_errors"] = target["errors"]
            per_round[cfg.name].append(summary)
    if bar is not None:
        bar.close()
    for cfg in cfgs:
        runs = per_round[cfg.name]
        merged = dict(runs[0])
        for key, value in runs[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                merged[key] = float(np.median([run[key] for run in runs]))
        merged["rounds"] = len(runs)
        report["configs"][cfg.name] = merged

    base = report["configs"]["baseline"]
    recorded_answers = {s.session_id: s.answer for s in chosen}
    checks = {
        "answers_identical": all(c["answers"] == base["answers"] and c.get("projection_answers", base["answers"])
                                 == base["answers"] for c in report["configs"].values()),
        "answers_equal_recorded": base["answers"] == recorded_answers,
        "lossless_outputs_identical": {n: outputs[n] == outputs["baseline"] for n in outputs
                                       if n.split("@")[0] in LOSSLESS},
        "no_errors": all(not c["errors"] and not c.get("projection_errors") for c in report["configs"].values()),
    }
    for name, c in report["configs"].items():
        c["speedup_mean"] = base["mean_session_latency_s"] / c["mean_session_latency_s"]
    report["speedup_all"] = report["configs"].get("all", base)["speedup_mean"]
    report["compilations_in_measured_rounds"] = measured_compilations
    proj_base = base["projected_mean_session_latency_s"]
    report["projection"] = {
        "label": ("PROJECTION, not a measurement: the run's steps (drafts, acceptance, cache hits, batch "
                  "composition) at the roofline cost of the shapes below on one H100; tool waits and host "
                  "time between steps as measured"
                  + ("; drafting configs replayed once more with the adaptive switch pricing k at these costs"
                     if projection_switch else "")),
        "adaptive_switch_priced_at_target": projection_switch,
        "cost_model": {role: {"shape": PROJECTION_SHAPES[role], "device": PROJECTION_DEVICE, **m.to_dict()}
                       for role, m in cost_models.items()},
        "speedup": {name: proj_base / c["projected_mean_session_latency_s"]
                    for name, c in report["configs"].items()},
    }
    report["projection"]["speedup_all"] = report["projection"]["speedup"].get("all", 1.0)
    # Amdahl: with the baseline's tool waits left as they are, a technique that made every LLM call
    # free would reach only this; beyond it, a speed-up must hide tool time (SPAgent).
    tools = base["mean_tool_time_s"]
    report["llm_free_bound"] = {
        "wall": base["mean_session_latency_s"] / tools if tools > 0 else math.inf,
        "projection": proj_base / tools if tools > 0 else math.inf,
    }
    # Tighter, per config: tools one after another plus the answering call, which nothing hides
    # (SPAgent overlaps a tool only with the calls before it). No config can pass its own.
    report["critical_path_bound"] = {
        name: {"wall": base["mean_session_latency_s"] / c["critical_path_s"],
               "projection": proj_base / c["projected_critical_path_s"]}
        for name, c in report["configs"].items()}
    report["checks"] = checks
    report["setup"] = {
        "traces": portable_path(traces or default_trace_path()), "num_sessions": len(chosen), "max_turns": max_turns,
        "tool_latency_mean_s": tool_latency_mean, "arrival_rate_per_s": arrival_rate, "seed": seed,
        "num_draft_tokens": num_draft_tokens, "memory_sessions": len(setup.memory_contexts),
        "engine": dataclasses.asdict(setup.engine_config), "compile_s": compile_s,
        "warmup_compilations": warmup_compilations,
        "large": f"configs/{model}.py (random weights)",
        "small": "half its width, a quarter of its layers (at least 1; random weights)",
        "mode": "replay: real forward passes, every token forced to the recorded response",
    }
    return report


def print_table(report: dict[str, Any]) -> None:
    cols = ("mean_session_latency_s", "p50_session_latency_s", "p99_session_latency_s", "mean_llm_time_s",
            "mean_tool_time_s", "prompt_tokens", "kv_hit_rate", "tokens_per_verify_step", "action_buffer_hit_rate",
            "speedup_mean")
    short = ("mean_s", "p50_s", "p99_s", "llm_s", "tool_s", "prompt_tok", "kv_hit", "tok/verify", "buf_hit", "speedup")
    print(f"{'config':<11}" + "".join(f"{c:>11}" for c in short))
    for name, c in report["configs"].items():
        cells = [f"{c[k]:>11.3f}" if isinstance(c[k], float) else f"{c[k]:>11}" for k in cols]
        print(f"{name:<11}" + "".join(cells))
    print(f"speed-up (all vs baseline, mean session latency, measured on this machine's wall clock): "
          f"{report['speedup_all']:.2f}x")
    print(f"compilations in measured rounds: {report['compilations_in_measured_rounds']}")
    proj = report["projection"]
    print("PROJECTION (virtual clock, Llama-3.1-8B / Llama-3.2-1B shapes on one H100, not measured): "
          + ", ".join(f"{n} {v:.2f}x" for n, v in proj["speedup"].items()))
    bound = report["llm_free_bound"]
    print(f"bound if every LLM call took no time and tools stayed as in the baseline: {bound['wall']:.2f}x wall, "
          f"{bound['projection']:.2f}x projected")
    floor = report["critical_path_bound"].get("all")
    if floor is not None:
        print(f"bound for all (its sessions' tools one after another, then the answering call): "
              f"{floor['wall']:.2f}x wall, {floor['projection']:.2f}x projected")
    print("checks:", json.dumps(report["checks"]))


def plot(report: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["configs"])
    llm = [report["configs"][n]["mean_llm_time_s"] for n in names]
    tool = [report["configs"][n]["mean_tool_time_s"] for n in names]
    mean = [report["configs"][n]["mean_session_latency_s"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(names, llm, label="LLM time (mean per session)")
    ax.bar(names, tool, bottom=llm, label="tool time (mean per session)")
    ax.scatter(names, mean, color="black", marker="_", s=400, label="mean session latency", zorder=3)
    ax.set_ylabel("seconds")
    ax.set_title(f"Agent sessions in replay: all techniques {report['speedup_all']:.2f}x faster")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.derive_hit_rates_from:
        table = derive_hit_rates(pathlib.Path(FLAGS.derive_hit_rates_from))
        HIT_RATES_PATH.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {HIT_RATES_PATH} from {table['num_logs']} logs")
        return
    if FLAGS.compilation_cache:
        enable_compilation_cache(FLAGS.compilation_cache)
    quick = FLAGS.quick
    report = experiment(
        FLAGS.configs,
        traces=FLAGS.traces,
        num_sessions=FLAGS.num_sessions or (4 if quick else 12),
        tool_latency_mean=FLAGS.tool_latency_mean if FLAGS.tool_latency_mean is not None else (0.5 if quick else 1.5),
        arrival_rate=FLAGS.arrival_rate,
        max_turns=FLAGS.max_turns or (3 if quick else 6),
        num_draft_tokens=FLAGS.num_draft_tokens,
        repeats=FLAGS.repeats,
        memory_sessions=FLAGS.memory_sessions,
        seed=FLAGS.seed,
        projection_switch=FLAGS.projection_switch,
        model=FLAGS.model,
    )
    print_table(report)
    out = pathlib.Path(FLAGS.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    app.run(main)
