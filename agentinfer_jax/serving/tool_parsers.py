"""Model output -> OpenAI `tool_calls`, incrementally, for the formats chat templates teach.

- `hermes` (Qwen2.5 / Qwen3, Hermes): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
  blocks anywhere in the text; the text outside them is the message content.
- `llama3_json` (Llama 3.x): the whole reply is `{"name": ..., "parameters": {...}}` (or several
  joined by ";"), optionally after `<|python_tag|>`; any other reply is content.
- `tool_choice` named / required (`NamedToolParser`, `RequiredToolParser`), as vLLM does them:
  the reply is the named function's arguments, or a JSON list of {"name", "parameters"}. A grammar
  constrains those replies (`tool_choice_json_schema` is the schema); without one the reply may
  not parse, and then it is returned as content.

Every parser is fed the text's deltas (`feed(delta) -> [ToolDelta]`, `finish() -> [ToolDelta]`)
and emits content deltas and tool-call deltas that are never retracted: a tool call goes out only
once its block is complete and parses (first its id and name, then its arguments), and text that
may still become a tool call is held back. The non-streaming result is the same parser fed the
whole text at once (`parse_all`), so streamed deltas always concatenate to it.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["ToolCallOut", "ToolDelta", "ToolParser", "HermesToolParser", "Llama3JsonToolParser",
           "NamedToolParser", "RequiredToolParser", "TOOL_PARSERS", "detect_tool_parser", "format_hermes_reply", "parse_all",
           "tool_choice_json_schema"]


@dataclasses.dataclass(frozen=True)
class ToolCallOut:
    """One parsed call: `arguments` is a JSON text (as OpenAI sends it)."""

    id: str
    name: str
    arguments: str


@dataclasses.dataclass(frozen=True)
class ToolDelta:
    """One piece of output: content text, or (index, id/name on a call's first delta, arguments)."""

    content: str | None = None
    index: int | None = None
    id: str | None = None
    name: str | None = None
    arguments: str | None = None

    def openai(self) -> dict[str, Any]:
        """The `delta.tool_calls[i]` object of a chat.completion.chunk."""
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out.update(id=self.id, type="function")
        fn: dict[str, Any] = {}
        if self.name is not None:
            fn["name"] = self.name
        if self.arguments is not None:
            fn["arguments"] = self.arguments
        out["function"] = fn
        return out


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ToolParser:
    """Base: holds the calls emitted so far; subclasses implement `feed` and `finish`."""

    def __init__(self, tool_names: Sequence[str] = (), *, parallel: bool = True) -> None:
        self.tool_names = frozenset(tool_names)
        self.parallel = parallel
        self.calls: list[ToolCallOut] = []

    def feed(self, delta: str) -> list[ToolDelta]:
        raise NotImplementedError

    def finish(self) -> list[ToolDelta]:
        raise NotImplementedError

    def _call(self, name: str, arguments: str) -> list[ToolDelta]:
        """The deltas of one new call (none past the first when parallel calls are off)."""
        if self.calls and not self.parallel:
            return []
        call = ToolCallOut(new_call_id(), name, arguments)
        self.calls.append(call)
        i = len(self.calls) - 1
        return [ToolDelta(index=i, id=call.id, name=name, arguments=""), ToolDelta(index=i, arguments=arguments)]

    def _valid_call(self, obj: Any, args_key: str) -> tuple[str, str] | None:
        """(name, arguments JSON) when `obj` is {"name": <known tool>, args_key: {...}}."""
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        if self.tool_names and obj["name"] not in self.tool_names:
            return None
        args = obj.get(args_key, {})
        if not isinstance(args, dict):
            return None
        return obj["name"], json.dumps(args, ensure_ascii=False)


class HermesToolParser(ToolParser):
    """Whitespace around a call block is layout (the template puts a newline before each block), not
    content: trailing whitespace is held back until more text follows, and dropped before a valid
    block and at the end of a reply that made calls."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, tool_names: Sequence[str] = (), *, parallel: bool = True) -> None:
        super().__init__(tool_names, parallel=parallel)
        self._buf = ""  # text not yet emitted
        self._inside = False  # _buf starts with an open block
        self._ws = ""  # held-back trailing whitespace of the content
        self._block_ws = ""  # the whitespace before the open block (content again if the block is not a call)

    def feed(self, delta: str) -> list[ToolDelta]:
        self._buf += delta
        return self._drain(final=False)

    def finish(self) -> list[ToolDelta]:
        out = self._drain(final=True)
        if self._inside:  # an unclosed <tool_call> block: it was text after all
            self._inside = False
            out += self._content(self._block_ws + self._buf, final=True)
            self._buf = ""
        return out

    def _content(self, text: str, final: bool) -> list[ToolDelta]:
        text, self._ws = self._ws + text, ""
        if final:
            if self.calls and not text.strip():
                return []
            return [ToolDelta(content=text)] if text else []
        body = text.rstrip()
        self._ws = text[len(body):]
        return [ToolDelta(content=body)] if body else []

    def _drain(self, final: bool) -> list[ToolDelta]:
        out: list[ToolDelta] = []
        while True:
            if not self._inside:
                at = self._buf.find(self.OPEN)
                if at < 0:
                    keep = 0 if final else _partial_suffix(self._buf, self.OPEN)
                    text, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                    out += self._content(text, final)
                    return out
                out += self._content(self._buf[:at], False)
                self._block_ws, self._ws = self._ws, ""
                self._buf, self._inside = self._buf[at:], True
            end = self._buf.find(self.CLOSE)
            if end < 0:
                return out  # wait for the block to close (finish() turns an unclosed one into text)
            block = self._buf[:end + len(self.CLOSE)]
            self._buf, self._inside = self._buf[len(block):], False
            call = self._parse_block(block[len(self.OPEN):-len(self.CLOSE)])
            if call is None:
                out += self._content(self._block_ws + block, False)
            else:
                out += self._call(*call)
            self._block_ws = ""

    def _parse_block(self, body: str) -> tuple[str, str] | None:
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            return None
        return self._valid_call(obj, "arguments")


class Llama3JsonToolParser(ToolParser):
    PYTHON_TAG = "<|python_tag|>"

    def __init__(self, tool_names: Sequence[str] = (), *, parallel: bool = True) -> None:
        super().__init__(tool_names, parallel=parallel)
        self._buf = ""
        self._mode: str | None = None  # None: undecided, "content" or "json"

    def feed(self, delta: str) -> list[ToolDelta]:
        if self._mode == "content":
            return [ToolDelta(content=delta)] if delta else []
        self._buf += delta
        head = self._buf.lstrip()
        if not head or (self.PYTHON_TAG.startswith(head) and len(head) < len(self.PYTHON_TAG)):
            return []  # cannot tell yet
        if head.startswith("{") or head.startswith(self.PYTHON_TAG):
            self._mode = "json"
            return []  # a call is only known once the reply ends
        self._mode = "content"
        text, self._buf = self._buf, ""
        return [ToolDelta(content=text)]

    def finish(self) -> list[ToolDelta]:
        text, self._buf = self._buf, ""
        if self._mode == "content" or not text:
            return [ToolDelta(content=text)] if text else []
        body = text.strip()
        if body.startswith(self.PYTHON_TAG):
            body = body[len(self.PYTHON_TAG):]
        calls = self._parse_calls(body)
        if calls is None:
            return [ToolDelta(content=text)]
        out: list[ToolDelta] = []
        for name, args in calls:
            out += self._call(name, args)
        return out

    def _parse_calls(self, body: str) -> list[tuple[str, str]] | None:
        decoder, pos, calls = json.JSONDecoder(), 0, []
        while True:
            while pos < len(body) and body[pos].isspace():
                pos += 1
            try:
                obj, pos = decoder.raw_decode(body, pos)
            except json.JSONDecodeError:
                return None
            key = "parameters" if isinstance(obj, dict) and "parameters" in obj else "arguments"
            call = self._valid_call(obj, key)
            if call is None:
                return None
            calls.append(call)
            rest = body[pos:].lstrip()
            if not rest:
                return calls
            if not rest.startswith(";"):
                return None
            pos = len(body) - len(rest) + 1


class NamedToolParser(ToolParser):
    """tool_choice {"type": "function", "function": {"name": N}}: the reply is N's arguments."""

    def __init__(self, name: str) -> None:
        super().__init__((name,))
        self.name = name
        self._text = ""

    def feed(self, delta: str) -> list[ToolDelta]:
        out = []
        if not self.calls:
            self.calls.append(ToolCallOut(new_call_id(), self.name, ""))
            out.append(ToolDelta(index=0, id=self.calls[0].id, name=self.name, arguments=""))
        self._text += delta
        if delta:
            out.append(ToolDelta(index=0, arguments=delta))
        return out

    def finish(self) -> list[ToolDelta]:
        out = self.feed("") if not self.calls else []
        self.calls[0] = dataclasses.replace(self.calls[0], arguments=self._text)
        return out


class RequiredToolParser(ToolParser):
    """tool_choice "required": the reply is a JSON list of {"name", "parameters"} (emitted at the end)."""

    def __init__(self, tool_names: Sequence[str] = (), *, parallel: bool = True) -> None:
        super().__init__(tool_names, parallel=parallel)
        self._text = ""

    def feed(self, delta: str) -> list[ToolDelta]:
        self._text += delta
        return []

    def finish(self) -> list[ToolDelta]:
        try:
            items = json.loads(self._text)
        except json.JSONDecodeError:
            items = None
        calls = [self._valid_call(x, "parameters") for x in items] if isinstance(items, list) and items else [None]
        if any(c is None for c in calls):
            return [ToolDelta(content=self._text)] if self._text else []
        out: list[ToolDelta] = []
        for name, args in calls:  # type: ignore[misc]
            out += self._call(name, args)
        return out


TOOL_PARSERS = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}


def detect_tool_parser(chat_template: str | None) -> str | None:
    """The parser a chat template's tool format calls for (None: it teaches no known format)."""
    if not chat_template:
        return None
    if "<tool_call>" in chat_template:
        return "hermes"
    if "ipython" in chat_template or '"parameters"' in chat_template:
        return "llama3_json"
    return None


def format_hermes_reply(content: str | None, calls: Sequence[tuple[str, str | Mapping[str, Any]]]) -> str:
    """The reply text that `HermesToolParser` reads back as (content, calls), laid out as the
    Qwen2.5 template writes an assistant turn: content, then one `<tool_call>` block per call."""
    parts = [content] if content else []
    for name, args in calls:
        args_json = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        parts.append(f'<tool_call>\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {args_json}}}'
                     "\n</tool_call>")
    return "\n".join(parts)


def parse_all(parser: ToolParser, text: str) -> tuple[str | None, list[ToolCallOut]]:
    """(content or None, calls) of a whole reply: the streamed deltas, joined."""
    deltas = parser.feed(text) + parser.finish()
    content = "".join(d.content for d in deltas if d.content is not None)
    return (content if content or not parser.calls else None), list(parser.calls)


def tool_choice_json_schema(tools: Sequence[Mapping[str, Any]], tool_choice: Any,
                            parallel: bool = True) -> dict[str, Any] | None:
    """The JSON schema a grammar must hold the reply to for `tool_choice` named or required
    (None for auto / none). Named: the function's parameters. Required: a non-empty list of
    {"name": one of the tools, "parameters": its parameters} (one item without parallel calls)."""
    def params(t: Mapping[str, Any]) -> dict[str, Any]:
        return dict(t["function"].get("parameters") or {"type": "object", "properties": {}})

    if isinstance(tool_choice, Mapping):
        name = tool_choice["function"]["name"]
        return next(params(t) for t in tools if t["function"]["name"] == name)
    if tool_choice != "required":
        return None
    items = {"anyOf": [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                         "parameters": params(t)},
                        "required": ["name", "parameters"], "additionalProperties": False} for t in tools]}
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": items}
    if not parallel:
        schema["maxItems"] = 1
    return schema

