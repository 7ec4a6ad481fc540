"""Request and response schemas of the OpenAI routes, as pydantic models, and their mapping.

Every field of OpenAI's chat and completion request bodies is declared, plus our extensions
(session_id, priority, speculative, cache_salt, top_k, ignore_eos, return_token_ids). A field
either takes effect or is refused with a 400 naming it: unknown fields are refused by the models
(extra="forbid"), and declared fields we cannot honour yet are refused by `check_supported`
unless they hold their no-op value (`UNSUPPORTED`). Types are strict (no "1" for 1, no true for
1) as OpenAI's own server checks them.

`sampling_params_from_request` is the one place a validated request becomes `SamplingParams`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agentinfer_jax.engine.structured import validate_structured
from agentinfer_jax.sampling_params import (INT32_MAX, InvalidRequestError, SamplingParams, StructuredOutput,
                                            fold_seed)
from agentinfer_jax.serving.openai_sampling import FieldError, sampling_fields

__all__ = ["ApiError", "error_response", "ChatMessage", "ToolDefinition", "ChatCompletionRequest",
           "CompletionRequest", "UNSUPPORTED", "check_supported", "parse_request", "sampling_params_from_request",
           "MAX_STOP_STRINGS"]

MAX_STOP_STRINGS = 16


class ApiError(Exception):
    """An error answered in OpenAI's shape {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.param = status, message, code, type_, param

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.code, self.type, self.param)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(status: int, message: str, code: str | None, type_: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


# ---- models ----------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _drop_null_response_fields(cls, data: Any) -> Any:
        # Replies appended to the history carry these as null; a null is no content.
        if isinstance(data, dict):
            data = {k: v for k, v in data.items()
                    if not (v is None and k in ("refusal", "audio", "function_call", "annotations"))}
        return data

    @model_validator(mode="after")
    def _check_role_fields(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry 'tool_calls'")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("only tool messages carry 'tool_call_id'")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs 'tool_call_id'")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            if self.role != "assistant":
                raise ValueError(f"a {self.role} message needs 'content'")
        return self

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content

    def template_message(self) -> dict[str, Any]:
        """The message as chat templates read it: text content, developer as system, tool-call
        arguments parsed into objects (templates write them with tojson, as vLLM hands them over)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role}
        content = self.text()
        if content is not None or not self.tool_calls:
            out["content"] = content or ""
        for key in ("name", "tool_call_id", "reasoning_content"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": _arguments(c)}}
                                 for c in self.tool_calls]
        return out


def _arguments(call: ToolCall) -> Any:
    try:
        return json.loads(call.function.arguments)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"tool call {call.id!r}: 'arguments' is not JSON ({e.msg})", "invalid_messages",
                       param="messages") from e


class FunctionDefinition(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    # Accepted as vLLM does: auto-mode calls are parsed, not constrained; required / named replies are
    # held to the schema by the grammar (see sampling_params_from_request).
    strict: bool | None = None


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition

    def template_tool(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class JsonSchemaFormat(_Strict):
    name: str | None = None
    description: str | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    strict: bool | None = None  # the grammar holds every reply to the schema, strict or not


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check_schema_with_type(self) -> ResponseFormat:
        if self.json_schema is not None and self.type != "json_schema":
            raise ValueError(f"'json_schema' needs type 'json_schema', not {self.type!r}")
        return self


class _RequestBase(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions (vLLM / SGLang spell top_k, ignore_eos and cache_salt the same way)
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None  # -1 / 0: off; the engine packs k as int32
    ignore_eos: bool | None = None
    return_token_ids: bool | None = None
    session_id: str | None = None
    priority: int | None = None
    speculative: bool | None = None
    cache_salt: str | None = None
    # SGLang's own fields: the SGLang Model Gateway (sglang-router, `agentinfer-replicas`) sends them
    # with their defaults on every request it forwards; other values are refused (UNSUPPORTED).
    no_stop_trim: bool | None = None
    skip_special_tokens: bool | None = None
    return_hidden_states: bool | None = None

    @model_validator(mode="after")
    def _check_stream_options(self) -> _RequestBase:
        # Without a stream there is no usage chunk to add: refused (as OpenAI does), not ignored.
        if self.stream_options is not None and not self.stream:
            raise ValueError("'stream_options' needs 'stream': true")
        return self


class CompletionRequest(_RequestBase):
    prompt: str | list[int] | list[str] | list[list[int]]
    best_of: int | None = None
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None


class ChatCompletionRequest(_RequestBase):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    audio: dict[str, Any] | None = None
    function_call: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    modalities: list[str] | None = None
    moderation: Any = None
    prediction: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: Any = None
    prompt_cache_retention: str | None = None
    reasoning_effort: str | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    store: bool | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    # vLLM / SGLang: the last (assistant) message is a prefix the reply continues; the template's
    # generation prompt is then off unless add_generation_prompt says otherwise (both true: a 400).
    continue_final_message: bool | None = None
    add_generation_prompt: bool | None = None
    # SGLang reasoning-parser switches (sent by sglang-router): no effect either way on a server
    # without a reasoning parser, which this one is.
    separate_reasoning: bool | None = None
    stream_reasoning: bool | None = None

    @model_validator(mode="after")
    def _check_field_combinations(self) -> ChatCompletionRequest:
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("'continue_final_message' and 'add_generation_prompt' cannot both be true")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise ValueError("'tool_choice' needs 'tools'")
        if self.parallel_tool_calls is not None and not self.tools:
            raise ValueError("'parallel_tool_calls' needs 'tools'")
        names = [t.function.name for t in self.tools or ()]
        dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if dup is not None:  # a call names its tool: two definitions of one name are ambiguous
            raise ValueError(f"'tools' defines {dup!r} more than once")
        if isinstance(self.tool_choice, NamedToolChoice):
            if self.tool_choice.function.name not in names:
                raise ValueError(f"'tool_choice' names {self.tool_choice.function.name!r}, which is not in 'tools'")
        return self


# ---- fields we cannot honour yet ----------------------------------------------------------------
# field -> (the value(s) that change nothing, why not). A field holding anything else is a 400
# naming it.

UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "best_of": (lambda v: v == 1, "only 'best_of' = 1 is supported"),
    "echo": (lambda v: v is False, "'echo' is not supported"),
    "suffix": (lambda v: v == "", "'suffix' is not supported"),
    "audio": (lambda v: False, "'audio' output is not supported"),
    "modalities": (lambda v: v == ["text"], "only 'modalities' ['text'] is supported"),
    "functions": (lambda v: False, "'functions' is deprecated and not supported; use 'tools'"),
    "function_call": (lambda v: False, "'function_call' is deprecated and not supported; use 'tool_choice'"),
    "prediction": (lambda v: False, "'prediction' (predicted outputs) is not supported"),
    "reasoning_effort": (lambda v: False, "'reasoning_effort' is not supported"),
    "verbosity": (lambda v: False, "'verbosity' is not supported"),
    "web_search_options": (lambda v: False, "'web_search_options' is not supported"),
    "store": (lambda v: v is False, "'store' is not supported (completions are not stored)"),
    "metadata": (lambda v: False, "'metadata' is not supported (completions are not stored)"),
    "moderation": (lambda v: False, "'moderation' is not supported"),
    "prompt_cache_options": (lambda v: False, "'prompt_cache_options' is not supported"),
    "prompt_cache_retention": (lambda v: False, "'prompt_cache_retention' is not supported"),
    "service_tier": (lambda v: v in ("auto", "default"), "only 'service_tier' 'auto' / 'default' is served"),
    "user": (lambda v: False, "'user' is not used by this server; send session_id for affinity"),
    "safety_identifier": (lambda v: False, "'safety_identifier' is not used by this server"),
    "no_stop_trim": (lambda v: v is False, "'no_stop_trim' is not supported (stop strings are trimmed)"),
    "skip_special_tokens": (lambda v: v is True, "only 'skip_special_tokens' true is supported"),
    "return_hidden_states": (lambda v: v is False, "'return_hidden_states' is not supported"),
}


def check_supported(req: _RequestBase) -> None:
    """Raises ApiError(400) naming the first field that is set to something we cannot honour."""
    for field in type(req).model_fields:
        if field not in UNSUPPORTED:
            continue
        value = getattr(req, field)
        no_op, why = UNSUPPORTED[field]
        if value is not None and not no_op(value):
            assert f"'{field}'" in why  # the message names the field
            raise ApiError(400, why, "unsupported_field", param=field)
    options = req.stream_options
    if options is not None and options.include_obfuscation:
        raise ApiError(400, "'stream_options.include_obfuscation' is not supported", "unsupported_field",
                       param="stream_options")


# ---- parsing ---------------------------------------------------------------------------------


def parse_request(kind: type[_RequestBase], body: dict[str, Any]) -> Any:
    """`kind` validated from a JSON object; ApiError(400) naming the first bad field."""
    try:
        req = kind.model_validate(body)
    except ValidationError as e:
        raise _validation_error(e) from None
    check_supported(req)
    return req


def _validation_error(e: ValidationError) -> ApiError:
    err = e.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "tagged-")))
    # Union members add their type names to the location; keep the field path only.
    parts = [p for p in loc.split(".") if p not in _UNION_TAGS]
    where = ".".join(parts) or "body"
    if err["type"] == "missing":
        return ApiError(400, f"missing required field '{where}'", "missing_field", param=where)
    if err["type"] == "value_error":  # our validators: the message names the field
        message = str(err.get("ctx", {}).get("error", err["msg"]))
        named = re.match(r"\W*'([\w.]+)'", message)
        param = named.group(1) if named and where == "body" else where
        return ApiError(400, message if where == "body" else f"'{where}': {message}", "invalid_value", param=param)
    if err["type"] == "extra_forbidden":
        return ApiError(400, f"unknown field '{where}' (not an OpenAI field nor one of this server's extensions)",
                        "unsupported_field", param=where)
    return ApiError(400, f"'{where}': {err['msg']}", "invalid_type" if "type" in err["type"] else "invalid_value",
                    param=where)


_UNION_TAGS = {"str", "int", "float", "bool", "list[int]", "list[str]", "list[list[int]]", "list[TextPart]",
               "NamedToolChoice", "dict[str,any]", "literal['none','auto','required']", "none"}


def resolve_stop(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not all(stops) or len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} "
                       "non-empty strings", "invalid_stop", param="stop")
    return tuple(stops)


def sampling_params_from_request(req: CompletionRequest | ChatCompletionRequest, *, max_tokens: int,
                                 tool_json_schema: dict[str, Any] | None = None) -> SamplingParams:
    """The one mapping from a validated request to `SamplingParams` (max_tokens resolved by the caller,
    who knows the prompt length and the server's limits). Raises ApiError(400) naming the field.

    `tool_json_schema` is what tool_choice required / named must produce (`ToolPlan.json_schema`):
    the reply is constrained to it by the grammar, as `response_format`'s schema constrains a reply.
    n, logprobs / top_logprobs, penalties, logit_bias and response_format are mapped by
    `openai_sampling.sampling_fields`."""
    chat = isinstance(req, ChatCompletionRequest)
    body: dict[str, Any] = {k: v for k in ("n", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs")
                            if (v := getattr(req, k)) is not None}
    if chat:
        if req.top_logprobs is not None:
            body["top_logprobs"] = req.top_logprobs
        if req.response_format is not None:
            body["response_format"] = req.response_format.model_dump(exclude_none=True, by_alias=True)
    try:
        fields = sampling_fields(body, chat=chat)
        if tool_json_schema is not None:
            if fields["structured"] is not None:
                raise FieldError("response_format", "'response_format' cannot be combined with tool_choice "
                                                    "'required' or a named tool (both constrain the reply)")
            fields["structured"] = StructuredOutput("json_schema", json.dumps(tool_json_schema))
            validate_structured(fields["structured"])
    except FieldError as e:
        raise ApiError(400, str(e), f"invalid_{e.field}", param=e.field) from e
    except InvalidRequestError as e:  # the tools' schemas do not compile to a grammar
        raise ApiError(400, f"'tools': {e}", "invalid_tools", param="tools") from e
    seed = None
    if req.seed is not None:
        try:
            seed = fold_seed(req.seed)  # any int64 seed, folded into the engine's 32 bits
        except InvalidRequestError as e:
            raise ApiError(400, str(e), "invalid_seed", param="seed") from e
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else float(req.temperature),
        top_k=max(0, req.top_k or 0),  # OpenAI-style -1 also means "off"
        top_p=1.0 if req.top_p is None else float(req.top_p),
        seed=seed,
        stop=resolve_stop(req.stop),
        ignore_eos=bool(req.ignore_eos),
        **fields,
    )
    try:
        sampling.validate()
    except InvalidRequestError as e:
        raise ApiError(400, str(e), "invalid_sampling") from e
    return sampling
