"""Trace replay of agent sessions: what each LLM call and tool call of a recorded session returns.

In replay the model's forward passes and the KV cache are real, but every emitted token is forced
to the recorded response (`Request.forced_output`, applied by the scheduler's update), tools
return the recorded observations after the recorded (simulated) latency, and AgentCollab's
PROGRESS signal is derived from the trace. Every configuration of the stack therefore sees the
same text, and a lossless technique must leave every output token unchanged.

- `record_session`: a trajectory -> `RecordedSession` (responses, actions, observations, tool
  latencies, next-action guess hits drawn from `HitRates`);
- `TraceReplay`: the EngineClient's replay oracle (the text each call must emit);
- `TraceTool`: the session's recorded tool; `TraceProgressController`: trace-derived PROGRESS;
- `derive_hit_rates`: the bundled hit-rate table from speculative-action's logs.

Layering: workloads sit above agents (this module uses the agent's parser, tools and controller).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import pathlib
import random
import re
from typing import Any

from agentinfer_jax.agents.clients import RecordedCall
from agentinfer_jax.agents.collab import CollabController
from agentinfer_jax.agents.react import Action, normalize_action_key, parse_step
from agentinfer_jax.agents.tools import SearchResult, ToolLatency, ToolOutcome, ToolState
from agentinfer_jax.workloads.traces import Trajectory

__all__ = ["HIT_RATES_PATH", "derive_hit_rates", "HitRates", "RecordedSession", "record_session", "TraceTool",
           "TraceReplay", "TraceProgressController"]

HIT_RATES_PATH = pathlib.Path(__file__).resolve().parents[1] / "assets" / "data" / "speculative_action_hit_rates.json"

# ---------------------------------------------------------------------------------------------
# Real next-action guess hit rates


_GUESS = re.compile(r"\b(Search|Lookup|Finish)\[([^\]\n]*)\]?", re.IGNORECASE)


def derive_hit_rates(run_metrics: pathlib.Path) -> dict[str, Any]:
    """Per (action type, step) hit counts of the top-1 guesses in speculative-action's logs.

    A step hits when the normalised action of the NORMAL trajectory is among the actions the
    guess model wrote in the SIMULATION trajectory of that step. Steps >= 4 are pooled as "4".
    """
    counts: dict[str, dict[str, list[int]]] = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0]))
    logs = sorted(run_metrics.glob("agent_*_top1/trajs_*/*/log.txt"))
    for log in logs:
        parts = re.split(r"\n\s*STEP: (\d+)\s*\n", log.read_text(errors="replace"))
        for step, body in zip(parts[1::2], parts[2::2]):
            if "SIMULATION TRAJECTORY" not in body or "NORMAL TRAJECTORY" not in body:
                continue
            normal, sim = body.split("SIMULATION TRAJECTORY", 1)
            normal_lines = [ln for ln in normal.split("NORMAL TRAJECTORY", 1)[1].splitlines() if re.match(r"\s*Action \d+:", ln)]
            sim_lines = [ln for ln in sim.splitlines() if re.match(r"\s*Action \d+:", ln)]
            true = _GUESS.search(normal_lines[0]) if normal_lines else None
            if true is None or not sim_lines:
                continue
            key = normalize_action_key(Action(true.group(1).lower(), true.group(2)))
            guesses = {normalize_action_key(Action(g.group(1).lower(), g.group(2))) for ln in sim_lines for g in _GUESS.finditer(ln)}
            c = counts[true.group(1).lower()][str(min(int(step), 4))]
            c[0] += key in guesses
            c[1] += 1
    return {
        "what": "next-action guess hit counts [hits, total] per action type and step (4 = step >= 4), top-1 guesses",
        "source": "naimengye/speculative-action, hotpotqa/run_metrics/agent_*_top1/*/*/log.txt (via ../shared/data)",
        "licence": "Apache-2.0, see LICENSE-speculative-action beside this file",
        "num_logs": len(logs),
        "counts": {kind: dict(sorted(v.items())) for kind, v in sorted(counts.items())},
    }


class HitRates:
    """P(guess == true action) by action type and step; pooled over steps when a cell has < min_total samples."""

    def __init__(self, table: dict[str, Any], min_total: int = 5) -> None:
        self._counts = table["counts"]
        self._min = min_total

    @classmethod
    def bundled(cls) -> HitRates:
        return cls(json.loads(HIT_RATES_PATH.read_text()))

    def probability(self, kind: str, step: int) -> float:
        cells = self._counts.get(kind, {})
        hits, total = cells.get(str(min(max(step, 1), 4)), (0, 0))
        if total < self._min:
            hits, total = (sum(c[i] for c in cells.values()) for i in (0, 1))
        if total < self._min:
            hits = sum(c[0] for cs in self._counts.values() for c in cs.values())
            total = sum(c[1] for cs in self._counts.values() for c in cs.values())
        return hits / total if total else 0.0


# ---------------------------------------------------------------------------------------------
# One recorded session: responses, actions, observations, tool latencies, guesses


_OBS_LABEL = re.compile(r"^\s*observation\s*\d*\s*:\s*", re.IGNORECASE)
_SIMILAR = re.compile(r"Similar:\s*\[(.*)\]", re.DOTALL)
_FAILURE = re.compile(r"could ?n[o']t find|cannot find|can't find|not find|unable to find|no (?:relevant )?information"
                      r"|does not (?:provide|mention|say)|doesn't (?:provide|mention|say)|not found|no results", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class RecordedSession:
    """A trajectory as the replay needs it. Invariant: len(actions) == len(responses)."""

    session_id: str
    question: str
    responses: tuple[str, ...]
    actions: tuple[Action | None, ...]
    observations: tuple[str, ...]
    tool_latencies: tuple[float, ...]
    guess_hits: tuple[bool, ...]  # per step: does the speculative guess equal the true action?

    @property
    def answer(self) -> str | None:
        last = self.actions[-1]
        return last.arg if last is not None and last.kind == "finish" else None


def record_session(traj: Trajectory, latency: ToolLatency, hit_rates: HitRates, rng: random.Random) -> RecordedSession | None:
    """None for trajectories the agent loop cannot replay step for step (an unparsable turn)."""
    turns = list(traj.assistant_turns())
    if not turns or traj.messages[0]["role"] != "user":
        return None
    responses, actions, observations = [], [], []
    msgs = traj.messages
    assistant_at = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    for i in assistant_at:
        step = parse_step(msgs[i]["content"])
        if step.action is None:
            return None
        responses.append(msgs[i]["content"])
        actions.append(step.action)
        nxt = msgs[i + 1] if i + 1 < len(msgs) and msgs[i + 1]["role"] == "user" else None
        observations.append(_OBS_LABEL.sub("", nxt["content"], count=1) if nxt else "")
    if actions[-1].kind != "finish" or any(a.kind == "finish" for a in actions[:-1]):
        return None  # the loop ends at the first Finish: only complete, single-answer sessions replay exactly
    hits = tuple(rng.random() < hit_rates.probability(a.kind, n) for n, a in enumerate(actions, start=1))
    question = re.sub(r"^\s*question\s*:\s*", "", msgs[0]["content"], flags=re.IGNORECASE).strip()
    return RecordedSession(traj.id, question, tuple(responses), tuple(actions), tuple(observations),
                           tuple(latency() for _ in actions), hits)


class TraceTool:
    """A session's recorded tool: the recorded observation of step i for its recorded action.

    The step index travels in ToolState.cursor (one past the last executed step), so a
    speculative execution and the real one of the same step agree, and Lookup keys differ per
    step. A different action (a wrong guess) gets a "Could not find" observation. Every call
    sleeps the step's recorded latency. Search misses carry their "Similar" titles as results
    (for AgentCompress's filter).
    """

    def __init__(self, session: RecordedSession, corpus: dict[str, list[str]] | None = None) -> None:
        self.session = session
        self._corpus = corpus or {}
        self.invocations = 0

    async def run(self, action: Action, state: ToolState) -> ToolOutcome:
        self.invocations += 1
        s = self.session
        step = min(state.cursor, len(s.actions) - 1)
        delay = s.tool_latencies[step]
        await asyncio.sleep(delay)
        after = ToolState(page=f"step-{step + 1}", cursor=step + 1)
        if action.kind == "finish":
            return ToolOutcome("Episode finished.", state, done=True, answer=action.arg, latency_s=delay)
        recorded = s.actions[step]
        if recorded is None or normalize_action_key(action) != normalize_action_key(recorded):
            return ToolOutcome(f"Could not find {action.arg}.", after, latency_s=delay)
        observation = s.observations[step]
        return ToolOutcome(observation, after, latency_s=delay, results=self._results(observation),
                           query=action.arg)

    def _results(self, observation: str) -> tuple[SearchResult, ...]:
        m = _SIMILAR.search(observation)
        if m is None:
            return ()
        titles = [t.strip().strip("'\"") for t in m.group(1).split(",") if t.strip().strip("'\"")]
        return tuple(SearchResult(t, " ".join(self._corpus.get(t, []))[:200]) for t in titles)


class TraceReplay:
    """The ReplayOracle: which text each LLM call must emit.

    - A reasoning call of session s at step i (i = assistant turns in its prompt) emits the
      recorded response i.
    - A speculative call emits the true next action when the step's guess hit (drawn once per
      session from the real hit rates, so every config sees the same guesses), else a wrong one.
    - Anything else (no recorded session) is generated freely.
    """

    def __init__(self, sessions: dict[str, RecordedSession]) -> None:
        self.sessions = sessions

    def __call__(self, call: RecordedCall) -> list[str] | None:
        s = self.sessions.get(call.session_id or "")
        if s is None:
            return None
        # A continued assistant prefix (SPAgent's guess) is the reply being written, not a past turn.
        step = sum(m["role"] == "assistant" for m in call.messages) - call.continue_final_message
        if step >= len(s.responses):
            return None
        if not call.speculative:
            return [s.responses[step]] * call.n
        true = s.actions[step]
        guess = true if s.guess_hits[step] and true is not None else Action("search", f"{s.question[:40]} (guess)")
        if call.continue_final_message:  # the verified phase's guess: the rest of an "Action:" line
            return [f" {guess}\n"] * call.n
        return [f"Action: {guess}\nPlausibility: 4"] * call.n


class TraceProgressController(CollabController):
    """AgentCollab's controller with the PROGRESS signal derived from the trace (replay mode).

    A random-weight model cannot judge progress, and the recorded responses carry no PROGRESS
    block. The signal is FALSE when the step's action repeats an earlier action of the session
    or its thought reports a failure of the previous step ("could not find", "no information",
    ...), TRUE otherwise; it is written into the response as the block the model would write.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._seen: set[str] = set()

    def observe(self, role: str, response: str, prompt_tokens: int = 0, completion_tokens: int = 0):
        step = parse_step(response)
        key = normalize_action_key(step.action) if step.action is not None else None
        progress = key not in self._seen and not _FAILURE.search(step.thought)
        if key is not None:
            self._seen.add(key)
        block = f"\n===PROGRESS===\n<reason>trace-derived</reason>\n<value>{str(progress).upper()}</value>\n===END_PROGRESS==="
        return super().observe(role, response + block, prompt_tokens, completion_tokens)
