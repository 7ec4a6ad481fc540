"""Every field of OpenAI's chat and completion request bodies, as the `openai` package declares them,
either takes effect on our server or gets a 400 that names it: no field is silently ignored.

The field lists come from the installed `openai` package's own parameter types, so a field OpenAI
adds fails this test until the server decides what to do with it (EFFECTS or REFUSED below).
"""

from __future__ import annotations

import json
import random
import typing

import httpx
import pytest
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params

from agentinfer_jax.serving.tool_parsers import format_hermes_reply
from forced_replies import tiny_server

TOOL = {"type": "function", "function": {"name": "search", "description": "Search the web",
                                         "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                                                        "required": ["query"]}}}
MESSAGES = [{"role": "user", "content": "Name a river in France."}]
PROMPT = [random.Random(4).randrange(5, 4096) for _ in range(12)]
NEW = 8
FORCED = {"max_tokens": 200, "ignore_eos": False}  # room for a forced reply, which ends at its EOS


def openai_fields(params) -> set[str]:
    fields = set(typing.get_type_hints(params.CompletionCreateParamsBase))
    return fields | {"stream"}  # declared on the streaming / non-streaming variants


@pytest.fixture(scope="module")
def server():
    with tiny_server(num_blocks=96, block_size=16, max_num_seqs=2, max_tokens_per_step=256, min_token_bucket=256,
                     max_model_len=1024) as srv:
        yield srv


class Api:
    def __init__(self, server):
        self.server, self.model = server, server.stack.model_name
        self.http = httpx.Client(base_url=server.base_url, timeout=120)

    def post(self, path: str, **fields):
        base = {"model": self.model, "max_tokens": NEW, "temperature": 0, "ignore_eos": True}
        base.update({"messages": MESSAGES} if "chat" in path else {"prompt": PROMPT})
        res = self.http.post(path, json={**base, **fields})
        return res.status_code, res.json() if res.headers.get("content-type", "").startswith("application/json") \
            else res.text

    def ok(self, path: str, **fields):
        status, body = self.post(path, **fields)
        assert status == 200, (fields, body)
        return body

    @staticmethod
    def out(body):
        c = body["choices"][0]
        return c["message"]["content"] if "message" in c else c["text"]


# ---- fields that take effect: each check shows the effect against a baseline ----------------------


def _greedy(api, path):
    return api.out(api.ok(path))


def check_model(api, path):
    status, body = api.post(path, model="not-" + api.model)
    assert status == 404 and "model" in body["error"]["message"]


def check_max_tokens(api, path, field="max_tokens"):
    assert api.ok(path, **{field: 3})["usage"]["completion_tokens"] == 3


def check_temperature(api, path):  # sampled draws differ from greedy and between seeds
    outs = {api.out(api.ok(path, temperature=1.5, seed=s)) for s in range(4)}
    assert len(outs) > 1 or _greedy(api, path) not in outs


def check_top_p(api, path):  # a tiny nucleus is greedy even at high temperature
    assert api.out(api.ok(path, temperature=1.5, top_p=1e-6, seed=3)) == _greedy(api, path)


def check_seed(api, path):
    a, b = (api.out(api.ok(path, temperature=1.0, seed=s)) for s in (11, 11))
    c = [api.out(api.ok(path, temperature=1.0, seed=s)) for s in (12, 13, 14)]
    assert a == b and any(x != a for x in c)


def check_stop(api, path):
    text = _greedy(api, path)
    stop = text[2:4]
    body = api.ok(path, stop=[stop])
    assert api.out(body) == text[:text.find(stop)] and body["choices"][0]["finish_reason"] == "stop"


def check_stream(api, path):
    status, body = api.post(path, stream=True)
    assert status == 200 and body.startswith("data: ") and body.rstrip().endswith("data: [DONE]")


def check_stream_options(api, path):
    _, body = api.post(path, stream=True, stream_options={"include_usage": True})
    assert '"usage": {"prompt_tokens"' in body
    status, err = api.post(path, stream=True, stream_options={"include_obfuscation": True})
    assert status == 400 and "include_obfuscation" in err["error"]["message"]


def check_noop_or_refused(field, noop, refused):
    """Fields we cannot honour yet: their no-op value is served, any other value is a 400 naming them."""
    def check(api, path):
        api.ok(path, **{field: noop})
        status, body = api.post(path, **{field: refused})
        assert status == 400 and field in body["error"]["message"] and body["error"]["param"] == field, body
    return check


def check_tools(api, path):  # the tools are rendered into the prompt
    plain = api.ok(path, tool_choice="none", tools=[TOOL])["usage"]["prompt_tokens"]
    assert plain > api.ok(path)["usage"]["prompt_tokens"] + 50


def check_tool_choice(api, path):
    body = api.ok(path, tools=[TOOL], tool_choice={"type": "function", "function": {"name": "search"}})
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "search"
    api.server.forced.script = [format_hermes_reply(None, [("search", {"query": "x"})])]
    body = api.ok(path, tools=[TOOL], tool_choice="none", **FORCED)
    assert "tool_calls" not in body["choices"][0]["message"] and "<tool_call>" in api.out(body)


def check_parallel_tool_calls(api, path):
    two = format_hermes_reply(None, [("search", {"query": "a"}), ("search", {"query": "b"})])
    for parallel, expected in ((True, 2), (False, 1)):
        api.server.forced.script = [two]
        body = api.ok(path, tools=[TOOL], parallel_tool_calls=parallel, **FORCED)
        assert len(body["choices"][0]["message"]["tool_calls"]) == expected


def check_prompt_cache_key(api, path):  # OpenAI's cache-affinity key is our session
    api.ok(path, prompt_cache_key="affinity-7")
    assert api.server.forced.requests[-1].session_id == "affinity-7"


def check_modalities(api, path):
    check_noop_or_refused("modalities", ["text"], ["text", "audio"])(api, path)


def check_messages(api, path):  # the history is the prompt
    a = api.ok(path)["usage"]["prompt_tokens"]
    assert api.ok(path, messages=MESSAGES * 2)["usage"]["prompt_tokens"] > a


def check_prompt(api, path):
    assert api.ok(path, prompt=PROMPT[:5])["usage"]["prompt_tokens"] == 5


def check_n(api, path):  # n choices, each its own draw (choice 0 is the request's own seed)
    body = api.ok(path, n=3, temperature=1.5, seed=5)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert len({api.out({"choices": [c]}) for c in body["choices"]}) > 1
    assert api.out(body) == api.out(api.ok(path, temperature=1.5, seed=5))
    status, err = api.post(path, n=0)
    assert status == 400 and err["error"]["param"] == "n"


def _repeats(ids):
    return len(ids) - len(set(ids))


def check_penalty(field):
    def check(api, path):  # a strong penalty on repeats changes a greedy reply that repeats itself
        plain = api.ok(path, max_tokens=32, return_token_ids=True)["choices"][0]["token_ids"]
        penal = api.ok(path, max_tokens=32, return_token_ids=True, **{field: 2.0})["choices"][0]["token_ids"]
        assert _repeats(plain) > 0, "the greedy reply does not repeat: pick another prompt"
        assert penal != plain and _repeats(penal) <= _repeats(plain)
        status, err = api.post(path, **{field: 3.0})
        assert status == 400 and err["error"]["param"] == field
    return check


def check_logit_bias(api, path):  # +100 on one token makes every greedy token that one
    body = api.ok(path, logit_bias={"77": 100}, return_token_ids=True)
    assert body["choices"][0]["token_ids"] == [77] * NEW
    status, err = api.post(path, logit_bias={"77": 101})
    assert status == 400 and err["error"]["param"] == "logit_bias"


def check_chat_logprobs(api, path):
    body = api.ok(path, logprobs=True, top_logprobs=2)
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == NEW and all(len(c["top_logprobs"]) == 2 for c in content)
    assert all(c["logprob"] <= 0 for c in content)
    assert api.ok(path, logprobs=False)["choices"][0]["logprobs"] is None


def check_top_logprobs(api, path):
    status, err = api.post(path, top_logprobs=2)  # without logprobs: refused, named
    assert status == 400 and err["error"]["param"] == "top_logprobs"
    check_chat_logprobs(api, path)


def check_completion_logprobs(api, path):
    lp = api.ok(path, logprobs=3)["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == NEW and all(len(t) <= 3 for t in lp["top_logprobs"])


def check_response_format(api, path):  # the reply follows the schema
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    body = api.ok(path, max_tokens=64, response_format={"type": "json_schema",
                                                        "json_schema": {"name": "r", "schema": schema}})
    assert isinstance(json.loads(api.out(body))["ok"], bool)
    status, err = api.post(path, response_format={"type": "json_schema", "json_schema": {"name": "r"}})
    assert status == 400 and err["error"]["param"] == "response_format"


COMMON = {
    "model": check_model, "max_tokens": check_max_tokens, "temperature": check_temperature, "top_p": check_top_p,
    "seed": check_seed, "stop": check_stop, "stream": check_stream, "stream_options": check_stream_options,
    "n": check_n, "presence_penalty": check_penalty("presence_penalty"),
    "frequency_penalty": check_penalty("frequency_penalty"), "logit_bias": check_logit_bias,
    "user": check_noop_or_refused("user", None, "u-1"),
}
CHAT_EFFECTS = {
    **COMMON, "messages": check_messages,
    "max_completion_tokens": lambda api, path: check_max_tokens(api, path, "max_completion_tokens"),
    "tools": check_tools, "tool_choice": check_tool_choice, "parallel_tool_calls": check_parallel_tool_calls,
    "prompt_cache_key": check_prompt_cache_key, "modalities": check_modalities,
    "logprobs": check_chat_logprobs, "top_logprobs": check_top_logprobs, "response_format": check_response_format,
    "store": check_noop_or_refused("store", False, True),
    "service_tier": check_noop_or_refused("service_tier", "auto", "flex"),
    "audio": check_noop_or_refused("audio", None, {"voice": "alloy", "format": "wav"}),
    "functions": check_noop_or_refused("functions", None, [{"name": "f", "parameters": {}}]),
    "function_call": check_noop_or_refused("function_call", None, "auto"),
    "metadata": check_noop_or_refused("metadata", None, {"k": "v"}),
    "moderation": check_noop_or_refused("moderation", None, {"type": "auto"}),
    "prediction": check_noop_or_refused("prediction", None, {"type": "content", "content": "x"}),
    "prompt_cache_options": check_noop_or_refused("prompt_cache_options", None, {"x": 1}),
    "prompt_cache_retention": check_noop_or_refused("prompt_cache_retention", None, "24h"),
    "reasoning_effort": check_noop_or_refused("reasoning_effort", None, "low"),
    "safety_identifier": check_noop_or_refused("safety_identifier", None, "s-1"),
    "verbosity": check_noop_or_refused("verbosity", None, "low"),
    "web_search_options": check_noop_or_refused("web_search_options", None, {}),
}
COMPLETION_EFFECTS = {
    **COMMON, "prompt": check_prompt,
    "best_of": check_noop_or_refused("best_of", 1, 2),
    "echo": check_noop_or_refused("echo", False, True),
    "logprobs": check_completion_logprobs,
    "suffix": check_noop_or_refused("suffix", None, "tail"),
}


@pytest.mark.parametrize("path, params, effects", [
    ("/v1/chat/completions", chat_create_params, CHAT_EFFECTS),
    ("/v1/completions", completion_create_params, COMPLETION_EFFECTS),
], ids=["chat", "completions"])
def test_every_openai_request_field_takes_effect_or_is_a_400_naming_it(server, path, params, effects):
    fields = openai_fields(params)
    assert fields - set(effects) == set(), "fields the server has not decided on"
    api = Api(server)
    for field in sorted(fields):
        effects[field](api, path)
    # Unknown fields (typos, other servers' extensions) are refused by name, never ignored.
    status, body = api.post(path, temprature=0.5)
    assert status == 400 and "temprature" in body["error"]["message"]


# The SGLang Model Gateway (sglang-router 0.3.2, agentinfer-replicas) forwards each request with these
# SGLang fields at their defaults (captured from the router's own requests to a worker).
ROUTER_CHAT_FIELDS = {"logprobs": False, "stream": False, "no_stop_trim": False, "ignore_eos": False,
                      "continue_final_message": False, "skip_special_tokens": True, "separate_reasoning": True,
                      "stream_reasoning": True, "return_hidden_states": False}
ROUTER_COMPLETION_FIELDS = {"stream": False, "echo": False, "no_stop_trim": False, "ignore_eos": False,
                            "skip_special_tokens": True, "return_hidden_states": False}


@pytest.mark.parametrize("path, fields", [("/v1/chat/completions", ROUTER_CHAT_FIELDS),
                                          ("/v1/completions", ROUTER_COMPLETION_FIELDS)], ids=["chat", "completions"])
def test_what_the_router_forwards_is_served_and_other_values_are_named(server, path, fields):
    api = Api(server)
    assert api.out(api.ok(path, **fields)) == _greedy(api, path)
    for field, value in (("no_stop_trim", True), ("skip_special_tokens", False), ("return_hidden_states", True)):
        status, body = api.post(path, **{**fields, field: value})
        assert status == 400 and body["error"]["param"] == field, body


def test_continue_final_message_continues_the_assistant_prefix(server):
    """The reply to a chat whose last assistant message is continued equals the completion of the
    same prompt rendered by transformers (its `continue_final_message`), and bad combinations are
    400s naming the field."""
    transformers = pytest.importorskip("transformers")
    from agentinfer_jax.tokenizer import ASSETS_DIR

    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(ASSETS_DIR / "tokenizer.json"))
    ref.chat_template = json.loads((ASSETS_DIR / "tokenizer_config.json").read_text())["chat_template"]
    messages = [*MESSAGES, {"role": "assistant", "content": "The river is"}]
    ids = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=False, continue_final_message=True,
                                  return_dict=False)
    api = Api(server)
    chat = api.ok("/v1/chat/completions", messages=messages, continue_final_message=True)
    completion = api.ok("/v1/completions", prompt=list(ids))
    assert chat["usage"]["prompt_tokens"] == len(ids)
    assert api.out(chat) == api.out(completion)
    # Without the flag the assistant turn is closed and a new one starts: a different prompt.
    assert api.ok("/v1/chat/completions", messages=messages)["usage"]["prompt_tokens"] != len(ids)
    status, body = api.post("/v1/chat/completions", messages=messages, continue_final_message=True,
                            add_generation_prompt=True)
    assert status == 400 and body["error"]["param"] == "continue_final_message", body
    status, body = api.post("/v1/chat/completions", messages=MESSAGES, continue_final_message=True)
    assert status == 400 and "assistant" in body["error"]["message"], body
