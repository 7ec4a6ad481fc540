"""Replicas behind the SGLang Model Gateway (sglang-router), live on loopback.

Two `agentinfer-serve --config tiny` replicas and the real router (session policy: sticky per
routing-key header) replay bundled agent sessions through the agents' own OpenAI client. A replica
killed (SIGKILL) mid-run loses no session: every session finishes with the final answer of a run
without the fault, the router's breaker marks the dead replica down, and once restarted the
replica gets new sessions again. Every process binds 127.0.0.1 and is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import urllib.request

import httpx
import pytest

from agentinfer_jax.serving.replicas import (POLICIES, ROUTING_KEY_HEADER, ReplicaFleet, parse_args, router_args,
                                             routing_key_http_client)
from agentinfer_jax.workloads.http_replay import replay_sessions, summarize
from agentinfer_jax.workloads.sessions import sessions_from_traces
from agentinfer_jax.workloads.traces import default_trace_path, load_traces

pytest.importorskip("sglang_router")


def test_routing_key_header_carries_the_body_session_id():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get(ROUTING_KEY_HEADER))
        return httpx.Response(200, json={})

    async def send():
        async with routing_key_http_client(transport=httpx.MockTransport(handler)) as client:
            await client.post("http://x/v1/chat/completions", json={"session_id": "s-17", "messages": []})
            await client.post("http://x/v1/chat/completions", json={"messages": []})
            await client.post("http://x/v1/chat/completions", content=b"not json")
            await client.post("http://x/v1/chat/completions", json={"session_id": "a"},
                              headers={ROUTING_KEY_HEADER: "explicit"})
            await client.get("http://x/health")

    asyncio.run(send())
    assert seen == ["s-17", None, None, "explicit", None]


def test_router_arguments():
    args = router_args(["http://127.0.0.1:1"], "session", host="127.0.0.1", port=2, prometheus_port=3)
    assert args[args.index("--policy") + 1] == "manual"
    assert args[args.index("--prometheus-host") + 1] == "127.0.0.1"  # the router's default is 0.0.0.0
    for p in POLICIES[1:]:
        a = router_args(["u"], p, host="h", port=1, prometheus_port=2)
        assert a[a.index("--policy") + 1] == p
    with pytest.raises(ValueError, match="unknown routing policy"):
        router_args(["u"], "sticky", host="h", port=1, prometheus_port=2)
    with pytest.raises(ValueError, match="worker URL"):
        router_args([], "session", host="h", port=1, prometheus_port=2)
    with pytest.raises(ValueError):
        ReplicaFleet(0)
    args, serve = parse_args(["--replicas", "3", "--policy", "cache_aware", "--", "--config", "tiny", "--policy", "lpm"])
    assert (args.replicas, args.policy, serve) == (3, "cache_aware", ["--config", "tiny", "--policy", "lpm"])
    assert parse_args([])[1] == ["--config", "tiny"]
    for bad in (["--policy", "sticky"], ["--replicas", "0"], ["--port", "-1"], ["--replica-ports", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def _requests_served(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(v) for v in re.findall(r"^agentinfer_requests_total\{[^}]*\} (\S+)$", text, re.MULTILINE))


def _sessions(n: int):
    """The n bundled sessions with the shortest final prompts among those of >= 4 calls (fast)."""
    sessions = sessions_from_traces(load_traces(default_trace_path()), add_instruction=False)
    size = lambda s: sum(len(m["content"]) for m in s.calls[-1].messages)  # noqa: E731
    return sorted((s for s in sessions if s.num_calls >= 4), key=size)[:n]


@pytest.mark.slow
def test_a_killed_replica_loses_no_session_and_rejoins_when_back(tmp_path):
    sessions = _sessions(4)  # final prompts of 200-300 tokens
    serve = ["--config", "tiny", "--num-blocks", "64", "--max-model-len", "512", "--max-tokens-per-step", "64",
             "--max-num-seqs", "8", "--log-level", "warning"]
    # One compilation cache: the restarted replica loads its steps instead of compiling them.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "AGENTINFER_JAX_CACHE_DIR": str(tmp_path / "xla")}
    with ReplicaFleet(2, serve, policy="session", log_dir=tmp_path / "logs", env=env) as fleet:
        assert fleet.router is not None and all(r.process.pid for r in fleet.replicas)
        run = lambda suffix, **kw: replay_sessions(  # noqa: E731
            fleet.url, "tiny", sessions, concurrency=len(sessions), max_tokens=6,
            http_client_factory=routing_key_http_client, session_suffix=suffix, **kw)
        baseline = run("-a")
        assert summarize(baseline)["cached_token_ratio"] > 0.3  # sessions stayed on their replica
        served_before = [_requests_served(r.url) for r in fleet.replicas]
        assert min(served_before) > 0  # sessions were spread over both

        killed = []

        async def kill_mid_run(session_id: str, i: int) -> None:
            if not killed and i == 1:  # every session has started; some live on replica 0
                fleet.kill_replica(0)
                killed.append(session_id)

        faulty = run("-b", after_call=kill_mid_run)
        assert killed
        assert [r.final_answer for r in faulty] == [r.final_answer for r in baseline]
        assert [len(r.calls) for r in faulty] == [s.num_calls for s in sessions]
        with urllib.request.urlopen(fleet.metrics_url, timeout=10) as r:
            router_metrics = r.read().decode()
        dead = fleet.replicas[0].url
        assert re.search(rf'smg_worker_cb_transitions_total\{{worker="{re.escape(dead)}",from="closed",to="open"\}} [1-9]',
                         router_metrics), "the router must mark the killed replica down"
        fleet.restart_replica(0)
        served = _requests_served(dead)  # 0: a fresh process
        deadline = time.monotonic() + 60
        round_ = 0
        while _requests_served(dead) <= served:  # new sessions reach the replica again
            assert time.monotonic() < deadline, "the restarted replica never got traffic again"
            round_ += 1
            run(f"-c{round_}")
            time.sleep(0.5)
    assert all(r.process.poll() is not None for r in fleet.replicas) and fleet.router.poll() is not None
