"""ReAct for multi-hop QA: the instruction, the chat messages of a session, and a forgiving parser.

A step is one model call that writes a thought and then one action:

    Thought 2: ...
    Action 2: Search[entity] | Lookup[keyword] | Finish[answer]

The parser never raises: whatever the model wrote, `parse_step` returns a `Step`, with `action=None`
and a message in `error` when no action could be read.

Native tool calling (OpenAI `tools`): the three actions are the functions `REACT_TOOLS`; a step's
action is the model's first tool call (`action_from_tool_call`), and the history is OpenAI
tool-calling messages (`build_tool_messages`: assistant `tool_calls`, then a role "tool" result).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
from collections.abc import Sequence
from typing import Any, Literal

ActionKind = Literal["search", "lookup", "finish"]
ACTION_KINDS: tuple[ActionKind, ...] = ("search", "lookup", "finish")

PROMPT_PATH = pathlib.Path(__file__).resolve().parent.parent / "assets" / "prompts" / "react_hotpotqa.txt"

DEFAULT_INSTRUCTION = """\
Answer a multi-hop question by interleaving Thought, Action and Observation steps.
A Thought reasons about what is known so far and what is still missing. An Action is exactly one of:
(1) Search[entity]: looks up the Wikipedia page titled entity and returns its first paragraph; if there
    is no such page, it returns similar titles you can search instead.
(2) Lookup[keyword]: returns the next sentence containing keyword on the page from the last Search.
(3) Finish[answer]: returns the answer (a short phrase, a name, a date or yes/no) and ends the task.
Write one Thought line and then one Action line per step, numbered, and stop after the Action; the
Observation is given to you.

Example:
Question: Which magazine was started first, Arthur's Magazine or First for Women?
Thought 1: I need to search Arthur's Magazine and First for Women and find which was started first.
Action 1: Search[Arthur's Magazine]
Observation 1: Arthur's Magazine (1844-1846) was an American literary periodical published in Philadelphia.
Thought 2: Arthur's Magazine was started in 1844. I need to search First for Women next.
Action 2: Search[First for Women]
Observation 2: First for Women is a woman's magazine published by Bauer Media Group in the USA. The magazine was started in 1989.
Thought 3: First for Women was started in 1989, after 1844, so Arthur's Magazine was started first.
Action 3: Finish[Arthur's Magazine]"""


@functools.cache
def react_instruction() -> str:
    """The shared instruction file when another module ships it, else the default above."""
    if PROMPT_PATH.is_file():
        text = PROMPT_PATH.read_text(encoding="utf-8").strip()
        if text:
            return text
    return DEFAULT_INSTRUCTION


@dataclasses.dataclass(frozen=True)
class Action:
    """One tool action; `kind` is lower-case, `arg` is stripped of brackets and outer whitespace."""

    kind: ActionKind
    arg: str

    def __post_init__(self) -> None:
        if self.kind not in ACTION_KINDS:
            raise ValueError(f"unknown action kind {self.kind!r}; expected one of {ACTION_KINDS}")

    def __str__(self) -> str:
        return f"{self.kind.capitalize()}[{self.arg}]"


@dataclasses.dataclass(frozen=True)
class Step:
    """A parsed model response. Invariant: exactly one of `action` and `error` is None."""

    thought: str
    action: Action | None
    raw: str
    error: str | None = None


def normalize_text(text: str) -> str:
    """Case-folded, underscores as spaces, whitespace collapsed, outer quotes and dots removed."""
    text = text.replace("_", " ").casefold()
    text = re.sub(r"\s+", " ", text).strip()
    return text.strip(" \"'`.,;:!?")


def normalize_action_key(action: Action) -> str:
    """A key under which two spellings of the same action compare equal ("Search[ Foo_Bar ]" == "search[foo bar]")."""
    return f"{action.kind}:{normalize_text(action.arg)}"


_KINDS = "|".join(ACTION_KINDS)
# "Action 2:", "action:", "**Action 3**:" - the label that opens the action part of a response.
_ACTION_LABEL = re.compile(r"\**\s*action\s*\d*\s*\**\s*[:：]", re.IGNORECASE)
_THOUGHT_LABEL = re.compile(r"^\s*\**\s*thought\s*\d*\s*\**\s*[:：]\s*", re.IGNORECASE)
# Kind[arg] or Kind(arg); a missing closing bracket lets the arg run to the end of the line.
_BRACKETED = re.compile(rf"\b({_KINDS})\s*(?:\[([^\]\n]*)\]?|\(([^)\n]*)\)?)", re.IGNORECASE)
# Kind: arg / Kind arg, only trusted at the start of an Action line.
_BARE = re.compile(rf"^\s*({_KINDS})\b\s*[:\-]?\s*(.*)$", re.IGNORECASE)
_OBSERVATION = re.compile(r"\n\s*observation\s*\d*\s*[:：]", re.IGNORECASE)


def _clean_arg(arg: str) -> str:
    return re.sub(r"\s+", " ", arg).strip().strip("\"'`").strip()


def _bracketed_action(match: re.Match[str]) -> Action:
    arg = match.group(2) if match.group(2) is not None else match.group(3)
    return Action(match.group(1).lower(), _clean_arg(arg or ""))  # type: ignore[arg-type]


def _strip_thought_label(text: str) -> str:
    return _THOUGHT_LABEL.sub("", text.strip()).strip()


def parse_step(text: object) -> Step:
    """Reads the thought and the first action out of a model response; never raises.

    With an "Action n:" label the action is read after it (bracketed, or bare "Search Foo" on that
    line); without one, the first bracketed action anywhere counts and the text before it is the
    thought. Text after a hallucinated "Observation" line is ignored.
    """
    raw = text if isinstance(text, str) else ("" if text is None else str(text))
    body = _OBSERVATION.split(raw, maxsplit=1)[0]
    action: Action | None = None
    label = _ACTION_LABEL.search(body)
    if label is not None:
        thought = _strip_thought_label(body[: label.start()])
        tail = body[label.end():]
        lines = tail.strip().splitlines()
        first_line = lines[0] if lines else ""
        bare = _BARE.match(first_line)
        on_line = _BRACKETED.match(first_line.strip())
        anywhere = _BRACKETED.search(tail)
        if on_line is not None:
            action = _bracketed_action(on_line)
        elif bare is not None:
            action = Action(bare.group(1).lower(), _clean_arg(bare.group(2)))  # type: ignore[arg-type]
        elif anywhere is not None:
            action = _bracketed_action(anywhere)
    else:
        bracketed = _BRACKETED.search(body)
        if bracketed is not None:
            thought = _strip_thought_label(body[: bracketed.start()])
            action = _bracketed_action(bracketed)
        else:
            thought = _strip_thought_label(body)

    if action is None:
        return Step(thought, None, raw, "no action found; expected Search[...], Lookup[...] or Finish[...]")
    if not action.arg and action.kind != "finish":
        return Step(thought, None, raw, f"{action.kind} needs a non-empty argument")
    return Step(thought, action, raw, None)


def cut_at_observation(text: str) -> str:
    """The response up to a hallucinated "Observation" line (what the history should keep)."""
    return _OBSERVATION.split(text, maxsplit=1)[0].strip()


def format_step(index: int, thought: str, action: Action) -> str:
    """The canonical text of a step, as the prompt's examples write it."""
    return f"Thought {index}: {thought}\nAction {index}: {action}" if thought else f"Action {index}: {action}"


@dataclasses.dataclass
class StepRecord:
    """One closed Think-Act-Observe round of a session, as it appears in the next prompt."""

    response: str
    observation: str
    action: Action | None = None
    compressed: bool = False
    tool_call: dict[str, Any] | None = None  # native tool calling: the call that ran (OpenAI shape)


def build_messages(
    question: str,
    steps: Sequence[StepRecord],
    *,
    instruction: str | None = None,
    extra_instruction: str = "",
) -> list[dict[str, str]]:
    """Chat messages for the next model call: instruction, question, then one (assistant, user) pair per step."""
    system = instruction if instruction is not None else react_instruction()
    if extra_instruction:
        system = f"{system}\n\n{extra_instruction}"
    messages = [{"role": "system", "content": system}, {"role": "user", "content": f"Question: {question}"}]
    for i, step in enumerate(steps, start=1):
        messages.append({"role": "assistant", "content": step.response})
        messages.append({"role": "user", "content": f"Observation {i}: {step.observation}"})
    return messages


# ---- native tool calling ------------------------------------------------------------------------

_ARG_NAMES: dict[str, str] = {"search": "entity", "lookup": "keyword", "finish": "answer"}


def _function(name: str, description: str, arg: str, arg_description: str) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": {arg: {"type": "string", "description": arg_description}},
                       "required": [arg], "additionalProperties": False}}}


REACT_TOOLS: list[dict[str, Any]] = [
    _function("search", "Look up the Wikipedia page titled `entity` and return its first paragraph; "
              "without such a page, similar titles to search instead.", "entity", "a page title"),
    _function("lookup", "Return the next sentence containing `keyword` on the page of the last search.",
              "keyword", "a word or phrase"),
    _function("finish", "Give the answer (a short phrase, a name, a date or yes/no) and end the task.",
              "answer", "the answer"),
]

TOOL_INSTRUCTION = """\
Answer a multi-hop question by calling the tools: search Wikipedia pages, look up keywords on the
page you searched last, and call finish with the answer (a short phrase, a name, a date or yes/no)
once you know it. Think briefly before each call; call one tool per turn."""


def action_from_tool_call(call: Any) -> Action | None:
    """The Action of an OpenAI tool call ({"function": {"name", "arguments"}}), or None when the
    name is not one of the actions or the arguments do not carry its string argument."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or fn.get("name") not in _ARG_NAMES:
        return None
    try:
        args = json.loads(fn.get("arguments") or "{}")
    except (TypeError, json.JSONDecodeError):
        return None
    arg = args.get(_ARG_NAMES[fn["name"]]) if isinstance(args, dict) else None
    if not isinstance(arg, str) or (not arg.strip() and fn["name"] != "finish"):
        return None
    return Action(fn["name"], _clean_arg(arg))


def tool_call_for(action: Action, call_id: str) -> dict[str, Any]:
    """The OpenAI tool call that performs `action` (what a model's call looks like in the history)."""
    args = json.dumps({_ARG_NAMES[action.kind]: action.arg}, ensure_ascii=False)
    return {"id": call_id, "type": "function", "function": {"name": action.kind, "arguments": args}}


def build_tool_messages(
    question: str,
    steps: Sequence[StepRecord],
    *,
    instruction: str | None = None,
    extra_instruction: str = "",
) -> list[dict[str, Any]]:
    """Chat messages for the next native tool-calling call: instruction, question, then per step the
    assistant's tool call and the tool's result (a step without a call: its text and a user note)."""
    system = instruction if instruction is not None else TOOL_INSTRUCTION
    if extra_instruction:
        system = f"{system}\n\n{extra_instruction}"
    messages: list[dict[str, Any]] = [{"role": "system", "content": system},
                                      {"role": "user", "content": f"Question: {question}"}]
    for step in steps:
        if step.tool_call is None:
            messages.append({"role": "assistant", "content": step.response})
            messages.append({"role": "user", "content": step.observation})
            continue
        messages.append({"role": "assistant", "content": step.response or None, "tool_calls": [step.tool_call]})
        messages.append({"role": "tool", "tool_call_id": step.tool_call["id"], "content": step.observation})
    return messages
