"""Tokenizer: a HF `tokenizer.json` plus the chat template of `tokenizer_config.json`.

Chat templates are rendered with jinja2 (sandboxed) in the environment transformers'
`apply_chat_template` sets up (its `tojson` filter, `raise_exception`, `strftime_now`, loop
controls), with the same inputs: messages without None-valued keys, `tools` as JSON schemas, and
the special tokens. A model's own template therefore produces the prompt it was trained on,
tool definitions and tool-call history included.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

ASSETS_DIR = pathlib.Path(__file__).parent / "assets"
Message = Mapping[str, Any]


class TokenizerError(ValueError):
    """A tokenizer file is missing or malformed, or a chat template cannot be rendered."""


def _token_content(value: Any) -> str | None:
    """Special tokens in tokenizer_config.json are strings or AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Text <-> token ids, special-token ids and chat formatting.

    Invariant: every special token named in the config exists in the vocabulary.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, config: Mapping[str, Any]):
        self._tok = tokenizer
        self.config = dict(config)
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))
        self.pad_token = _token_content(config.get("pad_token"))
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.bos_id = self._special_id(self.bos_token, "bos_token")
        self.pad_id = self._special_id(self.pad_token, "pad_token")
        eos_id = self._special_id(self.eos_token, "eos_token")
        self.eos_token_ids: tuple[int, ...] = () if eos_id is None else (eos_id,)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            template = next((t["template"] for t in template if t.get("name") == "default"),
                            None)
        self.chat_template: str | None = template
        self._template: jinja2.Template | None = None
        if template is not None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
            env.filters["tojson"] = _tojson  # jinja's own escapes HTML and sorts keys
            env.globals["raise_exception"] = _raise_template_error
            env.globals["strftime_now"] = _strftime_now
            try:
                self._template = env.from_string(template)
            except jinja2.TemplateSyntaxError as e:
                raise TokenizerError(f"malformed chat_template: {e}") from e

    def _special_id(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{field} {token!r} is not in the vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text are recognised."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        add_bos = self.add_bos_token if add_bos is None else add_bos
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        bad = [i for i in ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise ValueError(f"token ids outside [0, {self.vocab_size}): {bad[:5]}")
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template reads `tools` at all (else tool definitions would be dropped)."""
        return self.chat_template is not None and "tools" in self.chat_template

    def apply_chat_template(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, Any]] | None = None, continue_final_message: bool = False,
                            **kwargs: Any) -> str:
        """The prompt text for `messages` ([{role, content}, ...]; assistant messages may carry
        `tool_calls` instead of content, role "tool" messages a `tool_call_id`) and the `tools`
        JSON schemas ([{"type": "function", "function": {...}}, ...]).

        `continue_final_message`: the last message is an assistant turn the model goes on writing (a
        forced prefix, as vLLM's flag of that name): the text ends at its content, with no end of turn
        and no generation prompt."""
        if self._template is None:
            raise TokenizerError("this tokenizer has no chat_template")
        if continue_final_message:
            return self._continue_final(messages, tools, **kwargs)
        chat = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or "role" not in m or ("content" not in m and "tool_calls" not in m):
                raise ValueError(f"message {i} must be a mapping with 'role' and 'content' (or 'tool_calls')")
            chat.append(_template_message(m))
        specials = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                      ("pad_token", self.pad_token)) if v is not None}
        try:
            return self._template.render(**{"bos_token": "", "eos_token": "", **specials, **kwargs},
                                         messages=chat, tools=None if tools is None else list(tools),
                                         documents=None, add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat_template failed to render: {e}") from e

    def _continue_final(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None,
                        **kwargs: Any) -> str:
        """The whole chat rendered as finished, then cut right after the last message's content (the
        template's end-of-turn text after it dropped), so any template works unchanged."""
        last = messages[-1] if messages else None
        if not isinstance(last, Mapping) or last.get("role") != "assistant":
            raise ValueError("continue_final_message needs an assistant message last")
        content = last.get("content")
        if not isinstance(content, str) or not content:
            raise ValueError("continue_final_message needs the last message's content as a non-empty string")
        text = self.apply_chat_template(messages, add_generation_prompt=False, tools=tools, **kwargs)
        end = text.rfind(content)
        if end < 0:
            raise TokenizerError("chat_template does not render the final message's content verbatim")
        return text[:end + len(content)]

    def encode_chat(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None,
                    continue_final_message: bool = False) -> list[int]:
        """Token ids of the chat prompt (no extra BOS: templates write their own)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                        continue_final_message=continue_final_message)
        return self.encode(text, add_bos=False)


def _raise_template_error(message: str) -> None:
    raise TokenizerError(f"chat_template raised: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _template_message(m: Message) -> dict[str, Any]:
    """A message as transformers hands it to templates: None-valued keys dropped (templates test
    for presence, `content: null` beside tool_calls included), reasoning under its usual names."""
    out = {k: v for k, v in m.items() if v is not None}
    reasoning = next((out[k] for k in _REASONING_FIELDS if k in out), None)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


def load_tokenizer(path_or_dir: str | os.PathLike[str] | None = None) -> Tokenizer:
    """Loads `tokenizer.json` (+ `tokenizer_config.json` beside it, if present).

    `path_or_dir` is a directory or the tokenizer.json file; None means the built-in tokenizer.
    """
    path = pathlib.Path(ASSETS_DIR if path_or_dir is None else path_or_dir)
    tok_file = path / "tokenizer.json" if path.is_dir() else path
    if not tok_file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {tok_file}")
    try:
        tok = tokenizers.Tokenizer.from_file(str(tok_file))
    except Exception as e:  # tokenizers raises a bare Exception on parse errors
        raise TokenizerError(f"malformed tokenizer file {tok_file}: {e}") from e
    config_file = tok_file.parent / "tokenizer_config.json"
    config: dict[str, Any] = {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"malformed {config_file}: {e}") from e
        if not isinstance(config, dict):
            raise TokenizerError(f"{config_file} is not a JSON object")
    return Tokenizer(tok, config)
