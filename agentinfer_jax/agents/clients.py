"""LLM clients behind one protocol: an OpenAI-compatible endpoint, trace replay, and a scripted fake.

Every backend answers `complete(messages, role=..., ...) -> Completion`. `role` picks the model
("large" or "small", for AgentCollab); `session_id` and `priority` are hints for a serving engine's
prefix cache and scheduler; `speculative=True` marks SPAgent's short candidate-sampling calls;
`continue_final_message=True` makes the last message an assistant prefix the model goes on writing
(the reply's text is the continuation only, as vLLM returns it).

Native tool calling: `OpenAIClient` and `ScriptedClient` also take OpenAI `tools` (and
`tool_choice`); the Completion then carries the model's `tool_calls` (OpenAI's wire shape), and
messages may be OpenAI tool-calling messages (assistant `tool_calls`, role "tool" results).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import pathlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from agentinfer_jax.serving.tool_parsers import HermesToolParser, parse_all

Message = dict[str, Any]
ToolCall = dict[str, Any]  # {"id", "type": "function", "function": {"name", "arguments": JSON text}}
ROLES = ("large", "small")
TOKENIZER_PATH = pathlib.Path(__file__).resolve().parent.parent / "assets" / "tokenizer.json"


@dataclasses.dataclass(frozen=True)
class Completion:
    """The n sampled texts of one call and its accounting (tokens as the backend counted them)."""

    texts: list[str]
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    cached_tokens: int = 0
    model: str = ""
    tool_calls: tuple[ToolCall, ...] = ()  # of the first choice, when tools were offered

    @property
    def text(self) -> str:
        return self.texts[0] if self.texts else ""


@runtime_checkable
class LLMClient(Protocol):
    async def complete(
        self,
        messages: list[Message],
        *,
        role: str = "large",
        max_tokens: int = 256,
        stop: list[str] | None = None,
        temperature: float = 0.0,
        n: int = 1,
        session_id: str | None = None,
        priority: int = 0,
        speculative: bool = False,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        continue_final_message: bool = False,
    ) -> Completion: ...


class ClientError(RuntimeError):
    """A backend failed to answer (network, server error, replay script exhausted)."""


def validate_request(messages: Any, role: str, max_tokens: int, n: int, temperature: float,
                     continue_final_message: bool = False) -> None:
    """Raises ValueError naming the first bad argument of a `complete` call."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} dicts")
    if continue_final_message and not (isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant"
                                       and isinstance(messages[-1].get("content"), str) and messages[-1]["content"]):
        raise ValueError("continue_final_message needs a last assistant message with non-empty content")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] is not a {{role: str, content: str}} dict")
        tool_turn = m["role"] == "assistant" and m.get("tool_calls") and m.get("content") is None
        if not isinstance(m.get("content"), str) and not tool_turn:
            raise ValueError(f"messages[{i}] is not a {{role: str, content: str}} dict (nor an assistant tool call)")
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")


TokenCounter = Callable[[str], int]


@functools.cache
def builtin_token_counter() -> TokenCounter:
    """Counts tokens with the bundled byte-level BPE (no special tokens)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(TOKENIZER_PATH))
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


def count_message_tokens(messages: Sequence[Message], counter: TokenCounter) -> int:
    """Prompt length: the contents plus ChatML's 5 framing tokens per message (<|im_start|>role\\n...<|im_end|>\\n)."""
    return sum(counter(m["content"]) + 5 for m in messages)


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible endpoint


class OpenAIClient:
    """Any OpenAI-compatible chat endpoint (vLLM, SGLang, this project's server) via `openai.AsyncOpenAI`.

    `session_id`, `priority` (and `speculative` when set) travel as extra body fields, which this
    project's server reads and other servers ignore or reject per their own rules.
    """

    def __init__(
        self,
        base_url: str,
        models: Mapping[str, str] | str,
        *,
        api_key: str = "EMPTY",
        timeout_s: float = 120.0,
        http_client: Any = None,
    ) -> None:
        from openai import AsyncOpenAI  # optional dependency: imported only when this backend is used

        self.models = {r: models for r in ROLES} if isinstance(models, str) else dict(models)
        missing = [r for r in ROLES if r not in self.models]
        if missing:
            raise ValueError(f"OpenAIClient needs a model name for roles {missing}")
        self._client = AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, http_client=http_client)

    async def complete(
        self,
        messages: list[Message],
        *,
        role: str = "large",
        max_tokens: int = 256,
        stop: list[str] | None = None,
        temperature: float = 0.0,
        n: int = 1,
        session_id: str | None = None,
        priority: int = 0,
        speculative: bool = False,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        continue_final_message: bool = False,
    ) -> Completion:
        validate_request(messages, role, max_tokens, n, temperature, continue_final_message)
        import openai

        extra: dict[str, Any] = {"priority": priority}
        if session_id is not None:
            extra["session_id"] = session_id
        if speculative:
            extra["speculative"] = True
        if continue_final_message:  # vLLM's and SGLang's fields; they need both
            extra.update(continue_final_message=True, add_generation_prompt=False)
        if tools:
            extra_args: dict[str, Any] = {"tools": tools}
            if tool_choice is not None:
                extra_args["tool_choice"] = tool_choice
        else:
            extra_args = {}
        start = time.perf_counter()
        try:
            response = await self._client.chat.completions.create(
                model=self.models[role],
                messages=messages,  # type: ignore[arg-type]
                max_tokens=max_tokens,
                stop=stop or None,
                temperature=temperature,
                n=n,
                extra_body=extra,
                **extra_args,
            )
        except openai.OpenAIError as e:
            raise ClientError(f"{self.models[role]}: {e}") from e
        latency = time.perf_counter() - start
        usage = response.usage
        details = getattr(usage, "prompt_tokens_details", None) if usage else None
        choices = sorted(response.choices, key=lambda c: c.index)
        calls = tuple(c.model_dump(include={"id", "type", "function"}) for c in (choices[0].message.tool_calls or ())
                      ) if choices else ()
        return Completion(
            tool_calls=calls,
            texts=[c.message.content or "" for c in choices],
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            latency_s=latency,
            cached_tokens=(getattr(details, "cached_tokens", 0) or 0) if details else 0,
            model=response.model or self.models[role],
        )

    async def close(self) -> None:
        await self._client.close()


# ---------------------------------------------------------------------------------------------
# Latency model shared by the offline backends


@dataclasses.dataclass(frozen=True)
class LatencyModel:
    """latency = base_s + prefill_s_per_token * uncached prompt tokens + decode_s_per_token * output tokens.

    With `sleep=False` the latency is only reported (virtual time), so replays run instantly.
    """

    base_s: float = 0.0
    prefill_s_per_token: float = 0.0
    decode_s_per_token: float = 0.0
    sleep: bool = True

    def __post_init__(self) -> None:
        if min(self.base_s, self.prefill_s_per_token, self.decode_s_per_token) < 0:
            raise ValueError("LatencyModel coefficients must be >= 0")

    def latency(self, prompt_tokens: int, completion_tokens: int) -> float:
        return self.base_s + self.prefill_s_per_token * prompt_tokens + self.decode_s_per_token * completion_tokens


# ---------------------------------------------------------------------------------------------
# Trace replay


class ReplayClient:
    """Returns each session's recorded responses in order, with a latency model: lossless replay.

    `scripts` maps session_id -> the recorded assistant responses of that session (e.g. from
    `Trajectory.assistant_turns()`); calls without a session_id use the script under key None.
    Speculative calls (SPAgent) are not part of a recording: they get `speculative_text` and do
    not advance the script. The role changes the reported model name only.
    """

    def __init__(
        self,
        scripts: Mapping[str | None, Sequence[str]],
        *,
        latency: LatencyModel = LatencyModel(sleep=False),
        token_counter: TokenCounter | None = None,
        speculative_text: str = "",
    ) -> None:
        self._scripts = {k: list(v) for k, v in scripts.items()}
        self._cursor: dict[str | None, int] = collections.defaultdict(int)
        self._latency = latency
        self._count = token_counter or builtin_token_counter()
        self._speculative_text = speculative_text

    @classmethod
    def from_trajectories(cls, trajectories: Iterable[Any], **kwargs: Any) -> ReplayClient:
        """One script per `Trajectory`, keyed by its id."""
        return cls({t.id: [resp for _, resp in t.assistant_turns()] for t in trajectories}, **kwargs)

    def remaining(self, session_id: str | None = None) -> int:
        return len(self._scripts.get(session_id, ())) - self._cursor[session_id]

    async def complete(
        self,
        messages: list[Message],
        *,
        role: str = "large",
        max_tokens: int = 256,
        stop: list[str] | None = None,
        temperature: float = 0.0,
        n: int = 1,
        session_id: str | None = None,
        priority: int = 0,
        speculative: bool = False,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        continue_final_message: bool = False,
    ) -> Completion:
        validate_request(messages, role, max_tokens, n, temperature, continue_final_message)
        if speculative:
            text = self._speculative_text
        else:
            script = self._scripts.get(session_id)
            if script is None:
                raise ClientError(f"no recorded script for session {session_id!r}")
            i = self._cursor[session_id]
            if i >= len(script):
                raise ClientError(f"session {session_id!r}: recorded script exhausted after {len(script)} responses")
            self._cursor[session_id] = i + 1
            text = script[i]
        prompt_tokens = count_message_tokens(messages, self._count)
        completion_tokens = self._count(text) * n
        latency = self._latency.latency(prompt_tokens, completion_tokens)
        if self._latency.sleep and latency > 0:
            await asyncio.sleep(latency)
        calls: tuple[ToolCall, ...] = ()
        if tools and tool_choice != "none":  # a recorded tool-calling reply: its <tool_call> blocks
            content, parsed = parse_all(HermesToolParser([t["function"]["name"] for t in tools]), text)
            text = content or ""
            calls = tuple({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                          for c in parsed)
        return Completion([text] * n, prompt_tokens, completion_tokens, latency, 0, f"replay-{role}", calls)


# ---------------------------------------------------------------------------------------------
# Scripted fake for tests


@dataclasses.dataclass(frozen=True)
class RecordedCall:
    """The arguments of one `complete` call, as ScriptedClient saw them."""

    messages: list[Message]
    role: str
    max_tokens: int
    stop: list[str] | None
    temperature: float
    n: int
    session_id: str | None
    priority: int
    speculative: bool
    tools: list[dict[str, Any]] | None = None
    continue_final_message: bool = False  # the last message is an assistant prefix being continued

    @property
    def channel(self) -> str:
        """The queue this call draws from: "speculative" for speculative calls, else its role."""
        return "speculative" if self.speculative else self.role


ScriptItem = str | Sequence[str] | Completion | BaseException
Responder = Callable[[RecordedCall], ScriptItem]


class ScriptedClient:
    """Answers from queued outputs and records every call (for tests).

    `script` is one queue for all calls, or a mapping channel -> queue with channels "large",
    "small" and "speculative" (see RecordedCall.channel). An item is a text (repeated n times), a
    list of n texts, a ready Completion (with `tool_calls` for native tool calling), or an
    exception to raise. `responder` (a function of the
    call) is used instead when given. `latency_s` (a number or a function of the call) is slept.
    """

    def __init__(
        self,
        script: Iterable[ScriptItem] | Mapping[str, Iterable[ScriptItem]] | None = None,
        *,
        responder: Responder | None = None,
        latency_s: float | Callable[[RecordedCall], float] = 0.0,
        token_counter: TokenCounter | None = None,
    ) -> None:
        if script is None and responder is None:
            raise ValueError("ScriptedClient needs a script or a responder")
        if isinstance(script, Mapping):
            self._queues = {k: collections.deque(v) for k, v in script.items()}
        else:
            self._queues = {"*": collections.deque(script or ())}
        self._responder = responder
        self._latency = latency_s
        self._count = token_counter or (lambda text: len(text.split()))
        self.calls: list[RecordedCall] = []

    def calls_on(self, channel: str) -> list[RecordedCall]:
        return [c for c in self.calls if c.channel == channel]

    def _next_item(self, call: RecordedCall) -> ScriptItem:
        if self._responder is not None:
            return self._responder(call)
        queue = self._queues.get(call.channel, self._queues.get("*"))
        if not queue:
            raise ClientError(f"ScriptedClient: no scripted output left for channel {call.channel!r}")
        return queue.popleft()

    async def complete(
        self,
        messages: list[Message],
        *,
        role: str = "large",
        max_tokens: int = 256,
        stop: list[str] | None = None,
        temperature: float = 0.0,
        n: int = 1,
        session_id: str | None = None,
        priority: int = 0,
        speculative: bool = False,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        continue_final_message: bool = False,
    ) -> Completion:
        validate_request(messages, role, max_tokens, n, temperature, continue_final_message)
        call = RecordedCall(
            [dict(m) for m in messages], role, max_tokens, stop, temperature, n, session_id, priority, speculative,
            tools, continue_final_message,
        )
        self.calls.append(call)
        item = self._next_item(call)
        latency = self._latency(call) if callable(self._latency) else self._latency
        if latency > 0:
            await asyncio.sleep(latency)
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, Completion):
            return item
        texts = [item] * n if isinstance(item, str) else list(item)
        prompt_tokens = count_message_tokens(messages, self._count)
        completion_tokens = sum(self._count(t) for t in texts)
        return Completion(texts, prompt_tokens, completion_tokens, latency, 0, f"scripted-{role}")
