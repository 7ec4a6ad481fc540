"""Search/Lookup tools and the ActionServer, against brute-force references."""

import asyncio
import math
import random
import re
import time

import numpy as np
import pytest

from agentinfer_jax.agents.action_server import ActionServer
from agentinfer_jax.agents.react import Action
from agentinfer_jax.agents.tools import CORPUS_PATH, Bm25Index, SearchTool, ToolLatency, ToolOutcome, ToolState

SYLLABLES = ["ka", "lo", "mi", "ver", "dun", "sta", "pho", "rix", "gel", "tam"]


def _word(rng):
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))


def bm25_reference(docs, query, k1=1.5, b=0.75):
    """Lucene BM25 in float64 over lower-cased \\w\\w+ tokens (the made-up words contain no stop words)."""
    tok = lambda s: re.findall(r"\w\w+", s.lower())
    docs_t = [tok(d) for d in docs]
    n, avgdl = len(docs_t), sum(map(len, docs_t)) / len(docs_t)
    scores = np.zeros(n)
    for term in set(tok(query)):
        df = sum(term in d for d in docs_t)
        if df == 0:
            continue
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        for i, d in enumerate(docs_t):
            tf = d.count(term)
            scores[i] += idf * tf / (tf + k1 * (1 - b + b * len(d) / avgdl))
    return scores


@pytest.fixture(scope="module")
def synthetic_corpus():
    rng = random.Random(0)
    corpus = {}
    while len(corpus) < 40:
        title = " ".join(_word(rng).capitalize() for _ in range(rng.randint(1, 3)))
        corpus[title] = [" ".join(_word(rng) for _ in range(rng.randint(4, 10))) + "." for _ in range(rng.randint(1, 6))]
    return corpus


@pytest.fixture(scope="module")
def tool(synthetic_corpus):
    return SearchTool(synthetic_corpus)


def test_bm25_scores_match_reference(synthetic_corpus):
    rng = random.Random(1)
    docs = [f"{t} {' '.join(s)}" for t, s in synthetic_corpus.items()]
    index = Bm25Index(docs)
    for _ in range(20):
        query = " ".join(rng.choice(docs).split()[rng.randint(0, 3)] for _ in range(2))
        np.testing.assert_allclose(index.scores(query), bm25_reference(docs, query), rtol=1e-4, atol=1e-6)
    assert not index.scores("zzzz qqqq").any()


def test_exact_search_is_normalised_and_returns_the_page(tool, synthetic_corpus):
    rng = random.Random(2)
    for title in rng.sample(list(synthetic_corpus), 15):
        mangled = rng.choice([title.upper(), title.lower().replace(" ", "_"), f"  {title}  ".replace(" ", "  ")])
        out = tool.execute(Action("search", mangled), ToolState())
        assert out.ok and out.state == ToolState(page=title)
        assert out.observation == " ".join(s.strip() for s in synthetic_corpus[title])


def test_search_miss_suggests_bm25_ranked_titles(tool, synthetic_corpus):
    titles = list(synthetic_corpus)
    docs = [f"{t} {' '.join(s)}" for t, s in synthetic_corpus.items()]
    rng = random.Random(3)
    for _ in range(10):
        query = " ".join(rng.choice(docs).split()[-1].strip(".") for _ in range(2)) + " nonexistent"
        out = tool.execute(Action("search", query), ToolState(page=titles[0]))
        ref = bm25_reference(docs, query)
        order = sorted(range(len(titles)), key=lambda i: (-ref[i], i))
        expected = [titles[i] for i in order[:5] if ref[i] > 0]
        assert [r.title for r in out.results] == expected
        assert out.observation.startswith(f"Could not find {query}.")
        assert out.state == ToolState(page=titles[0])  # a miss keeps the open page


def test_lookup_walks_matching_sentences(tool, synthetic_corpus):
    rng = random.Random(4)
    for title in rng.sample(list(synthetic_corpus), 10):
        keyword = rng.choice(" ".join(synthetic_corpus[title]).split()).strip(".")[:4]
        expected = [s.strip() for s in synthetic_corpus[title] if keyword.lower() in s.lower()]
        state = tool.execute(Action("search", title), ToolState()).state
        seen = []
        for _ in range(len(expected) + 1):
            out = tool.execute(Action("lookup", keyword), state)
            state = out.state
            seen.append(out.observation)
        assert seen[:-1] == [f"(Result {i + 1} / {len(expected)}) {s}" for i, s in enumerate(expected)]
        assert seen[-1] == "No more results."
        # a different keyword restarts the cursor
        other = tool.execute(Action("lookup", "zzzz"), state)
        assert other.observation == "No more results." and other.state.cursor == 1
    assert "Search" in tool.execute(Action("lookup", "x"), ToolState()).observation


def test_default_corpus_is_the_bundled_one():
    import json

    corpus = json.loads(CORPUS_PATH.read_text())
    title = sorted(corpus)[7]
    out = SearchTool().execute(Action("search", title.lower()), ToolState())
    assert out.observation == " ".join(s.strip() for s in corpus[title])


def test_failures_and_latency_are_injected_and_seeded(synthetic_corpus):
    failing = SearchTool(synthetic_corpus, failure_rate=1.0)
    out = asyncio.run(failing.run(Action("search", "x"), ToolState()))
    assert not out.ok and out.observation.startswith("tool error: ")
    draws = [ToolLatency(0.2, sigma=0.5, seed=7)() for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same first draw
    lat = ToolLatency(0.2, sigma=0.5, seed=8)
    samples = np.array([lat() for _ in range(20000)])
    assert abs(samples.mean() - 0.2) < 0.01 and samples.min() > 0
    half = SearchTool(synthetic_corpus, failure_rate=0.3, seed=5)
    fails = sum(not asyncio.run(half.run(Action("finish", "a"), ToolState())).ok for _ in range(400))
    assert 80 < fails < 160


class CountingTool:
    """Fake tool with a fixed delay that records calls and the peak concurrency."""

    def __init__(self, delay=0.02, raise_on=None):
        self.delay, self.raise_on = delay, raise_on
        self.calls, self.active, self.peak = [], 0, 0

    async def run(self, action, state):
        self.calls.append(action)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(self.delay)
            if self.raise_on == action.arg:
                raise RuntimeError("backend down")
            return ToolOutcome(f"obs {action.arg}", state)
        finally:
            self.active -= 1


def test_server_deduplicates_limits_concurrency_and_contains_errors():
    async def main():
        tool = CountingTool()
        server = ActionServer(tool, max_concurrency=3, timeout_s=1.0)
        same = await asyncio.gather(*(server.execute(Action("search", "A  b"), ToolState()) for _ in range(5)))
        assert len(tool.calls) == 1 and {o.observation for o in same} == {"obs A  b"}
        assert server.stats.deduplicated == 4
        await asyncio.gather(*(server.execute(Action("search", f"q{i}"), ToolState()) for i in range(10)))
        assert tool.peak == 3 and len(tool.calls) == 11
        bad = await ActionServer(CountingTool(raise_on="boom")).execute(Action("search", "boom"), ToolState())
        assert not bad.ok and "backend down" in bad.observation
        slow = ActionServer(CountingTool(delay=5.0), timeout_s=0.05)
        out = await slow.execute(Action("search", "x"), ToolState(page="P"))
        assert not out.ok and "timed out" in out.observation and out.state == ToolState(page="P")
        assert slow.stats.timeouts == 1

    asyncio.run(main())


def test_server_turns_garbage_and_self_cancelling_tools_into_errors():
    """A tool that returns something other than a ToolOutcome, or raises CancelledError on its own,
    gives a "tool error" outcome; before, the first crashed the session and the second cancelled it."""

    class Odd:
        async def run(self, action, state):
            if action.arg == "str":
                return "just text"
            if action.arg == "none":
                return None
            if action.arg == "bad":
                return ToolOutcome(None, state)
            raise asyncio.CancelledError()  # e.g. its connection pool was closed under it

    async def main():
        server = ActionServer(Odd())
        outs = {a: await server.execute(Action("search", a), ToolState()) for a in ("str", "none", "bad", "cancel")}
        return outs, server.stats.errors

    outs, errors = asyncio.run(main())
    assert all(not o.ok and o.observation.startswith("tool error: ") for o in outs.values())
    assert "returned str" in outs["str"].observation and "returned NoneType" in outs["none"].observation
    assert "malformed" in outs["bad"].observation and "cancelled itself" in outs["cancel"].observation
    assert errors == 4


def test_timeout_holds_for_a_tool_that_ignores_cancellation():
    """wait_for waited for a tool that swallowed its cancellation and then returned its late result;
    the server now answers at timeout + grace and cancels the straggler again on aclose."""

    class Stubborn:
        def __init__(self):
            self.finished = False

        async def run(self, action, state):
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass  # swallows the first cancellation...
            try:
                await asyncio.sleep(10)
                return ToolOutcome("late", state)
            finally:
                self.finished = True  # ...but not the second one

    async def main():
        tool = Stubborn()
        server = ActionServer(tool, timeout_s=0.05, cancel_grace_s=0.05)
        start = time.perf_counter()
        out = await server.execute(Action("search", "x"), ToolState())
        elapsed = time.perf_counter() - start
        stats, finished_before = server.stats, tool.finished
        await server.aclose()
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return out, elapsed, stats, finished_before, tool.finished, left

    out, elapsed, stats, finished_before, finished_after, left = asyncio.run(main())
    assert not out.ok and "timed out after 0.05s" in out.observation and elapsed < 1.0
    assert stats.timeouts == 1 and stats.abandoned == 1
    assert not finished_before and finished_after and left == []


def test_caller_never_joins_an_execution_being_cancelled():
    """The last waiter of a speculative execution leaves (its session ended); a real call of the same
    action arriving before the cancellation lands used to join it and raise CancelledError."""

    async def main():
        tool = CountingTool(delay=0.05)
        server = ActionServer(tool)
        spec = asyncio.create_task(server.execute(Action("search", "A"), ToolState(), speculative=True))
        await asyncio.sleep(0.01)
        spec.cancel()
        await asyncio.sleep(0)  # the waiter has left and cancelled the execution, which is still unwinding
        out = await server.execute(Action("search", "A"), ToolState())
        return out, len(tool.calls), server.running

    out, calls, running = asyncio.run(main())
    assert out.ok and out.observation == "obs A" and calls == 2 and running == 0


def test_shared_search_miss_keeps_each_callers_own_state():
    """Search keys ignore the state, but a miss leaves the state where it ran: a caller in another
    state that joins it must not be moved to the other caller's page."""

    async def main():
        tool = SearchTool({"Alpha": ["Alpha is a town."], "Beta": ["Beta is a river."]}, latency=0.02)
        server = ActionServer(tool)
        on_alpha, on_beta = ToolState(page="Alpha"), ToolState(page="Beta", keyword="river", cursor=1)
        a, b = await asyncio.gather(server.execute(Action("search", "Zeta"), on_alpha),
                                    server.execute(Action("search", "Zeta"), on_beta))
        hit_a, hit_b = await asyncio.gather(server.execute(Action("search", "Beta"), on_alpha),
                                            server.execute(Action("search", "Beta"), on_beta))
        return a, b, hit_a, hit_b, tool.invocations, server.stats

    a, b, hit_a, hit_b, invocations, stats = asyncio.run(main())
    assert a.observation == b.observation and a.observation.startswith("Could not find Zeta")
    assert a.state == ToolState(page="Alpha") and b.state == ToolState(page="Beta", keyword="river", cursor=1)
    assert hit_a.state == hit_b.state == ToolState(page="Beta")  # a hit opens its page wherever it ran: shared
    assert invocations == 3 and stats.retried_in_other_state == 1 and stats.deduplicated == 2
