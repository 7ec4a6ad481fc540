"""OpenAI tool calling: the output parsers, the server (official `openai` client on loopback), the trace
loader and ReActAgent with native tools.

The tiny random model cannot write a tool call, so the server tests force its reply tokens (the
scheduler's trace-replay path, `Request.forced_output`): the forward passes, the detokenizer, the
streaming and the tool-call parsing are the server's own. References are independent: the calls the
forced text was written from, transformers' apply_chat_template for the prompt, jsonschema.
"""

from __future__ import annotations

import asyncio
import json
import random
import string
import types

import httpx
import openai
import pytest

from agentinfer_jax.serving import tool_parsers
from agentinfer_jax.serving.tool_parsers import (HermesToolParser, Llama3JsonToolParser, RequiredToolParser,
                                                 format_hermes_reply, parse_all)
from agentinfer_jax.workloads.traces import TraceFormatError, load_traces
from forced_replies import tiny_server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"],
                   "additionalProperties": False}}}
TOOLS = [WEATHER, SEARCH]
NAMES = ("get_weather", "search")


def random_args(rng, name):
    word = "".join(rng.choice(string.ascii_letters + " éü中{}\"<>") for _ in range(rng.randint(1, 12)))
    return {"city": word, "days": rng.randint(1, 9)} if name == "get_weather" else {"query": word}


def random_chunks(rng, text):
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12)))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def streamed(parser, chunks):
    deltas = [d for c in chunks for d in parser.feed(c)] + parser.finish()
    content = "".join(d.content for d in deltas if d.content is not None)
    calls: dict[int, dict] = {}
    for d in deltas:
        if d.index is not None:
            c = calls.setdefault(d.index, {"name": None, "arguments": ""})
            c["name"] = d.name or c["name"]
            c["arguments"] += d.arguments or ""
    return content, [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]


# ---- parsers ------------------------------------------------------------------------------------


def test_hermes_parser_reads_back_the_calls_it_was_written_from_under_any_chunking():
    rng = random.Random(0)
    for _ in range(200):
        calls = [(n, random_args(rng, n)) for n in rng.choices(NAMES, k=rng.randint(0, 3))]
        content = rng.choice(["", "Let me check.", "I'll <b>look</b> it up: <tool"])
        text = format_hermes_reply(content, calls)
        whole_content, whole_calls = parse_all(HermesToolParser(NAMES), text)
        assert [(c.name, json.loads(c.arguments)) for c in whole_calls] == calls
        assert whole_content == (content if content or not calls else None)
        got_content, got_calls = streamed(HermesToolParser(NAMES), random_chunks(rng, text))
        assert got_calls == calls and got_content == (whole_content or "")


def test_hermes_parser_keeps_bad_blocks_as_text_and_parallel_false_keeps_one_call():
    bad = 'a <tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call> b <tool_call>{not json</tool_call>'
    assert parse_all(HermesToolParser(NAMES), bad) == (bad, [])
    unclosed = 'x <tool_call>\n{"name": "search", "arguments": {"query": "q"}}'
    assert parse_all(HermesToolParser(NAMES), unclosed) == (unclosed, [])
    two = format_hermes_reply(None, [("search", {"query": "a"}), ("search", {"query": "b"})])
    _, calls = parse_all(HermesToolParser(NAMES, parallel=False), two)
    assert [json.loads(c.arguments) for c in calls] == [{"query": "a"}]


def test_llama3_json_parser_under_any_chunking():
    rng = random.Random(1)
    for _ in range(200):
        calls = [(n, random_args(rng, n)) for n in rng.choices(NAMES, k=rng.randint(1, 2))]
        body = "; ".join(json.dumps({"name": n, "parameters": a}, ensure_ascii=False) for n, a in calls)
        text = rng.choice(["", "<|python_tag|>", " "]) + body
        content, got = parse_all(Llama3JsonToolParser(NAMES), text)
        assert content is None and [(c.name, json.loads(c.arguments)) for c in got] == calls
        assert streamed(Llama3JsonToolParser(NAMES), random_chunks(rng, text)) == ("", calls)
    plain = "The weather is {fine}."
    assert parse_all(Llama3JsonToolParser(NAMES), plain) == (plain, [])
    broken = '{"name": "search", "parameters": {"query": '
    assert streamed(Llama3JsonToolParser(NAMES), [broken]) == (broken, [])


def test_required_schema_accepts_exactly_the_valid_replies():
    good = [{"name": "search", "parameters": {"query": "x"}}]
    _, calls = parse_all(RequiredToolParser(NAMES), json.dumps(good))
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("search", {"query": "x"})]
    assert parse_all(RequiredToolParser(NAMES), '[{"name": "other", "parameters": {}}]')[1] == []
    named = tool_parsers.tool_choice_json_schema(TOOLS, {"type": "function", "function": {"name": "search"}})
    assert named == SEARCH["function"]["parameters"]
    jsonschema = pytest.importorskip("jsonschema")  # not a dependency yet (the grammar work may bring it)
    schema = tool_parsers.tool_choice_json_schema(TOOLS, "required", parallel=False)
    jsonschema.validate(good, schema)
    for bad in ([], [{"name": "search", "parameters": {}}], [{"name": "other", "parameters": {}}], good * 2):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


# ---- the server --------------------------------------------------------------------------------


SERVER = dict(num_blocks=160, block_size=16, max_num_seqs=2, max_tokens_per_step=256, min_token_bucket=256,
              max_model_len=2048)


@pytest.fixture(scope="module")
def server():
    with tiny_server(**SERVER, drafter="ngram", num_draft_tokens=4) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


HISTORY = [
    {"role": "system", "content": "You are a travel assistant."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, clear"},
    {"role": "tool", "tool_call_id": "call_2", "content": "24 C, sunny"},
    {"role": "user", "content": "And what about news on Rome?"},
]


def test_tools_and_tool_history_reach_the_prompt_as_transformers_renders_them(server, client):
    transformers = pytest.importorskip("transformers")
    from agentinfer_jax.tokenizer import ASSETS_DIR

    ref = transformers.AutoTokenizer.from_pretrained(str(ASSETS_DIR))
    history = [dict(m, tool_calls=[dict(c, function=dict(c["function"], arguments=json.loads(
        c["function"]["arguments"]))) for c in m["tool_calls"]]) if m.get("tool_calls") else m for m in HISTORY]
    expected = ref.apply_chat_template(history, tools=TOOLS, tokenize=True, add_generation_prompt=True,
                                       return_dict=False)
    res = client.chat.completions.create(model=server.stack.model_name, messages=HISTORY, tools=TOOLS,
                                         max_tokens=2, temperature=0)
    assert server.forced.prompts[-1] == list(expected)
    assert res.usage.prompt_tokens == len(expected)
    text = server.stack.tokenizer.decode(expected)
    assert "<tools>" in text and "24 C, sunny" in text and '"city": "Rome"' in text


def _forced_calls(rng):
    calls = [(n, random_args(rng, n)) for n in rng.choices(NAMES, k=rng.randint(1, 2))]
    return calls, format_hermes_reply(rng.choice([None, "Checking."]), calls)


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_calls_come_back_parsed_and_stream_as_deltas_that_join_to_them(server, client, stream):
    rng = random.Random(5 + stream)
    for _ in range(3):
        calls, text = _forced_calls(rng)
        server.forced.script = [text, text]
        kw = dict(model=server.stack.model_name, messages=HISTORY[:2], tools=TOOLS, temperature=0)
        full = client.chat.completions.create(**kw).choices[0]
        assert full.finish_reason == "tool_calls"
        assert [(c.function.name, json.loads(c.function.arguments)) for c in full.message.tool_calls] == calls
        if not stream:
            continue
        chunks = list(client.chat.completions.create(stream=True, **kw))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        joined: dict[int, dict] = {}
        for c in chunks:
            for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
                j = joined.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                j["id"] = d.id or j["id"]
                j["name"] += (d.function.name or "") if d.function else ""
                j["arguments"] += (d.function.arguments or "") if d.function else ""
        assert (content or None) == full.message.content
        assert [(j["name"], j["arguments"]) for _, j in sorted(joined.items())] == \
            [(c.function.name, c.function.arguments) for c in full.message.tool_calls]
        assert all(j["id"] for j in joined.values())
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
            ["tool_calls"]


def test_tool_choice_none_named_required_and_parallel_false(server, client):
    calls, text = _forced_calls(random.Random(9))
    kw = dict(model=server.stack.model_name, messages=HISTORY[:2], tools=TOOLS, temperature=0)
    server.forced.script = [text]
    res = client.chat.completions.create(tool_choice="none", **kw).choices[0]
    assert res.message.tool_calls is None and res.message.content == text and res.finish_reason == "stop"

    two = format_hermes_reply(None, [("search", {"query": "a"}), ("search", {"query": "b"})])
    server.forced.script = [two]
    res = client.chat.completions.create(parallel_tool_calls=False, **kw).choices[0]
    assert [json.loads(c.function.arguments) for c in res.message.tool_calls] == [{"query": "a"}]

    # Named / required: the reply is the arguments / a JSON list (a grammar will hold it to the schema).
    server.forced.script = ['{"query": "rome news"}']
    res = client.chat.completions.create(tool_choice={"type": "function", "function": {"name": "search"}}, **kw)
    (call,) = res.choices[0].message.tool_calls
    assert call.function.name == "search" and json.loads(call.function.arguments) == {"query": "rome news"}
    server.forced.script = [json.dumps([{"name": "get_weather", "parameters": {"city": "Oslo"}}])]
    res = client.chat.completions.create(tool_choice="required", **kw).choices[0]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in res.message.tool_calls] == \
        [("get_weather", {"city": "Oslo"})]
    assert res.finish_reason == "tool_calls"


def test_bad_tool_requests_are_400s_naming_the_field(server):
    base = {"model": server.stack.model_name, "max_tokens": 2, "messages": HISTORY[:2]}
    cases = [
        ({**base, "tool_choice": "required"}, "tool_choice"),
        ({**base, "parallel_tool_calls": False}, "parallel_tool_calls"),
        ({**base, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({**base, "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        ({**base, "tools": [{"type": "retrieval"}]}, "tools"),
        ({**base, "messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
        ({**base, "messages": [*HISTORY[:2], {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "search", "arguments": "{oops"}}]}]}, "arguments"),
        ({**base, "messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "tool_calls"),
        ({**base, "functions": [{"name": "f"}]}, "functions"),
        ({**base, "tools": [TOOLS[0], TOOLS[0]]}, "tools"),  # which definition would a call be of?
    ]
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        for body, field in cases:
            res = http.post("/v1/chat/completions", json=body)
            assert res.status_code == 400, (field, res.text)
            assert field in res.json()["error"]["message"], (field, res.text)


def test_each_template_gets_its_parser_and_a_template_without_tools_refuses_them(tmp_path):
    transformers = pytest.importorskip("transformers")
    from hf_fixtures import LLAMA31_STYLE_TEMPLATE, qwen25_style_template, write_tokenizer_dir
    from agentinfer_jax.serving.protocol import ApiError
    from agentinfer_jax.serving.server import BodyParser, ServerLimits
    from agentinfer_jax.tokenizer import load_tokenizer

    plain = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    history = [m for m in HISTORY if m["role"] != "tool" and not m.get("tool_calls")]  # Llama 3.1: one call a turn
    for name, template, parser in (("qwen", qwen25_style_template(), "hermes"),
                                   ("llama", LLAMA31_STYLE_TEMPLATE, "llama3_json"), ("plain", plain, None)):
        directory = write_tokenizer_dir(tmp_path / name, template)
        # BodyParser reads the stack's tokenizer, model name and context length only.
        stack = types.SimpleNamespace(tokenizer=load_tokenizer(directory), model_name="m",
                                      config=types.SimpleNamespace(max_model_len=2048))
        body = {"model": stack.model_name, "messages": history, "tools": TOOLS}
        if parser is None:
            with pytest.raises(ApiError, match="does not render 'tools'"):
                BodyParser(stack, ServerLimits()).chat(body)
            continue
        parsed = BodyParser(stack, ServerLimits()).chat(body)
        assert parsed.tools.parser == parser
        ref = transformers.AutoTokenizer.from_pretrained(str(directory))
        assert parsed.prompt_tokens == list(ref.apply_chat_template(history, tools=TOOLS, add_generation_prompt=True,
                                                                    tokenize=True, return_dict=False))
        forced = BodyParser(stack, ServerLimits(tool_parser="hermes")).chat(body)
        assert forced.tools.parser == "hermes"  # the server's setting overrides the detection


# ---- trajectories, ReActAgent with native tools -------------------------------------------------

TRAJECTORY = {"id": "t1", "tools": None, "messages": [
    {"role": "system", "content": "Use the tools."},
    {"role": "user", "content": "Question: What river flows through Paris?"},
    {"role": "assistant", "content": "I should search Paris.", "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "search", "arguments": '{"entity": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_a", "content": "Paris is the capital of France. It lies on the Seine."},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_b", "type": "function", "function": {"name": "lookup", "arguments": '{"keyword": "Seine"}'}}]},
    {"role": "tool", "tool_call_id": "call_b", "content": "It lies on the Seine."},
    {"role": "assistant", "content": "The Seine.", "tool_calls": [
        {"id": "call_c", "type": "function", "function": {"name": "finish", "arguments": '{"answer": "Seine"}'}}]},
]}


def test_trace_loader_reads_tool_calling_trajectories(tmp_path):
    from agentinfer_jax.tokenizer import load_tokenizer

    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(TRAJECTORY) + "\n")
    (traj,) = load_traces(path)
    assert traj.has_tool_calls and traj.id == "t1"
    replies = [r for _, r in traj.assistant_turns()]
    assert [c.name for r in replies for c in parse_all(HermesToolParser(), r)[1]] == ["search", "lookup", "finish"]
    # Message-by-message ChatML text turns render as the template renders the tool-calling messages.
    tok = load_tokenizer()
    chatml = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in traj.as_text_chat().messages)
    assert chatml == tok.apply_chat_template(list(traj.messages), add_generation_prompt=False)
    bad = dict(TRAJECTORY, messages=[{"role": "assistant", "content": None, "tool_calls": [
        {"id": "x", "function": {"name": "search", "arguments": "{no"}}]}])
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(TraceFormatError, match="arguments are not JSON"):
        load_traces(path)


def test_react_agent_with_native_tools_replays_a_recorded_trajectory_against_our_server(server, tmp_path):
    from agentinfer_jax.agents.clients import OpenAIClient
    from agentinfer_jax.agents.loop import AgentConfig, ReActAgent
    from agentinfer_jax.agents.tools import SearchTool

    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(TRAJECTORY) + "\n")
    (traj,) = load_traces(path)
    server.forced.script = [reply for _, reply in traj.assistant_turns()]  # the model's turns, as recorded
    corpus = {"Paris": ["Paris is the capital of France.", "It lies on the Seine."]}
    client = OpenAIClient(f"{server.base_url}/v1", server.stack.model_name, timeout_s=120)
    agent = ReActAgent(client, SearchTool(corpus), config=AgentConfig(max_steps=5, max_tokens=64, native_tools=True))
    result = asyncio.run(agent.run("What river flows through Paris?", session_id="tools-1"))
    assert result.metrics.error is None and result.metrics.parse_errors == 0, (result.metrics, result.steps)
    assert result.answer == "Seine" and result.metrics.llm_calls == 3
    assert [s.action.kind for s in result.steps] == ["search", "lookup", "finish"]
    assert "Seine" in result.steps[0].observation  # the real tool ran on the parsed call
    roles = [m["role"] for m in result.messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant", "tool"]
    # Every later prompt extends the earlier one, and the server served it from the prefix cache.
    prompts = server.forced.prompts[-3:]
    assert all(b[:len(a)] == a for a, b in zip(prompts, prompts[1:]))
    assert not server.forced.script


def test_sam_acceptance_replays_a_tool_calling_trajectory_file(tmp_path):
    import pathlib
    import subprocess
    import sys

    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(dict(TRAJECTORY, id=f"t{i}")) + "\n" for i in range(3)))
    script = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "sam_acceptance.py"
    out = tmp_path / "out.json"
    res = subprocess.run([sys.executable, str(script), f"--traces={path}", "--drafters=prompt_lookup,sam_session",
                          f"--json_out={out}"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    # 3 sessions x 3 replies, each reply's tokens generated once per drafter; repeated sessions draft well.
    assert result["drafters"]["sam_session"]["tokens_per_step"] > 1.0
    # --stream_passes: one drafter over the file twice, RSS after each pass, every turn counted.
    stream = tmp_path / "stream.json"
    res = subprocess.run([sys.executable, str(script), f"--traces={path}", "--drafters=sam_memory",
                          "--stream_passes=2", f"--json_out={stream}"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    passes = json.loads(stream.read_text())["results"]["8/sam_memory"]
    assert len(passes["rss_mb_after_each_pass"]) == 2 and len(passes["growth_per_pass"]) == 1
    assert passes["turns_per_pass"] == 3 * sum(m["role"] == "assistant" for m in TRAJECTORY["messages"])


BOUNDED_TOOLS = [  # bounded strings and numbers: a random model's reply must end within max_tokens
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "properties": {"query": {"type": "string", "maxLength": 12}}, "required": ["query"],
        "additionalProperties": False}}},
]


@pytest.fixture(scope="module")
def plain_server():
    with tiny_server(**SERVER) as srv:
        yield srv


@pytest.mark.parametrize("drafting", [True, False], ids=["drafting", "no_drafting"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_and_named_tool_calls_validate_against_the_schema(server, plain_server, drafting, temperature):
    """Acceptance: tool_choice "required" (and a named tool) returns tool_calls whose arguments parse
    and validate against the tool's schema on 50 of 50 requests: the grammar holds the reply to the
    schema, greedy and sampled, drafting on and off."""
    import jsonschema
    srv = server if drafting else plain_server
    client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in BOUNDED_TOOLS}
    choices = ["required", {"type": "function", "function": {"name": "get_weather"}}]
    ok = 0
    for i in range(50):
        res = client.chat.completions.create(model=srv.stack.model_name, messages=HISTORY[:2], tools=BOUNDED_TOOLS,
                                             tool_choice=choices[i % 2], temperature=temperature, seed=i,
                                             max_tokens=160, parallel_tool_calls=False)  # bounded: one call
        calls = res.choices[0].message.tool_calls or []
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        if i % 2:
            assert [c.function.name for c in calls] == ["get_weather"]
        ok += bool(calls)
    assert ok == 50
