"""The agent orchestrator: an asyncio Think-Act-Observe loop with AgentCollab, AgentCompress and SPAgent.

One `ReActAgent` serves many sessions concurrently (`run` keeps all per-session state local);
sessions share its ActionServer (concurrency limit, de-duplication) and ActionBuffer. Each
technique is a feature flag. Nothing a model or tool does makes `run` raise: malformed output
becomes an "Invalid action" observation, tool failures and timeouts become "tool error"
observations, and a failing LLM backend ends the session with `metrics.error` set (as does an
LLM call past `AgentConfig.llm_timeout_s`, when set). A failing search-result filter leaves the
observation unfiltered (`metrics.filter_errors`). Every background task of a session is cancelled
before `run` returns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from agentinfer_jax.agents.action_buffer import ActionBuffer
from agentinfer_jax.agents.action_server import ActionServer
from agentinfer_jax.agents.clients import ClientError, Completion, LLMClient, TokenCounter, builtin_token_counter, count_message_tokens
from agentinfer_jax.agents.collab import PROGRESS_INSTRUCTION, CollabController, strip_progress
from agentinfer_jax.agents.compress import MemoryDistiller, SearchResultFilter
from agentinfer_jax.agents.react import (REACT_TOOLS, Action, StepRecord, action_from_tool_call, build_messages,
                                         build_tool_messages, cut_at_observation, parse_step)
from agentinfer_jax.agents.spagent import ActionSpeculator, Phase, SpeculationConfig, SpeculationGate
from agentinfer_jax.agents.tools import ToolEnvironment, ToolOutcome, ToolState, render_results

T = TypeVar("T")
INVALID_ACTION = "Invalid action: {error}. Valid actions are Search[entity], Lookup[keyword] and Finish[answer]."
INVALID_TOOL_CALL = "Invalid tool call: {error}. Call one of the tools search(entity), lookup(keyword), finish(answer)."


@dataclasses.dataclass(frozen=True)
class AgentFeatures:
    """Which techniques run; all off is a plain ReAct agent on the large model."""

    collab: bool = False
    filter_results: bool = False
    distill_memory: bool = False
    speculate: bool = False


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    max_steps: int = 8
    max_tokens: int = 256
    temperature: float = 0.0
    role: str = "large"  # the model when collab is off
    stop: tuple[str, ...] = ("\nObservation",)
    priority: int = 0
    native_tools: bool = False  # OpenAI tool calling (REACT_TOOLS) instead of Thought/Action text
    # bound on each LLM call the session waits for (reasoning, aggressive guesses, result filter);
    # None: the client's own (OpenAIClient has one, the in-process EngineClient has none)
    llm_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.max_tokens < 1:
            raise ValueError("max_steps and max_tokens must be >= 1")
        if self.llm_timeout_s is not None and not self.llm_timeout_s > 0:
            raise ValueError(f"llm_timeout_s must be > 0 or None, got {self.llm_timeout_s}")
        if self.role not in ("large", "small"):
            raise ValueError(f"role must be 'large' or 'small', got {self.role!r}")


@dataclasses.dataclass
class SessionMetrics:
    """Per-session accounting. Times are wall-clock seconds spent waiting on the critical path."""

    session_id: str
    steps: int = 0
    llm_calls: int = 0
    llm_time_s: float = 0.0
    tool_time_s: float = 0.0
    wall_s: float = 0.0
    prompt_tokens: dict[str, int] = dataclasses.field(default_factory=lambda: {"large": 0, "small": 0})
    completion_tokens: dict[str, int] = dataclasses.field(default_factory=lambda: {"large": 0, "small": 0})
    cached_tokens: int = 0
    parse_errors: int = 0
    tool_errors: int = 0
    filter_errors: int = 0  # search-result filter failures (the observation stayed unfiltered)
    buffer_hits: int = 0
    skipped_reasoning_calls: int = 0
    finished: bool = False
    answer: str | None = None
    error: str | None = None
    collab: dict[str, Any] | None = None
    compress: dict[str, Any] | None = None
    speculation: dict[str, Any] | None = None
    # (wait start, wait end, execution start, execution end) of each tool wait, perf_counter seconds
    tool_waits: list[tuple[float, float, float, float]] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class AgentResult:
    question: str
    answer: str | None
    steps: list[StepRecord]
    messages: list[dict[str, str]]
    metrics: SessionMetrics


class ReActAgent:
    """Runs ReAct sessions against an LLMClient and a tool environment."""

    _ids = itertools.count()

    def __init__(
        self,
        client: LLMClient,
        tools: ToolEnvironment,
        *,
        config: AgentConfig = AgentConfig(),
        features: AgentFeatures = AgentFeatures(),
        action_server: ActionServer | None = None,
        buffer: ActionBuffer | None = None,
        collab_factory: Callable[[], CollabController] = CollabController,
        result_filter: SearchResultFilter | None = None,
        distiller_factory: Callable[[str], MemoryDistiller] | None = None,
        speculation: SpeculationConfig = SpeculationConfig(),
        speculation_gate: SpeculationGate | None = None,
        instruction: str | None = None,
        token_counter: TokenCounter | None = None,
    ) -> None:
        """`speculation_gate`: SPAgent's choice of which sessions speculate, shared by this agent's
        sessions (None: every session guesses in every verified step)."""
        if config.native_tools and (features.collab or features.speculate):
            raise ValueError("native_tools runs without collab and speculate (they read Thought/Action text)")
        self.client, self.tools = client, tools
        self.config, self.features = config, features
        self.server = action_server or ActionServer(tools)
        self.buffer = buffer or ActionBuffer()
        self._collab_factory = collab_factory
        self._filter = result_filter or (SearchResultFilter() if features.filter_results else None)
        self._distiller_factory = distiller_factory or (
            lambda sid: MemoryDistiller(client, session_id=sid, token_counter=token_counter)
        )
        self._speculation = speculation
        self.speculation_gate = speculation_gate
        self._instruction = instruction
        self._extra = PROGRESS_INSTRUCTION if features.collab else ""
        self._count = token_counter

    async def run(self, question: str, *, session_id: str | None = None) -> AgentResult:
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty string")
        session = _Session(self, question, session_id or f"session-{next(self._ids)}")
        return await session.run()

    async def aclose(self) -> None:
        await self.server.aclose()


class _Session:
    """The state of one running session (owned by `ReActAgent.run`)."""

    def __init__(self, agent: ReActAgent, question: str, session_id: str) -> None:
        self.agent, self.question, self.id = agent, question, session_id
        features = agent.features
        self.cfg = agent.config
        self.metrics = SessionMetrics(session_id)
        self.steps: list[StepRecord] = []
        self.state = ToolState()
        self.collab = agent._collab_factory() if features.collab else None
        self.distiller = agent._distiller_factory(session_id) if features.distill_memory else None
        self.speculator = (
            ActionSpeculator(agent.client, agent.server, agent.buffer, session_id, agent._speculation)
            if features.speculate
            else None
        )

    def messages(self) -> list[dict[str, Any]]:
        if self.cfg.native_tools:
            return build_tool_messages(self.question, self.steps, instruction=self.agent._instruction,
                                       extra_instruction=self.agent._extra)
        return build_messages(self.question, self.steps, instruction=self.agent._instruction, extra_instruction=self.agent._extra)

    async def _timed(self, awaitable: Awaitable[T], kind: str) -> T:
        start = time.perf_counter()
        limit = self.cfg.llm_timeout_s if kind == "llm" else None
        try:
            async with asyncio.timeout(limit) as deadline:
                return await awaitable
        except TimeoutError as e:
            if deadline.expired():  # ours, not one the client raised
                raise ClientError(f"LLM call timed out after {limit:g}s") from e
            raise
        finally:
            elapsed = time.perf_counter() - start
            if kind == "llm":
                self.metrics.llm_time_s += elapsed
            else:
                self.metrics.tool_time_s += elapsed

    def _account(self, completion: Completion, role: str) -> None:
        self.metrics.llm_calls += 1
        self.metrics.prompt_tokens[role] += completion.prompt_tokens
        self.metrics.completion_tokens[role] += completion.completion_tokens
        self.metrics.cached_tokens += completion.cached_tokens

    async def run(self) -> AgentResult:
        start = time.perf_counter()
        try:
            for index in range(1, self.cfg.max_steps + 1):
                try:
                    if await self._step(index):
                        break
                finally:
                    if self.agent.speculation_gate is not None:
                        self.agent.speculation_gate.release(self.id)
        except Exception as e:  # a failing backend ends this session, never the serving loop
            self.metrics.error = f"{type(e).__name__}: {e}"
        finally:
            try:
                if self.speculator is not None:
                    await self.speculator.aclose()
            finally:  # also when a second cancellation interrupts the first close
                if self.distiller is not None:
                    await self.distiller.aclose()
                self.metrics.wall_s = time.perf_counter() - start
                self._collect()
        return AgentResult(self.question, self.metrics.answer, self.steps, self.messages(), self.metrics)

    def _collect(self) -> None:
        if self.collab is not None:
            self.metrics.collab = self.collab.metrics.as_dict()
        if self.distiller is not None:
            self.metrics.compress = dataclasses.asdict(self.distiller.metrics)
        if self.speculator is not None:
            self.metrics.speculation = {**dataclasses.asdict(self.speculator.metrics), "phase": self.speculator.phase.value}
            self.metrics.buffer_hits = self.speculator.metrics.buffer_hits
            self.metrics.skipped_reasoning_calls = self.speculator.metrics.skipped_reasoning_calls

    async def _step(self, index: int) -> bool:
        """One Think-Act-Observe round; True when the session is finished."""
        if self.distiller is not None:
            self.distiller.poll(self.steps)
        messages = self.messages()
        role = self.collab.role_for_next_step() if self.collab is not None else self.cfg.role
        self.metrics.steps += 1

        chosen = await self._aggressive(messages, role, index)
        if chosen is not None:
            action, response = chosen, f"Action {index}: {chosen}"
        else:
            tool_args = {"tools": REACT_TOOLS, "tool_choice": "auto"} if self.cfg.native_tools else {}
            completion = await self._timed(
                self.agent.client.complete(
                    messages,
                    role=role,
                    max_tokens=self.cfg.max_tokens,
                    stop=list(self.cfg.stop),
                    temperature=self.cfg.temperature,
                    session_id=self.id,
                    priority=self.cfg.priority,
                    **tool_args,
                ),
                "llm",
            )
            self._account(completion, role)
            if self.cfg.native_tools:
                return await self._tool_step(completion)
            raw = completion.text
            if self.collab is not None:
                self.collab.observe(role, raw, completion.prompt_tokens, completion.completion_tokens)
                raw = strip_progress(raw)
            response = cut_at_observation(raw)
            step = parse_step(response)
            if step.action is None:
                self.metrics.parse_errors += 1
                self.steps.append(StepRecord(response or "(no output)", INVALID_ACTION.format(error=step.error)))
                return False
            action = step.action

        if action.kind == "finish":
            self.metrics.finished, self.metrics.answer = True, action.arg
            self.steps.append(StepRecord(response, "Episode finished.", action))
            return True
        waited_s = time.perf_counter()
        outcome = await self._timed(self._execute(action), "tool")
        if outcome.finished_s:
            self.metrics.tool_waits.append((waited_s, time.perf_counter(), outcome.started_s, outcome.finished_s))
        await self._observe(response, action, outcome)
        return False

    async def _tool_step(self, completion: Completion) -> bool:
        """A native tool-calling step: the first tool call is the action (the rest wait for a later turn)."""
        response = completion.text.strip()
        call = completion.tool_calls[0] if completion.tool_calls else None
        action = action_from_tool_call(call) if call is not None else None
        if action is None:
            self.metrics.parse_errors += 1
            error = "no tool call" if call is None else f"cannot run {_describe_call(call)}"
            self.steps.append(StepRecord(response or "(no output)", INVALID_TOOL_CALL.format(error=error),
                                         tool_call=_replayable_call(call)))
            return False
        if action.kind == "finish":
            self.metrics.finished, self.metrics.answer = True, action.arg
            self.steps.append(StepRecord(response, "Episode finished.", action, tool_call=_replayable_call(call)))
            return True
        outcome = await self._timed(self._execute(action), "tool")
        await self._observe(response, action, outcome, tool_call=_replayable_call(call))
        return False

    async def _aggressive(self, messages: list[dict[str, str]], role: str, index: int) -> Action | None:
        """SPAgent: the action to take without a reasoning call, or None (then verified speculation starts)."""
        spec = self.speculator
        if spec is None:
            return None
        limit = spec.config.max_aggressive_steps
        if spec.phase is Phase.AGGRESSIVE and limit is not None and index > limit:
            spec.switch_to_verified(index)
        if spec.phase is Phase.VERIFIED:
            if spec.config.verified and self._may_speculate(index):
                spec.launch(messages, role, self.state)
            return None
        try:
            candidates = await self._timed(spec.propose(messages, role, self.cfg.priority), "llm")
        except Exception:
            spec.metrics.speculation_errors += 1
            candidates = []
        best = spec.passes(candidates)
        if best is not None:
            spec.metrics.skipped_reasoning_calls += 1
            return best.action
        spec.switch_to_verified(index)
        if spec.config.verified:
            spec.launch(messages, role, self.state, candidates)
        return None

    def _may_speculate(self, index: int) -> bool:
        gate = self.agent.speculation_gate
        if gate is None or gate.admit(self.id, index):
            return True
        self.speculator.metrics.gated_steps += 1
        return False

    async def _execute(self, action: Action) -> ToolOutcome:
        if self.speculator is not None:
            outcome, _ = await self.speculator.execute_real(action, self.state)
            gate = self.agent.speculation_gate
            if gate is not None and outcome.finished_s:
                gate.observe_tool(outcome.finished_s - outcome.started_s)
            return outcome
        return await self.agent.server.execute(action, self.state)

    async def _observe(self, response: str, action: Action, outcome: ToolOutcome,
                       tool_call: dict[str, Any] | None = None) -> None:
        observation = outcome.observation
        if not outcome.ok:
            self.metrics.tool_errors += 1
        else:
            self.state = outcome.state
            if self.agent._filter is not None and outcome.results:
                try:
                    kept = await self._timed(
                        self.agent._filter.filter(self.question, outcome.results, session_id=self.id), "llm"
                    )
                    observation = render_results(outcome.query, kept)
                except Exception:  # the filter is an optimisation: the tool's own observation stands
                    self.metrics.filter_errors += 1
        self.steps.append(StepRecord(response, observation, action, tool_call=tool_call))
        if self.distiller is not None:
            counter = self.agent._count or builtin_token_counter()
            self.distiller.maybe_start(self.question, self.steps, count_message_tokens(self.messages(), counter))


def _describe_call(call: object) -> str:
    """A model's unusable tool call, for its error observation (it may not even be a dict)."""
    if isinstance(call, dict):
        return json.dumps(call.get("function"), default=str)[:500]
    return f"{type(call).__name__} {call!r}"[:500]


def _replayable_call(call: object) -> dict[str, Any] | None:
    """The call as the history sends it back (assistant tool_calls + a tool message with its id), or
    None when it has no id to answer to: the step is then kept as plain text and a user note."""
    return call if isinstance(call, dict) and isinstance(call.get("id"), str) else None
