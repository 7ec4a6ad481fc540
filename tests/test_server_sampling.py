"""Issue #21's sampling fields over HTTP (official `openai` client): response_format, n, logprobs,
penalties and logit_bias take effect; values that cannot are a 400 naming the field."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from agentinfer_jax.serving.builder import ServerConfig, build_stack
from agentinfer_jax.serving.server import BackgroundServer

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 50},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "n", "ok"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "rec", "schema": SCHEMA, "strict": True}}
MESSAGES = [{"role": "user", "content": "Give me a record."}]


@pytest.fixture(scope="module")
def server():
    stack = build_stack(ServerConfig(config="tiny", num_blocks=128, block_size=16, max_num_seqs=4,
                                     max_tokens_per_step=64, min_token_bucket=64, max_model_len=256,
                                     drafter="ngram", num_draft_tokens=3))
    srv = BackgroundServer(stack).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def blocks_in_use(stack):
    return stack.pool.num_used - (stack.prefix_cache.num_evictable() if stack.prefix_cache else 0)


def test_json_schema_outputs_validate_and_stream_equals_non_stream(server, client):
    name = server.stack.model_name
    for temperature in (0.0, 1.0):
        for seed in range(3):
            kw = dict(model=name, messages=MESSAGES, response_format=FORMAT, max_tokens=120,
                      temperature=temperature, seed=seed)
            whole = client.chat.completions.create(**kw).choices[0]
            jsonschema.validate(json.loads(whole.message.content), SCHEMA)
            assert whole.finish_reason == "stop"
            parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                     if c.choices]
            assert "".join(parts) == whole.message.content
    assert blocks_in_use(server.stack) == 0


def test_n_choices_with_logprobs_stream_and_non_stream(server, client):
    name = server.stack.model_name
    kw = dict(model=name, messages=MESSAGES, max_tokens=12, temperature=1.0, seed=7, n=3, logprobs=True,
              top_logprobs=2)
    res = client.chat.completions.create(**kw)
    assert [c.index for c in res.choices] == [0, 1, 2]
    texts = [c.message.content for c in res.choices]
    assert len(set(texts)) == 3  # each choice draws from its own seed
    for c in res.choices:
        assert len(c.logprobs.content) == 12 or c.finish_reason == "stop"
        for tok in c.logprobs.content:
            assert tok.logprob <= 0 and len(tok.top_logprobs) == 2
            assert tok.top_logprobs[0].logprob >= tok.logprob - 1e-6 or tok.token == tok.top_logprobs[0].token
    assert res.usage.completion_tokens == sum(len(c.logprobs.content) for c in res.choices)
    streamed = ["", "", ""]
    lps = [[], [], []]
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
            lps[c.index] += [t.logprob for t in (c.logprobs.content if c.logprobs else [])]
    assert streamed == texts
    assert lps == [[t.logprob for t in c.logprobs.content] for c in res.choices]
    assert blocks_in_use(server.stack) == 0


def test_completions_logprobs_penalties_and_logit_bias(server, client):
    name = server.stack.model_name
    res = client.completions.create(model=name, prompt=[10, 20, 30, 40], max_tokens=8, temperature=0, logprobs=3)
    lp = res.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert all(len(t) <= 3 for t in lp.top_logprobs)
    # logit_bias +100 on one token: greedy picks it every time.
    res = client.completions.create(model=name, prompt=[10, 20, 30, 40], max_tokens=5, temperature=0,
                                    logit_bias={"999": 100}, extra_body={"return_token_ids": True})
    assert res.choices[0].model_extra["token_ids"] == [999] * 5
    # frequency penalty 2 with the same bias: after the first 999 its logit drops by 2 per use.
    res = client.completions.create(model=name, prompt=[10, 20, 30, 40], max_tokens=5, temperature=0,
                                    logit_bias={"999": 3}, frequency_penalty=2.0,
                                    extra_body={"return_token_ids": True})
    ids = res.choices[0].model_extra["token_ids"]
    assert ids.count(999) < 5


@pytest.mark.parametrize("body,field", [
    ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": "x"}, "frequency_penalty"),
    ({"n": 0}, "'n'"),
    ({"n": 99}, "'n'"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}},
     "response_format"),
    # a schema beside another type, or a key the schema object does not have, was ignored
    ({"response_format": {"type": "text", "json_schema": {"schema": {"type": "integer"}}}}, "response_format"),
    ({"response_format": {"type": "json_object", "json_schema": {"schema": {"type": "integer"}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "integer"}, "shema": {}}}},
     "response_format.json_schema.shema"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # no stream: no usage chunk to add
    ({"top_k": 2**31, "temperature": 1.0}, "top_k"),  # the engine packs k as int32 (was a 500)
    ({"top_k": -2}, "top_k"),
    # int() reads these as ids; a token id is decimal digits
    ({"logit_bias": {" 5": 1}}, "logit_bias"),
    ({"logit_bias": {"1_0": 1}}, "logit_bias"),
    # max_completion_tokens wins over max_tokens, but a bad max_tokens beside it is not dropped
    ({"max_tokens": -1, "max_completion_tokens": 3}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
])
def test_fields_that_cannot_take_effect_are_a_400_naming_them(server, body, field):
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        res = http.post("/v1/chat/completions", json={"model": server.stack.model_name, "messages": MESSAGES,
                                                       "max_tokens": 2, **body})
    assert res.status_code == 400, res.text
    assert field.strip("'") in res.json()["error"]["message"]
    assert (res.json()["error"]["param"] or "").startswith(field.strip("'")), res.text
