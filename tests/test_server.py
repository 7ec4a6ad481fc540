"""The OpenAI-compatible server, driven live on loopback with the official `openai` client and httpx.

Independent reference: `model.transformer.generate` (dense contiguous cache, no scheduler, no
paging, no drafting) on the same prompt ids; the server runs the tiny model through the engine
with the prefix cache and the prompt-lookup drafter on, and must emit the same greedy tokens.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from agentinfer_jax.model.transformer import generate
from agentinfer_jax.serving.builder import ServerConfig, build_stack
from agentinfer_jax.serving.server import BackgroundServer, ServerLimits, TextDeltas

MAX_MODEL_LEN = 256
MAX_TOKENS_LIMIT = 200


@pytest.fixture(scope="module")
def server():
    stack = build_stack(ServerConfig(config="tiny", num_blocks=96, block_size=16, max_num_seqs=2,
                                     max_tokens_per_step=32, min_token_bucket=32,
                                     max_model_len=MAX_MODEL_LEN, drafter="ngram",
                                     num_draft_tokens=4))
    stack.engine.warmup()  # compile before any client waits on a reply (order-independent tests)
    srv = BackgroundServer(stack, limits=ServerLimits(max_tokens_limit=MAX_TOKENS_LIMIT)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


CHAT = [{"role": "system", "content": "You answer with Thought, Action and Observation steps. " * 3},
        {"role": "user", "content": "Which magazine was started first, Arthur's or First for Women?"}]
_rng = random.Random(11)
PROMPTS = [[_rng.randrange(5, 4096) for _ in range(n)] for n in (5, 23, 40)]  # ids >= 5: no special tokens
REF_NEW = 20


@pytest.fixture(scope="module")
def references(server):
    """Greedy continuations of PROMPTS and the CHAT prompt (one batched reference call: one compile)."""
    chat_ids = server.stack.tokenizer.encode_chat(CHAT)
    rows = generate(server.stack.model, [*PROMPTS, chat_ids], REF_NEW)  # each row stops after EOS
    return rows[:-1], (chat_ids, rows[-1])


def model_name(server):
    return server.stack.model_name


def random_prompt(rng, n, vocab=4096):
    return [rng.randrange(5, vocab) for _ in range(n)]  # ids >= 5: no special tokens


def wait_until(cond, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_concurrent_greedy_completions_equal_the_dense_reference(server, client, references):
    prompts, max_new = PROMPTS, 12
    reference = [row[:max_new] for row in references[0]]

    def call(p):
        return client.completions.create(model=model_name(server), prompt=p, max_tokens=max_new, temperature=0,
                                         extra_body={"return_token_ids": True})

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(call, prompts))
    tok = server.stack.tokenizer
    for p, ref, res in zip(prompts, reference, results):
        choice = res.choices[0]
        assert choice.model_extra["token_ids"] == ref
        assert choice.text == tok.decode(ref, skip_special_tokens=True)
        assert choice.finish_reason == ("stop" if len(ref) < max_new else "length")
        assert res.usage.prompt_tokens == len(p) and res.usage.completion_tokens == len(ref)


def test_chat_stream_equals_non_stream_and_repeats_hit_the_prefix_cache(server, client, references):
    ids, ref = references[1]
    kw = dict(model=model_name(server), messages=CHAT, max_tokens=REF_NEW, temperature=0)
    full = client.chat.completions.create(**kw)
    assert full.choices[0].message.content == server.stack.tokenizer.decode(ref, skip_special_tokens=True)
    assert full.usage.prompt_tokens == len(ids)

    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [full.choices[0].finish_reason]
    usage = chunks[-1].usage  # the include_usage chunk; the prompt was cached by the first call
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens >= 16 * ((len(ids) - 1) // 16) > 0


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text(server, client, stream):
    rng = random.Random(5)
    prompt = random_prompt(rng, 30)
    kw = dict(model=model_name(server), prompt=prompt, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(**kw).choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    expected = text[:text.find(stop)]
    if stream:
        chunks = list(client.completions.create(stream=True, stop=stop, **kw))
        got, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        res = client.completions.create(stop=[stop], **kw)
        got, reason = res.choices[0].text, res.choices[0].finish_reason
    assert got == expected and reason == "stop"


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [model_name(server)]
    assert client.models.retrieve(model_name(server)).id == model_name(server)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    with httpx.Client(base_url=server.base_url) as http:
        assert http.get("/health").json() == {"status": "ok"}
        http.post("/v1/completions", json={"model": model_name(server), "prompt": [7, 8, 9], "max_tokens": 2})
        metrics = http.get("/metrics").text
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
               if line and not line.startswith("#")}
    assert samples['agentinfer_requests_total{reason="length"}'] >= 1
    assert samples["agentinfer_prompt_tokens_total"] >= 3
    assert samples["agentinfer_output_tokens_total"] >= 2


def _bad_cases(name):
    big = [5] * (MAX_MODEL_LEN + 3)
    base = {"model": name, "max_tokens": 4}
    return [
        ("empty prompt", "/v1/completions", {**base, "prompt": ""}, 400),
        ("empty id list", "/v1/completions", {**base, "prompt": []}, 400),
        ("over context", "/v1/completions", {**base, "prompt": big}, 400),
        ("id >= vocab", "/v1/completions", {**base, "prompt": [5, 4096]}, 400),
        ("negative id", "/v1/completions", {**base, "prompt": [-1, 5]}, 400),
        ("max_tokens 0", "/v1/completions", {**base, "prompt": "hi", "max_tokens": 0}, 400),
        ("max_tokens < 0", "/v1/chat/completions",
         {**base, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400),
        ("max_tokens over limit", "/v1/completions", {**base, "prompt": "hi", "max_tokens": MAX_TOKENS_LIMIT + 1}, 400),
        ("missing prompt", "/v1/completions", base, 400),
        ("missing messages", "/v1/chat/completions", base, 400),
        ("missing model", "/v1/completions", {"prompt": "hi"}, 400),
        ("bad message", "/v1/chat/completions", {**base, "messages": [{"content": "no role"}]}, 400),
        ("n too large", "/v1/completions", {**base, "prompt": "hi", "n": 99}, 400),
        ("bad type", "/v1/completions", {**base, "prompt": "hi", "temperature": "hot"}, 400),
        ("bad stop", "/v1/completions", {**base, "prompt": "hi", "stop": [""]}, 400),
        ("bad top_p", "/v1/completions", {**base, "prompt": "hi", "top_p": 0}, 400),
        ("unknown model", "/v1/completions", {**base, "model": "gpt-9", "prompt": "hi"}, 404),
        ("malformed json", "/v1/completions", b'{"model": "tiny", "prompt": ', 400),
        ("json not an object", "/v1/completions", b"[1, 2]", 400),
        ("body over 1 MiB", "/v1/completions", {**base, "prompt": "x" * (1 << 20)}, 413),
        ("unknown route", "/v1/engines", {}, 404),
    ]


def test_bad_inputs_get_openai_shaped_4xx(server):
    failures = []
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        for label, path, body, status in _bad_cases(model_name(server)):
            kw = {"content": body} if isinstance(body, bytes) else {"json": body}
            res = http.post(path, headers={"content-type": "application/json"}, **kw)
            err = res.json().get("error", {}) if res.headers.get("content-type", "").startswith("application/json") \
                else {}
            if res.status_code != status or not err.get("message") or "type" not in err or "code" not in err:
                failures.append((label, res.status_code, res.text[:200]))
        # A chunked body (no Content-Length) over the limit is cut off while reading.
        chunked = http.post("/v1/completions", content=iter([b'{"prompt": "'] + [b"x" * 65536] * 20 + [b'"}']))
        assert chunked.status_code == 413
    assert not failures, failures


def test_stream_disconnect_cancels_and_frees_blocks_while_others_are_served(server):
    stack = server.stack
    rng = random.Random(3)
    body = {"model": model_name(server), "prompt": random_prompt(rng, 40), "max_tokens": MAX_TOKENS_LIMIT,
            "temperature": 0, "ignore_eos": True, "stream": True}
    other: dict = {}

    def other_request():
        with httpx.Client(base_url=server.base_url, timeout=120) as http:
            other["res"] = http.post("/v1/completions", json={"model": model_name(server), "max_tokens": 6,
                                                              "prompt": random_prompt(rng, 20), "ignore_eos": True})

    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        with http.stream("POST", "/v1/completions", json=body) as res:
            assert res.status_code == 200
            lines = res.iter_lines()
            first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
            rid = first["id"]
            assert stack.pool.num_used > len(stack.prefix_cache)  # the stream holds blocks of its own
            worker = threading.Thread(target=other_request)
            worker.start()
            for _ in range(3):
                next(lines)
        # Leaving the block closes the connection mid-stream.
    worker.join(timeout=120)
    assert other["res"].status_code == 200 and other["res"].json()["usage"]["completion_tokens"] == 6

    def aborted():
        return any(m.request_id == rid and m.finish_reason == "abort" for m in stack.loop.metrics.finished)

    assert wait_until(aborted), "the disconnected stream was not cancelled"
    assert wait_until(lambda: not stack.scheduler.running and stack.pool.num_used == len(stack.prefix_cache))
    finished = next(m for m in stack.loop.metrics.finished if m.request_id == rid)
    assert finished.output_tokens < MAX_TOKENS_LIMIT


def test_text_deltas_never_retract_and_concatenate_to_the_final_text():
    rng = random.Random(0)
    alphabet = "ab\ufffd "
    for _ in range(300):
        final = "".join(rng.choice(alphabet[:2] + " ") for _ in range(rng.randint(0, 30)))
        stops = tuple("".join(rng.choice("ab") for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(0, 2)))
        # The loop reports growing prefixes, sometimes with a transient incomplete-UTF-8 tail,
        # and cuts the final text before the first stop string.
        cut = min([final.find(s) for s in stops if s in final], default=len(final))
        target = final[:cut]
        deltas = TextDeltas(stops)
        out = []
        for n in range(len(target) + 1):
            shown = final[:n] + ("\ufffd" if rng.random() < 0.3 else "")
            if all(s not in shown.rstrip("\ufffd") for s in stops):
                out.append(deltas.push(shown, final=False))
        out.append(deltas.push(target, final=True))
        assert "".join(out) == target


def test_any_int64_seed_is_folded_and_out_of_range_is_a_400_naming_seed(server, client):
    """Seeds outside uint32 used to reach the engine (500, batch re-run, client retries)."""
    from agentinfer_jax.sampling_params import fold_seed

    prompt = random_prompt(random.Random(8), 12)
    kw = dict(model=model_name(server), prompt=prompt, max_tokens=6, temperature=1.0,
              extra_body={"return_token_ids": True, "ignore_eos": True})

    def sample(seed):
        return client.completions.create(seed=seed, **kw).choices[0].model_extra["token_ids"]

    for seed in (-1, 2**32, 2**63 - 1, -(2**63)):
        folded = fold_seed(seed)
        assert 0 <= folded < 2**32
        # Deterministic, and exactly the draws of the folded uint32 seed (the engine's own seeding).
        assert sample(seed) == sample(seed) == sample(folded)
    assert fold_seed(7) == 7 and fold_seed(-1) != fold_seed(-2)
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        for seed in (2**63, -(2**63) - 1, 10**30):
            res = http.post("/v1/completions", json={"model": model_name(server), "prompt": prompt,
                                                     "max_tokens": 2, "seed": seed})
            assert res.status_code == 400, res.text
            assert "seed" in res.json()["error"]["message"]
    assert server.stack.loop.is_running


class _SlowExecutor:
    """Wraps the loop's executor so that every step takes `seconds` more (a long request stays running)."""

    def __init__(self, stack, seconds):
        self.stack, self.inner, self.seconds = stack, stack.loop.executor, seconds
        stack.loop.executor = self

    def execute(self, batch):
        time.sleep(self.seconds)
        return self.inner.execute(batch)

    def restore(self):
        self.stack.loop.executor = self.inner


def test_non_stream_disconnect_aborts_the_request_and_frees_its_blocks(server):
    import socket

    stack = server.stack
    slow = _SlowExecutor(stack, 0.05)  # 200 tokens >= 10 s: only an abort ends it early
    try:
        body = json.dumps({"model": model_name(server), "prompt": random_prompt(random.Random(21), 40),
                           "max_tokens": MAX_TOKENS_LIMIT, "temperature": 0, "ignore_eos": True}).encode()
        before = {m.request_id for m in stack.loop.metrics.finished}
        sock = socket.create_connection((server.host, server.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert wait_until(lambda: stack.scheduler.running), "the request never started"
        assert wait_until(lambda: any(len(r.output_tokens) >= 3 for r in stack.scheduler.running))
        sock.close()  # the client goes away (as kill -9 would) without reading the reply
        closed = time.monotonic()

        def aborted():
            return [m for m in stack.loop.metrics.finished if m.request_id not in before]

        assert wait_until(aborted, timeout_s=8.0), "the disconnected request kept running"
        assert time.monotonic() - closed < 8.0
        m = aborted()[0]
        assert m.finish_reason == "abort" and m.output_tokens < MAX_TOKENS_LIMIT
        assert wait_until(lambda: not stack.scheduler.running and stack.pool.num_used == len(stack.prefix_cache))
    finally:
        slow.restore()


def test_chat_without_max_tokens_may_use_the_rest_of_the_context(server, client):
    messages = [{"role": "user", "content": "Find the magazine that was started first and say why. " * 6}]
    prompt_len = len(server.stack.tokenizer.encode_chat(messages))
    assert MAX_MODEL_LEN - MAX_TOKENS_LIMIT < prompt_len < MAX_MODEL_LEN - 8  # the context binds, not the limit
    res = client.chat.completions.create(model=model_name(server), messages=messages, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert res.usage.prompt_tokens == prompt_len
    assert res.usage.completion_tokens == MAX_MODEL_LEN - prompt_len
    assert res.choices[0].finish_reason == "length"
    # Completions keep a fixed default, cut to the server's max_tokens limit (not a 400).
    res = client.completions.create(model=model_name(server), prompt=[7, 8, 9], temperature=0,
                                    extra_body={"ignore_eos": True})
    assert res.usage.completion_tokens == min(256, MAX_TOKENS_LIMIT)


@pytest.mark.parametrize("stream", [False, True])
def test_usage_at_a_stop_string_counts_every_emitted_token(server, client, stream):
    tok = server.stack.tokenizer
    prompt = random_prompt(random.Random(17), 30)
    kw = dict(model=model_name(server), prompt=prompt, max_tokens=24, temperature=0)
    extra = {"ignore_eos": True, "return_token_ids": True}
    ref = client.completions.create(extra_body=extra, **kw).choices[0].model_extra["token_ids"]
    text = tok.decode(ref, skip_special_tokens=True)
    stop = text[len(text) // 4:len(text) // 2]  # long: the tiny model repeats itself
    # Reference: the fewest tokens whose text contains the stop string.
    need = next(n for n in range(1, len(ref) + 1) if stop in tok.decode(ref[:n], skip_special_tokens=True))
    if stream:
        chunks = list(client.completions.create(stream=True, stop=stop, extra_body=extra,
                                                stream_options={"include_usage": True}, **kw))
        ids = [t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]]
        usage, reason = chunks[-1].usage, [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        res = client.completions.create(stop=stop, extra_body=extra, **kw)
        ids, usage, reason = res.choices[0].model_extra["token_ids"], res.usage, res.choices[0].finish_reason
    assert reason == "stop" and need > 4
    assert ids == ref[:len(ids)] and len(ids) >= need  # the step that hit the stop string is counted
    assert usage.completion_tokens == len(ids)


def _gauges(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        text = http.get("/metrics").text
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line.startswith("agentinfer_") and "{" not in line}


def test_gauges_follow_every_state_change_and_exclude_evictable_cache_blocks(server):
    stack = server.stack
    capacity = stack.pool.num_blocks - 1
    slow = _SlowExecutor(stack, 0.05)
    try:
        body = {"model": model_name(server), "prompt": random_prompt(random.Random(33), 40),
                "max_tokens": MAX_TOKENS_LIMIT, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=server.base_url, timeout=120) as http:
            with http.stream("POST", "/v1/completions", json=body) as res:
                lines = res.iter_lines()
                for _ in range(4):
                    next(line for line in lines if line.startswith("data: "))
                g = _gauges(server)
                assert g["agentinfer_running_requests"] == 1
                assert g["agentinfer_blocks_capacity"] == capacity
                assert 3 <= g["agentinfer_blocks_in_use"] <= capacity  # 40 + tokens in 16-token blocks
                assert g["agentinfer_kv_cache_usage"] == pytest.approx(g["agentinfer_blocks_in_use"] / capacity)
        # Cancelled by the disconnect; no step runs after it, yet the gauges must say idle.
        assert wait_until(lambda: not stack.scheduler.has_unfinished)

        def idle():
            g = _gauges(server)
            return (g["agentinfer_running_requests"] == 0 and g["agentinfer_waiting_requests"] == 0
                    and g["agentinfer_blocks_in_use"] == 0 and g["agentinfer_kv_cache_usage"] == 0)

        assert wait_until(idle, timeout_s=10), _gauges(server)
        # Reference: the pool itself. Idle and no retention, so every used block is the cache's, evictable.
        g = _gauges(server)
        assert g["agentinfer_blocks_cached_evictable"] == stack.pool.num_used == len(stack.prefix_cache) > 0
    finally:
        slow.restore()


def test_prompts_are_tokenized_off_the_event_loop(server, client):
    """A huge prompt's tokenization must not stall the event loop (every other stream waits on it)."""
    tok = server.stack.tokenizer
    threads = []

    def recording(fn):
        def wrapped(*args, **kwargs):
            threads.append(threading.current_thread().name)
            return fn(*args, **kwargs)
        return wrapped

    tok.encode, tok.encode_chat = recording(tok.encode), recording(tok.encode_chat)
    try:
        client.completions.create(model=model_name(server), prompt="Thought: search it", max_tokens=2)
        client.chat.completions.create(model=model_name(server), max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}])
    finally:
        del tok.encode, tok.encode_chat  # back to the class's methods
    assert len(threads) >= 2
    assert "http-server" not in threads  # the event loop's thread (BackgroundServer runs uvicorn there)


def test_start_up_logs_one_summary_line(caplog):
    config = ServerConfig(config="tiny", num_blocks=40, block_size=16, max_num_seqs=1, max_tokens_per_step=16,
                          max_model_len=128, drafter="sam", num_draft_tokens=3, policy="lpm")
    stack = build_stack(config)
    with caplog.at_level("INFO", logger="agentinfer_jax.serving.server"):
        with BackgroundServer(stack):
            pass
    lines = [r.getMessage() for r in caplog.records if "agentinfer-serve:" in r.getMessage()]
    assert len(lines) == 1
    line = lines[0]
    for part in ("model tiny", f"dtype {stack.model_config.dtype}", "KV pages 39 x 16", "policy lpm",
                 "drafter sam (k<=3, adaptive)", "max_model_len 128"):
        assert part in line, (part, line)


def _bodies_the_engine_cannot_take(name):
    """(label, raw body, status, param): JSON text Python's json accepts but the tokenizer or the
    engine cannot take (500s, or a 400 that named no field)."""
    chat = '{"model": "%s", "max_tokens": 2, "messages": [{"role": "user", "content": %s}]}'
    completion = '{"model": "%s", "max_tokens": 2, "prompt": "hi", %s}'
    return [
        ("deep nesting", "[" * 100_000, 400, None),
        ("NaN", completion % (name, '"temperature": NaN'), 400, None),
        ("Infinity", completion % (name, '"temperature": Infinity'), 400, None),
        ("beyond a float", completion % (name, '"top_p": 1e400'), 400, None),
        ("lone surrogate in a prompt", '{"model": "%s", "max_tokens": 2, "prompt": "a\\ud800b"}' % name, 400, "prompt"),
        ("lone surrogate in a message", chat % (name, '"\\udc00"'), 400, "messages.0.content"),
        ("prompt id beyond the vocabulary", '{"model": "%s", "max_tokens": 2, "prompt": [5, 4096]}' % name, 400,
         "prompt"),
        ("negative logit_bias id", completion % (name, '"logit_bias": {"-1": 5}'), 400, "logit_bias"),
        ("prompt over the context", '{"model": "%s", "max_tokens": 2, "prompt": %s}' % (name, [5] * MAX_MODEL_LEN),
         400, "prompt"),
    ]


def test_bodies_the_engine_cannot_take_are_400s_naming_the_field_and_the_connection_serves_on(server):
    stack = server.stack
    path = {True: "/v1/chat/completions", False: "/v1/completions"}
    normal = {"model": model_name(server), "prompt": [7, 8, 9], "max_tokens": 2}
    failures = []
    assert wait_until(lambda: not stack.scheduler.has_unfinished)
    used = stack.pool.num_used
    # One keep-alive connection: an unhandled error (500) used to close it under the next request.
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        for label, raw, status, param in _bodies_the_engine_cannot_take(model_name(server)):
            res = http.post(path['"messages"' in raw], content=raw.encode(),
                            headers={"content-type": "application/json"})
            err = res.json().get("error", {})
            if res.status_code != status or err.get("param") != param or (param and param not in err["message"]):
                failures.append((label, res.status_code, res.text[:200]))
            ok = http.post("/v1/completions", json=normal)
            if ok.status_code != 200:
                failures.append((label, "then", ok.status_code, ok.text[:200]))
    assert not failures, failures
    assert stack.loop.is_running and stack.pool.num_used == used  # nothing reached the KV cache


def test_client_gone_mid_upload_is_no_server_error(server, caplog):
    """A client that disconnects while sending its body used to be logged as an unhandled error."""
    import socket

    with caplog.at_level("ERROR"):
        sock = socket.create_connection((server.host, server.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\": ")
        time.sleep(0.2)
        sock.close()
        time.sleep(0.5)
        with httpx.Client(base_url=server.base_url, timeout=60) as http:
            res = http.post("/v1/completions", json={"model": model_name(server), "prompt": [7, 8], "max_tokens": 2})
    assert res.status_code == 200
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]


def test_requests_to_a_stopped_serving_loop_are_503s_not_waits(server):
    """The loop's thread gone (stopped, or dead of a bug): requests used to wait forever for events."""
    stack = server.stack
    slow = _SlowExecutor(stack, 0.05)
    result: dict = {}

    def long_request():
        with httpx.Client(base_url=server.base_url, timeout=30) as http:
            result["res"] = http.post("/v1/completions", json={"model": model_name(server), "max_tokens": 150,
                                                               "prompt": [7, 8, 9], "ignore_eos": True})

    def long_stream():
        with httpx.Client(base_url=server.base_url, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json={"model": model_name(server), "max_tokens": 150,
                                                              "prompt": [7, 8, 10], "ignore_eos": True,
                                                              "stream": True}) as res:
                result["events"] = [line for line in res.iter_lines() if line.startswith("data: ")]

    try:
        workers = [threading.Thread(target=long_request), threading.Thread(target=long_stream)]
        for w in workers:
            w.start()
        assert wait_until(lambda: sum(bool(r.output_tokens) for r in stack.scheduler.running) == 2)
        stack.loop.shutdown()
        for w in workers:
            w.join(timeout=10)
        assert not any(w.is_alive() for w in workers), "an in-flight request kept waiting"
        assert result["res"].status_code == 503
        # the stream ends with an error event naming the cause, then [DONE]
        assert result["events"][-1] == "data: [DONE]"
        assert json.loads(result["events"][-2][len("data: "):])["error"]["code"] == "loop_down"
        with httpx.Client(base_url=server.base_url, timeout=10) as http:
            res = http.post("/v1/completions", json={"model": model_name(server), "prompt": [7, 8], "max_tokens": 2})
            assert res.status_code == 503 and res.json()["error"]["code"] == "loop_down"
    finally:
        slow.restore()
        stack.loop.start()
    # Restarted: the abandoned request's cancel is applied, its blocks come back, serving goes on.
    assert wait_until(lambda: not stack.scheduler.has_unfinished and stack.pool.num_used == len(stack.prefix_cache))
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        res = http.post("/v1/completions", json={"model": model_name(server), "prompt": [7, 8], "max_tokens": 2})
    assert res.status_code == 200


def test_a_bug_in_one_request_is_a_500_and_its_keep_alive_connection_serves_on(server, monkeypatch):
    def broken():
        raise RuntimeError("a bug")

    monkeypatch.setattr(server.stack.loop.metrics, "prometheus_text", broken)
    # One raw keep-alive connection (a client library would quietly reconnect): uvicorn used to reset it.
    with socket.create_connection((server.host, server.port), timeout=10) as conn:
        conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\nGET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        data = b""
        while b'{"status":"ok"}' not in data:
            chunk = conn.recv(4096)
            assert chunk, f"connection closed after {data!r}"
            data += chunk
    first, second = data.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"500") and b'"code":"internal_error"' in first
    assert second.startswith(b"200")
