"""Agent sessions from recorded traces: the LLM calls an agent makes, their prompts and tool steps.

A `Trajectory` (see `traces.py`) is a chat transcript; each assistant message is one model call.
`session_from_trajectory` turns it into an `AgentSession` of `LLMCall`s: call i's prompt is the
instruction (for traces recorded without one) plus every message before the i-th assistant turn, its
response is the recorded assistant text, and the tool step that follows is parsed from the response's
`Action:` line, with the recorded observation message after it.

Invariant (message level): call i+1's prompt = call i's prompt + [assistant response i] + the
messages recorded between the two turns (the observation). `tokenize_session` keeps it at the token
level: call i+1's prompt ids start with call i's prompt ids + response ids, exactly, so a prefix
cache sees real agent prefix reuse.

Also here: Poisson session arrivals and a seeded tool-latency distribution for simulations.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import re
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np

from agentinfer_jax.workloads.traces import Message, Trajectory

__all__ = ["LLMCall", "AgentSession", "TokenizedCall", "TokenizedSession", "load_prompt", "parse_action",
           "needs_instruction", "session_from_trajectory", "sessions_from_traces", "tokenize_session",
           "poisson_arrivals", "ToolLatency", "PrefixInstabilityError"]

_ASSETS = pathlib.Path(__file__).resolve().parents[1] / "assets"
_ACTION_LINE = re.compile(r"^\s*Action(?:\s*\d+)?\s*:\s*(.+?)\s*$", re.MULTILINE)
# A trace carries its own instruction when its first message names the ReAct action format.
_INSTRUCTION_HINT = re.compile(r"(search|finish)\[(entity|answer)\]", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class LLMCall:
    """One model call of an agent session, as recorded."""

    messages: tuple[Message, ...]  # the prompt, as chat messages
    response: str  # the recorded assistant text
    tool_action: str | None  # e.g. "Search[Paris]", parsed from the response's last Action line
    observation: str | None  # the message recorded after the response (the tool's result), if any
    tool_latency_s: float | None = None  # recorded tool time, where the trace has one

    @property
    def is_final(self) -> bool:
        """The call that answers (Finish[...]) or that no tool step follows."""
        return self.tool_action is None or self.tool_action.lower().startswith("finish[")


@dataclasses.dataclass(frozen=True)
class AgentSession:
    """An agent's sequence of LLM calls; `calls[i + 1]` extends `calls[i]`'s prompt."""

    session_id: str
    calls: list[LLMCall]
    source: str = ""

    @property
    def num_calls(self) -> int:
        return len(self.calls)


@dataclasses.dataclass(frozen=True)
class TokenizedCall:
    """Token view of one call: the chat-template prompt (ending in the generation prompt) and the
    tokens the model produces (the response, then the end-of-turn token)."""

    prompt_ids: list[int]
    response_ids: list[int]


@dataclasses.dataclass(frozen=True)
class TokenizedSession:
    session_id: str
    calls: list[TokenizedCall]


class PrefixInstabilityError(ValueError):
    """The chat template or tokenizer would make a later prompt not extend the earlier one."""


@functools.cache
def load_prompt(name: str = "react_hotpotqa") -> str:
    """A bundled prompt from assets/prompts/<name>.txt (the ReAct instruction + few-shot examples)."""
    path = _ASSETS / "prompts" / f"{name}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"no bundled prompt {name!r} (looked for {path})")
    return path.read_text().strip()


def parse_action(response: str) -> str | None:
    """The action of a ReAct response: its last `Action[ n]: ...` line, stripped; None if it has none."""
    found = _ACTION_LINE.findall(response)
    return found[-1] if found else None


def needs_instruction(traj: Trajectory) -> bool:
    """True for traces recorded without a system prompt or ReAct instruction (FireAct's fine-tuned
    models saw only the question); False when the first message is a system prompt or already
    describes the action format (e.g. the speculative-action runs)."""
    first = traj.messages[0]
    return first["role"] != "system" and not _INSTRUCTION_HINT.search(first["content"])


def session_from_trajectory(traj: Trajectory, *, add_instruction: bool = True,
                            instruction: str | None = None) -> AgentSession:
    """Builds the session of `traj`'s assistant turns.

    With `add_instruction` (default), traces that `needs_instruction` get a system message holding
    `instruction` (default: the bundled ReAct HotpotQA instruction and two examples) in front of every
    prompt; False replays the trace exactly as recorded.
    """
    prefix: tuple[Message, ...] = ()
    if add_instruction and needs_instruction(traj):
        prefix = ({"role": "system", "content": instruction if instruction is not None else load_prompt()},)
    tool_times = traj.meta.get("tool_times_s") or []
    msgs = traj.messages
    calls = []
    for turn, i in enumerate(j for j, m in enumerate(msgs) if m["role"] == "assistant"):
        response = msgs[i]["content"]
        nxt = msgs[i + 1] if i + 1 < len(msgs) else None
        observation = nxt["content"] if nxt is not None and nxt["role"] == "user" else None
        latency = float(tool_times[turn]) if turn < len(tool_times) else None
        calls.append(LLMCall(prefix + msgs[:i], response, parse_action(response), observation, latency))
    if not calls:
        raise ValueError(f"trajectory {traj.id!r} has no assistant turn, so no LLM call")
    return AgentSession(traj.id, calls, traj.source)


def sessions_from_traces(trajs: Iterable[Trajectory], **kwargs: Any) -> list[AgentSession]:
    """`session_from_trajectory` over many traces, skipping those without any assistant turn."""
    return [session_from_trajectory(t, **kwargs) for t in trajs if any(m["role"] == "assistant" for m in t.messages)]


# --- token-level view -----------------------------------------------------------------------------


class TextEncoder(Protocol):
    """HF `tokenizers.Tokenizer`, a transformers tokenizer or the project tokenizer: has `encode`."""

    def encode(self, text: str, *args: Any, **kwargs: Any) -> Any: ...


def _encode(tokenizer: TextEncoder, text: str) -> list[int]:
    try:
        out = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:  # an encoder without that option adds nothing of its own
        out = tokenizer.encode(text)
    return list(getattr(out, "ids", out))


@functools.cache
def _default_template_config() -> dict[str, Any]:
    return json.loads((_ASSETS / "tokenizer_config.json").read_text())


@functools.cache
def _compile_template(source: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg: str) -> None:
        raise ValueError(f"chat template: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def tokenize_session(session: AgentSession, tokenizer: TextEncoder, *, chat_template: str | None = None,
                     end_of_turn: str | None = None, template_vars: dict[str, Any] | None = None
                     ) -> TokenizedSession:
    """Token ids of every call, built so that consecutive calls share prefixes exactly.

    The chat template (default: the bundled ChatML template) renders each prompt with the generation
    prompt. Each call's ids are the previous call's prompt ids + response ids + the ids of the text
    the template adds after them (end of turn, observation, next generation prompt). Those pieces are
    separated by special tokens, so for byte-level BPE tokenizers the result also equals encoding the
    whole rendered prompt (tests check this on the bundled traces).

    Raises PrefixInstabilityError when the template re-renders earlier turns differently (e.g. one
    that strips old thoughts) or the response does not tokenize on its own as inside the prompt.
    """
    cfg = _default_template_config()
    template = _compile_template(chat_template if chat_template is not None else cfg["chat_template"])
    eot = end_of_turn if end_of_turn is not None else cfg["eos_token"]
    eot_ids = _encode(tokenizer, eot)
    if len(eot_ids) != 1:
        raise ValueError(f"end-of-turn text {eot!r} is not a single token for this tokenizer: {eot_ids}")
    tvars = {"bos_token": cfg.get("bos_token", ""), "eos_token": eot, **(template_vars or {})}

    def render(msgs: Sequence[Message], gen: bool) -> str:
        return template.render(messages=list(msgs), add_generation_prompt=gen, **tvars)

    ids: list[int] = []
    text = ""
    calls = []
    for n, call in enumerate(session.calls):
        prompt_text = render(call.messages, True)
        if not prompt_text.startswith(text):
            raise PrefixInstabilityError(f"session {session.session_id!r} call {n}: the prompt does not extend "
                                         "the previous call's prompt + response (template not prefix-stable)")
        ids += _encode(tokenizer, prompt_text[len(text):])
        prompt_ids = list(ids)
        done_text = render([*call.messages, {"role": "assistant", "content": call.response}], False)
        if not done_text.startswith(prompt_text) or not done_text[len(prompt_text):].startswith(call.response):
            raise PrefixInstabilityError(f"session {session.session_id!r} call {n}: the template does not "
                                         "render the response right after the generation prompt")
        response_ids = _encode(tokenizer, call.response) + eot_ids
        tail = _encode(tokenizer, done_text[len(prompt_text):])
        if tail[: len(response_ids)] != response_ids:
            raise PrefixInstabilityError(f"session {session.session_id!r} call {n}: the response and end of turn "
                                         "tokenize differently inside the rendered conversation")
        ids += tail
        text = done_text
        calls.append(TokenizedCall(prompt_ids, response_ids))
    return TokenizedSession(session.session_id, calls)


# --- arrivals and tool latency ---------------------------------------------------------------------


def poisson_arrivals(n: int, rate: float, seed: int = 0, start_s: float = 0.0) -> np.ndarray:
    """Arrival times (seconds, increasing) of `n` sessions of a Poisson process of `rate` per second:
    exponential inter-arrival gaps of mean 1 / rate, the first one after `start_s`."""
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a positive finite number of arrivals per second, got {rate!r}")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=int(n))
    return start_s + np.cumsum(gaps)


class ToolLatency:
    """Seeded tool-call latency distribution, in seconds.

    kinds: 'lognormal' (mean `mean_s`, log-space std `sigma`; heavy right tail like web search),
    'exponential' (mean `mean_s`), 'constant' (always `mean_s`), 'empirical' (resamples `samples`,
    e.g. the recorded `tool_times_s` of the speculative-action traces; `mean_s` is then ignored).
    Draws advance one private generator, so the sequence is fixed by `seed`.
    """

    KINDS = ("lognormal", "exponential", "constant", "empirical")

    def __init__(self, kind: str = "lognormal", mean_s: float = 1.5, *, sigma: float = 0.5, seed: int = 0,
                 samples: Sequence[float] | None = None) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown tool latency kind {kind!r}; choose one of {', '.join(self.KINDS)}")
        if not (math.isfinite(mean_s) and mean_s >= 0):
            raise ValueError(f"mean_s must be a finite number >= 0, got {mean_s!r}")
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
        self.kind, self.mean_s, self.sigma, self.seed = kind, float(mean_s), float(sigma), seed
        self._samples = np.asarray(samples if samples is not None else [], dtype=np.float64)
        if kind == "empirical":
            if self._samples.size == 0 or not np.all(np.isfinite(self._samples)) or np.any(self._samples < 0):
                raise ValueError("empirical tool latency needs a non-empty list of finite samples >= 0")
        elif kind != "constant" and mean_s == 0:
            raise ValueError(f"{kind} tool latency needs mean_s > 0")
        self._rng = np.random.default_rng(seed)

    @property
    def mean(self) -> float:
        """The distribution's mean (seconds)."""
        return float(self._samples.mean()) if self.kind == "empirical" else self.mean_s

    def sample_n(self, n: int) -> np.ndarray:
        """`n` latencies (seconds)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if self.kind == "constant":
            return np.full(n, self.mean_s)
        if self.kind == "exponential":
            return self._rng.exponential(self.mean_s, size=n)
        if self.kind == "empirical":
            return self._rng.choice(self._samples, size=n, replace=True)
        # lognormal: E[exp(N(mu, s^2))] = exp(mu + s^2 / 2) = mean_s.
        mu = math.log(self.mean_s) - 0.5 * self.sigma**2
        return self._rng.lognormal(mu, self.sigma, size=n)

    def sample(self) -> float:
        """One latency (seconds)."""
        return float(self.sample_n(1)[0])

    def __repr__(self) -> str:
        return f"ToolLatency(kind={self.kind!r}, mean_s={self.mean:.4g}, sigma={self.sigma}, seed={self.seed})"
