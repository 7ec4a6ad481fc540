"""One model over several processes (hosts): `jax.distributed` start-up and SPMD lockstep.

Every process calls `initialize` before anything touches a device; then `jax.devices()` lists the
devices of all processes and the engine's mesh spans them (`make_mesh` over the global list). JAX is
multi-controller: every process must run the same jitted step on the same inputs, in the same
order. Only process 0 serves HTTP and runs the scheduler; it is the *leader*. Before each engine
step it sends the step's plain `StepBatch` to every *follower* over a small TCP channel, then all
processes run `Engine.execute` on it, and the step's collectives (gloo on CPU, NCCL on GPU) meet.

Why a socket and not a collective broadcast: a follower waits for the next step as long as the
server idles (minutes, hours), and a collective would time out; a socket read does not. The channel
carries JSON (plain numbers, never code), and the leader's end closing ends each follower.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import struct
import time
from collections.abc import Sequence

import numpy as np

from agentinfer_jax.engine.step_batch import SeqSampling, StepBatch, StepSeq

__all__ = ["DistributedConfig", "initialize", "shutdown", "StepChannel", "LockstepExecutor", "follow",
           "encode_batch", "decode_batch"]

log = logging.getLogger(__name__)
_HEADER = struct.Struct("!I")  # message length in bytes


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Where the processes meet. `coordinator` is process 0's host:port (jax.distributed's
    coordination service); the lockstep channel listens on the same host at `step_port`
    (default: the coordinator's port + 1)."""

    coordinator: str
    num_processes: int
    process_id: int
    step_port: int | None = None
    connect_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        host, sep, port = self.coordinator.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"coordinator address must be HOST:PORT, got {self.coordinator!r}")
        if self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process_id must be in [0, {self.num_processes}), got {self.process_id}")

    @property
    def host(self) -> str:
        return self.coordinator.rpartition(":")[0].strip("[]")

    @property
    def channel_port(self) -> int:
        return self.step_port if self.step_port is not None else int(self.coordinator.rpartition(":")[2]) + 1

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0


def initialize(config: DistributedConfig) -> None:
    """`jax.distributed.initialize` for `config`, with gloo collectives on CPU (jax's CPU backend has
    none by default, so a cross-process step would fail). Call before any device is touched."""
    import jax

    if config.num_processes == 1:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # jax 0.10's default; only CPU reads it
    # The coordination service binds the coordinator's own address (jax's default is every interface).
    jax.distributed.initialize(config.coordinator, num_processes=config.num_processes,
                               process_id=config.process_id, coordinator_bind_address=config.coordinator)
    log.info("jax.distributed: process %d of %d, %d local of %d devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def shutdown() -> None:
    """Leaves the job cleanly (a barrier: every process calls it, the leader after closing its
    channel, the followers once it closed); without it, the coordinator's exit aborts the others."""
    import jax

    if jax.process_count() > 1:
        jax.distributed.shutdown()


# ---- wire format -------------------------------------------------------------------------------


def encode_batch(batch: StepBatch) -> bytes:
    """Every field of every StepSeq: followers must run exactly the leader's program (a sampling
    option or grammar mask that differs would change the compiled step and its collectives)."""
    seqs = [{"id": s.request_id, "start": s.start_pos, "tokens": list(s.tokens), "drafts": s.num_draft,
             "blocks": list(s.block_ids), "sampling": dataclasses.asdict(s.sampling), "samples": s.samples,
             "counts": [list(c) for c in s.token_counts],
             "allowed": None if s.allowed is None else np.asarray(s.allowed).tolist()}
            for s in batch.seqs]
    return json.dumps(seqs, separators=(",", ":")).encode()


def decode_batch(data: bytes) -> StepBatch:
    seqs = []
    for s in json.loads(data):
        sp = dict(s["sampling"])
        sp["logit_bias"] = tuple((int(t), float(b)) for t, b in sp.get("logit_bias", ()))
        seqs.append(StepSeq(str(s["id"]), int(s["start"]), tuple(s["tokens"]), int(s["drafts"]), tuple(s["blocks"]),
                            SeqSampling(**sp), bool(s["samples"]),
                            allowed=None if s["allowed"] is None else np.asarray(s["allowed"], np.int32),
                            token_counts=tuple((int(t), int(c)) for t, c in s["counts"])))
    return StepBatch(seqs)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf.extend(chunk)
    return bytes(buf)


class StepChannel:
    """The leader's sockets to its followers (`listen`), or a follower's socket to it (`connect`)."""

    def __init__(self, sockets: Sequence[socket.socket]):
        self._sockets = list(sockets)

    @classmethod
    def listen(cls, config: DistributedConfig) -> StepChannel:
        """Leader: waits until every follower has connected (the followers start in any order)."""
        server = socket.create_server((config.host, config.channel_port), reuse_port=False)
        server.settimeout(config.connect_timeout_s)
        peers = []
        try:
            for _ in range(config.num_processes - 1):
                conn, _ = server.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peers.append(conn)
        except OSError:
            for p in peers:
                p.close()
            raise
        finally:
            server.close()
        return cls(peers)

    @classmethod
    def connect(cls, config: DistributedConfig) -> StepChannel:
        """Follower: connects to the leader, retrying while it is still starting."""
        deadline = time.monotonic() + config.connect_timeout_s
        while True:
            try:
                sock = socket.create_connection((config.host, config.channel_port), timeout=5.0)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        sock.settimeout(None)  # a step may be hours away
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls([sock])

    def send(self, batch: StepBatch) -> None:
        data = encode_batch(batch)
        for sock in self._sockets:
            sock.sendall(_HEADER.pack(len(data)) + data)

    def receive(self) -> StepBatch | None:
        """Follower: the next step, or None when the leader has gone."""
        header = _recv_exact(self._sockets[0], _HEADER.size)
        if header is None:
            return None
        data = _recv_exact(self._sockets[0], _HEADER.unpack(header)[0])
        return None if data is None else decode_batch(data)

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()


class LockstepExecutor:
    """The leader's executor: sends each step to the followers, then runs it here. Everything else
    (timings, step records, compile counts) is the wrapped engine's."""

    def __init__(self, engine, channel: StepChannel):
        self.engine = engine
        self.channel = channel

    def execute(self, batch: StepBatch) -> dict[str, list[int]]:
        if not batch.seqs:
            return {}
        self.channel.send(batch)
        return self.engine.execute(batch)

    def dispatch(self, batch: StepBatch):
        """The overlapped loop's path: the followers get the step (PREVIOUS_TOKEN included: each
        engine reads it from its own previous step, which ran the same program) before it starts."""
        if not batch.seqs:
            return None
        self.channel.send(batch)
        return self.engine.dispatch(batch)

    def collect(self, pending):
        return self.engine.collect(pending)

    def __getattr__(self, name: str):
        return getattr(self.engine, name)


def follow(engine, channel: StepChannel) -> int:
    """A follower's life: run every step the leader sends, until it goes; returns the step count.

    A step that fails here failed on the leader too (same inputs, same code), where the serving loop
    re-runs its sequences one by one: those re-runs arrive here as steps as well, so keep going."""
    steps = 0
    while (batch := channel.receive()) is not None:
        try:
            engine.execute(batch)
        except Exception:  # noqa: BLE001 - mirrored from the leader, which handles it
            log.exception("lockstep step failed (the leader's serving loop isolates it)")
        steps += 1
    channel.close()
    return steps
