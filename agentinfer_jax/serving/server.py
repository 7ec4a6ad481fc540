"""OpenAI-compatible HTTP server over a `ServingStack`: the routes and the app (completions, chat
completions with tool calling, SSE or not, models, health and Prometheus metrics).

The split by job: `protocol` holds the request schemas (pydantic) and the request -> SamplingParams
mapping, `streaming` the one thread-to-asyncio bridge (`RequestStream`, shared with the in-process
EngineClient) and the text deltas, `tool_parsers` the model output -> `tool_calls` parsers; this
module turns a body into a `Request` with the stack's tokenizer and limits and answers it.

Thread model: the engine runs in the ServingLoop's background thread; each HTTP request submits a
`Request` through a `RequestStream`. Whatever ends a handler early (client disconnect, cancellation,
an error) cancels its request in `finally`, so the request's KV blocks always come back.

Extension fields beside OpenAI's: session_id, priority, speculative, cache_salt (prefix-cache
namespace), top_k, ignore_eos, return_token_ids (token ids in each choice). n choices share the
prompt's KV blocks; logprobs come back in OpenAI's chat or completions shape.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import anyio.to_thread
import uvicorn
from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from agentinfer_jax.serving import tool_parsers
from agentinfer_jax.serving.builder import ServingStack
from agentinfer_jax.serving.loop import StreamEvent
from agentinfer_jax.serving.openai_sampling import child_seed, choice_logprobs
from agentinfer_jax.serving.protocol import (ApiError, ChatCompletionRequest, CompletionRequest, NamedToolChoice,
                                             error_response, parse_request, sampling_params_from_request)
from agentinfer_jax.serving.request import InvalidRequestError, Request, SamplingParams
from agentinfer_jax.serving.streaming import RequestStream, TextDeltas

__all__ = ["ApiError", "ServerLimits", "ToolPlan", "create_app", "serve", "BackgroundServer", "TextDeltas"]

log = logging.getLogger(__name__)
_DISCONNECT_POLL_S = 0.25  # a non-streaming request's client is checked this often while it runs


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """Input limits enforced before a request reaches the scheduler, and the tool-call format."""

    max_body_bytes: int = 1 << 20  # request body size (413 beyond)
    max_tokens_limit: int | None = None  # max_tokens at most; None = the model's max_model_len
    default_max_tokens: int = 256  # completions without max_tokens, within the limit (chat: the rest of the context)
    tool_parser: str | None = None  # "hermes" or "llama3_json"; None = the one the chat template teaches


# ---- request parsing -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ToolPlan:
    """How a chat request's reply becomes tool calls: the parser and, for tool_choice named or
    required, the JSON schema the reply must follow (the grammar constraint's input)."""

    mode: str  # "auto", "required" or "named"
    tool_names: tuple[str, ...]
    parallel: bool
    parser: str | None = None  # auto: the model's format
    named: str | None = None
    json_schema: dict[str, Any] | None = None

    def new_parser(self) -> tool_parsers.ToolParser:
        if self.mode == "named":
            return tool_parsers.NamedToolParser(self.named or "")
        if self.mode == "required":
            return tool_parsers.RequiredToolParser(self.tool_names, parallel=self.parallel)
        return tool_parsers.TOOL_PARSERS[self.parser or "hermes"](self.tool_names, parallel=self.parallel)


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    """A validated OpenAI body, ready to become a `Request`."""

    prompt_tokens: list[int]
    sampling: SamplingParams
    stream: bool
    include_usage: bool
    return_token_ids: bool
    session_id: str | None
    priority: int
    speculative: bool
    namespace: str
    tools: ToolPlan | None = None


class BodyParser:
    """Turns a JSON body into a `ParsedRequest` (protocol models, then the stack's tokenizer and
    limits); raises ApiError(400) naming the offending field."""

    def __init__(self, stack: ServingStack, limits: ServerLimits):
        self.stack = stack
        self.limits = limits
        self.max_tokens_limit = limits.max_tokens_limit or stack.config.max_model_len
        if limits.tool_parser is not None and limits.tool_parser not in tool_parsers.TOOL_PARSERS:
            raise ValueError(f"unknown tool parser {limits.tool_parser!r}; "
                             f"expected one of {sorted(tool_parsers.TOOL_PARSERS)}")
        self.tool_parser = limits.tool_parser or tool_parsers.detect_tool_parser(stack.tokenizer.chat_template)

    @property
    def vocab_size(self) -> int:
        """The ids the engine takes (the model's vocabulary, which may pad the tokenizer's)."""
        return self.stack.scheduler.config.vocab_size

    def completion(self, body: Mapping[str, Any]) -> ParsedRequest:
        req: CompletionRequest = parse_request(CompletionRequest, dict(body))
        self.check_model(req.model)
        return self._common(req, self._prompt_ids(req.prompt))

    def chat(self, body: Mapping[str, Any]) -> ParsedRequest:
        req: ChatCompletionRequest = parse_request(ChatCompletionRequest, dict(body))
        self.check_model(req.model)
        messages = [m.template_message() for m in req.messages]
        plan = self._tool_plan(req)
        tools = [t.template_tool() for t in req.tools] if req.tools else None
        try:
            cont = bool(req.continue_final_message)
            generation_prompt = not cont if req.add_generation_prompt is None else req.add_generation_prompt
            ids = self.stack.tokenizer.encode_chat(messages, tools=tools, add_generation_prompt=generation_prompt,
                                                   continue_final_message=cont)
        except ValueError as e:  # TokenizerError is a ValueError
            raise ApiError(400, f"messages cannot be formatted: {e}", "invalid_messages", param="messages") from e
        return self._common(req, ids, req.max_completion_tokens, plan)

    def _tool_plan(self, req: ChatCompletionRequest) -> ToolPlan | None:
        """None when the reply is plain text: no tools, or tool_choice "none" (tools are still shown
        to the model, as vLLM does, but nothing is parsed)."""
        if not req.tools:
            return None
        if not self.stack.tokenizer.renders_tools:
            raise ApiError(400, "this model's chat template does not render 'tools'", "unsupported_field",
                           param="tools")
        choice = req.tool_choice or "auto"
        if choice == "none":
            return None
        names = tuple(t.function.name for t in req.tools)
        parallel = req.parallel_tool_calls is not False
        if choice == "auto":
            if self.tool_parser is None:
                raise ApiError(400, "this model's chat template teaches no tool-call format this server parses; "
                               "'tools' cannot be used with tool_choice 'auto'", "unsupported_field", param="tools")
            return ToolPlan("auto", names, parallel, parser=self.tool_parser)
        schemas = [t.model_dump(exclude_none=True) for t in req.tools]
        wire_choice = choice.model_dump() if isinstance(choice, NamedToolChoice) else choice
        schema = tool_parsers.tool_choice_json_schema(schemas, wire_choice, parallel)
        # The reply is held to `schema` by the grammar (sampling_params_from_request).
        if isinstance(choice, NamedToolChoice):
            return ToolPlan("named", names, parallel, named=choice.function.name, json_schema=schema)
        return ToolPlan("required", names, parallel, json_schema=schema)

    # -- fields

    def _common(self, req: CompletionRequest | ChatCompletionRequest, prompt: list[int],
                chat_max_tokens: int | None = None, tools: ToolPlan | None = None) -> ParsedRequest:
        chat = isinstance(req, ChatCompletionRequest)
        self._check_prompt_length(prompt, "messages" if chat else "prompt")
        # chat: max_completion_tokens replaces the deprecated max_tokens (wins when both are sent, as vLLM);
        # the other one is still checked, never silently dropped
        if chat_max_tokens is not None and req.max_tokens is not None and req.max_tokens <= 0:
            raise ApiError(400, f"max_tokens must be positive, got {req.max_tokens}", "invalid_max_tokens",
                           param="max_tokens")
        max_tokens = chat_max_tokens if chat_max_tokens is not None else req.max_tokens
        if max_tokens is None and chat:
            # chat: the rest of the context (as vLLM), within the server's max_tokens limit
            max_tokens = max(1, min(self.max_tokens_limit, self.stack.config.max_model_len - len(prompt)))
        if max_tokens is None:  # completions: a default, never over the limit (the client set none)
            max_tokens = min(self.limits.default_max_tokens, self.max_tokens_limit)
        field = "max_completion_tokens" if chat_max_tokens is not None else "max_tokens"
        if max_tokens <= 0:
            raise ApiError(400, f"{field} must be positive, got {max_tokens}", "invalid_max_tokens", param=field)
        if max_tokens > self.max_tokens_limit:
            raise ApiError(400, f"{field} {max_tokens} exceeds the limit {self.max_tokens_limit}",
                           "invalid_max_tokens", param=field)
        sampling = sampling_params_from_request(req, max_tokens=max_tokens,
                                                tool_json_schema=tools.json_schema if tools is not None else None)
        try:  # the loop checks these too, but without knowing which field they came from
            if sampling.logit_bias:
                sampling.validate_ids(self.vocab_size)
        except InvalidRequestError as e:
            raise ApiError(400, str(e), "invalid_logit_bias", param="logit_bias") from e
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        session_id = req.session_id
        if session_id is None and chat:
            session_id = req.prompt_cache_key  # OpenAI's cache-affinity key: our session
        return ParsedRequest(prompt, sampling, bool(req.stream), include_usage, bool(req.return_token_ids),
                             session_id, req.priority or 0, bool(req.speculative), req.cache_salt or "", tools)

    def check_model(self, model: str) -> None:
        if model != self.stack.model_name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves {self.stack.model_name!r}",
                           "model_not_found", param="model")

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            return self.stack.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise ApiError(400, f"'prompt': token id {bad} is outside the vocabulary [0, {self.vocab_size})",
                               "invalid_prompt", param="prompt")
            return list(prompt)
        raise ApiError(400, "'prompt' must be a string or a list of token ids (batches are not supported)",
                       "invalid_prompt", param="prompt")

    def _check_prompt_length(self, prompt: list[int], field: str) -> None:
        limit = self.stack.config.max_model_len
        if not prompt:
            raise ApiError(400, f"'{field}' is empty", "invalid_prompt", param=field)
        if len(prompt) >= limit:  # not one token of room left
            raise ApiError(400, f"'{field}' has {len(prompt)} tokens; the context limit is {limit}",
                           "context_length_exceeded", param=field)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: JSON text, but no float can hold it
        raise ValueError(f"number {text} is out of range")
    return value


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object; ApiError(400) for anything Python's json is lenient about
    but the engine cannot take: NaN / Infinity, numbers beyond a float, nesting past the recursion
    limit, strings with unpaired UTF-16 surrogates (which the tokenizer cannot encode)."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise ApiError(400, "malformed JSON body: nested too deeply", "invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError and the hooks' errors
        raise ApiError(400, f"malformed JSON body: {e}", "invalid_json") from e
    if not isinstance(body, dict):
        raise ApiError(400, "the JSON body must be an object", "invalid_json")
    _check_strings(body)
    return body


def _check_strings(body: dict[str, Any]) -> None:
    """Raises ApiError(400) naming the first string (key or value) that is not valid Unicode.
    Iterative: json.loads already bounded the depth, a recursive walk could still overflow."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            items = value.items()
        elif isinstance(value, list):
            items = ((str(i), v) for i, v in enumerate(value))
        else:
            items = ()
        for key, item in items:
            where = f"{path}.{key}" if path else key
            for text in (key, item):
                if isinstance(text, str):
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:
                        raise ApiError(400, f"'{where}' holds an unpaired UTF-16 surrogate (not valid Unicode)",
                                       "invalid_json", param=where) from None
            if isinstance(item, (dict, list)):
                stack.append((where, item))


# ---- the app ------------------------------------------------------------------------------------


class _Generation:
    """The n submitted requests of one call (choice i = streams[i]) and the one queue their events
    arrive on as (choice index, event). Choices past the first share the first's prompt blocks
    (`fork_of`) and draw from their own seeds."""

    def __init__(self, stack: ServingStack, parsed: ParsedRequest, request_id: str):
        self.stack = stack
        self.parsed = parsed
        n = parsed.sampling.n
        self.queue: asyncio.Queue[tuple[int, StreamEvent]] = asyncio.Queue()
        self.streams = [
            RequestStream(stack.loop, Request(
                request_id if i == 0 else f"{request_id}-{i}", parsed.prompt_tokens,
                parsed.sampling if i == 0 else dataclasses.replace(parsed.sampling,
                                                                   seed=child_seed(parsed.sampling.seed, i)),
                session_id=parsed.session_id, namespace=parsed.namespace, priority=parsed.priority,
                speculative=parsed.speculative, fork_of=request_id if i else None), self.queue, i)
            for i in range(n)]
        self.request = self.streams[0].request
        for stream in self.streams:
            try:
                stream.submit()
            except InvalidRequestError as e:
                self.cancel_unless_finished()
                code = "context_length_exceeded" if "context limit" in str(e) else "invalid_request"
                raise ApiError(400, str(e), code) from e

    @property
    def all_finished(self) -> bool:
        return all(s.finished for s in self.streams)

    async def next_event(self) -> tuple[int, StreamEvent]:
        try:  # a decoding request has its next event queued already: no task, no wait
            index, ev = self.queue.get_nowait()
        except asyncio.QueueEmpty:
            # One pending get across polls (a wait_for timeout could drop an event); a loop that
            # stops meanwhile sends nothing more, so its absence ends the wait with a 503.
            get = asyncio.ensure_future(self.queue.get())
            try:
                while not (await asyncio.wait({get}, timeout=_DISCONNECT_POLL_S))[0]:
                    _check_loop_alive(self.stack)
            finally:
                if not get.done():
                    get.cancel()
            index, ev = get.result()
        if ev.finished:
            self.streams[index].finished = True
            if ev.error:
                self.cancel_unless_finished()
                _check_loop_alive(self.stack)  # ended by the loop stopping: a 503, as for a wait
                raise ApiError(500, ev.error, "engine_error", "server_error")
        return index, ev

    def cancel_unless_finished(self) -> None:
        for stream in self.streams:
            stream.cancel_unless_finished()

    def token_ids(self, index: int) -> list[int]:
        return self.streams[index].token_ids

    def logprobs(self, index: int, start: int, token_ids: list[int], chat: bool,
                 text_offset: int = 0) -> dict[str, Any] | None:
        """Choice `index`'s logprobs object for its tokens [start, start + len(token_ids)) (None when off)."""
        if self.parsed.sampling.logprobs is None:
            return None
        lps = self.streams[index].request.output_logprobs[start:start + len(token_ids)]
        return choice_logprobs(self.stack.detokenize, token_ids, lps, chat=chat, text_offset=text_offset)

    def usage(self) -> dict[str, Any]:
        prompt = len(self.request.prompt_tokens)
        completion = sum(len(s.token_ids) for s in self.streams)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": self.request.num_cached_tokens}}


def _finish_reason(reason: str | None, calls: list[tool_parsers.ToolCallOut]) -> str | None:
    """A reply that ended on its own with tool calls finishes with "tool_calls" (as OpenAI's)."""
    return "tool_calls" if calls and reason == "stop" else reason


class _OpenAIRoutes:
    """Handlers of the OpenAI routes; one instance per app."""

    def __init__(self, stack: ServingStack, limits: ServerLimits):
        self.stack = stack
        self.limits = limits
        self.parser = BodyParser(stack, limits)
        self.created = int(time.time())

    async def read_json(self, http: HttpRequest) -> dict[str, Any]:
        limit = self.limits.max_body_bytes
        declared = http.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                           "body_too_large")
        chunks, size = [], 0
        try:
            async for chunk in http.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"request body exceeds the limit of {limit} bytes", "body_too_large")
                chunks.append(chunk)
        except ClientDisconnect:  # gone mid-upload: nobody to answer, nothing to log as a server error
            raise ApiError(499, "client disconnected", "client_disconnected") from None
        return parse_json_body(b"".join(chunks))

    async def completions(self, http: HttpRequest) -> Response:
        # Parsing tokenizes: a worker thread, so a huge prompt does not stall other streams.
        parsed = await anyio.to_thread.run_sync(self.parser.completion, await self.read_json(http))
        return await self._respond(http, parsed, chat=False)

    async def chat_completions(self, http: HttpRequest) -> Response:
        parsed = await anyio.to_thread.run_sync(self.parser.chat, await self.read_json(http))
        return await self._respond(http, parsed, chat=True)

    async def _respond(self, http: HttpRequest, parsed: ParsedRequest, chat: bool) -> Response:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        _check_loop_alive(self.stack)  # a request queued to a stopped loop would wait forever
        gen = _Generation(self.stack, parsed, rid)
        if parsed.stream:
            return StreamingResponse(self._stream(gen, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            return JSONResponse(await self._complete(http, gen, chat))
        finally:
            gen.cancel_unless_finished()

    async def _complete(self, http: HttpRequest, gen: _Generation, chat: bool) -> dict[str, Any]:
        # One pending get at a time (never wait_for on queue.get: a timeout could drop an event); the
        # get itself ends with a 503 if the loop stops. The disconnect check runs on a clock, not only
        # when no event came: a decoding request delivers an event every step, and its client may be
        # long gone.
        pending: asyncio.Future[tuple[int, StreamEvent]] | None = None
        loop = asyncio.get_running_loop()
        next_check = loop.time() + _DISCONNECT_POLL_S
        final: dict[int, StreamEvent] = {}
        try:
            while len(final) < len(gen.streams):
                pending = pending or asyncio.ensure_future(gen.next_event())
                done, _ = await asyncio.wait({pending}, timeout=max(0.0, next_check - loop.time()))
                if loop.time() >= next_check:
                    if await http.is_disconnected():
                        raise ApiError(499, "client disconnected", "client_disconnected")
                    next_check = loop.time() + _DISCONNECT_POLL_S
                if not done:
                    continue
                (index, ev), pending = pending.result(), None
                if ev.finished:
                    final[index] = ev
        finally:
            if pending is not None:
                pending.cancel()
        choices = []
        for index in range(len(gen.streams)):
            ev = final[index]
            text = ev.text or ""
            ids = gen.token_ids(index)
            choice: dict[str, Any] = {"index": index, "finish_reason": ev.finish_reason,
                                      "logprobs": gen.logprobs(index, 0, ids, chat)}
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if gen.parsed.tools is not None:
                    content, calls = tool_parsers.parse_all(gen.parsed.tools.new_parser(), text)
                    message["content"] = content
                    if calls:
                        message["tool_calls"] = [{"id": c.id, "type": "function",
                                                  "function": {"name": c.name, "arguments": c.arguments}}
                                                 for c in calls]
                    choice["finish_reason"] = _finish_reason(ev.finish_reason, calls)
                choice["message"] = message
            else:
                choice["text"] = text
            if gen.parsed.return_token_ids:
                choice["token_ids"] = list(ids)
            choices.append(choice)
        return {"id": gen.request.request_id, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.stack.model_name, "choices": choices,
                "usage": gen.usage()}

    async def _stream(self, gen: _Generation, chat: bool) -> AsyncIterator[str]:
        rid, created = gen.request.request_id, int(time.time())
        n = len(gen.streams)
        deltas = [TextDeltas(gen.parsed.sampling.stop) for _ in range(n)]
        tools = [gen.parsed.tools.new_parser() if chat and gen.parsed.tools is not None else None for _ in range(n)]
        first, ids = [True] * n, [[] for _ in range(n)]
        sent_ids, sent_text = [0] * n, [0] * n  # tokens and characters already sent, per choice

        def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
            obj: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                   "created": created, "model": self.stack.model_name, "choices": choices}
            if usage is not None:
                obj["usage"] = usage
            return f"data: {json.dumps(obj)}\n\n"

        def choice(i: int, delta: dict[str, Any] | str, finish_reason: str | None, text_len: int,
                   carry_ids: bool = True) -> dict[str, Any]:
            """A chunk's choice i carrying the held ids (and their logprobs) unless `carry_ids` is
            False; `text_len` characters of completion text go with them."""
            new_ids = ids[i] if carry_ids else []
            if carry_ids:
                ids[i] = []
            c: dict[str, Any] = {"index": i, "finish_reason": finish_reason,
                                 "logprobs": gen.logprobs(i, sent_ids[i], new_ids, chat, sent_text[i])}
            sent_ids[i] += len(new_ids)
            sent_text[i] += text_len
            c["delta" if chat else "text"] = delta
            if gen.parsed.return_token_ids:
                c["token_ids"] = new_ids
            return c

        def chat_deltas(i: int, text: str, final: bool) -> list[dict[str, Any]]:
            """The chat deltas of new text: plain content, or the tool parser's content and calls."""
            parser = tools[i]
            if parser is None:
                return [{"content": text}] if text else []
            out = parser.feed(text) + (parser.finish() if final else [])
            return [{"content": d.content} if d.content is not None else {"tool_calls": [d.openai()]} for d in out]

        try:
            while not gen.all_finished:
                try:
                    i, ev = await gen.next_event()
                except ApiError as e:
                    yield f"data: {json.dumps(e.body())}\n\n"
                    break
                text = deltas[i].push(ev.text, ev.finished)
                ids[i].extend(ev.new_tokens)  # ids of held-back text go out with the next chunk
                reason = ev.finish_reason if ev.finished else None
                if not chat:
                    if text or ev.finished:
                        yield chunk([choice(i, text, reason, len(text))])
                else:
                    calls = tools[i].calls if tools[i] else []
                    pieces = chat_deltas(i, text, ev.finished)
                    if first[i]:  # the role goes out at once, in a chunk of its own
                        yield chunk([choice(i, {"role": "assistant", "content": ""}, None, 0, carry_ids=False)])
                        first[i] = False
                    for j, piece in enumerate(pieces):
                        last = ev.finished and j == len(pieces) - 1
                        yield chunk([choice(i, piece, _finish_reason(reason, calls) if last else None, 0)])
                    if ev.finished and not pieces:
                        yield chunk([choice(i, {}, _finish_reason(reason, calls), 0)])
                if gen.all_finished and gen.parsed.include_usage:
                    yield chunk([], gen.usage())
            yield "data: [DONE]\n\n"
        finally:  # client gone (generator closed or cancelled) -> free the request's blocks
            gen.cancel_unless_finished()

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_card()]}

    def model(self, model_id: str) -> dict[str, Any]:
        """GET /v1/models/{model_id} (the OpenAI SDK's `models.retrieve`)."""
        self.parser.check_model(model_id)
        return self._model_card()

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.stack.model_name, "object": "model", "created": self.created, "owned_by": "agentinfer-jax",
                "max_model_len": self.stack.config.max_model_len}

    def health(self) -> JSONResponse:
        if not _loop_alive(self.stack):
            return error_response(503, "the serving loop is not running", "loop_down", "server_error")
        return JSONResponse({"status": "ok"})

    def metrics(self) -> Response:
        return Response(self.stack.loop.metrics.prometheus_text(), media_type=CONTENT_TYPE_LATEST)


def _loop_alive(stack: ServingStack) -> bool:
    return stack.loop.is_running


def _check_loop_alive(stack: ServingStack) -> None:
    if not _loop_alive(stack):
        raise ApiError(503, "the serving loop is not running", "loop_down", "server_error")


class _InternalErrors:
    """ASGI middleware: a bug in one request is a 500 JSON error and the connection serves on.

    Starlette's handler for `Exception` answers and then re-raises to the server, and uvicorn then
    resets the client's keep-alive connection. Caught here, below that handler, nothing re-raises
    unless the response had already started (then there is no status left to send).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as e:
            if started:
                raise
            log.exception("unhandled error")
            response = error_response(500, f"internal error: {type(e).__name__}", "internal_error", "server_error")
            await response(scope, receive, send)


def create_app(stack: ServingStack, limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI app. The caller owns the stack's loop (start it before serving)."""
    routes = _OpenAIRoutes(stack, limits or ServerLimits())
    app = FastAPI(title="agentinfer-jax", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.stack = stack

    @app.exception_handler(ApiError)
    async def _api_error(_: HttpRequest, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: HttpRequest, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), None, "invalid_request_error")

    app.add_middleware(_InternalErrors)
    app.add_api_route("/v1/completions", routes.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", routes.chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", routes.models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", routes.model, methods=["GET"])  # ids may hold '/'
    app.add_api_route("/health", routes.health, methods=["GET"])
    app.add_api_route("/metrics", routes.metrics, methods=["GET"])
    return app


def serve(stack: ServingStack, host: str = "127.0.0.1", port: int = 8000, limits: ServerLimits | None = None,
          log_level: str = "info") -> None:
    """Starts the serving loop and runs uvicorn until interrupted; shuts the loop down after."""
    stack.start()
    log.info("agentinfer-serve: %s", stack.summary())
    try:
        uvicorn.run(create_app(stack, limits), host=host, port=port, log_level=log_level)
    finally:
        stack.shutdown()


class BackgroundServer:
    """uvicorn in a daemon thread on an already-bound socket (tests, demos, in-process agents).

    Binding before starting means `port` is known and free (port=0 picks one) with no race.
    """

    def __init__(self, stack: ServingStack, host: str = "127.0.0.1", port: int = 0,
                 limits: ServerLimits | None = None, log_level: str = "warning"):
        self.stack = stack
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = self._socket.getsockname()[:2]
        config = uvicorn.Config(create_app(stack, limits), log_level=log_level, timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="http-server", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        self.stack.start()
        log.info("agentinfer-serve: %s", self.stack.summary())
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._socket.close()
        self.stack.shutdown()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
