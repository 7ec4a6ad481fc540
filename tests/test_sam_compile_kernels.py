"""compile_kernels must leave nothing for a real AgentSAM workload to compile: a numba kernel that
compiles inside a measured round or a first request costs seconds (the demo's warm-up relies on it)."""

from __future__ import annotations

import random

from numba.core.registry import CPUDispatcher

from agentinfer_jax.speculation import calibrator, sam_drafter, session_memory, suffix_automaton
from agentinfer_jax.speculation.sam_drafter import SAMDrafter, compile_kernels
from agentinfer_jax.speculation.session_memory import SessionMemory


def _signatures() -> dict[str, int]:
    out = {}
    for mod in (calibrator, sam_drafter, session_memory, suffix_automaton):
        for name, obj in vars(mod).items():
            if isinstance(obj, CPUDispatcher):
                out[f"{mod.__name__}.{name}"] = len(obj.signatures)
    return out


def test_compile_kernels_covers_what_a_session_workload_uses():
    compile_kernels()
    before = _signatures()
    # Helpers that only other kernels call compile inside them and keep no signature of their own.
    assert sum(before.values()) >= 10, before
    rng = random.Random(5)
    memory = SessionMemory(top_k=4)
    try:
        for i in range(6):
            memory.add(f"past-{i}", [rng.randrange(5, 300) for _ in range(rng.randrange(50, 900))])
        drafter = SAMDrafter(memory)
        text = [rng.randrange(5, 300) for _ in range(400)]
        for r in range(3):
            rid = f"r{r}"
            drafter.begin(rid, text, session_id="s")
            drafter.wait_for_memory(rid)
            for _ in range(30):
                drafts = drafter.propose(rid, rng.choice([1, 4, 8, 16]))
                accepted = drafts[:rng.randrange(0, len(drafts) + 1)] + [rng.randrange(5, 300)]
                drafter.extend(rid, accepted)
                text += accepted
            drafter.end(rid)
            memory.flush()
    finally:
        memory.close()
    assert _signatures() == before
