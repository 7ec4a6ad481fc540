"""Admission policies: FCFS/SJF/LPM orders, speculation-first, and the AgentSched shadow-price rule
checked against a straightforward float re-computation of the formula in papers/DETAILS.md."""

from __future__ import annotations

import math
import random

import pytest

from agentinfer_jax.serving.policies import (FCFS, LPM, SJF, AdmissionPolicy, AgentSched, CacheView, Candidate,
                                             make_policy)

BS = 16


def rand_candidates(rng: random.Random, n: int, *, hits: bool = True, waits: bool = True,
                    unique_prompts: bool = False, spec_frac: float = 0.0) -> list[Candidate]:
    lengths = rng.sample(range(1, 4000), n) if unique_prompts else [rng.randint(1, 4000) for _ in range(n)]
    out = []
    for i, p in enumerate(lengths):
        total = math.ceil(p / BS)
        hit = rng.randint(0, (p - 1) // BS) if hits else 0
        arrival = rng.uniform(0, 100)
        out.append(Candidate(f"r{i}", p, hit, total - hit, rng.uniform(0, 30) if waits else 0.0, arrival,
                             speculative=rng.random() < spec_frac))
    return out


def reference_agentsched(waiting, free, evictable, bs, a, b, c, k, lam_max, include_evictable=True):
    """The DETAILS.md rule written out plainly; returns (lambda, {id: score})."""
    H = float(sum(x.cached_blocks for x in waiting))
    N = float(free + (evictable if include_evictable else 0))
    U = max(0.0, N - H)
    D = float(sum(x.need_blocks for x in waiting))
    z = 0.0 if D == 0 else (float("inf") if U == 0 else D / U)
    t = k * (z - 1.0)
    sig = 1.0 if t == float("inf") else 1.0 / (1.0 + math.exp(-t)) if t > -700 else 0.0
    lam = lam_max * sig
    mix = min(1.0, max(0.0, 1.0 - lam / lam_max))
    scores = {}
    for x in waiting:
        need_eff = mix * (x.prompt_tokens / bs) + (1 - mix) * x.need_blocks
        scores[x.request_id] = a * x.cached_blocks - (b + lam) * need_eff + c * x.wait_s
    return lam, scores


def is_permutation(out, waiting):
    return sorted(c.request_id for c in out) == sorted(c.request_id for c in waiting)


@pytest.mark.parametrize("name", ["fcfs", "sjf", "lpm", "agentsched"])
def test_factory_and_protocol(name):
    p = make_policy(name)
    assert isinstance(p, AdmissionPolicy) and p.name == name
    assert make_policy(name.upper(), speculation_first=True).speculation_first


def test_fcfs_and_sjf_orders():
    rng = random.Random(0)
    for _ in range(20):
        w = rand_candidates(rng, rng.randint(0, 40))
        view = CacheView(rng.randint(0, 500), rng.randint(0, 100), BS)
        f = FCFS().order(w, view, 0.0)
        s = SJF().order(w, view, 0.0)
        assert is_permutation(f, w) and is_permutation(s, w)
        assert all(x.arrival_s <= y.arrival_s for x, y in zip(f, f[1:]))
        for x, y in zip(s, s[1:]):
            assert x.prompt_tokens < y.prompt_tokens or (x.prompt_tokens == y.prompt_tokens
                                                         and x.arrival_s <= y.arrival_s)


def test_lpm_longest_cached_prefix_then_fcfs_fallback():
    rng = random.Random(1)
    view = CacheView(100, 10, BS)
    w = rand_candidates(rng, 30)
    out = LPM().order(w, view, 0.0)
    for x, y in zip(out, out[1:]):
        assert x.cached_blocks > y.cached_blocks or (x.cached_blocks == y.cached_blocks and x.arrival_s <= y.arrival_s)
    # Above the threshold (default 128, as SGLang) the queue is served in arrival order.
    long_q = rand_candidates(rng, 129)
    assert LPM().order(long_q, view, 0.0) == FCFS().order(long_q, view, 0.0)
    assert LPM().order(long_q[:128], view, 0.0) != FCFS().order(long_q[:128], view, 0.0)
    assert LPM(fcfs_threshold=5).order(w[:6], view, 0.0) == FCFS().order(w[:6], view, 0.0)


@pytest.mark.parametrize("name", ["fcfs", "sjf", "lpm", "agentsched"])
def test_speculation_first_keeps_base_order_within_groups(name):
    rng = random.Random(2)
    w = rand_candidates(rng, 40, spec_frac=0.3)
    view = CacheView(400, 50, BS)
    base = make_policy(name).order(w, view, 0.0)
    out = make_policy(name, speculation_first=True).order(w, view, 0.0)
    n_spec = sum(c.speculative for c in w)
    assert 0 < n_spec < len(w)
    assert all(c.speculative for c in out[:n_spec]) and not any(c.speculative for c in out[n_spec:])
    assert out[:n_spec] == [c for c in base if c.speculative]
    assert out[n_spec:] == [c for c in base if not c.speculative]


def test_priority_classes_come_first():
    rng = random.Random(3)
    w = [Candidate(f"r{i}", rng.randint(1, 500), 0, 3, 0.0, rng.random(), priority=rng.randint(0, 2))
         for i in range(30)]
    for name in ("fcfs", "sjf", "lpm", "agentsched"):
        out = make_policy(name).order(w, CacheView(100, 0, BS), 0.0)
        assert [c.priority for c in out] == sorted((c.priority for c in w), reverse=True)


@pytest.mark.parametrize("include_evictable", [True, False])
def test_agentsched_matches_reference_formula(include_evictable):
    rng = random.Random(4 + include_evictable)
    for trial in range(60):
        consts = dict(a=rng.uniform(0, 2), b=rng.uniform(0, 2), c=rng.uniform(0, 5), k=rng.uniform(0.5, 12),
                      lambda_max=rng.uniform(0.5, 20))
        w = rand_candidates(rng, rng.randint(1, 30))
        demand = sum(c.need_blocks for c in w) + sum(c.cached_blocks for c in w)
        free = rng.randint(0, 2 * demand)  # from far above demand to none at all
        evict = rng.randint(0, demand)
        pol = AgentSched(include_evictable=include_evictable, **consts)
        out = pol.order(w, CacheView(free, evict, BS), 0.0)
        lam, ref = reference_agentsched(w, free, evict, BS, consts["a"], consts["b"], consts["c"], consts["k"],
                                        consts["lambda_max"], include_evictable)
        assert pol.last_lambda == pytest.approx(lam, rel=1e-12, abs=1e-12)
        assert is_permutation(out, w)
        got = [ref[c.request_id] for c in out]
        assert all(x >= y - 1e-9 for x, y in zip(got, got[1:])), f"trial {trial}: not sorted by score"


def test_agentsched_loose_capacity_is_sjf():
    rng = random.Random(6)
    for _ in range(20):
        w = rand_candidates(rng, 25, hits=False, waits=False)
        view = CacheView(100 * sum(c.need_blocks for c in w), 0, BS)  # z = 0.01
        pol = AgentSched()
        assert pol.order(w, view, 0.0) == SJF().order(w, view, 0.0)
        assert pol.last_lambda < 1e-2 * pol.lambda_max
        # With hits in the queue the a*hit term is the only difference; a = c = 0 leaves pure SJF.
        wh = rand_candidates(rng, 25, unique_prompts=True)
        view = CacheView(100 * sum(c.need_blocks + c.cached_blocks for c in wh), 0, BS)
        assert AgentSched(a=0.0, c=0.0).order(wh, view, 0.0) == SJF().order(wh, view, 0.0)


def test_agentsched_pressure_rewards_cache_hits():
    """The shadow price's mechanism, shown at a small hit reward (a = 0.5) so that both sides of
    the switch are visible: SJF under loose capacity, cache hits under pressure."""
    rng = random.Random(7)
    pol = AgentSched(a=0.5)
    for _ in range(50):
        # Long prompt, mostly cached; a shorter prompt with nothing cached but more new blocks.
        long_blocks = rng.randint(40, 200)
        hit = long_blocks - rng.randint(1, 10)
        # More new blocks than the cached one needs, fewer than its prompt minus the a*hit reward.
        short_blocks = rng.randint(long_blocks - hit + 1, long_blocks - math.ceil(pol.a * hit) - 1)
        cached = Candidate("cached", long_blocks * BS, hit, long_blocks - hit, 0.0, 0.0)
        short = Candidate("short", short_blocks * BS, 0, short_blocks, 0.0, 1.0)
        w = [short, cached]
        demand = long_blocks - hit + short_blocks
        tight = CacheView(hit + rng.randint(0, demand // 4), 0, BS)  # D >= 4 U
        assert [c.request_id for c in pol.order(w, tight, 0.0)] == ["cached", "short"]
        assert pol.last_lambda > 0.99 * pol.lambda_max
        loose = CacheView(hit + 1000 * demand, 0, BS)
        assert [c.request_id for c in pol.order(w, loose, 0.0)] == ["short", "cached"]  # SJF side


def test_agentsched_defaults_put_returning_agent_calls_before_new_sessions():
    """With the default hit reward a returning call (long prompt, its context cached but for the
    new observation) outranks a new session's short first call at any capacity; among requests
    without hits the order stays SJF's (test above)."""
    rng = random.Random(10)
    pol = AgentSched()
    for _ in range(50):
        ctx = rng.randint(8, 120)  # cached blocks of the session's context
        obs = rng.randint(1, 6)  # new blocks: the tool's observation
        returning = Candidate("returning", (ctx + obs) * BS, ctx, obs, 0.0, 0.0)
        new = Candidate("new", rng.randint(1, 4 * BS), 0, rng.randint(1, 4), 0.0, 1.0)
        for free in (0, ctx + obs, 1000 * (ctx + obs)):
            view = CacheView(free, rng.randint(0, ctx), BS)
            assert [c.request_id for c in pol.order([new, returning], view, 0.0)] == ["returning", "new"]


def test_agentsched_wait_term_bounds_starvation():
    rng = random.Random(8)
    for _ in range(30):
        pol = AgentSched(c=rng.uniform(0.5, 10))
        long_tok = rng.randint(2000, 8000)
        short = Candidate("short", rng.randint(1, 200), 0, 13, 0.0, 10.0)
        view = CacheView(rng.randint(0, 2000), rng.randint(0, 100), BS)

        def long_at(w):
            return Candidate("long", long_tok, 0, math.ceil(long_tok / BS), w, 0.0 - w)

        # Wait does not enter the shadow price, so lambda is the same at every wait.
        lam, s0 = reference_agentsched([short, long_at(0.0)], view.free_blocks, view.evictable_blocks, BS,
                                       pol.a, pol.b, pol.c, pol.k, pol.lambda_max)
        t_star = (s0["short"] - s0["long"]) / pol.c  # the long job overtakes after this wait
        assert t_star > 0
        assert pol.order([short, long_at(t_star * 0.99)], view, 0.0)[0].request_id == "short"
        assert pol.order([short, long_at(t_star * 1.01)], view, 0.0)[0].request_id == "long"
        assert t_star <= pol.starvation_bound_s(math.ceil(long_tok / BS))


def test_agentsched_bound_holds_on_random_queues():
    rng = random.Random(9)
    for _ in range(30):
        pol = AgentSched(a=rng.uniform(0, 2), c=rng.uniform(0.1, 5))
        w = rand_candidates(rng, 20, waits=False)
        m = max(math.ceil(c.prompt_tokens / BS) for c in w)
        old = w[0]
        w[0] = Candidate(old.request_id, old.prompt_tokens, old.cached_blocks, old.need_blocks,
                         pol.starvation_bound_s(m) + 1e-6, old.arrival_s)
        view = CacheView(rng.randint(0, 3000), rng.randint(0, 300), BS)
        assert pol.order(w, view, 0.0)[0].request_id == old.request_id


def test_agentsched_capacity_edge_cases():
    pol = AgentSched()
    w = [Candidate("x", 100, 2, 5, 0.0, 0.0)]
    pol.order(w, CacheView(0, 0, BS), 0.0)  # U = 0: z infinite
    assert pol.last_z == math.inf and pol.last_lambda == pol.lambda_max
    pol.order([Candidate("y", 32, 2, 0, 0.0, 0.0)], CacheView(0, 0, BS), 0.0)  # D = 0: no pressure
    assert pol.last_z == 0.0
    # Evictable blocks count toward N only when asked.
    view = CacheView(10, 1000, BS)
    assert AgentSched(include_evictable=True).shadow_price(w, view)[0] == pytest.approx(5 / 1008)
    assert AgentSched(include_evictable=False).shadow_price(w, view)[0] == pytest.approx(5 / 8)
    assert pol.order([], view, 0.0) == []


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown admission policy"):
        make_policy("lifo")
    with pytest.raises(ValueError, match="bad options"):
        make_policy("fcfs", lambda_max=3)
    with pytest.raises(ValueError, match="lambda_max"):
        AgentSched(lambda_max=0)
    with pytest.raises(ValueError, match="finite"):
        AgentSched(a=float("nan"))
    with pytest.raises(ValueError, match="block_size"):
        CacheView(1, 0, 0)
    with pytest.raises(ValueError, match="need_blocks"):
        Candidate("r", 10, 0, -1, 0.0, 0.0)
    with pytest.raises(ValueError, match="fcfs_threshold"):
        LPM(fcfs_threshold=-1)
