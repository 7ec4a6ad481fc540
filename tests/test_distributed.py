"""One model over two processes: `agentinfer-serve` under jax.distributed on loopback.

Two processes with 4 fake CPU devices each form one 8-device mesh (1 x 8: the MLP and the vocabulary
are split across the processes, so every step runs cross-process collectives over gloo). Process 0
serves HTTP and sends each step to process 1; the greedy tokens must equal the dense single-process
reference (`model.transformer.generate`, one device, no paging). The lockstep channel's wire format
is checked on random batches against a real socket.
"""

from __future__ import annotations

import os
import random
import re
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from agentinfer_jax.engine.step_batch import SeqSampling, StepBatch, StepSeq
from agentinfer_jax.model.transformer import generate, init_model
from agentinfer_jax.serving import distributed
from agentinfer_jax.serving.builder import load_model_config
from agentinfer_jax.serving.cli import distributed_from_args, parse_args
from agentinfer_jax.serving.replicas import ManagedProcess, free_port, wait_http_ok


def _random_batch(rng: random.Random) -> StepBatch:
    seqs = []
    for i in range(rng.randint(1, 6)):
        n = rng.randint(1, 40)
        seqs.append(StepSeq(f"req-{rng.random()}-{i}", rng.randint(0, 500), tuple(rng.randrange(4096) for _ in range(n)),
                            rng.randint(0, n - 1), tuple(rng.randrange(1, 64) for _ in range(rng.randint(1, 8))),
                            SeqSampling(rng.random() * 2, rng.randint(0, 50), rng.random(), rng.getrandbits(32),
                                        rng.random(), -rng.random(),
                                        tuple((rng.randrange(4096), rng.uniform(-100, 100)) for _ in range(rng.randint(0, 3))),
                                        rng.choice([None, 0, 5])),
                            rng.random() < 0.8,
                            allowed=(np.asarray([[rng.getrandbits(31) for _ in range(4)] for _ in range(rng.randint(1, 3))],
                                                np.int32) if rng.random() < 0.5 else None),
                            token_counts=tuple((rng.randrange(4096), rng.randint(1, 9)) for _ in range(rng.randint(0, 4)))))
    return StepBatch(seqs)


def test_leader_sends_every_step_unchanged_and_the_follower_stops_when_it_goes():
    rng = random.Random(3)
    batches = [_random_batch(rng) for _ in range(20)]

    class RecordingEngine:
        def __init__(self):
            self.seen = []
            self.last_timing = "leader's"

        def execute(self, batch):
            self.seen.append(list(batch.seqs))
            return {s.request_id: [1] for s in batch.seqs if s.samples}

        def dispatch(self, batch):  # the overlapped loop's path
            return self.execute(batch)

        def collect(self, pending):
            return pending

    leader_sock, follower_sock = socket.socketpair()
    leader, follower = RecordingEngine(), RecordingEngine()
    steps = []
    t = threading.Thread(target=lambda: steps.append(distributed.follow(follower, distributed.StepChannel([follower_sock]))))
    t.start()
    executor = distributed.LockstepExecutor(leader, distributed.StepChannel([leader_sock]))
    for i, b in enumerate(batches):
        if i % 2:
            executor.collect(executor.dispatch(b))
        else:
            executor.execute(b)
    assert executor.execute(StepBatch([])) == {}  # nothing to run: nothing sent
    assert executor.last_timing == "leader's"  # everything else is the engine's
    executor.channel.close()
    t.join(timeout=10)
    assert steps == [len(batches)]
    assert follower.seen == leader.seen == [list(b.seqs) for b in batches]
    for got, sent in zip(follower.seen, leader.seen):  # masks are not part of StepSeq equality
        for a, b in zip(got, sent):
            assert (a.allowed is None) == (b.allowed is None)
            assert a.allowed is None or (a.allowed.dtype == np.int32 and np.array_equal(a.allowed, b.allowed))


def test_distributed_flags_are_checked():
    assert distributed_from_args(parse_args(["--config", "tiny"])) is None
    cfg = distributed_from_args(parse_args(["--coordinator-address", "10.0.0.1:9000", "--num-processes", "2",
                                            "--process-id", "1"]))
    assert (cfg.host, cfg.channel_port, cfg.is_leader) == ("10.0.0.1", 9001, False)
    with pytest.raises(SystemExit):
        parse_args(["--num-processes", "2"])  # no coordinator
    for bad in [("nohost", 2, 0), ("h:1", 2, 2), ("h:1", 0, 0), ("h:x", 2, 0)]:
        with pytest.raises(ValueError):
            distributed.DistributedConfig(*bad)


_rng = random.Random(23)
PROMPTS = [[_rng.randrange(5, 4096) for _ in range(n)] for n in (7, 19, 33, 50)]  # ids >= 5: no special tokens
MAX_NEW = 10


@pytest.mark.slow
def test_two_processes_serve_one_8_device_mesh_with_single_process_greedy_outputs(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    coordinator, step_port, http_port = free_port(), free_port(), free_port()
    command = [sys.executable, "-m", "agentinfer_jax.serving.cli", "--config", "tiny", "--mesh", "1,8",
               "--num-blocks", "64", "--max-model-len", "256", "--max-tokens-per-step", "64", "--max-num-seqs", "4",
               "--drafter", "ngram",
               "--coordinator-address", f"127.0.0.1:{coordinator}", "--num-processes", "2",
               "--step-port", str(step_port), "--log-level", "info"]
    # cwd: a temporary folder, so the checkout never lands on the children's sys.path.
    follower = ManagedProcess("follower", [*command, "--process-id", "1"], tmp_path / "p1.log", env, str(tmp_path))
    leader = ManagedProcess("leader", [*command, "--process-id", "0", "--host", "127.0.0.1", "--port", str(http_port)],
                            tmp_path / "p0.log", env, str(tmp_path))
    try:
        base = f"http://127.0.0.1:{http_port}"
        wait_http_ok(f"{base}/health", 240, leader)

        def complete(prompt):
            r = httpx.post(f"{base}/v1/completions", timeout=240,
                           json={"model": "tiny", "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0,
                                 "return_token_ids": True})
            r.raise_for_status()
            return r.json()["choices"][0]["token_ids"]

        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # batched steps
            served = list(pool.map(complete, PROMPTS))
        again = complete(PROMPTS[-1])  # a prefix-cache hit on the sharded pool
        assert follower.poll() is None, "the follower must still be running"
        leader.stop(timeout_s=60)  # SIGTERM: it lets the follower go, and both leave the job cleanly
        follower.popen.wait(timeout=60)
        assert (leader.poll(), follower.poll()) == (0, 0)
    finally:
        leader.stop()
        follower.stop()
    reference = generate(init_model(load_model_config("tiny"), seed=0), PROMPTS, MAX_NEW)
    assert served == [row[:MAX_NEW] for row in reference]
    assert again == served[-1]
    log0 = (tmp_path / "p0.log").read_text()
    assert "process 0 of 2, 4 local of 8 devices" in log0 and "mesh (1, 8)" in log0
    log1 = (tmp_path / "p1.log").read_text()
    assert "process 1 of 2, 4 local of 8 devices" in log1
    steps = re.search(r"process 1 ran (\d+) steps", log1)
    assert steps and int(steps.group(1)) >= MAX_NEW  # it ran the leader's steps in lockstep
