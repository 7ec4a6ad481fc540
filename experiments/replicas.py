"""Routing policies of the SGLang Model Gateway over agentinfer-serve replicas, on agent sessions.

For each policy, starts fresh replicas (`--replicas`, tiny model by default) behind `sglang-router`
on loopback, replays the bundled multi-turn FireAct sessions through it (each call's prompt extends
the previous one's; several sessions in flight; the agents' OpenAI client sends the session id as
the routing-key header), and reports the cached-token ratio (prompt tokens served from a replica's
prefix cache / all prompt tokens), mean and p99 session latency and each replica's load (requests
and prompt tokens). `session` is the gateway's manual policy keyed by session id (sticky sessions);
`cache_aware` routes by the gateway's own prefix tree; `round_robin` ignores both.

  python experiments/replicas.py --quick --json_out=experiments/results/replicas_quick.json
  python experiments/replicas.py --policies=round_robin,cache_aware,session,power_of_two
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pathlib
import tempfile
import re
import sys
import time
import urllib.request

from absl import app, flags
from tqdm import tqdm

from agentinfer_jax.serving.replicas import POLICIES, ReplicaFleet, routing_key_http_client
from agentinfer_jax.workloads.http_replay import replay_sessions, summarize
from agentinfer_jax.workloads.sessions import sessions_from_traces
from agentinfer_jax.workloads.traces import default_trace_path, load_traces

FLAGS = flags.FLAGS
flags.DEFINE_list("policies", ["round_robin", "cache_aware", "session"], f"Routing policies ({', '.join(POLICIES)}).")
flags.DEFINE_integer("replicas", 2, "agentinfer-serve replicas behind the router.", lower_bound=1)
flags.DEFINE_integer("num_sessions", 40, "Sessions replayed (the bundled sample's first N, longest first).",
                     lower_bound=1)
flags.DEFINE_integer("concurrency", 8, "Sessions in flight at once.", lower_bound=1)
flags.DEFINE_integer("max_tokens", 8, "Tokens the model generates per call (its own, greedy).", lower_bound=1)
flags.DEFINE_string("config", "tiny", "configs/<name>.py each replica serves (random weights).")
flags.DEFINE_integer("num_blocks", 256, "KV pages per replica (the memory a replica has for sessions' KV).",
                     lower_bound=2)
flags.DEFINE_integer("max_model_len", 2048, "Context per request.", lower_bound=1)
flags.DEFINE_list("serve_args", [], "Extra agentinfer-serve arguments for every replica.")
flags.DEFINE_list("router_args", [], "Extra sglang-router arguments (they override the launcher's, e.g. "
                  "--assignment-mode,min_group).")
flags.DEFINE_bool("quick", False, "12 sessions, 6 in flight, 160 KV pages per replica (CI / demo scale).")
flags.DEFINE_string("json_out", "", "Write results here.")
flags.register_validator("policies", lambda v: set(v) <= set(POLICIES), f"choose from {','.join(POLICIES)}")
flags.register_validator("config", lambda v: v.isidentifier()
                         and importlib.util.find_spec(f"agentinfer_jax.configs.{v}") is not None,
                         "no such configs/<name>.py")

_METRIC = re.compile(r"^(agentinfer_(?:requests_total|prompt_tokens_total|cached_prompt_tokens_total))(\{[^}]*\})? (\S+)$",
                     re.MULTILINE)


def replica_counters(url: str) -> dict[str, float]:
    """Requests, prompt tokens and cached prompt tokens a replica has served (its Prometheus text)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for name, _, value in _METRIC.findall(text):
        out[name] = out.get(name, 0.0) + float(value)
    return {"requests": out.get("agentinfer_requests_total", 0.0),
            "prompt_tokens": out.get("agentinfer_prompt_tokens_total", 0.0),
            "cached_prompt_tokens": out.get("agentinfer_cached_prompt_tokens_total", 0.0)}


def warm_up(url: str, model: str) -> None:
    """Compiles a replica's small step shapes before timing (a short prompt, a few tokens)."""
    body = json.dumps({"model": model, "prompt": "warm up " * 40, "max_tokens": 4, "temperature": 0}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        r.read()


def run_policy(policy: str, sessions, serve_args: list[str], env: dict[str, str]) -> dict:
    with ReplicaFleet(FLAGS.replicas, serve_args, policy=policy, env=env, router_extra=FLAGS.router_args) as fleet:
        for r in fleet.replicas:
            warm_up(r.url, FLAGS.config)
        before = [replica_counters(r.url) for r in fleet.replicas]
        t0 = time.perf_counter()
        results = replay_sessions(fleet.url, FLAGS.config, sessions, concurrency=FLAGS.concurrency,
                                  max_tokens=FLAGS.max_tokens, http_client_factory=routing_key_http_client)
        wall = time.perf_counter() - t0
        after = [replica_counters(r.url) for r in fleet.replicas]
    load = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before)]
    row = summarize(results)
    row.update(wall_s=wall, replica_load=load,
               load_imbalance=max(x["prompt_tokens"] for x in load) / max(1.0, sum(x["prompt_tokens"] for x in load) / len(load)),
               final_answers={r.session_id: r.final_answer for r in results})
    return row


def main(argv):
    del argv
    for name in ("httpx", "httpx2"):  # one line per call otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    if FLAGS.quick:
        FLAGS.num_sessions, FLAGS.concurrency, FLAGS.num_blocks = 12, 6, 160
    unknown = [p for p in FLAGS.policies if p not in POLICIES]
    if unknown:
        sys.exit(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}")
    trajs = load_traces(default_trace_path())
    sessions = sorted(sessions_from_traces(trajs, add_instruction=False), key=lambda s: -s.num_calls)
    sessions = sessions[:FLAGS.num_sessions]
    serve_args = ["--config", FLAGS.config, "--num-blocks", str(FLAGS.num_blocks), "--max-model-len",
                  str(FLAGS.max_model_len), "--log-level", "warning", *FLAGS.serve_args]
    print(f"{len(sessions)} sessions, {sum(s.num_calls for s in sessions)} calls, {FLAGS.concurrency} in flight, "
          f"{FLAGS.replicas} replicas of configs/{FLAGS.config}")
    # Every replica loads its compiled steps from one persistent compilation cache, filled first by
    # an unmeasured run of the same sessions on one replica: no policy pays for compilation.
    compile_cache = tempfile.TemporaryDirectory(prefix="agentinfer-replicas-xla-")
    env = {**os.environ, "AGENTINFER_JAX_CACHE_DIR": compile_cache.name}
    with ReplicaFleet(1, serve_args, policy="round_robin", env=env) as fleet:
        replay_sessions(fleet.url, FLAGS.config, sessions, concurrency=FLAGS.concurrency, max_tokens=FLAGS.max_tokens)
    policies = {}
    for policy in tqdm(FLAGS.policies, desc="policies"):
        policies[policy] = run_policy(policy, sessions, serve_args, env)
    compile_cache.cleanup()

    print(f"\n{'policy':<14}{'cached ratio':>13}{'mean s':>9}{'p99 s':>9}{'wall s':>9}   requests / prompt tokens per replica")
    for name, row in policies.items():
        load = "  ".join(f"{int(x['requests'])}/{int(x['prompt_tokens'])}" for x in row["replica_load"])
        print(f"{name:<14}{row['cached_token_ratio']:>13.3f}{row['mean_session_latency_s']:>9.2f}"
              f"{row['p99_session_latency_s']:>9.2f}{row['wall_s']:>9.1f}   {load}")
    result = {"policies": policies,
              "setup": {"replicas": FLAGS.replicas, "sessions": len(sessions), "concurrency": FLAGS.concurrency,
                        "max_tokens": FLAGS.max_tokens, "kv_pages_per_replica": FLAGS.num_blocks, "serve_args": serve_args, "quick": FLAGS.quick,
                        "traces": "bundled FireAct HotpotQA sample (as recorded, no instruction)"}}
    if "round_robin" in policies:
        rr = policies["round_robin"]
        affine = [p for p in ("session", "cache_aware") if p in policies]
        if affine:
            best = max(affine, key=lambda p: policies[p]["cached_token_ratio"])
            b = policies[best]
            result["best_affinity"] = {
                "policy": best, "cached_ratio_vs_round_robin": b["cached_token_ratio"] / max(rr["cached_token_ratio"], 1e-9),
                "mean_latency_vs_round_robin": b["mean_session_latency_s"] / rr["mean_session_latency_s"]}
            print(f"\nbest affinity policy {best}: cached-token ratio x{result['best_affinity']['cached_ratio_vs_round_robin']:.2f} "
                  f"of round_robin's, mean session latency x{result['best_affinity']['mean_latency_vs_round_robin']:.2f}")
    if FLAGS.json_out:
        path = pathlib.Path(FLAGS.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
