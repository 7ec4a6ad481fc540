"""SPAgent: speculate the next action, execute it early, and skip or shortcut the real step.

Two phases per session:
- aggressive (early steps): sample k candidate actions without a thought (one call, n=k, short
  max_tokens, speculative=True), each followed by the model's own plausibility score 1-5. While
  the best score reaches `beta`, that action is executed and its observation taken; the reasoning
  call of the step is skipped.
- verified (after the first step whose best score is below `beta`): the normal thought+action
  call runs while candidates are sampled and executed in the background into the ActionBuffer;
  when the real action equals a speculated one, its outcome comes from the buffer.

The verified phase's guess continues an assistant "Action:" prefix (`continue_final_message`: this
project's server, vLLM and SGLang serve it; a backend that refuses it fails the guess, which costs
only the guess's own benefit).

`SpeculationPlanner` is the load-aware part: which sessions may speculate this round;
`SpeculationGate` applies it as sessions come and go (an agent's sessions share one).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import math
import re
from collections.abc import Callable, Sequence

from agentinfer_jax.agents.action_buffer import ActionBuffer
from agentinfer_jax.agents.action_server import ActionServer
from agentinfer_jax.agents.clients import Completion, LLMClient, Message
from agentinfer_jax.agents.react import Action, normalize_action_key, parse_step
from agentinfer_jax.agents.tools import ToolOutcome, ToolState, action_cache_key, reusable_in

CANDIDATE_INSTRUCTION = """\
Guess the next action directly, without a thought. Write one line `Action: Search[...]`,
`Action: Lookup[...]` or `Action: Finish[...]`, then one line `Plausibility: N` where N from 1
(a wild guess) to 5 (certainly the right next action) says how sure you are."""

# The verified phase executes every guess whatever its score, so its call is a forced start of the
# reply: the model continues "Action:" on the reasoning call's own prompt (no thought, no instruction
# to prefill; its prefix cache is the reasoning call's) and stops at the end of the line. SPAgent:
# speculative calls under about 10 tokens.
GUESS_PREFIX = "Action:"
_GUESS_STOP = ["\n"]

_SCORE = re.compile(r"(?:plausibility|score|confidence)\s*[:=]?\s*\(?\s*([1-5](?:\.\d+)?)", re.IGNORECASE)
_TRAILING_SCORE = re.compile(r"[\])]\s*[-:(|,]?\s*([1-5])\s*(?:/\s*5)?\s*\)?\s*$")


def parse_plausibility(text: object) -> float | None:
    """The 1-5 score written after a candidate action, or None when there is none (never raises)."""
    if not isinstance(text, str):
        return None
    m = _SCORE.search(text)
    if m is None:
        first_line = text.strip().splitlines()[0] if text.strip() else ""
        m = _TRAILING_SCORE.search(first_line)
    if m is None:
        return None
    return min(5.0, max(1.0, float(m.group(1))))


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A speculated action and its self-scored plausibility (0 when the model gave no score)."""

    action: Action
    score: float


class Phase(enum.Enum):
    AGGRESSIVE = "aggressive"
    VERIFIED = "verified"


@dataclasses.dataclass
class SpeculationMetrics:
    candidate_calls: int = 0
    candidates: int = 0
    unscored_candidates: int = 0
    unparsable_candidates: int = 0
    skipped_reasoning_calls: int = 0
    speculative_executions: int = 0
    buffer_hits: int = 0
    inflight_hits: int = 0  # not buffered yet, but its speculative execution was running: joined
    buffer_misses: int = 0
    speculation_errors: int = 0
    phase_switch_step: int | None = None
    speculative_tokens: int = 0
    gated_steps: int = 0  # verified steps whose guess the SpeculationGate refused


@dataclasses.dataclass(frozen=True)
class SpeculationConfig:
    k: int = 4
    beta: float = 3.0
    aggressive: bool = True
    verified: bool = True
    max_tokens: int = 24
    temperature: float = 1.0
    max_aggressive_steps: int | None = None

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not 1.0 <= self.beta <= 5.0:
            raise ValueError(f"beta must be in [1, 5], got {self.beta}")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")


class ActionSpeculator:
    """One session's SPAgent state: its phase, its background speculation tasks, its metrics.

    Invariant: background tasks only write successful outcomes to the buffer and never raise
    into the loop; `aclose` cancels the ones still running.
    """

    def __init__(
        self,
        client: LLMClient,
        server: ActionServer,
        buffer: ActionBuffer,
        session_id: str,
        config: SpeculationConfig = SpeculationConfig(),
    ) -> None:
        self._client, self._server, self._buffer = client, server, buffer
        self.session_id, self.config = session_id, config
        self.phase = Phase.AGGRESSIVE if config.aggressive else Phase.VERIFIED
        self.metrics = SpeculationMetrics()
        self._background: set[asyncio.Task[None]] = set()

    async def propose(self, messages: list[Message], role: str, priority: int = 0,
                      scored: bool = True) -> list[Candidate]:
        """k sampled candidate actions, de-duplicated by normalised key (max score kept), best first.
        `scored=False` (the verified phase) has the model continue an "Action:" reply on `messages`
        (every score 0)."""
        if scored:
            prompt = [*messages, {"role": "user", "content": CANDIDATE_INSTRUCTION}]
            extra: dict[str, object] = {"stop": ["\nObservation", "\nThought"]}
        else:
            prompt = [*messages, {"role": "assistant", "content": GUESS_PREFIX}]
            extra = {"stop": _GUESS_STOP, "continue_final_message": True}
        completion: Completion = await self._client.complete(
            prompt,
            role=role,
            max_tokens=self.config.max_tokens,
            temperature=self.config.temperature,
            n=self.config.k,
            session_id=self.session_id,
            priority=priority,
            speculative=True,
            **extra,
        )
        self.metrics.candidate_calls += 1
        self.metrics.speculative_tokens += completion.prompt_tokens + completion.completion_tokens
        best: dict[str, Candidate] = {}
        for text in completion.texts:
            step = parse_step(text if scored else GUESS_PREFIX + text)
            if step.action is None or step.action.kind == "finish" and not step.action.arg:
                self.metrics.unparsable_candidates += 1
                continue
            score = parse_plausibility(text) if scored else None
            self.metrics.candidates += 1
            self.metrics.unscored_candidates += scored and score is None
            candidate = Candidate(step.action, 0.0 if score is None else score)
            key = normalize_action_key(step.action)
            if key not in best or best[key].score < candidate.score:
                best[key] = candidate
        return sorted(best.values(), key=lambda c: -c.score)

    def passes(self, candidates: Sequence[Candidate]) -> Candidate | None:
        """The best candidate if it reaches beta; else None (and the session turns verified)."""
        if candidates and candidates[0].score >= self.config.beta:
            return candidates[0]
        return None

    def switch_to_verified(self, step_index: int) -> None:
        if self.phase is Phase.AGGRESSIVE:
            self.phase = Phase.VERIFIED
            self.metrics.phase_switch_step = step_index

    def launch(self, messages: list[Message], role: str, state: ToolState, candidates: Sequence[Candidate] | None = None) -> None:
        """Starts background speculation: sample candidates (unless given) and execute them into the buffer."""
        task = asyncio.create_task(self._speculate(messages, role, state, candidates))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _speculate(
        self, messages: list[Message], role: str, state: ToolState, candidates: Sequence[Candidate] | None
    ) -> None:
        try:
            if candidates is None:
                candidates = await self.propose(messages, role, scored=False)
            await asyncio.gather(*(self._execute_into_buffer(c.action, state) for c in candidates if c.action.kind != "finish"))
        except asyncio.CancelledError:
            raise
        except Exception:  # speculation is best effort: a failing call only loses its own benefit
            self.metrics.speculation_errors += 1

    async def _execute_into_buffer(self, action: Action, state: ToolState) -> None:
        key = action_cache_key(action, state)
        stored = self._buffer.peek(self.session_id, key)
        if stored is not None and reusable_in(stored, state):
            return
        self.metrics.speculative_executions += 1
        outcome = await self._server.execute(action, state, speculative=True)
        if not outcome.ok:
            self.metrics.speculation_errors += 1
        self._buffer.put(self.session_id, key, outcome)

    async def execute_real(self, action: Action, state: ToolState) -> tuple[ToolOutcome, bool]:
        """The real action's outcome and whether speculation served it: from the buffer, or by joining
        its still-running speculative execution (True); else executed now (False)."""
        key = action_cache_key(action, state)
        # an entry speculated in another browsing state may not carry over to this one (a search miss)
        cached = self._buffer.get(self.session_id, key, usable=lambda o: reusable_in(o, state))
        if cached is not None:
            self.metrics.buffer_hits += 1
            return cached, True
        outcome, joined = await self._server.execute_sharing(action, state)
        if joined:
            self.metrics.inflight_hits += 1
        else:
            self.metrics.buffer_misses += 1
        return outcome, joined

    async def aclose(self) -> None:
        tasks = list(self._background)
        for t in tasks:
            t.cancel()
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:  # emptied even when the wait is cancelled (cancelled tasks put nothing more)
            self._buffer.drop_session(self.session_id)


# ---------------------------------------------------------------------------------------------
# Load-aware selection of speculating sessions


@dataclasses.dataclass(frozen=True)
class SessionSpeculationInfo:
    """What the planner knows about one running session."""

    session_id: str
    hit_probability: float  # p: chance that one speculated action equals the real one
    mean_tool_time_s: float  # t_act


def hit_probability_prior(step_index: int, first_step: float = 0.73, later_steps: float = 0.11) -> float:
    """SPAgent's reported direct-guess hit rates: 73% at step 1, about 11% afterwards."""
    return first_step if step_index <= 1 else later_steps


class SpeculationPlanner:
    """Chooses which sessions speculate: greedy by benefit while the marginal gain stays positive.

    benefit(s) = [1 - (1 - p_s)^k] * t_act_s (expected tool time saved); `cost_model(n)` is the
    extra serving time when n sessions speculate (from a profiled model of mixed batches), with
    cost_model(0) = 0. With a convex cost (non-decreasing marginal cost) the greedy prefix is the
    optimal subset.
    """

    def __init__(self, cost_model: Callable[[int], float], k: int = 4) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self._cost, self.k = cost_model, k

    def benefit(self, info: SessionSpeculationInfo) -> float:
        p = min(1.0, max(0.0, info.hit_probability))
        return (1.0 - (1.0 - p) ** self.k) * max(0.0, info.mean_tool_time_s)

    def admits(self, info: SessionSpeculationInfo, speculating: int) -> bool:
        """Whether one more speculating session, `info`, gains more than its marginal cost when
        `speculating` sessions speculate already."""
        cost_next = self._cost(speculating + 1)
        return math.isfinite(cost_next) and self.benefit(info) - (cost_next - self._cost(speculating)) > 0

    def select(self, sessions: Sequence[SessionSpeculationInfo]) -> list[str]:
        """Session ids allowed to speculate, highest benefit first."""
        chosen: list[str] = []
        for info in sorted(sessions, key=lambda s: (-self.benefit(s), s.session_id)):
            if not self.admits(info, len(chosen)):
                break
            chosen.append(info.session_id)
        return chosen


class SpeculationGate:
    """SPAgent's choice of who speculates, online: a session asks before each verified-phase guess
    and leaves when its step ends; it is admitted while its benefit beats the marginal cost of one
    more speculating session (the planner's greedy step, taken in arrival order).

    A session's hit probability comes from its step index (`hit_probability`, SPAgent's reported
    rates by default) and t_act from the tools this gate has seen run (`default_tool_time_s`
    before the first). Invariant: `active` holds exactly the sessions admitted and not released;
    an admitted session is never revoked by a later arrival.
    """

    def __init__(self, planner: SpeculationPlanner,
                 hit_probability: Callable[[int], float] = hit_probability_prior,
                 default_tool_time_s: float = 1.0) -> None:
        if not default_tool_time_s >= 0:
            raise ValueError(f"default_tool_time_s must be >= 0, got {default_tool_time_s}")
        self._planner, self._p = planner, hit_probability
        self._default_s = default_tool_time_s
        self._tool_s, self._tools = 0.0, 0
        self.active: dict[str, SessionSpeculationInfo] = {}
        self.refused = 0

    @property
    def mean_tool_time_s(self) -> float:
        return self._tool_s / self._tools if self._tools else self._default_s

    def observe_tool(self, seconds: float) -> None:
        """One tool execution's duration (t_act's running mean)."""
        if seconds >= 0:
            self._tool_s += seconds
            self._tools += 1

    def admit(self, session_id: str, step_index: int) -> bool:
        """Whether `session_id` may speculate in its step `step_index` (it stays active until released)."""
        self.active.pop(session_id, None)
        info = SessionSpeculationInfo(session_id, self._p(step_index), self.mean_tool_time_s)
        if self._planner.admits(info, len(self.active)):
            self.active[session_id] = info
            return True
        self.refused += 1
        return False

    def release(self, session_id: str) -> None:
        self.active.pop(session_id, None)
