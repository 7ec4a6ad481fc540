"""OpenAI request fields of sampling (issue #21) -> `SamplingParams`, and logprobs in the response.

Self-contained so that it can move into the server's protocol module as is:
- `sampling_fields(body, chat=...)`: n, logprobs / top_logprobs, presence_penalty,
  frequency_penalty, logit_bias and response_format as `SamplingParams` keyword arguments; any
  value that cannot take effect raises `FieldError` naming the field (the server answers 400).
- `choice_logprobs(...)`: a choice's "logprobs" object in the chat or the completions shape.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable

from agentinfer_jax.engine.structured import validate_structured
from agentinfer_jax.sampling_params import MAX_N, MAX_TOP_LOGPROBS, InvalidRequestError, StructuredOutput

__all__ = ["FieldError", "sampling_fields", "choice_logprobs", "child_seed"]

MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's limit


class FieldError(InvalidRequestError):
    """A request field that cannot take effect as given; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _number(body: Mapping[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FieldError(key, f"'{key}' must be a number, got {value!r}")
    return float(value)


def _int(body: Mapping[str, Any], key: str, default: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(key, f"'{key}' must be an integer, got {value!r}")
    return value


def _logprobs(body: Mapping[str, Any], chat: bool) -> int | None:
    if chat:  # logprobs: bool, top_logprobs: 0..20 (needs logprobs=true)
        flag = body.get("logprobs")
        if flag is not None and not isinstance(flag, bool):
            raise FieldError("logprobs", f"'logprobs' must be a boolean, got {flag!r}")
        top = _int(body, "top_logprobs", None)
        if top is not None and not flag:
            raise FieldError("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        if not flag:
            return None
        k = 0 if top is None else top
        field = "top_logprobs"
    else:  # completions: logprobs is the number of top logprobs
        k = _int(body, "logprobs", None)
        if k is None:
            return None
        field = "logprobs"
    if not 0 <= k <= MAX_TOP_LOGPROBS:
        raise FieldError(field, f"'{field}' must be in 0..{MAX_TOP_LOGPROBS}, got {k}")
    return k


def _logit_bias(body: Mapping[str, Any]) -> tuple[tuple[int, float], ...]:
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, Mapping) or len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise FieldError("logit_bias", f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS_ENTRIES} "
                                       "token id -> bias entries")
    out = []
    for key, value in bias.items():
        # decimal digits only: int() would also read " 5", "1_0" and "+5" as ids
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise FieldError("logit_bias", f"'logit_bias' keys must be token ids, got {key!r}")
        tok = int(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise FieldError("logit_bias", f"'logit_bias' values must be numbers in [-100, 100], got {value!r}")
        out.append((tok, float(value)))
    return tuple(out)


def _response_format(body: Mapping[str, Any]) -> StructuredOutput | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        spec = StructuredOutput("json_object")
    elif kind == "json_schema":
        inner = fmt.get("json_schema")
        schema = inner.get("schema") if isinstance(inner, Mapping) else None
        if not isinstance(schema, Mapping):
            raise FieldError("response_format", "'response_format.json_schema.schema' must be an object")
        spec = StructuredOutput("json_schema", json.dumps(schema))
    else:
        raise FieldError("response_format", "'response_format.type' must be 'text', 'json_object' or 'json_schema'")
    try:
        validate_structured(spec)
    except InvalidRequestError as e:
        raise FieldError("response_format", f"'response_format': {e}") from e
    return spec


def sampling_fields(body: Mapping[str, Any], *, chat: bool) -> dict[str, Any]:
    """`SamplingParams` keyword arguments for n, logprobs, penalties, logit_bias and response_format."""
    n = _int(body, "n", 1)
    if not 1 <= n <= MAX_N:
        raise FieldError("n", f"'n' must be in 1..{MAX_N}, got {n}")
    fields: dict[str, Any] = {"n": n, "logprobs": _logprobs(body, chat), "logit_bias": _logit_bias(body),
                              "structured": _response_format(body)}
    for key in ("presence_penalty", "frequency_penalty"):
        value = _number(body, key, 0.0)
        if not -2.0 <= value <= 2.0:
            raise FieldError(key, f"'{key}' must be in [-2, 2], got {value}")
        fields[key] = value
    return fields


def child_seed(seed: int | None, index: int) -> int | None:
    """Choice `index`'s seed: the request's for choice 0, a distinct one derived from it for the rest
    (None stays None: each choice then gets the default seed of its own request id)."""
    if seed is None or index == 0:
        return seed
    return (seed * 1_000_003 + index * 0x9E3779B1) % 2**32


def choice_logprobs(decode: Callable[[Sequence[int]], str], token_ids: Sequence[int], logprobs: Sequence[Any],
                    *, chat: bool, text_offset: int = 0) -> dict[str, Any]:
    """The "logprobs" object of a choice for `token_ids` with their `TokenLogprob`s.

    Chat: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]};
    completions: {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}.
    """
    def entry(tok: int, lp: float) -> dict[str, Any]:
        text = decode([tok])
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    pairs = [(t, lp) for t, lp in zip(token_ids, logprobs) if lp is not None]
    if chat:
        return {"content": [{**entry(t, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                            for t, lp in pairs]}
    tokens, offsets, at = [], [], text_offset
    for t, _ in pairs:
        tokens.append(decode([t]))
        offsets.append(at)
        at += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [lp.logprob for _, lp in pairs],
            "top_logprobs": [{decode([i]): v for i, v in lp.top} for _, lp in pairs], "text_offset": offsets}
