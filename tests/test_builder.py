"""build_stack: a served checkpoint generates what the dense reference generates; bad configs fail clearly."""

from __future__ import annotations

import random
import shutil

import pytest

from agentinfer_jax.configs.tiny import get_config as tiny_config
from agentinfer_jax.model.checkpoint import save_hf_checkpoint
from agentinfer_jax.model.transformer import generate, init_model
from agentinfer_jax.serving.builder import SafeDetokenizer, ServerConfig, build_stack, load_model_config
from agentinfer_jax.serving.request import Request, SamplingParams
from agentinfer_jax.tokenizer import ASSETS_DIR, load_tokenizer

SMALL = dict(num_blocks=40, block_size=16, max_num_seqs=1, max_tokens_per_step=16, max_model_len=128)


def test_checkpoint_stack_generates_the_reference_tokens(tmp_path):
    config = tiny_config()
    model = init_model(config, seed=7)
    ckpt = tmp_path / "tiny-ckpt"
    save_hf_checkpoint(model, config, ckpt)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSETS_DIR / name, ckpt / name)
    stack = build_stack(ServerConfig(checkpoint=str(ckpt), config=None, drafter="ngram", num_draft_tokens=3,
                                     policy="lpm", **SMALL))
    assert stack.model_name == "tiny-ckpt"
    # The chat template's end-of-turn token stops requests.
    assert set(stack.tokenizer.eos_token_ids) <= set(stack.scheduler.config.eos_token_ids)

    rng = random.Random(2)
    prompts = [[rng.randrange(5, config.vocab_size) for _ in range(n)] for n in (9, 33)]
    reference = generate(model, prompts, 10)  # the in-memory model, not the loaded one
    events: dict[str, list] = {}
    for i, p in enumerate(prompts):
        stack.loop.submit(Request(f"r{i}", p, SamplingParams(max_tokens=10)),
                          lambda ev: events.setdefault(ev.request_id, []).append(ev))
    stack.loop.run_until_idle()
    for i, ref in enumerate(reference):
        evs = events[f"r{i}"]
        assert [t for ev in evs for t in ev.new_tokens] == ref
        assert evs[-1].finished and evs[-1].text == stack.tokenizer.decode(ref, skip_special_tokens=True)
    assert stack.pool.num_used == len(stack.prefix_cache)  # finished requests hold no blocks


def test_sam_stack_with_adaptive_switch_is_lossless_and_closes_its_memory():
    """drafter="sam": AgentSAM with cross-session memory and the adaptive switch; greedy tokens equal
    the dense reference; later calls of a session draft from it; shutdown stops the memory's worker."""
    stack = build_stack(ServerConfig(config="tiny", drafter="sam", num_draft_tokens=4, **{**SMALL, "max_num_seqs": 2}))
    assert stack.session_memory is not None and stack.scheduler.adaptive is not None
    rng = random.Random(3)
    base = [rng.randrange(5, stack.model_config.vocab_size) for _ in range(20)]
    prompts = [base, base + base[:6]]  # the second call repeats the first's text: drafts get proposed
    reference = generate(stack.model, prompts, 12)
    out = {}
    for i, p in enumerate(prompts):
        stack.loop.submit(Request(f"r{i}", p, SamplingParams(max_tokens=12), session_id="s"),
                          lambda ev: out.setdefault(ev.request_id, []).extend(ev.new_tokens))
        stack.loop.run_until_idle()
    assert [out["r0"], out["r1"]] == reference
    stack.shutdown()
    with pytest.raises(RuntimeError, match="closed"):
        stack.session_memory.add("x", [1])


def test_detokenizer_drops_ids_the_tokenizer_lacks():
    tok = load_tokenizer()
    rng = random.Random(4)
    ids = [rng.randrange(5, tok.vocab_size) for _ in range(12)]
    noisy = ids[:6] + [tok.vocab_size, -1, 10 ** 6] + ids[6:]
    assert SafeDetokenizer(tok)(noisy) == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(checkpoint="/nonexistent", config="tiny"), "exactly one"),
    (dict(checkpoint=None, config=None), "exactly one"),
    (dict(drafter="eagle"), "unknown drafter"),
    (dict(drafter="ngram", num_draft_tokens=0), "num_draft_tokens"),
    (dict(retention_ttl_s=-1.0), "retention_ttl_s"),
])
def test_bad_server_configs_are_rejected_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ServerConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(config="no_such_model"), "unknown model config"),
    (dict(config="../tiny"), "bad config name"),
    (dict(checkpoint="/nonexistent/ckpt", config=None), "does not exist"),
    (dict(config="tiny", policy="random"), "unknown admission policy"),
    (dict(config="tiny", max_model_len=8192, num_blocks=600), "max_position_embeddings"),
])
def test_bad_models_and_policies_fail_with_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_stack(ServerConfig(**{**SMALL, **kwargs}))


def test_named_configs_load():
    assert load_model_config("tiny") == tiny_config()
    assert load_model_config("llama3_2_1b").vocab_size == 128256
