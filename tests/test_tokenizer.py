"""Tokenizer wrapper vs transformers' own tokenizer and chat-template rendering."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from agentinfer_jax.tokenizer import ASSETS_DIR, TokenizerError, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _random_text(rng: np.random.Generator, n: int) -> str:
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,:;!?'\"\n\t{}[]()<>|_-") + \
        ["é", "ü", "中", "文", "🙂", "Ω", "<|im_end|>", "<|im_start|>"]
    return "".join(rng.choice(alphabet, n))


def test_special_ids_match_builtin_files(tok):
    assert tok.vocab_size == 4096
    assert (tok.pad_id, tok.bos_id, tok.eos_token_ids) == (0, 1, (4,))


def test_round_trip_and_parity_with_transformers(tok):
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(ASSETS_DIR / "tokenizer.json"))
    rng = np.random.default_rng(0)
    for _ in range(20):
        text = _random_text(rng, int(rng.integers(0, 80)))
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text  # byte-level BPE is lossless
        assert all(0 <= i < tok.vocab_size for i in ids)


def _reference_with_template():
    """transformers' tokenizer over the bundled files, with the bundled chat template."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(ASSETS_DIR / "tokenizer.json"))
    ref.chat_template = json.loads((ASSETS_DIR / "tokenizer_config.json").read_text())["chat_template"]
    return ref


def test_chat_template_matches_transformers(tok):
    ref = _reference_with_template()
    rng = np.random.default_rng(1)
    for _ in range(5):
        messages = [{"role": str(rng.choice(["system", "user", "assistant", "tool"])),
                     "content": _random_text(rng, int(rng.integers(0, 40)))}
                    for _ in range(int(rng.integers(1, 5)))]
        for gen in (True, False):
            expected = ref.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=gen)
            assert tok.apply_chat_template(messages, add_generation_prompt=gen) == expected
            assert tok.encode_chat(messages, add_generation_prompt=gen) == \
                ref.encode(expected, add_special_tokens=False)


def test_bad_inputs_raise_clear_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="malformed tokenizer file"):
        load_tokenizer(tmp_path)
    shutil.copy(ASSETS_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match="malformed .*tokenizer_config.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    missing_eos = re.escape("eos_token '<|nope|>' is not in the vocabulary")
    with pytest.raises(TokenizerError, match=missing_eos):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({}))
    with pytest.raises(TokenizerError, match="no chat_template"):
        load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="'role' and 'content'"):
        tok.apply_chat_template([{"content": "x"}])
    with pytest.raises(ValueError, match="outside"):
        tok.decode([5, tok.vocab_size])


# ---- tools and tool-call history: parity with transformers' apply_chat_template -----------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city <b>now</b> & later",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "Zürich, 東京"},
                                                     "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}


def _tool_conversations(rng):
    """Random conversations with system prompts, tool calls (arguments as dicts, as servers hand them to
    templates) and tool results; `parallel` allows several calls in one assistant turn."""
    def call(i):
        name = str(rng.choice(["get_weather", "search"]))
        args = {"city": _random_text(rng, 8)} if name == "get_weather" else {"query": _random_text(rng, 12), "n": 3}
        return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args}}

    for parallel in (True, False):
        for _ in range(4):
            msgs = []
            if rng.random() < 0.5:
                msgs.append({"role": "system", "content": _random_text(rng, 20)})
            msgs.append({"role": "user", "content": _random_text(rng, 20)})
            for turn in range(int(rng.integers(0, 3))):
                calls = [call(f"{turn}_{k}") for k in range(int(rng.integers(1, 3)) if parallel else 1)]
                content = _random_text(rng, 10) if parallel and rng.random() < 0.5 else None
                msgs.append({"role": "assistant", "content": content, "tool_calls": calls})
                for c in calls:
                    msgs.append({"role": "tool", "tool_call_id": c["id"], "content": _random_text(rng, 15)})
                if rng.random() < 0.5:
                    msgs.append({"role": "assistant", "content": _random_text(rng, 10)})
                    msgs.append({"role": "user", "content": _random_text(rng, 10)})
            yield parallel, msgs


@pytest.mark.parametrize("style", ["qwen2.5", "llama3.1"])
def test_tools_and_tool_history_render_token_identical_to_transformers(style, tmp_path):
    transformers = pytest.importorskip("transformers")
    from hf_fixtures import LLAMA31_STYLE_TEMPLATE, qwen25_style_template, write_tokenizer_dir

    template = qwen25_style_template() if style == "qwen2.5" else LLAMA31_STYLE_TEMPLATE
    directory = write_tokenizer_dir(tmp_path, template)
    ours = load_tokenizer(directory)
    ref = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert ours.renders_tools
    rng = np.random.default_rng(7)
    checked = 0
    for parallel, msgs in _tool_conversations(rng):
        if style == "llama3.1" and parallel:
            continue  # the Llama 3.1 template renders one call per assistant turn
        for tools in ([WEATHER, SEARCH], [WEATHER], None):
            for gen in (True, False):
                expected = ref.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=gen)
                assert ours.apply_chat_template(msgs, tools=tools, add_generation_prompt=gen) == expected
                assert ours.encode_chat(msgs, tools=tools, add_generation_prompt=gen) == \
                    ref.encode(expected, add_special_tokens=False)
                checked += 1
    assert checked >= 24
    # The tool definitions and the history are really in the prompt (not dropped by either side).
    msgs = next(m for p, m in _tool_conversations(np.random.default_rng(3))
                if not p and any("tool_calls" in x for x in m))
    text = ours.apply_chat_template(msgs, tools=[WEATHER])
    assert "get_weather" in text and "<b>now</b> & later" in text and "Zürich" in text
    assert msgs[-1]["content"] in text or msgs[-3]["content"] in text


def test_continue_final_message_matches_transformers(tok):
    """A forced assistant prefix renders as transformers renders it: the chat up to that message's
    content, with neither its end of turn nor a generation prompt."""
    ref = _reference_with_template()
    rng = np.random.default_rng(7)
    for _ in range(5):
        messages = [{"role": str(rng.choice(["system", "user", "assistant"])),
                     "content": _random_text(rng, int(rng.integers(1, 40)))} for _ in range(int(rng.integers(0, 4)))]
        messages.append({"role": "assistant", "content": "Action:" + _random_text(rng, int(rng.integers(0, 8)))})
        expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                           continue_final_message=True)
        assert tok.apply_chat_template(messages, continue_final_message=True) == expected
        assert tok.encode_chat(messages, continue_final_message=True) == ref.encode(expected, add_special_tokens=False)
    with pytest.raises(ValueError, match="assistant message last"):
        tok.encode_chat([{"role": "user", "content": "hi"}], continue_final_message=True)
    with pytest.raises(ValueError, match="non-empty"):
        tok.encode_chat([{"role": "assistant", "content": ""}], continue_final_message=True)
