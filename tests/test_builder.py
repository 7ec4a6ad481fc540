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


# ---- one builder for every consumer ----------------------------------------------------------


def test_engine_config_round_trips_through_the_server_config():
    from agentinfer_jax.engine.engine import EngineConfig

    ec = EngineConfig(num_blocks=70, block_size=8, max_num_seqs=3, max_tokens_per_step=48, max_model_len=200,
                      max_draft_tokens=5, min_token_bucket=8, seq_buckets=(1, 2), kv_dtype="float32")
    assert ServerConfig.from_engine_config(ec).engine_config() == ec
    # Without an explicit width the engine verifies num_draft_tokens drafts (at least 1 row).
    assert ServerConfig(drafter="ngram", num_draft_tokens=3).engine_config().max_draft_tokens == 3
    assert ServerConfig().engine_config().max_draft_tokens == 1


class ConstDrafter:
    def begin(self, rid, prompt, session_id=None):
        pass

    def extend(self, rid, toks):
        pass

    def propose(self, rid, k):
        return [7] * k

    def end(self, rid):
        pass


def test_role_engines_are_the_server_stack_with_the_adaptive_switch():
    """agents.engine_client.build_role_engine is build_stack: same wiring as a ServerConfig gives,
    the adaptive switch on with drafting unless turned off."""
    from agentinfer_jax.agents.engine_client import build_role_engine
    from agentinfer_jax.engine.engine import EngineConfig
    from agentinfer_jax.serving.builder import ServingStack

    model, tok = init_model(tiny_config(), seed=1), load_tokenizer()
    ec = EngineConfig(num_blocks=40, block_size=16, max_num_seqs=2, max_tokens_per_step=32, max_model_len=128,
                      max_draft_tokens=4)
    role = build_role_engine("small", model, tok, ec, drafter=ConstDrafter(), num_draft_tokens=4, policy="lpm")
    assert isinstance(role, ServingStack) and role.model_name == "small" and role.model is model
    assert role.engine.config == ec and role.pool.num_free == ec.num_blocks - 1
    assert role.scheduler.adaptive is not None and role.scheduler.config.num_draft_tokens == 4
    served = build_stack(ServerConfig.from_engine_config(ec, drafter="ngram", num_draft_tokens=4, policy="lpm"),
                         model=model, tokenizer=tok)
    assert role.scheduler.config == served.scheduler.config
    assert served.scheduler.config.share_inflight_prefill  # on by default
    unshared = build_stack(ServerConfig.from_engine_config(ec, share_inflight_prefill=False), model=model,
                           tokenizer=tok)
    assert not unshared.scheduler.config.share_inflight_prefill
    from agentinfer_jax.serving.cli import config_from_args, parse_args
    assert not config_from_args(parse_args(["--no-share-inflight-prefill"])).share_inflight_prefill
    assert config_from_args(parse_args([])).share_inflight_prefill
    # The server warms up and keeps its compiled steps on disk unless told not to.
    served_cli = config_from_args(parse_args([]))
    assert served_cli.compile_at_start and served_cli.measure_step_costs and served_cli.compilation_cache_dir
    assert served_cli.engine_config().compilation_cache_dir == served_cli.compilation_cache_dir
    quick = config_from_args(parse_args(["--no-warmup", "--compilation-cache-dir", ""]))
    assert not (quick.compile_at_start or quick.measure_step_costs) and quick.compilation_cache_dir is None
    assert type(role.scheduler.policy) is type(served.scheduler.policy)
    off = build_role_engine("x", model, tok, ec, drafter=ConstDrafter(), num_draft_tokens=4, adaptive_draft=False)
    assert off.scheduler.adaptive is None
    plain = build_role_engine("y", model, tok, ec)
    assert plain.scheduler.drafter is None and plain.scheduler.adaptive is None
    with pytest.raises(ValueError, match="drafter"):
        build_role_engine("z", model, tok, ec, num_draft_tokens=2)


def test_custom_drafters_and_memories_must_match_the_config():
    from agentinfer_jax.speculation import SessionMemory

    model, tok = init_model(tiny_config(), seed=1), load_tokenizer()
    with pytest.raises(ValueError, match="custom"):
        build_stack(ServerConfig(drafter="ngram", **SMALL), model=model, tokenizer=tok, drafter=ConstDrafter())
    with pytest.raises(ValueError, match="custom"):
        build_stack(ServerConfig(drafter="custom", **SMALL), model=model, tokenizer=tok)
    memory = SessionMemory()
    with pytest.raises(ValueError, match="AgentSAM"):
        build_stack(ServerConfig(drafter="ngram", **SMALL), model=model, tokenizer=tok, session_memory=memory)
    try:
        stack = build_stack(ServerConfig(drafter="sam", **SMALL), model=model, tokenizer=tok, session_memory=memory)
        assert stack.session_memory is memory and stack.scheduler.adaptive is not None
    finally:
        memory.close()


def test_slot_engine_is_built_from_the_same_config():
    from agentinfer_jax.engine.slots import SlotEngine
    from agentinfer_jax.serving.builder import build_slot_engine

    config = ServerConfig(**SMALL)
    slots = build_slot_engine(config)
    assert isinstance(slots, SlotEngine) and slots.engine.config == config.engine_config()
    assert slots.num_slots == config.max_num_seqs and slots.num_free_pages == config.num_blocks - 1


def test_a_checkpoint_without_tokenizer_json_needs_the_builtin_tokenizer_asked_for(tmp_path):
    config = tiny_config()
    ckpt = tmp_path / "no-tok"
    save_hf_checkpoint(init_model(config, seed=7), config, ckpt)  # config.json + safetensors, no tokenizer
    with pytest.raises(ValueError, match="tokenizer.json"):
        build_stack(ServerConfig(checkpoint=str(ckpt), config=None, **SMALL))
    stack = build_stack(ServerConfig(checkpoint=str(ckpt), config=None, tokenizer="builtin", **SMALL))
    text = "Thought: search the magazine"
    assert stack.tokenizer.encode(text) == load_tokenizer().encode(text)  # the bundled tokenizer
    # A random-weight config keeps the built-in tokenizer by default.
    assert build_stack(ServerConfig(config="tiny", **SMALL)).tokenizer.encode(text) == load_tokenizer().encode(text)


def test_draft_step_cost_prices_the_switch_and_needs_a_drafter():
    """A projection prices the adaptive switch's k at another device's costs; without a drafter
    (or with the switch off) there is nothing to price, and saying so beats ignoring it."""
    def flat(batch_size, tokens_fed):
        return 1e-3

    stack = build_stack(ServerConfig(config="tiny", drafter="ngram", num_draft_tokens=4, **SMALL),
                        draft_step_cost=flat)
    assert stack.scheduler.adaptive.step_cost is flat
    with pytest.raises(ValueError, match="draft_step_cost"):
        build_stack(ServerConfig(config="tiny", **SMALL), draft_step_cost=flat)
    with pytest.raises(ValueError, match="draft_step_cost"):
        build_stack(ServerConfig(config="tiny", drafter="ngram", adaptive_draft=False, **SMALL), draft_step_cost=flat)


def test_warm_stack_compiles_before_serving_and_prices_the_switch_from_timed_steps():
    """compile_at_start: every step shape is compiled before the first request, so serving compiles
    nothing; measure_step_costs: the adaptive switch starts with a timed cost for every cell it
    prices. Greedy output still equals the reference."""
    config = ServerConfig(config="tiny", drafter="ngram", num_draft_tokens=2, compile_at_start=True,
                          measure_step_costs=True, min_token_bucket=8,
                          **{**SMALL, "max_num_seqs": 2, "max_model_len": 64})
    stack = build_stack(config)
    cost = stack.scheduler.adaptive.step_cost
    compiled = stack.engine.num_compilations
    assert compiled == len(stack.engine.step_shapes(drafting=True))
    for n, t in cost.cells_to_seed(2, 2, 16):
        assert cost._bucket(t) in cost._cells[cost._bucket(n)]
    rng = random.Random(5)
    prompt = [rng.randrange(5, stack.model_config.vocab_size) for _ in range(20)]
    out = []
    stack.loop.submit(Request("r", prompt, SamplingParams(max_tokens=10)), lambda ev: out.extend(ev.new_tokens))
    stack.loop.run_until_idle()
    assert out == generate(stack.model, [prompt], 10)[0]
    assert stack.engine.num_compilations == compiled
    stack.shutdown()


def test_speculative_requests_are_admitted_first_unless_turned_off():
    """SPAgent's rule between requests: with one sequence slot, a speculative request submitted after
    a plain one runs first (the stack's default); with speculation_first off, arrival order wins."""
    model, tok = init_model(tiny_config(), seed=4), load_tokenizer()
    rng = random.Random(5)
    order = {}
    for first in (True, False):
        stack = build_stack(ServerConfig(config="tiny", speculation_first=first, **SMALL), model=model, tokenizer=tok)
        assert stack.scheduler.policy.speculation_first is first
        done: list[str] = []
        for rid, spec in (("reasoning", False), ("guess", True)):
            prompt = [rng.randrange(5, tok.vocab_size) for _ in range(12)]
            stack.loop.submit(Request(rid, prompt, SamplingParams(max_tokens=4), speculative=spec),
                              lambda ev: done.append(ev.request_id) if ev.finished else None)
        stack.loop.run_until_idle()
        order[first] = done
    assert order == {True: ["guess", "reasoning"], False: ["reasoning", "guess"]}
    from agentinfer_jax.serving.cli import config_from_args, parse_args
    assert config_from_args(parse_args([])).speculation_first
    assert not config_from_args(parse_args(["--no-speculation-first"])).speculation_first


@pytest.mark.parametrize("argv, flag", [
    (["--port", "-5"], "--port"), (["--max-model-len", "-1"], "--max-model-len"),
    (["--num-blocks", "1"], "--num-blocks"), (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--retention-ttl", "-1"], "--retention-ttl"), (["--log-level", "bogus"], "--log-level"),
    (["--num-draft-tokens", "x"], "--num-draft-tokens"),
    (["--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "2"], "--process-id"),
])
def test_cli_refuses_bad_values_naming_the_flag(argv, flag, capsys):
    """A bad value is a usage error naming its flag, never a traceback or a server that starts."""
    from agentinfer_jax.serving.cli import parse_args
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_server_config_refuses_a_context_without_tokens():
    with pytest.raises(ValueError, match="max_model_len"):
        ServerConfig(config="tiny", max_model_len=0)
