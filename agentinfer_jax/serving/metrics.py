"""Serving metrics: kept in process (for experiments) and exported to Prometheus (for operators)."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from agentinfer_jax.serving.request import Request

_LAT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclasses.dataclass
class RequestMetrics:
    request_id: str
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    queue_s: float
    ttft_s: float | None
    tpot_s: float | None
    e2e_s: float
    drafted: int
    accepted: int
    verify_steps: int
    preemptions: int
    finish_reason: str
    inflight_shared_tokens: int = 0  # of cached_tokens: waited for while another request prefilled them
    drafter_failed: bool = False  # its drafter raised or proposed garbage: it decoded on without drafts

    @classmethod
    def of(cls, r: Request) -> RequestMetrics:
        ttft = None if r.first_token_s is None else r.first_token_s - r.arrival_s
        n = len(r.output_tokens)
        tpot = (r.last_token_s - r.first_token_s) / (n - 1) if n > 1 and r.first_token_s is not None else None
        queue = (r.admitted_s - r.arrival_s) if r.admitted_s is not None else (r.finish_s - r.arrival_s)
        return cls(r.request_id, len(r.prompt_tokens), r.num_cached_tokens, n, queue, ttft, tpot,
                   r.finish_s - r.arrival_s, r.num_drafted, r.num_accepted, r.num_verify_steps,
                   r.num_preemptions, r.finish_reason.value if r.finish_reason else "",
                   r.num_inflight_shared_tokens, r.drafter_failed)


class ServingMetrics:
    """Aggregates finished requests and per-step gauges. Thread-safe."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._lock = threading.Lock()
        self.finished: list[RequestMetrics] = []
        self.inter_token_s: list[float] = []
        self.p_ttft = Histogram("agentinfer_ttft_seconds", "Time to first token", buckets=_LAT_BUCKETS, registry=r)
        self.p_tpot = Histogram("agentinfer_tpot_seconds", "Time per output token", buckets=_LAT_BUCKETS,
                                registry=r)
        self.p_itl = Histogram("agentinfer_inter_token_seconds", "Inter-token latency", buckets=_LAT_BUCKETS,
                               registry=r)
        self.p_queue = Histogram("agentinfer_queue_seconds", "Time waiting before admission",
                                 buckets=_LAT_BUCKETS, registry=r)
        self.p_requests = Counter("agentinfer_requests", "Finished requests", ["reason"], registry=r)
        self.p_prompt = Counter("agentinfer_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.p_cached = Counter("agentinfer_cached_prompt_tokens", "Prompt tokens served from the prefix cache",
                                registry=r)
        self.p_inflight_shared = Counter(
            "agentinfer_inflight_shared_prompt_tokens",
            "Prompt tokens served from the prefix cache after waiting for another request's prefill of them",
            registry=r)
        self.p_output = Counter("agentinfer_output_tokens", "Generated tokens", registry=r)
        self.p_drafted = Counter("agentinfer_drafted_tokens", "Drafted tokens sent to verification", registry=r)
        self.p_accepted = Counter("agentinfer_accepted_tokens", "Drafted tokens accepted", registry=r)
        self.p_preempt = Counter("agentinfer_preemptions", "Preemptions", registry=r)
        self.p_drafter_failed = Counter("agentinfer_drafter_failed_requests",
                                        "Finished requests whose drafter failed (they decoded on without drafts)",
                                        registry=r)
        self.g_blocks = Gauge("agentinfer_blocks_in_use",
                              "KV blocks held by requests or retained sessions (evictable cache blocks excluded)",
                              registry=r)
        self.g_cached = Gauge("agentinfer_blocks_cached_evictable",
                              "KV blocks only the prefix cache holds (freed on demand)", registry=r)
        self.g_capacity = Gauge("agentinfer_blocks_capacity", "Usable KV blocks (the pool less the null page)",
                                registry=r)
        self.g_kv_usage = Gauge("agentinfer_kv_cache_usage",
                                "Fraction of usable KV blocks in use (evictable cache blocks excluded)", registry=r)
        self.g_running = Gauge("agentinfer_running_requests", "Running requests", registry=r)
        self.g_waiting = Gauge("agentinfer_waiting_requests", "Waiting requests", registry=r)
        self.g_hit_rate = Gauge("agentinfer_prefix_hit_rate", "Cached prompt tokens / prompt tokens", registry=r)

    def on_tokens(self, gap_s: float) -> None:
        with self._lock:
            self.inter_token_s.append(gap_s)
        self.p_itl.observe(gap_s)

    def on_state(self, blocks_in_use: int, cached_evictable: int, capacity: int, running: int,
                 waiting: int) -> None:
        """The scheduler's state now (the loop calls this after every change: step, add, cancel)."""
        self.g_blocks.set(blocks_in_use)
        self.g_cached.set(cached_evictable)
        self.g_capacity.set(capacity)
        self.g_kv_usage.set(blocks_in_use / capacity if capacity > 0 else 0.0)
        self.g_running.set(running)
        self.g_waiting.set(waiting)

    def on_finish(self, req: Request) -> None:
        m = RequestMetrics.of(req)
        with self._lock:
            self.finished.append(m)
        self.p_requests.labels(m.finish_reason).inc()
        self.p_prompt.inc(m.prompt_tokens)
        self.p_cached.inc(m.cached_tokens)
        self.p_inflight_shared.inc(m.inflight_shared_tokens)
        self.p_output.inc(m.output_tokens)
        self.p_drafted.inc(m.drafted)
        self.p_accepted.inc(m.accepted)
        self.p_preempt.inc(m.preemptions)
        self.p_drafter_failed.inc(m.drafter_failed)
        self.p_queue.observe(max(0.0, m.queue_s))
        if m.ttft_s is not None:
            self.p_ttft.observe(m.ttft_s)
        if m.tpot_s is not None:
            self.p_tpot.observe(m.tpot_s)
        self.g_hit_rate.set(self.summary()["prefix_hit_rate"])

    def summary(self) -> dict[str, float]:
        with self._lock:
            fin = list(self.finished)
            itl = list(self.inter_token_s)

        def mean(xs):
            xs = [x for x in xs if x is not None]
            return float(np.mean(xs)) if xs else float("nan")

        def p99(xs):
            xs = [x for x in xs if x is not None]
            return float(np.percentile(xs, 99)) if xs else float("nan")

        prompt = sum(m.prompt_tokens for m in fin)
        steps = sum(m.verify_steps for m in fin)
        return {
            "requests": len(fin),
            "mean_ttft_s": mean([m.ttft_s for m in fin]), "p99_ttft_s": p99([m.ttft_s for m in fin]),
            "mean_tpot_s": mean([m.tpot_s for m in fin]), "mean_itl_s": mean(itl), "p99_itl_s": p99(itl),
            "mean_queue_s": mean([m.queue_s for m in fin]), "p99_queue_s": p99([m.queue_s for m in fin]),
            "mean_e2e_s": mean([m.e2e_s for m in fin]),
            "prefix_hit_rate": sum(m.cached_tokens for m in fin) / prompt if prompt else 0.0,
            "inflight_shared_tokens": sum(m.inflight_shared_tokens for m in fin),
            "drafted_tokens": sum(m.drafted for m in fin), "accepted_tokens": sum(m.accepted for m in fin),
            "tokens_per_verify_step": (sum(m.accepted for m in fin) + steps) / steps if steps else float("nan"),
            "preemptions": sum(m.preemptions for m in fin),
        }

    def prometheus_text(self) -> bytes:
        return generate_latest(self.registry)
