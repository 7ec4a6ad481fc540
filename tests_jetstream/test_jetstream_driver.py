"""Our engine under JetStream's own orchestrator: the Driver's prefill, generate and detokenize
threads run JetStreamEngine end to end, and the streamed tokens equal greedy decoding with the
contiguous-cache reference (`model.transformer.generate`)."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
from jetstream.core import orchestrator
from jetstream.core.proto import jetstream_pb2

from agentinfer_jax.configs import tiny
from agentinfer_jax.engine.engine import EngineConfig
from agentinfer_jax.engine.jetstream_adapter import JetStreamEngine, RejectedPrefix
from agentinfer_jax.model.transformer import generate, init_model

# 3 slots for 7 requests: slots are reused; prompts over 32 tokens are prefilled in chunks.
EC = EngineConfig(num_blocks=96, block_size=8, max_num_seqs=3, max_tokens_per_step=32, max_model_len=96)


class RecordingEngine(JetStreamEngine):
    """Keeps the newest decode state so the test can account for every page after the run."""

    last_state = None

    def generate(self, params, decode_state):
        self.last_state, result = super().generate(params, decode_state)
        return self.last_state, result


@pytest.fixture(scope="module")
def model():
    return init_model(tiny.get_config(), seed=2)


def expected_streams(model, prompts, stop):
    """Greedy reference, cut as JetStream cuts: before the first stop token, at most max_tokens.
    One batched call (rows are independent under the reference's masks): one compilation."""
    rows = generate(model, [p for p, _ in prompts], max(n for _, n in prompts), max_len=EC.max_model_len,
                    eos_token_ids=())
    out = []
    for row, (_, n) in zip(rows, prompts):
        row = row[:n]
        out.append(row[:next((i for i, t in enumerate(row) if t in stop), n)])
    return out


async def decode(orch, request) -> list[int]:
    tokens = []
    async for response in orch.Decode(request):
        for sample in response.stream_content.samples:
            tokens.extend(sample.token_ids)
    return tokens


def test_driver_streams_reference_tokens(model):
    engine = RecordingEngine.from_model(model, EC)
    tok = engine.build_tokenizer(engine.get_tokenizer())
    rng = random.Random(0)
    requests, prompts = [], []
    for i in range(7):
        max_tokens = rng.randint(1, 12)
        if i % 3 == 2:  # server-side tokenization of text
            text = " ".join(rng.choice(["search", "the", "answer", "Thought:", "Action", "[Paris]"])
                            for _ in range(rng.randint(1, 12)))
            ids = tok.tokenizer.encode(text, add_bos=False)
            content = dict(text_content=jetstream_pb2.DecodeRequest.TextContent(text=text))
        else:
            ids = [rng.randrange(5, 4096) for _ in range(rng.randint(1, 50))]
            content = dict(token_content=jetstream_pb2.DecodeRequest.TokenContent(token_ids=ids))
        requests.append(jetstream_pb2.DecodeRequest(max_tokens=max_tokens, **content))
        prompts.append(([tok.bos_id] + ids, max_tokens))  # JetStream prepends BOS to a new sequence

    params = engine.load_params()
    driver = orchestrator.Driver(prefill_engines=[engine], generate_engines=[engine], prefill_params=[params],
                                 generate_params=[params], interleaved_mode=True)
    orch = orchestrator.LLMOrchestrator(driver=driver)

    async def serve():
        try:
            return await asyncio.wait_for(asyncio.gather(*(decode(orch, r) for r in requests)), timeout=300)
        finally:
            # The detokenize thread posts to this loop even after a stream's last item: stop the
            # driver's threads before the loop closes (a failing driver thread kills the process).
            await asyncio.to_thread(driver.stop)

    streams = asyncio.run(serve())

    want = expected_streams(model, prompts, tok.stop_tokens)
    assert streams == want
    assert sum(len(s) for s in streams) > len(streams)  # more than first tokens were streamed
    # Every page is owned by a slot still holding a finished request (JetStream never frees slots).
    state = engine.last_state
    for slot in np.flatnonzero(state.active):
        state = engine.slots.free(state, int(slot))
    assert engine.slots.num_used_pages == 0


def test_existing_prefix_rejections_and_result_tokens(model):
    engine = JetStreamEngine.from_model(model, EC)
    params = engine.load_params()
    rng = np.random.default_rng(1)
    head = rng.integers(5, 4096, 19).astype(np.int32)
    tail = rng.integers(5, 4096, 7).astype(np.int32)

    def padded(ids):
        out = np.zeros(32, np.int32)
        out[:len(ids)] = ids
        return out, len(ids)

    shared = engine.prefill(params=params, padded_tokens=padded(head)[0], true_length=len(head))
    tokens, n = padded(tail)
    full = engine.prefill(params=params, existing_prefix=shared, padded_tokens=tokens, true_length=n)
    assert np.array_equal(full.tokens, np.concatenate([head, tail]))  # JetStream: tokens follow the prefix
    assert np.array_equal(full.pages[:2], shared.pages[:2])  # two full pages shared
    bad = engine.prefill(params=params, padded_tokens=np.array([1, 4096, 0, 0]), true_length=2)
    assert isinstance(bad, RejectedPrefix) and "outside" in bad.reason

    state = engine.init_decode_state()
    state = engine.insert(full, state, slot=0)
    state = engine.insert(bad, state, slot=1)
    ref = generate(model, [list(head) + list(tail)], 3, max_len=EC.max_model_len, eos_token_ids=())[0]
    got = []
    for step in range(3):
        state, result = engine.generate(params, state)
        result = result.convert_to_numpy()
        first, empty = result.get_result_at_slot(0), result.get_result_at_slot(1)
        assert first.valid[0, 0] == 1 and first.lengths[0] == step + 1
        assert empty.valid[0, 0] == 0
        got.append(int(first.tokens[0, 0]))
    assert got == ref  # the fed token, one step behind: the prefill's token first
    state = engine.insert(engine.prefill(params=params, padded_tokens=tokens, true_length=n), state, slot=0)
    state = engine.slots.free(state, 0)
    engine.slots.release(shared)
    assert engine.slots.num_used_pages == 0


def test_the_serving_builder_builds_the_jetstream_engine(model):
    """One config for every consumer: a ServerConfig builds the JetStream engine too."""
    from agentinfer_jax.serving.builder import ServerConfig, build_jetstream_engine

    config = ServerConfig.from_engine_config(EC)
    engine = build_jetstream_engine(config, model=model)
    assert isinstance(engine, JetStreamEngine) and engine.slots.engine.config == config.engine_config()
    prompt = np.random.default_rng(4).integers(5, 4096, 11).astype(np.int32)
    padded = np.zeros(16, np.int32)
    padded[:11] = prompt
    prefix = engine.prefill(params=engine.load_params(), padded_tokens=padded, true_length=11)
    assert prefix.first_token == generate(model, [list(prompt)], 1, max_len=EC.max_model_len, eos_token_ids=())[0][0]
    engine.slots.release(prefix)
