"""EngineClient: chat requests through a real ServingLoop + Engine with the tiny model.

Reference: `model.transformer.generate` (dense greedy decoding) on the same chat-template ids.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from agentinfer_jax.agents.clients import ClientError
from agentinfer_jax.agents.engine_client import EngineClient, build_role_engine
from agentinfer_jax.configs.tiny import get_config
from agentinfer_jax.engine.engine import EngineConfig
from agentinfer_jax.model.transformer import generate, init_model
from agentinfer_jax.tokenizer import load_tokenizer

# Shared with test_agent_e2e.py so one pytest process compiles each step shape once.
ENGINE = EngineConfig(num_blocks=160, block_size=16, max_num_seqs=4, max_tokens_per_step=128, max_model_len=1024,
                      max_draft_tokens=4, min_token_bucket=32)
WORDS = "search the page for an actor born in a city whose river flows north into the sea".split()


@pytest.fixture(scope="module")
def stack():
    tokenizer = load_tokenizer()
    model = init_model(get_config(), seed=3)
    role = build_role_engine("large", model, tokenizer, ENGINE)
    role.start()
    yield model, tokenizer, role
    role.shutdown()


def random_messages(rng: random.Random, turns: int = 1) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": " ".join(rng.choices(WORDS, k=rng.randint(5, 20)))}]
    for i in range(turns):
        msgs.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 30)))})
        if i < turns - 1:
            msgs.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 10)))})
    return msgs


def wait_idle(role, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while role.scheduler.has_unfinished and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # let the loop drain a last cancel


def assert_no_leak(role) -> None:
    """Blocks in use are exactly those the prefix cache holds: no request kept any."""
    wait_idle(role)
    assert not role.scheduler.running and not role.scheduler.waiting
    assert role.pool.num_used == len(role.prefix_cache)


def test_greedy_completion_equals_dense_generate(stack):
    model, tokenizer, role = stack
    client = EngineClient({"large": role.loop}, tokenizer)
    rng = random.Random(11)
    batch = [random_messages(rng, turns=rng.randint(1, 3)) for _ in range(3)]

    async def run():
        return await asyncio.gather(*(client.complete(m, max_tokens=7, session_id=f"s{i}") for i, m in enumerate(batch)))

    completions = asyncio.run(run())
    prompts = [tokenizer.encode_chat(m) for m in batch]
    eos = set(role.scheduler.config.eos_token_ids)
    reference = generate(model, prompts, 7, eos_token_ids=sorted(eos))
    by_prompt = {r.prompt_tokens: r for r in client.records}
    for prompt, ref, comp in zip(prompts, reference, completions):
        rec = by_prompt[len(prompt)]
        assert list(rec.output_tokens) == ref
        assert comp.text == tokenizer.decode(ref, skip_special_tokens=True)
        assert comp.prompt_tokens == len(prompt) and comp.completion_tokens == len(ref)
    assert_no_leak(role)


def test_continued_assistant_prefix_generates_as_the_dense_model_does(stack):
    """continue_final_message: the prompt is the chat up to the assistant prefix's content (no end
    of turn), and the reply is the dense model's greedy continuation of exactly those tokens."""
    model, tokenizer, role = stack
    client = EngineClient({"large": role.loop}, tokenizer)
    msgs = [*random_messages(random.Random(5), turns=2), {"role": "assistant", "content": "Action: Search["}]
    completion = asyncio.run(client.complete(msgs, max_tokens=6, continue_final_message=True))
    prompt = tokenizer.encode(tokenizer.apply_chat_template(msgs[:-1]) + "Action: Search[", add_bos=False)
    reference = generate(model, [prompt], 6, eos_token_ids=sorted(role.scheduler.config.eos_token_ids))[0]
    assert completion.prompt_tokens == len(prompt)
    assert list(client.records[-1].output_tokens) == reference
    with pytest.raises(ValueError, match="continue_final_message"):
        asyncio.run(client.complete(msgs[:-1], continue_final_message=True))
    assert_no_leak(role)


def test_replay_forces_the_recorded_text_and_n_samples(stack):
    _, tokenizer, role = stack
    rng = random.Random(5)
    recorded = " ".join(rng.choices(WORDS, k=12))
    client = EngineClient({"large": role.loop}, tokenizer, replay=lambda call: [recorded] * call.n)
    comp = asyncio.run(client.complete(random_messages(rng), n=2, max_tokens=3, temperature=1.0))
    assert comp.texts == [recorded, recorded]  # forced beyond max_tokens: the record wins
    assert comp.completion_tokens == 2 * (len(tokenizer.encode(recorded, add_bos=False)) + 1)  # + end of turn
    bad = EngineClient({"large": role.loop}, tokenizer, replay=lambda call: [recorded])
    with pytest.raises(ValueError, match="n=2"):
        asyncio.run(bad.complete(random_messages(rng), n=2))
    assert_no_leak(role)


def test_stream_deltas_join_to_the_completion_and_early_exit_cancels(stack):
    _, tokenizer, role = stack
    rng = random.Random(8)
    messages = random_messages(rng, 2)
    client = EngineClient({"large": role.loop}, tokenizer)

    async def collect(limit: int | None) -> list[str]:
        out = []
        async for delta in client.stream(messages, max_tokens=12, session_id="stream"):
            out.append(delta)
            if limit is not None and len(out) >= limit:
                break
        return out

    full = asyncio.run(client.complete(messages, max_tokens=12))
    assert "".join(asyncio.run(collect(None))) == full.text
    n_before = client.stats.requests
    asyncio.run(collect(1))  # leaves the generator after one delta: the request is cancelled
    assert client.stats.requests == n_before
    assert_no_leak(role)


def test_cancelled_complete_aborts_its_requests(stack):
    _, tokenizer, role = stack
    client = EngineClient({"large": role.loop}, tokenizer)
    rng = random.Random(9)

    async def run():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.complete(random_messages(rng), max_tokens=400, n=2), timeout=0.3)

    asyncio.run(run())
    assert client.stats.requests == 0
    assert_no_leak(role)


def test_request_of_a_closed_event_loop_is_cancelled_quietly(stack, caplog):
    """The waiter's asyncio loop closes with the call still running (a background speculative call
    when the agent's run returns): the request is cancelled, nothing is logged as a failure."""
    _, tokenizer, role = stack
    client = EngineClient({"large": role.loop}, tokenizer)
    aio = asyncio.new_event_loop()
    aio.create_task(client.complete(random_messages(random.Random(11)), max_tokens=400))
    aio.run_until_complete(asyncio.sleep(0.3))  # submitted and streaming
    aio.close()  # no cancellation reaches the task
    with caplog.at_level("ERROR", logger="agentinfer_jax.serving.loop"):
        assert_no_leak(role)
    assert not [r for r in caplog.records if "callback failed" in r.getMessage()]
    assert client.stats.requests == 0


def test_bad_input_raises_clear_errors(stack):
    _, tokenizer, role = stack
    client = EngineClient({"large": role.loop}, tokenizer, fallback_role=None)
    msgs = random_messages(random.Random(1))

    async def call(*args, **kwargs):
        return await client.complete(*args, **kwargs)

    with pytest.raises(ValueError, match="non-empty list"):
        asyncio.run(call([]))
    with pytest.raises(ValueError, match="role"):
        asyncio.run(call(msgs, role="medium"))
    with pytest.raises(ValueError, match="no serving loop for role 'small'"):
        asyncio.run(call(msgs, role="small"))
    with pytest.raises(ValueError, match="max_tokens"):
        asyncio.run(call(msgs, max_tokens=0))
    with pytest.raises(ValueError, match="stop"):
        asyncio.run(call(msgs, stop=[""]))
    with pytest.raises(ValueError, match="context limit"):
        asyncio.run(call([{"role": "user", "content": "word " * 2000}]))
    with pytest.raises(ValueError, match="fallback_role"):
        EngineClient({"small": role.loop}, tokenizer)
    assert client.stats.requests == 0
    assert_no_leak(role)


def test_fallback_role_serves_small_on_the_large_loop(stack):
    _, tokenizer, role = stack
    client = EngineClient({"large": role.loop}, tokenizer)
    comp = asyncio.run(client.complete(random_messages(random.Random(2)), role="small", max_tokens=2))
    assert comp.model == "large" and client.records[-1].role == "large"


def test_aborted_request_raises_client_error(stack):
    _, tokenizer, role = stack
    client = EngineClient({"large": role.loop}, tokenizer)
    original = role.loop.submit

    def submit_then_abort(req, callback=None):
        original(req, callback)
        role.loop.cancel(req.request_id)

    role.loop.submit = submit_then_abort
    try:
        with pytest.raises(ClientError, match="aborted"):
            asyncio.run(client.complete(random_messages(random.Random(3)), max_tokens=50))
    finally:
        role.loop.submit = original
    assert_no_leak(role)
