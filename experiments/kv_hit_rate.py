"""KV hit rate and latency of admission policies on real multi-turn agent sessions (AgentSched).

Replays trace sessions (Poisson arrivals, simulated tool latency) through the real scheduler, block
allocator and prefix cache, on either executor:
  --executor=sim     cost-model clock (roofline of --model_config on --device, or --cost_model JSON)
  --executor=engine  the JAX engine with the tiny model, tokens forced to the trace
Sweeps KV capacity (fraction of the working set: the peak of live session contexts) and arrival
rate; reports per policy the KV hit rate, call and session latency, throughput and preemptions;
plots hit rate against capacity and the shadow price over time; writes JSON with the headline point
(the capacity where FCFS's hit rate is nearest 60%, inside 40-80% when the sweep has one).

  python experiments/kv_hit_rate.py --executor=sim --traces=../shared/data/traces/fireact/hotpotqa_dev_gpt-3.5-turbo-ft.json
  python experiments/kv_hit_rate.py --executor=engine --quick --instruction=none --tool_latency_mean=0.3 --rates=1
  python experiments/kv_hit_rate.py --stress   # 100-token and 32K-token prompts mixed
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

import numpy as np
from absl import app, flags
from tqdm import tqdm

from agentinfer_jax.cache import BlockPool, PrefixCache
from agentinfer_jax.serving.builder import is_model_config, load_model_config
from agentinfer_jax.serving.policies import POLICY_NAMES, make_policy
from agentinfer_jax.serving.scheduler import Scheduler, SchedulerConfig, SessionRetention
from agentinfer_jax.workloads.cost_model import DEVICES, StepCostModel, holdout_report
from agentinfer_jax.workloads.sessions import (TokenizedCall, TokenizedSession, ToolLatency,
                                               poisson_arrivals, sessions_from_traces, tokenize_session)
from agentinfer_jax.workloads.simulator import (SimulatedExecutor, TimedEngineExecutor, VirtualClock,
                                                run_sessions)
from agentinfer_jax.workloads.traces import default_trace_path, load_traces

FLAGS = flags.FLAGS
flags.DEFINE_enum("executor", "sim", ["sim", "engine"], "Who runs the steps.")
flags.DEFINE_list("traces", [], "Trace files/dirs (default: the bundled FireAct sample).")
flags.DEFINE_enum("instruction", "fewshot", ["fewshot", "none"],
                  "Prompt of traces recorded without one (FireAct): 'fewshot' prepends the bundled ReAct "
                  "instruction + two examples (what an un-tuned model needs; one large block shared by every "
                  "session); 'none' replays them as recorded (FireAct's fine-tuned agents run zero-shot: "
                  "question + history only).")
flags.DEFINE_bool("quick", False, "Small sweep (CI / demo scale).")
flags.DEFINE_string("json_out", "", "Write results here.")
flags.DEFINE_string("plot_out", "", "PNG of hit rate vs capacity and lambda over time (default: beside json_out).")
flags.DEFINE_list("policies", ["fcfs", "sjf", "lpm", "agentsched"], "Policies to compare.")
flags.DEFINE_list("capacity_fracs", ["0.15", "0.25", "0.35", "0.5", "0.75"], "KV capacity / working set.")
flags.DEFINE_list("rates", ["4.0"], "Session arrival rates (sessions per second).")
flags.DEFINE_integer("num_sessions", 200, "Sessions replayed (first N of the traces).", lower_bound=1)
flags.DEFINE_float("tool_latency_mean", 1.5, "Mean tool latency in seconds (lognormal).", lower_bound=0.0)
flags.DEFINE_float("retention_ttl", 0.0, "Session-aware retention TTL in seconds (0 = off), for every policy.",
                  lower_bound=0.0)
flags.DEFINE_integer("block_size", 16, "Tokens per KV block.", lower_bound=1)
flags.DEFINE_integer("max_num_seqs", 64, "Running requests at most.", lower_bound=1)
flags.DEFINE_integer("max_tokens_per_step", 2048, "Token budget per step.", lower_bound=1)
flags.DEFINE_string("model_config", "llama3_1_8b", "configs/<name>.py whose shape the roofline uses (sim).")
flags.DEFINE_enum("device", "h100", list(DEVICES), "Roofline device for the sim cost model.")
flags.DEFINE_string("cost_model", "", "A fitted StepCostModel JSON (overrides the roofline).")
flags.DEFINE_float("as_a", 8.0, "AgentSched a (hit reward per cached block).")
flags.DEFINE_float("as_b", 1.0, "AgentSched b (base block price).")
flags.DEFINE_float("as_c", 4.0, "AgentSched c (waiting-time reward per second).")
flags.DEFINE_float("as_k", 8.0, "AgentSched k (sigmoid steepness).")
flags.DEFINE_float("as_lambda_max", 8.0, "AgentSched lambda_max.")
flags.DEFINE_bool("as_include_evictable", True, "AgentSched: count evictable cached blocks as free capacity N.")
flags.DEFINE_integer("working_set_blocks", 0,
                     "Working set the capacity fractions refer to (0 = measure it from an unconstrained FCFS run); "
                     "pin it to another run's value to compare executors at the same capacities.")
flags.DEFINE_bool("sweep_agentsched", False, "Also sweep AgentSched's (c, lambda_max) at the headline point.")
flags.DEFINE_bool("stress", False, "Run the 100-token / 32K-token stress mix instead.")
flags.DEFINE_integer("seed", 0, "Seed for arrivals and tool latency.")


def _positive_numbers(values: list[str]) -> bool:
    try:
        return all(0 < float(v) < math.inf for v in values)
    except ValueError:
        return False


flags.register_validator("policies", lambda v: set(v) <= set(POLICY_NAMES), f"choose from {','.join(POLICY_NAMES)}")
flags.register_validator("traces", lambda v: all(pathlib.Path(p).exists() for p in v), "no such file or directory")
flags.register_validator("cost_model", lambda v: not v or pathlib.Path(v).is_file(), "no such file")
flags.register_validator("capacity_fracs", _positive_numbers, "must be positive numbers")
flags.register_validator("rates", _positive_numbers, "must be positive numbers of sessions per second")
flags.register_validator("working_set_blocks", lambda v: v >= 0, "must be >= 0 (0 = measure it)")
flags.register_validator("model_config", is_model_config, "no such configs/<name>.py")


def load_sessions(paths, n, tokenizer, instruction="fewshot") -> list[TokenizedSession]:
    trajs = []
    for p in paths or [str(default_trace_path())]:
        trajs.extend(load_traces(p))
    out = []
    for s in sessions_from_traces(trajs, add_instruction=instruction == "fewshot"):
        if len(out) >= n:
            break
        try:
            out.append(tokenize_session(s, tokenizer))
        except ValueError:
            continue  # a trace whose template rendering is not prefix-stable: skipped, counted below
    return out


def working_set_blocks(sessions, arrivals, latencies, bs) -> int:
    """Peak over time of the blocks of all live sessions' final contexts."""
    events = []
    for s, a in zip(sessions, arrivals):
        last = s.calls[-1]
        blocks = math.ceil((len(last.prompt_ids) + len(last.response_ids)) / bs)
        events += [(a, blocks), (a + latencies.get(s.session_id, 0.0), -blocks)]
    live = peak = 0
    for _, d in sorted(events, key=lambda e: (e[0], e[1])):
        live += d
        peak = max(peak, live)
    return peak


def make_cost_model():
    if FLAGS.cost_model:
        return StepCostModel.load(FLAGS.cost_model)
    return StepCostModel.default_for(load_model_config(FLAGS.model_config), FLAGS.device)


class Runner:
    """Builds a fresh scheduler stack per run; sim or engine executor."""

    def __init__(self, sessions, vocab_size):
        self.sessions = sessions
        self.vocab_size = vocab_size
        self.engine_model = None
        self.engine = None
        self.engine_samples = []
        self.max_len = max(len(c.prompt_ids) + len(c.response_ids) for s in sessions for c in s.calls) + 1
        if FLAGS.executor == "sim":
            self.cost_model = make_cost_model()

    def policy(self, name, **over):
        if name == "agentsched":
            kw = dict(a=FLAGS.as_a, b=FLAGS.as_b, c=FLAGS.as_c, k=FLAGS.as_k, lambda_max=FLAGS.as_lambda_max,
                      include_evictable=FLAGS.as_include_evictable)
            kw.update(over)
            return make_policy(name, **kw)
        return make_policy(name)

    def run(self, policy, capacity_blocks, rate, progress=None):
        bs = FLAGS.block_size
        num_blocks = max(capacity_blocks, math.ceil(self.max_len / bs) + 1) + 1
        clock = VirtualClock()
        pool = BlockPool(num_blocks)
        cfg = SchedulerConfig(block_size=bs, max_num_seqs=FLAGS.max_num_seqs,
                              max_tokens_per_step=FLAGS.max_tokens_per_step,
                              max_model_len=min(self.max_len + 1, (num_blocks - 1) * bs), vocab_size=self.vocab_size)
        retention = SessionRetention(pool, FLAGS.retention_ttl) if FLAGS.retention_ttl > 0 else None
        if FLAGS.executor == "sim":
            executor = SimulatedExecutor(self.cost_model, clock)
        else:
            executor = TimedEngineExecutor(self._engine(num_blocks), clock)
        sched = Scheduler(cfg, pool, PrefixCache(bs, pool), policy, retention=retention, clock=clock)
        arrivals = poisson_arrivals(len(self.sessions), rate, seed=FLAGS.seed)
        tools = ToolLatency("lognormal", FLAGS.tool_latency_mean, seed=FLAGS.seed)
        res = run_sessions(self.sessions, arrivals, sched, executor, clock, tools.sample, on_progress=progress)
        if FLAGS.executor == "engine":
            self.engine_samples += executor.samples
        return res, arrivals

    def _engine(self, num_blocks):
        """One engine (one set of compiled shapes) sized for the largest run; a run's BlockPool
        decides how many of its pages the scheduler may use."""
        from agentinfer_jax.configs import tiny
        from agentinfer_jax.model.transformer import init_model
        from agentinfer_jax.serving.builder import ServerConfig, build_engine
        if self.engine is None or self.engine.config.num_blocks < num_blocks:
            if self.engine_model is None:
                self.engine_model = init_model(tiny.get_config(), seed=0)
            config = ServerConfig(num_blocks=num_blocks, block_size=FLAGS.block_size, max_num_seqs=FLAGS.max_num_seqs,
                                  max_tokens_per_step=FLAGS.max_tokens_per_step, max_model_len=self.max_len + 1,
                                  max_draft_tokens=0)
            self.engine = build_engine(config, self.engine_model)
        return self.engine


def print_table(title, rows):
    print(f"\n{title}")
    cols = ["policy", "kv_hit_rate", "mean_call_latency_s", "p99_call_latency_s", "mean_session_latency_s",
            "mean_session_llm_s", "throughput_tok_s", "mean_batch", "preemptions"]
    print("  ".join(f"{c:>22}" for c in cols))
    for name, s in rows.items():
        print("  ".join([f"{name:>22}"] + [f"{s[c]:>22.4f}" for c in cols[1:]]))


def plot(path, sweep, lambda_trace, policies, rate, z_trace=()):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(15, 4))
    for p in policies:
        pts = sorted((r["capacity_frac"], r["summary"]["kv_hit_rate"], r["summary"]["mean_session_latency_s"])
                     for r in sweep if r["policy"] == p and r["rate"] == rate)
        ax1.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker="o", label=p)
        ax3.plot([x for x, _, _ in pts], [z for _, _, z in pts], marker="o", label=p)
    ax1.set_xlabel("KV capacity / working set")
    ax1.set_ylabel("KV hit rate")
    ax1.set_title(f"Hit rate vs capacity ({rate:g} sessions/s)")
    ax1.legend()
    ax3.set_xlabel("KV capacity / working set")
    ax3.set_ylabel("mean session latency (s)")
    ax3.set_title(f"Session latency vs capacity ({rate:g} sessions/s)")
    if lambda_trace:
        t, lam = zip(*lambda_trace)
        ax2.plot(t, lam, lw=0.8, label="lambda")
    if z_trace:
        t, z = zip(*z_trace)
        twin = ax2.twinx()
        twin.plot(t, [min(v, 10.0) for v in z], lw=0.5, color="tab:red", alpha=0.6)
        twin.set_ylabel("z = D / U (capped at 10)", color="tab:red")
    ax2.set_xlabel("time (s)")
    ax2.set_ylabel("shadow price lambda")
    ax2.set_title("AgentSched lambda and z at the headline point")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def stress(runner_vocab):
    """100-token and 32K-token single-call sessions, mixed: p99 wait per class must stay bounded."""
    rng = np.random.default_rng(FLAGS.seed)
    n = 60 if FLAGS.quick else 300
    sessions = []
    for i in range(n):
        long = rng.random() < 0.2
        plen = 32768 if long else 100
        prompt = rng.integers(5, runner_vocab, plen).tolist()
        sessions.append(TokenizedSession(f"{'long' if long else 'short'}{i}",
                                         [TokenizedCall(prompt, rng.integers(5, runner_vocab, 64).tolist())]))
    runner = Runner(sessions, runner_vocab)
    capacity = int(0.5 * sum(math.ceil(32800 / FLAGS.block_size) for s in sessions if s.session_id.startswith("l")))
    out = {}
    for name in FLAGS.policies:
        res, _ = runner.run(runner.policy(name), capacity, rate=2.0)
        waits = {k: [c.queue_s for c in res.calls if c.session_id.startswith(k)] for k in ("short", "long")}
        out[name] = {f"p99_wait_{k}_s": float(np.percentile(v, 99)) for k, v in waits.items()}
        out[name].update({f"max_wait_{k}_s": float(np.max(v)) for k, v in waits.items()})
    print("\nStress: p99 / max waiting time per class (s)")
    for name, s in out.items():
        print(f"{name:>12}  " + "  ".join(f"{k}={v:.3f}" for k, v in s.items()))
    return {"stress": out}


def main(argv):
    del argv
    from agentinfer_jax.tokenizer import load_tokenizer
    tok = load_tokenizer()
    if FLAGS.stress:
        result = stress(tok.vocab_size)
        if FLAGS.json_out:
            pathlib.Path(FLAGS.json_out).write_text(json.dumps(result, indent=1))
        return
    n = FLAGS.num_sessions if not FLAGS.quick else min(FLAGS.num_sessions, 12 if FLAGS.executor == "engine" else 60)
    if FLAGS.quick and FLAGS.executor == "engine":
        # CPU scale: the reference attention gathers every slot's pages each step, so fewer slots
        # and a smaller token budget cut the step's fixed cost ~6x (12 sessions never need more).
        for name, value in (("max_num_seqs", 8), ("max_tokens_per_step", 512)):
            if not FLAGS[name].present:
                FLAGS[name].value = value
    fracs = [float(x) for x in FLAGS.capacity_fracs]
    rates = [float(x) for x in FLAGS.rates]
    if FLAGS.quick:
        fracs = fracs[1:4] if len(fracs) > 3 else fracs
        rates = rates[:1]
    sessions = load_sessions(FLAGS.traces, n, tok, FLAGS.instruction)
    print(f"{len(sessions)} sessions, {sum(len(s.calls) for s in sessions)} LLM calls, executor={FLAGS.executor}")
    runner = Runner(sessions, tok.vocab_size)

    sweep = []
    total = len(fracs) * len(rates) * len(FLAGS.policies) * sum(len(s.calls) for s in sessions)
    with tqdm(total=total, desc="calls", file=sys.stderr, disable=None) as bar:
        for rate in rates:
            # Working set from an unconstrained FCFS run at this rate.
            # Unconstrained = room for every session's whole context at once (no eviction possible).
            everything = sum(math.ceil((len(s.calls[-1].prompt_ids) + len(s.calls[-1].response_ids))
                                       / FLAGS.block_size) for s in sessions)
            if FLAGS.working_set_blocks > 0:
                ws = FLAGS.working_set_blocks
            else:
                res, arrivals = runner.run(runner.policy("fcfs"), everything, rate)
                ws = working_set_blocks(sessions, arrivals, res.session_latency_s, FLAGS.block_size)
            for frac in fracs:
                for name in FLAGS.policies:
                    r, _ = runner.run(runner.policy(name), max(1, int(frac * ws)), rate, progress=bar.update)
                    sweep.append({"policy": name, "rate": rate, "capacity_frac": frac,
                                  "capacity_blocks": int(frac * ws), "working_set_blocks": ws,
                                  "summary": r.summary(), "lambda_trace": r.lambda_trace, "z_trace": r.z_trace})

    # Headline: at the highest rate swept (where admission order matters most), the capacity where
    # FCFS's hit rate is nearest 60%.
    ref_policy = "fcfs" if "fcfs" in FLAGS.policies else FLAGS.policies[0]
    fcfs = [r for r in sweep if r["policy"] == ref_policy and r["rate"] == max(rates)]
    head = min(fcfs, key=lambda r: abs(r["summary"]["kv_hit_rate"] - 0.6))
    point = [r for r in sweep if r["rate"] == head["rate"] and r["capacity_frac"] == head["capacity_frac"]]
    rows = {r["policy"]: r["summary"] for r in point}
    for rate in rates:
        for frac in fracs:
            print_table(f"rate={rate}/s capacity={frac:.2f} x working set",
                        {r["policy"]: r["summary"] for r in sweep if r["rate"] == rate and r["capacity_frac"] == frac})
    base = rows.get("fcfs")
    print(f"\nheadline: rate={head['rate']}/s capacity={head['capacity_frac']} x working set "
          f"({head['capacity_blocks']} blocks)")
    if base:
        for name, s in rows.items():
            print(f"  {name:>12}: hit {s['kv_hit_rate']:.3f}  session latency x{s['mean_session_latency_s'] / base['mean_session_latency_s']:.3f} of FCFS")

    result = {"executor": FLAGS.executor, "num_sessions": len(sessions),
              "headline": {"rate": head["rate"], "capacity_frac": head["capacity_frac"],
                           "capacity_blocks": head["capacity_blocks"]},
              "policies": rows,
              "sweep": [{k: v for k, v in r.items() if k not in ("lambda_trace", "z_trace")} for r in sweep]}

    if FLAGS.sweep_agentsched and "agentsched" in FLAGS.policies:
        grid = {}
        points = [dict(a=a, c=c) for a in (0.5, 2.0, 8.0, 32.0) for c in (0.5, 4.0, 16.0)]
        points += [dict(lambda_max=lm) for lm in (2.0, 32.0)] + [dict(k=k) for k in (2.0, 32.0)]
        points += [dict(include_evictable=False)]
        for over in points:
            r, _ = runner.run(runner.policy("agentsched", **over), head["capacity_blocks"], head["rate"])
            grid[",".join(f"{k}={v}" for k, v in over.items())] = r.summary()
        result["agentsched_sweep"] = grid
        print("\nAgentSched constants sweep at the headline point (others at their flags' values; "
              "hit rate, mean session latency):")
        for k, s in grid.items():
            print(f"  {k:>24}: {s['kv_hit_rate']:.3f}  {s['mean_session_latency_s']:.3f}s")

    if FLAGS.executor == "engine" and len(runner.engine_samples) >= 20:
        fitted, err = holdout_report(runner.engine_samples, holdout_frac=0.25, seed=0)
        result["cost_model_holdout"] = err
        print(f"\ncost model fitted on 75% of the engine steps, relative error on the other 25%: "
              f"mean {err['mean_rel_err']:.3f}, median {err['median_rel_err']:.3f}, p90 {err['p90_rel_err']:.3f}")
        if FLAGS.json_out:
            # The simulator can replay the same sweep on this engine's clock: --cost_model=<this file>.
            cm_path = pathlib.Path(FLAGS.json_out).with_suffix(".cost_model.json")
            fitted.save(cm_path)
            result["cost_model"] = cm_path.name  # it sits beside the JSON
            print(f"fitted cost model: {cm_path}")

    if FLAGS.json_out:
        path = pathlib.Path(FLAGS.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"json: {path}")
        head_as = next((r for r in point if r["policy"] == "agentsched"), {})
        plot(FLAGS.plot_out or str(path.with_suffix(".png")), sweep, head_as.get("lambda_trace", []), FLAGS.policies,
             head["rate"], head_as.get("z_trace", []))


if __name__ == "__main__":
    app.run(main)
