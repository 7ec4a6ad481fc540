"""OpenAI-compatible HTTP server over a `ServingStack`: completions, chat completions (SSE or not),
models, health and Prometheus metrics.

Thread model: the engine runs in the ServingLoop's background thread; each HTTP request submits a
`Request` with a callback that hops StreamEvents onto the event loop (`call_soon_threadsafe` into an
`asyncio.Queue`). Whatever ends a handler early (client disconnect, cancellation, an error) cancels
its request in `finally`, so the request's KV blocks always come back.

Extension fields beside OpenAI's: session_id, priority, speculative, cache_salt (prefix-cache
namespace), top_k, ignore_eos, return_token_ids (token ids in each choice). n, logprobs /
top_logprobs, penalties, logit_bias and response_format are mapped by `openai_sampling`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
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

from agentinfer_jax.sampling_params import fold_seed
from agentinfer_jax.serving.builder import ServingStack
from agentinfer_jax.serving.loop import StreamEvent
from agentinfer_jax.serving.openai_sampling import FieldError, child_seed, choice_logprobs, sampling_fields
from agentinfer_jax.serving.request import InvalidRequestError, Request, SamplingParams

__all__ = ["ApiError", "ServerLimits", "create_app", "serve", "BackgroundServer"]

log = logging.getLogger(__name__)
_MAX_STOP_STRINGS = 16
_DISCONNECT_POLL_S = 0.25  # a non-streaming request's client is checked this often while it runs


class ApiError(Exception):
    """An error answered in OpenAI's shape {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.type = status, message, code, type_

    def response(self) -> JSONResponse:
        return _error_response(self.status, self.message, self.code, self.type)


def _error_response(status: int, message: str, code: str | None, type_: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": code}},
                        status_code=status)


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """Input limits enforced before a request reaches the scheduler."""

    max_body_bytes: int = 1 << 20  # request body size (413 beyond)
    max_tokens_limit: int | None = None  # max_tokens at most; None = the model's max_model_len
    default_max_tokens: int = 256  # completions without max_tokens, within the limit (chat: the rest of the context)


# ---- request parsing -------------------------------------------------------------------------


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


class BodyParser:
    """Turns a JSON body into a `ParsedRequest`; raises ApiError(400) naming the offending field."""

    def __init__(self, stack: ServingStack, limits: ServerLimits):
        self.stack = stack
        self.limits = limits
        self.max_tokens_limit = limits.max_tokens_limit or stack.config.max_model_len

    def completion(self, body: Mapping[str, Any]) -> ParsedRequest:
        if "prompt" not in body:
            raise ApiError(400, "missing required field 'prompt'", "missing_field")
        for field in ("echo", "suffix"):
            if body.get(field):
                raise ApiError(400, f"'{field}' is not supported", "unsupported_field")
        return self._common(body, self._prompt_ids(body["prompt"]), chat=False)

    def chat(self, body: Mapping[str, Any]) -> ParsedRequest:
        if "messages" not in body:
            raise ApiError(400, "missing required field 'messages'", "missing_field")
        messages = self._messages(body["messages"])
        try:
            ids = self.stack.tokenizer.encode_chat(messages)
        except ValueError as e:  # TokenizerError is a ValueError
            raise ApiError(400, f"messages cannot be formatted: {e}", "invalid_messages") from e
        return self._common(body, ids, max_tokens_field="max_completion_tokens", chat=True)

    # -- fields

    def _common(self, body: Mapping[str, Any], prompt: list[int],
                max_tokens_field: str | None = None, chat: bool = False) -> ParsedRequest:
        self._check_model(body)
        try:
            fields = sampling_fields(body, chat=chat)
        except FieldError as e:
            raise ApiError(400, str(e), f"invalid_{e.field}") from e
        if _get(body, "best_of", int, 1) != 1:
            raise ApiError(400, "only best_of=1 is supported", "unsupported_best_of")
        max_tokens = _get(body, "max_tokens", int, None)
        if max_tokens is None and max_tokens_field is not None:
            max_tokens = _get(body, max_tokens_field, int, None)
        if max_tokens is None and max_tokens_field is not None:
            # chat: the rest of the context (as vLLM), within the server's max_tokens limit
            max_tokens = max(1, min(self.max_tokens_limit, self.stack.config.max_model_len - len(prompt)))
        if max_tokens is None:  # completions: a default, never over the limit (the client set none)
            max_tokens = min(self.limits.default_max_tokens, self.max_tokens_limit)
        if max_tokens <= 0:
            raise ApiError(400, f"max_tokens must be positive, got {max_tokens}", "invalid_max_tokens")
        if max_tokens > self.max_tokens_limit:
            raise ApiError(400, f"max_tokens {max_tokens} exceeds the limit {self.max_tokens_limit}",
                           "invalid_max_tokens")
        stream_options = _get(body, "stream_options", dict, None) or {}
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=float(_get(body, "temperature", float, 1.0)),
            top_k=max(0, _get(body, "top_k", int, 0)),  # OpenAI-style -1 also means "off"
            top_p=float(_get(body, "top_p", float, 1.0)),
            seed=self._seed(body),
            stop=self._stop(body.get("stop")),
            ignore_eos=_get(body, "ignore_eos", bool, False),
            **fields,
        )
        try:
            sampling.validate()
        except InvalidRequestError as e:
            raise ApiError(400, str(e), "invalid_sampling") from e
        return ParsedRequest(prompt, sampling, _get(body, "stream", bool, False),
                             _get(stream_options, "include_usage", bool, False),
                             _get(body, "return_token_ids", bool, False),
                             _get(body, "session_id", str, None), _get(body, "priority", int, 0),
                             _get(body, "speculative", bool, False), _get(body, "cache_salt", str, None) or "")

    @staticmethod
    def _seed(body: Mapping[str, Any]) -> int | None:
        """Any int64 seed, folded into the engine's 32 bits (others: 400 naming 'seed')."""
        seed = _get(body, "seed", int, None)
        if seed is None:
            return None
        try:
            return fold_seed(seed)
        except InvalidRequestError as e:
            raise ApiError(400, str(e), "invalid_seed") from e

    def _check_model(self, body: Mapping[str, Any]) -> None:
        model = _get(body, "model", str, None)
        if model is None:
            raise ApiError(400, "missing required field 'model'", "missing_field")
        if model != self.stack.model_name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves {self.stack.model_name!r}",
                           "model_not_found")

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            return self.stack.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise ApiError(400, "'prompt' must be a string or a list of token ids (batches are not supported)",
                       "invalid_prompt")

    @staticmethod
    def _messages(messages: Any) -> list[dict[str, str]]:
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", "invalid_messages")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", "invalid_messages")
            content = m.get("content")
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported", "invalid_messages")
                content = "".join(p["text"] for p in content)
            if content is None:
                content = ""
            if not isinstance(content, str):
                raise ApiError(400, f"messages[{i}].content must be a string or text parts", "invalid_messages")
            out.append({"role": m["role"], "content": content})
        return out

    @staticmethod
    def _stop(stop: Any) -> tuple[str, ...]:
        if stop is None:
            return ()
        stops = [stop] if isinstance(stop, str) else stop
        if (not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops)
                or len(stops) > _MAX_STOP_STRINGS):
            raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {_MAX_STOP_STRINGS} "
                           "non-empty strings", "invalid_stop")
        return tuple(stops)


def _get(body: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    """body[key] checked against `kind` (None counts as absent); ints pass as floats, bools never as numbers."""
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise ApiError(400, f"'{key}' must be of type {kind.__name__}, got {type(value).__name__}", "invalid_type")
    return value


# ---- streaming text ------------------------------------------------------------------------------


class TextDeltas:
    """Turns the loop's "full text so far" into deltas that are never retracted.

    Holds back an incomplete UTF-8 tail (U+FFFD) and any tail that could still grow into a stop
    string (the loop would cut the text there), until the final event.
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.sent = ""

    def push(self, text: str | None, final: bool) -> str:
        if text is None or not text.startswith(self.sent):
            return ""
        ready = len(text) if final else self._stable_length(text)
        if ready <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):ready], text[:ready]
        return delta

    def _stable_length(self, text: str) -> int:
        end = len(text.rstrip("\ufffd"))
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, end), 0, -1):
                if text[end - n:end] == stop[:n]:
                    hold = max(hold, n)
                    break
        return end - hold


# ---- the app ------------------------------------------------------------------------------------


class _Generation:
    """The n submitted requests of one call (choice i = requests[i]; choices past the first share
    the first's prompt blocks through `fork_of`) and the queue their StreamEvents arrive on as
    (choice index, event) (event-loop side)."""

    def __init__(self, stack: ServingStack, parsed: ParsedRequest, request_id: str):
        self.stack = stack
        self.parsed = parsed
        n = parsed.sampling.n
        self.requests = [
            Request(request_id if i == 0 else f"{request_id}-{i}", parsed.prompt_tokens,
                    parsed.sampling if i == 0 else dataclasses.replace(
                        parsed.sampling, seed=child_seed(parsed.sampling.seed, i)),
                    session_id=parsed.session_id, namespace=parsed.namespace, priority=parsed.priority,
                    speculative=parsed.speculative, fork_of=request_id if i else None)
            for i in range(n)]
        self.request = self.requests[0]
        self.queue: asyncio.Queue[tuple[int, StreamEvent]] = asyncio.Queue()
        self.finished = [False] * n
        self.token_ids: list[list[int]] = [[] for _ in range(n)]
        aio_loop = asyncio.get_running_loop()

        def on_event(index: int, ev: StreamEvent) -> None:  # serving-loop thread
            aio_loop.call_soon_threadsafe(self.queue.put_nowait, (index, ev))

        for i, req in enumerate(self.requests):
            try:
                stack.loop.submit(req, functools.partial(on_event, i))
            except InvalidRequestError as e:
                self.finished[i:] = [True] * (n - i)
                self.cancel_unless_finished()
                code = "context_length_exceeded" if "context limit" in str(e) else "invalid_request"
                raise ApiError(400, str(e), code) from e

    @property
    def all_finished(self) -> bool:
        return all(self.finished)

    async def next_event(self) -> tuple[int, StreamEvent]:
        index, ev = await self.queue.get()
        self.token_ids[index].extend(ev.new_tokens)
        self.finished[index] = ev.finished
        if ev.finished and ev.error:
            self.cancel_unless_finished()
            raise ApiError(500, ev.error, "engine_error", "server_error")
        return index, ev

    def cancel_unless_finished(self) -> None:
        for i, req in enumerate(self.requests):
            if not self.finished[i]:
                self.stack.loop.cancel(req.request_id)
                self.finished[i] = True

    def logprobs(self, index: int, start: int, token_ids: list[int], chat: bool,
                 text_offset: int = 0) -> dict[str, Any] | None:
        """The choice's logprobs object for its tokens [start, start + len(token_ids)) (None when off)."""
        if self.parsed.sampling.logprobs is None:
            return None
        lps = self.requests[index].output_logprobs[start:start + len(token_ids)]
        return choice_logprobs(self.stack.detokenize, token_ids, lps, chat=chat, text_offset=text_offset)

    def usage(self) -> dict[str, Any]:
        prompt = len(self.request.prompt_tokens)
        completion = sum(len(ids) for ids in self.token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": self.request.num_cached_tokens}}


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
        async for chunk in http.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes", "body_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"malformed JSON body: {e}", "invalid_json") from e
        if not isinstance(body, dict):
            raise ApiError(400, "the JSON body must be an object", "invalid_json")
        return body

    async def completions(self, http: HttpRequest) -> Response:
        # Parsing tokenizes: a worker thread, so a huge prompt does not stall other streams.
        parsed = await anyio.to_thread.run_sync(self.parser.completion, await self.read_json(http))
        return await self._respond(http, parsed, chat=False)

    async def chat_completions(self, http: HttpRequest) -> Response:
        parsed = await anyio.to_thread.run_sync(self.parser.chat, await self.read_json(http))
        return await self._respond(http, parsed, chat=True)

    async def _respond(self, http: HttpRequest, parsed: ParsedRequest, chat: bool) -> Response:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        gen = _Generation(self.stack, parsed, rid)
        if parsed.stream:
            return StreamingResponse(self._stream(gen, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            return JSONResponse(await self._complete(http, gen, chat))
        finally:
            gen.cancel_unless_finished()

    async def _complete(self, http: HttpRequest, gen: _Generation, chat: bool) -> dict[str, Any]:
        # One pending get at a time (never wait_for on queue.get: a timeout could drop an event).
        # The disconnect check runs on a clock, not only when no event came: a decoding request
        # delivers an event every step, and its client may be long gone.
        pending: asyncio.Future[tuple[int, StreamEvent]] | None = None
        loop = asyncio.get_running_loop()
        next_check = loop.time() + _DISCONNECT_POLL_S
        final: dict[int, StreamEvent] = {}
        try:
            while len(final) < len(gen.requests):
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
        for index in range(len(gen.requests)):
            ev = final[index]
            text = ev.text or ""
            choice: dict[str, Any] = {"index": index, "finish_reason": ev.finish_reason,
                                      "logprobs": gen.logprobs(index, 0, gen.token_ids[index], chat)}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            if gen.parsed.return_token_ids:
                choice["token_ids"] = gen.token_ids[index]
            choices.append(choice)
        return {"id": gen.request.request_id, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.stack.model_name, "choices": choices,
                "usage": gen.usage()}

    async def _stream(self, gen: _Generation, chat: bool) -> AsyncIterator[str]:
        rid, created = gen.request.request_id, int(time.time())
        n = len(gen.requests)
        deltas = [TextDeltas(gen.parsed.sampling.stop) for _ in range(n)]

        def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
            obj: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                   "created": created, "model": self.stack.model_name, "choices": choices}
            if usage is not None:
                obj["usage"] = usage
            return f"data: {json.dumps(obj)}\n\n"

        def choice(index: int, text: str, finish_reason: str | None, first: bool, new_ids: list[int]) -> dict[str, Any]:
            c: dict[str, Any] = {"index": index, "finish_reason": finish_reason,
                                 "logprobs": gen.logprobs(index, sent_ids[index], new_ids, chat, sent_text[index])}
            if chat:
                c["delta"] = ({"role": "assistant", "content": text} if first else {"content": text})
            else:
                c["text"] = text
            if gen.parsed.return_token_ids:
                c["token_ids"] = new_ids
            return c

        first, ids = [True] * n, [[] for _ in range(n)]
        sent_ids, sent_text = [0] * n, [0] * n  # tokens and characters already sent, per choice
        try:
            while not gen.all_finished:
                try:
                    i, ev = await gen.next_event()
                except ApiError as e:
                    yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type, 'code': e.code}})}\n\n"
                    break
                text = deltas[i].push(ev.text, ev.finished)
                ids[i].extend(ev.new_tokens)  # ids of held-back text go out with the next chunk
                if text or ev.finished or (first[i] and chat):
                    yield chunk([choice(i, text, ev.finish_reason if ev.finished else None, first[i], ids[i])])
                    sent_ids[i] += len(ids[i])
                    sent_text[i] += len(text)
                    first[i], ids[i] = False, []
                if gen.all_finished and gen.parsed.include_usage:
                    yield chunk([], gen.usage())
            yield "data: [DONE]\n\n"
        finally:  # client gone (generator closed or cancelled) -> free the request's blocks
            gen.cancel_unless_finished()

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.stack.model_name, "object": "model", "created": self.created,
                                            "owned_by": "agentinfer-jax",
                                            "max_model_len": self.stack.config.max_model_len}]}

    def health(self) -> JSONResponse:
        if not _loop_alive(self.stack):
            return _error_response(503, "the serving loop is not running", "loop_down", "server_error")
        return JSONResponse({"status": "ok"})

    def metrics(self) -> Response:
        return Response(self.stack.loop.metrics.prometheus_text(), media_type=CONTENT_TYPE_LATEST)


def _loop_alive(stack: ServingStack) -> bool:
    return stack.loop.is_running


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
        return _error_response(e.status_code, str(e.detail), None, "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal_error(_: HttpRequest, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error_response(500, f"internal error: {type(e).__name__}", "internal_error", "server_error")

    app.add_api_route("/v1/completions", routes.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", routes.chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", routes.models, methods=["GET"])
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
