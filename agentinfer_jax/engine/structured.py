"""Grammar-constrained decoding (structured outputs) with llguidance.

Why llguidance: its wheel is small, has no dependencies (no torch) and installs for Python 3.11 on
x86_64 and aarch64; it reads a Hugging Face tokenizer.json directly (the built-in tokenizer and
every checkpoint tokenizer here are that format); it compiles JSON schemas, regexes and Lark
grammars (with `%json{...}` islands, which is how a tool call's wrapper text and its argument schema
become one grammar) in well under a millisecond; and a matcher computes the allowed-token bitmask
for the next token in about a millisecond for a 4k vocabulary, with rollback for drafts. xgrammar
needs torch at run time and outlines-core has no Lark grammars.

Division of work: the scheduler (serving) owns one `GrammarMatcher` per constrained request and
advances it on the host with every emitted token; for each step it cuts the request's drafts at the
first token the grammar forbids and asks for one bitmask per verification row (`allowed_rows`): the
state after drafts 0..j-1 for row j. The engine applies the masks to the logits on device
(engine/sampling.py), so constrained greedy decoding with drafts emits exactly what it emits without.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from agentinfer_jax.sampling_params import InvalidRequestError, StructuredOutput

__all__ = ["GrammarCompiler", "GrammarMatcher", "grammar_text", "validate_structured", "tool_call_grammar",
           "tool_call_schema"]

# JSON written compactly (no free whitespace between tokens), so a weak model cannot pad the output
# with whitespace until max_tokens runs out.
_JSON_OPTIONS = {"whitespace_flexible": False}


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # a core dependency; only a broken install lacks it
        raise InvalidRequestError("structured outputs need the llguidance package") from e
    return llguidance


def grammar_text(spec: StructuredOutput) -> str:
    """The llguidance grammar (its JSON form) of a structured-output spec; InvalidRequestError if the
    spec is malformed (bad JSON, not a schema object)."""
    spec.validate()
    matcher = _llguidance().LLMatcher
    if spec.kind == "json_object":
        return matcher.grammar_from_json_schema({"type": "object"}, overrides=_JSON_OPTIONS)
    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.spec)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"json_schema is not valid JSON: {e}") from e
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequestError("json_schema must be a JSON object")
        try:
            return matcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except ValueError as e:
            raise InvalidRequestError(f"json_schema is not usable: {e}") from e
    if spec.kind == "regex":
        return matcher.grammar_from_regex(spec.spec)
    return matcher.grammar_from_lark(spec.spec)


def validate_structured(spec: StructuredOutput) -> None:
    """Raises InvalidRequestError naming the problem when the grammar does not compile (the server
    checks this before submitting, so a bad schema is a 400, not a failed request)."""
    lark_or_json = grammar_text(spec)
    error = _llguidance().LLMatcher.validate_grammar(lark_or_json)
    if error:
        raise InvalidRequestError(f"{spec.kind} grammar is invalid: {error}")


class GrammarMatcher:
    """One request's grammar state: advanced with every emitted token; masks per verification row."""

    def __init__(self, matcher, words: int):
        self._m = matcher
        self.words = words  # int32 words per bitmask row: ceil(vocab / 32)

    def advance(self, token: int) -> bool:
        """Consumes an emitted token; False if the grammar forbids it (the matcher is then in error)."""
        return bool(self._m.consume_token(int(token)))

    @property
    def is_stopped(self) -> bool:
        """The grammar is complete and allows nothing but EOS (or the matcher is in error)."""
        return bool(self._m.is_stopped())

    @property
    def is_accepting(self) -> bool:
        return bool(self._m.is_accepting())

    @property
    def error(self) -> str:
        return self._m.get_error()

    def valid_prefix(self, drafts: Sequence[int]) -> int:
        """How many leading drafts the grammar allows from the current state."""
        return int(self._m.validate_tokens(list(drafts))) if drafts else 0

    def allowed_rows(self, drafts: Sequence[int]) -> np.ndarray:
        """Bitmasks int32 [len(drafts) + 1, words]: row j allows what may follow drafts[:j]. The
        drafts must be allowed (cut them with `valid_prefix` first); the state is left unchanged."""
        out = np.empty((len(drafts) + 1, self.words), np.int32)
        self._m.unsafe_compute_mask_ptr(out[0].ctypes.data, out[0].nbytes)
        for j, tok in enumerate(drafts):
            if not self._m.consume_token(int(tok)):
                raise ValueError(f"draft token {tok} is not allowed by the grammar: {self._m.get_error()}")
            self._m.unsafe_compute_mask_ptr(out[j + 1].ctypes.data, out[j + 1].nbytes)
        if drafts:
            self._m.rollback(len(drafts))
        return out


class GrammarCompiler:
    """Builds `GrammarMatcher`s over one tokenizer (tokenizer.json text), for a model vocabulary of
    `vocab_size` ids (ids past the tokenizer's are never allowed) ending on `eos_token_ids`."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int]):
        llg = _llguidance()
        eos = [int(t) for t in eos_token_ids]
        if not eos:
            raise ValueError("a grammar needs an EOS token to end on; the model names none")
        self.vocab_size = vocab_size
        self.tokenizer = llg.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos)
        self.words = -(-vocab_size // 32)
        self._cache: dict[tuple[str, str], str] = {}  # spec -> grammar text (schemas repeat per session)
        self._executor = None  # llguidance's thread pool, made on first batched use

    def allowed_rows_batch(self, jobs: Sequence[tuple[GrammarMatcher, Sequence[int]]]) -> list[np.ndarray]:
        """`allowed_rows` of many matchers at once, on llguidance's thread pool (one call per step)."""
        if len(jobs) <= 1:
            return [m.allowed_rows(d) for m, d in jobs]
        from llguidance.numpy import fill_next_token_bitmask_par, fill_next_token_bitmask_par_with_draft_tokens
        if self._executor is None:
            self._executor = _llguidance().LLExecutor()
        offsets = np.cumsum([0] + [len(d) + 1 for _, d in jobs])
        out = np.empty((int(offsets[-1]), self.words), np.int32)
        plain = [(m._m, int(o)) for (m, d), o in zip(jobs, offsets) if not d]
        drafted = [(m._m, int(o), [int(t) for t in d]) for (m, d), o in zip(jobs, offsets) if d]
        if plain:
            fill_next_token_bitmask_par(self._executor, plain, out)
        if drafted:  # llguidance refuses empty draft lists here
            fill_next_token_bitmask_par_with_draft_tokens(self._executor, drafted, out)
        return [out[offsets[i]:offsets[i + 1]] for i in range(len(jobs))]

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int, eos_token_ids: Sequence[int] = ()) -> GrammarCompiler:
        """From an agentinfer_jax `Tokenizer` (or a `tokenizers.Tokenizer`); EOS defaults to the tokenizer's."""
        backend = getattr(tokenizer, "_tok", tokenizer)  # the wrapped tokenizers.Tokenizer
        eos = tuple(eos_token_ids) or tuple(getattr(tokenizer, "eos_token_ids", ()))
        return cls(backend.to_str(), vocab_size, eos)

    def matcher(self, spec: StructuredOutput) -> GrammarMatcher:
        key = (spec.kind, spec.spec)
        grammar = self._cache.get(key)
        if grammar is None:
            grammar = self._cache[key] = grammar_text(spec)
            if len(self._cache) > 256:
                self._cache.pop(next(iter(self._cache)))
        m = _llguidance().LLMatcher(self.tokenizer, grammar, log_level=0)
        if m.is_error():
            raise InvalidRequestError(f"{spec.kind} grammar is invalid: {m.get_error()}")
        return GrammarMatcher(m, self.words)


# ---- tool calls ----------------------------------------------------------------------------------


def tool_call_schema(tools: Sequence[Mapping[str, Any]], name: str | None = None) -> dict[str, Any]:
    """JSON schema of one call {"name": ..., "arguments": {...}} to any of `tools` (OpenAI tool
    objects {"type": "function", "function": {"name", "parameters"}}) or only to the one `name`d."""
    options = []
    for tool in tools:
        fn = tool.get("function", tool)
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise InvalidRequestError("each tool needs a function with a string 'name'")
        if name is not None and fn["name"] != name:
            continue
        params = fn.get("parameters") or {"type": "object"}
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    if not options:
        raise InvalidRequestError(f"tool_choice names {name!r}, which is not among the tools" if name
                                  else "tool_choice needs at least one tool")
    return options[0] if len(options) == 1 else {"anyOf": options}


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lark string literal


def tool_call_grammar(tools: Sequence[Mapping[str, Any]], name: str | None = None, *,
                      open_tag: str = "<tool_call>\n", close_tag: str = "\n</tool_call>",
                      max_calls: int = 1) -> StructuredOutput:
    """A grammar for 1..max_calls tool calls in the Qwen / Hermes format: `open_tag`, the call's JSON
    (`tool_call_schema`), `close_tag`. tool_choice="required" -> name=None; a named function ->
    its name (only that tool)."""
    schema = json.dumps(tool_call_schema(tools, name), separators=(",", ":"))
    calls = "call" if max_calls == 1 else f"call (\"\\n\" call){{0,{max_calls - 1}}}"
    lark = "\n".join([
        f"start: {calls}",
        f"call: {_lark_string(open_tag)} body {_lark_string(close_tag)}",
        f"body: %json{json.dumps({'x-guidance': _JSON_OPTIONS, **json.loads(schema)})}",
    ])
    return StructuredOutput("lark", lark)
