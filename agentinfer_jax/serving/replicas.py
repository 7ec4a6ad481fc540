"""Replicas of `agentinfer-serve` behind the SGLang Model Gateway (`sglang-router`, the `router` extra).

We build no router: `ReplicaFleet` starts N servers and the gateway in front of them, and stops
each by its PID. `agentinfer-replicas` is the same from the command line:

  agentinfer-replicas --replicas 2 --policy session --port 30000 -- --config tiny --drafter sam
  agentinfer-replicas --worker-urls http://host1:8000 http://host2:8000 --policy cache_aware  # N hosts

Policies are the gateway's (cache_aware, round_robin, power_of_two, random) plus `session`: the
gateway's `manual` policy, which pins each `x-smg-routing-key` header value to one replica (new keys
go to the replica holding the fewest keys). An agent session that sends its session id in that
header reaches the replica holding its KV blocks and its AgentSAM automaton on every call;
`routing_key_http_client` is an httpx client that copies the body's `session_id` into the header,
for `agents.clients.OpenAIClient(http_client=...)` or any OpenAI client.

Faults: the gateway's circuit breaker opens on a replica's first failed connection and its retries
go to another replica (a pinned session moves with them and re-prefills there); the breaker tries
the replica again `REJOIN_S` seconds later, so a replica that comes back rejoins.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from agentinfer_jax.serving.argtypes import int_in_range

__all__ = ["ROUTING_KEY_HEADER", "POLICIES", "REJOIN_S", "ManagedProcess", "ReplicaFleet", "free_port",
           "router_args", "routing_key_http_client", "wait_http_ok", "main"]

log = logging.getLogger(__name__)

ROUTING_KEY_HEADER = "x-smg-routing-key"  # sglang-router 0.3's manual-policy routing key
POLICIES = ("session", "cache_aware", "round_robin", "power_of_two", "random")
REJOIN_S = 2  # the circuit breaker's open time: a restarted replica gets traffic again after this
_LOOPBACK = "127.0.0.1"


def free_port(host: str = _LOOPBACK) -> int:
    """A port free on `host` right now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_http_ok(url: str, timeout_s: float, process: ManagedProcess | None = None) -> None:
    """Polls GET `url` until it answers 200; RuntimeError if `process` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.name} exited with {process.poll()} before {url} answered; "
                               f"log: {process.log_path}")
        try:
            with urllib.request.urlopen(url, timeout=2.0) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s")
        time.sleep(0.2)


class ManagedProcess:
    """A child process with its output in a log file, stopped by its own PID (never by name)."""

    def __init__(self, name: str, argv: Sequence[str], log_path: pathlib.Path, env: dict[str, str] | None = None,
                 cwd: str | None = None):
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        # Its own session: a terminal's Ctrl-C reaches the launcher, which stops children in order.
        self.popen = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                      start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def kill(self) -> None:
        """SIGKILL: a crash, as far as the others can tell."""
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait()
        self._log.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
        if self._log.closed:
            return
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self._log.close()


def router_args(worker_urls: Sequence[str], policy: str, *, host: str, port: int, prometheus_port: int,
                extra: Sequence[str] = ()) -> list[str]:
    """sglang-router 0.3 `launch` arguments: `policy` (one of POLICIES), fast failure detection
    (one failed connection opens a replica's breaker; retries pick another replica) and a fast
    rejoin (the breaker half-opens after REJOIN_S), Prometheus metrics on `host`."""
    if policy not in POLICIES:
        raise ValueError(f"unknown routing policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if not worker_urls:
        raise ValueError("the router needs at least one worker URL")
    policy_args = ["--policy", "manual", "--assignment-mode", "min_group"] if policy == "session" \
        else ["--policy", policy]
    return ["--host", host, "--port", str(port), "--worker-urls", *worker_urls, *policy_args,
            "--prometheus-host", host, "--prometheus-port", str(prometheus_port),
            "--health-check-interval-secs", "1", "--health-failure-threshold", "1",
            "--health-success-threshold", "1", "--worker-startup-check-interval", "1",
            "--cb-failure-threshold", "1", "--cb-success-threshold", "1",
            "--cb-timeout-duration-secs", str(REJOIN_S),
            "--retry-max-retries", "6", "--retry-initial-backoff-ms", "50", "--retry-max-backoff-ms", "1000",
            "--log-level", "warn", *extra]


def _python_module(module: str) -> list[str]:
    return [sys.executable, "-m", module]


def _check_router_installed() -> None:
    import importlib.util

    if importlib.util.find_spec("sglang_router") is None:
        raise RuntimeError("the SGLang Model Gateway is not installed: pip install 'agentinfer-jax[router]' "
                           "(sglang-router)")


@dataclasses.dataclass
class _Replica:
    port: int
    process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{_LOOPBACK}:{self.port}"


class ReplicaFleet:
    """N `agentinfer-serve` replicas on loopback and the gateway in front; a context manager.

    `serve_args` go to every replica (e.g. ["--config", "tiny"]); `worker_urls` instead routes to
    replicas that already run (other hosts) and starts none. Everything binds `host` (loopback by
    default), ports are free ones unless given, and logs go to `log_dir` (a temporary folder by
    default). `kill_replica` / `restart_replica` are the fault-injection hooks.
    """

    def __init__(self, num_replicas: int = 2, serve_args: Sequence[str] = ("--config", "tiny"), *,
                 policy: str = "session", host: str = _LOOPBACK, port: int = 0,
                 worker_urls: Sequence[str] = (), replica_ports: Sequence[int] = (),
                 log_dir: str | os.PathLike | None = None, router_extra: Sequence[str] = (),
                 env: dict[str, str] | None = None, start_timeout_s: float = 180.0):
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; choose one of {', '.join(POLICIES)}")
        if not worker_urls and num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if replica_ports and len(replica_ports) != num_replicas:
            raise ValueError(f"{len(replica_ports)} replica ports for {num_replicas} replicas")
        self.policy = policy
        self.host = host
        self.port = port or free_port(host)
        self.serve_args = list(serve_args)
        self.external_urls = list(worker_urls)
        ports = list(replica_ports) or [free_port(host) for _ in range(0 if worker_urls else num_replicas)]
        self.replicas = [_Replica(p) for p in ports]
        self.router_extra = list(router_extra)
        self.env = dict(os.environ if env is None else env)
        self.start_timeout_s = start_timeout_s
        self._tmp = None if log_dir is not None else tempfile.TemporaryDirectory(prefix="agentinfer-replicas-")
        self.log_dir = pathlib.Path(log_dir if log_dir is not None else self._tmp.name)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.router: ManagedProcess | None = None
        self.prometheus_port = free_port(host)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def worker_urls(self) -> list[str]:
        return self.external_urls or [r.url for r in self.replicas]

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.prometheus_port}/metrics"

    # ---- life cycle --------------------------------------------------------------------------

    def start(self) -> ReplicaFleet:
        _check_router_installed()
        try:
            for i in range(len(self.replicas)):
                self._start_replica(i)
            for i, r in enumerate(self.replicas):
                wait_http_ok(f"{r.url}/health", self.start_timeout_s, r.process)
            argv = _python_module("sglang_router.launch_router") + router_args(
                self.worker_urls, self.policy, host=self.host, port=self.port,
                prometheus_port=self.prometheus_port, extra=self.router_extra)
            self.router = ManagedProcess("sglang-router", argv, self.log_dir / "router.log", self.env,
                                         cwd=str(self.log_dir))
            self.wait_routable(len(self.worker_urls), self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_replica(self, i: int) -> None:
        r = self.replicas[i]
        argv = _python_module("agentinfer_jax.serving.cli") + [*self.serve_args, "--host", _LOOPBACK,
                                                               "--port", str(r.port)]
        # cwd: the log folder, so `python -m` never puts a source checkout on sys.path.
        r.process = ManagedProcess(f"replica {i}", argv, self.log_dir / f"replica{i}.log", self.env,
                                   cwd=str(self.log_dir))

    def workers(self) -> list[dict[str, Any]]:
        """The gateway's view of its workers (url, is_healthy, load)."""
        with urllib.request.urlopen(f"{self.url}/workers", timeout=5.0) as r:
            return json.load(r).get("workers", [])

    def wait_routable(self, n: int, timeout_s: float) -> None:
        """Until the gateway lists `n` healthy workers."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.router is not None and self.router.poll() is not None:
                raise RuntimeError(f"sglang-router exited with {self.router.poll()}; log: {self.router.log_path}")
            with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
                if sum(bool(w.get("is_healthy")) for w in self.workers()) >= n:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the router did not list {n} healthy workers within {timeout_s:.0f} s")
            time.sleep(0.2)

    def kill_replica(self, i: int) -> None:
        """SIGKILL replica i (a crash: no goodbye to the router)."""
        proc = self.replicas[i].process
        if proc is not None:
            proc.kill()

    def restart_replica(self, i: int) -> None:
        """Starts replica i again on its port and waits until it is healthy."""
        r = self.replicas[i]
        if r.process is not None and r.process.poll() is None:
            raise RuntimeError(f"replica {i} is still running")
        self._start_replica(i)
        wait_http_ok(f"{r.url}/health", self.start_timeout_s, r.process)

    def stop(self) -> None:
        """Router first (no request goes to a stopping replica), then every replica, by PID."""
        if self.router is not None:
            self.router.stop()
        for r in self.replicas:
            if r.process is not None:
                r.process.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> ReplicaFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def routing_key_http_client(**kwargs: Any):
    """An `httpx.AsyncClient` that sends each JSON request's `session_id` as the gateway's routing
    key header, so the `session` policy keeps a session on one replica. Extra kwargs go to httpx."""
    import httpx

    async def add_routing_key(request: httpx.Request) -> None:
        if ROUTING_KEY_HEADER in request.headers or not request.content:
            return
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            body = json.loads(request.content)
            session = body.get("session_id") if isinstance(body, dict) else None
            if isinstance(session, str) and session:
                request.headers[ROUTING_KEY_HEADER] = session

    hooks = kwargs.pop("event_hooks", {})
    hooks = {**hooks, "request": [*hooks.get("request", []), add_routing_key]}
    return httpx.AsyncClient(event_hooks=hooks, **kwargs)


# ---- command line --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    serve_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, serve_args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(prog="agentinfer-replicas", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int_in_range(1), default=2,
                   help="agentinfer-serve replicas to start on this host (default: %(default)s)")
    p.add_argument("--policy", choices=POLICIES, default="session",
                   help="routing policy (session = sticky per x-smg-routing-key, i.e. per agent session; "
                        "default: %(default)s)")
    p.add_argument("--host", default=_LOOPBACK, help="the router's bind address (replicas bind loopback)")
    p.add_argument("--port", type=int_in_range(1, 65535), default=30000,
                   help="the router's port (default: %(default)s)")
    p.add_argument("--replica-ports", type=int_in_range(1, 65535), nargs="*", default=[],
                   help="replica ports (default: free ones)")
    p.add_argument("--worker-urls", nargs="*", default=[],
                   help="route to replicas already running (e.g. on other hosts) instead of starting any")
    p.add_argument("--log-dir", help="replica and router logs (default: a temporary folder)")
    args = p.parse_args(argv)
    return args, serve_args or ["--config", "tiny"]


def main(argv: Sequence[str] | None = None) -> int:
    args, serve_args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        fleet = ReplicaFleet(args.replicas, serve_args, policy=args.policy, host=args.host, port=args.port,
                             worker_urls=args.worker_urls, replica_ports=args.replica_ports, log_dir=args.log_dir)
        fleet.start()
    except (ValueError, RuntimeError) as e:
        print(f"agentinfer-replicas: {e}", file=sys.stderr)
        return 2
    try:
        log.info("agentinfer-replicas: router %s (policy %s, metrics %s) over %s; logs in %s",
                 fleet.url, args.policy, fleet.metrics_url, " ".join(fleet.worker_urls), fleet.log_dir)
        while not stop.wait(1.0):
            for i, r in enumerate(fleet.replicas):
                if r.process is not None and r.process.poll() is not None:
                    log.warning("replica %d exited (%s); restarting it", i, r.process.poll())
                    with contextlib.suppress(RuntimeError):
                        fleet.restart_replica(i)
    finally:
        fleet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
