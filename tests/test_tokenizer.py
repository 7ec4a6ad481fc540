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


def test_chat_template_matches_transformers(tok):
    transformers = pytest.importorskip("transformers")
    config = json.loads((ASSETS_DIR / "tokenizer_config.json").read_text())
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(ASSETS_DIR / "tokenizer.json"))
    ref.chat_template = config["chat_template"]
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
