"""AgentCompress: search-result filtering and asynchronous memory distillation."""

import asyncio
import random
import re

from agentinfer_jax.agents.clients import ScriptedClient
from agentinfer_jax.agents.compress import MemoryDistiller, SearchResultFilter, extractive_compress
from agentinfer_jax.agents.loop import AgentConfig, AgentFeatures, ReActAgent
from agentinfer_jax.agents.react import StepRecord
from agentinfer_jax.agents.tools import SearchResult, SearchTool
from test_tools import SYLLABLES, bm25_reference

words = lambda text: len(text.split())


def _results(rng, n):
    w = lambda: "".join(rng.choice(SYLLABLES) for _ in range(2))
    return [SearchResult(f"{w()} {w()}", " ".join(w() for _ in range(rng.randint(3, 9)))) for _ in range(n)]


def test_bm25_filter_keeps_reference_top_n_and_threshold():
    rng = random.Random(0)
    for _ in range(30):
        results = _results(rng, rng.randint(2, 9))
        question = " ".join(rng.choice(f"{r.title} {r.snippet}".split()) for r in rng.sample(results, 2))
        top_n = rng.randint(1, 4)
        ref = bm25_reference([f"{r.title} {r.snippet}" for r in results], question)
        order = sorted(range(len(results)), key=lambda i: (-ref[i], i))
        kept = asyncio.run(SearchResultFilter(top_n=top_n).filter(question, results))
        assert kept == [results[i] for i in order[:top_n]]
        threshold = float(sorted(ref)[len(ref) // 2]) + 1e-3
        kept = asyncio.run(SearchResultFilter(top_n=10, min_score=threshold).filter(question, results))
        assert kept == [results[i] for i in order if ref[i] >= threshold]


def test_llm_filter_uses_the_small_model_and_falls_back():
    rng = random.Random(1)
    results = _results(rng, 5)
    client = ScriptedClient(["3, 1, 9, 3", "none of them"])
    flt = SearchResultFilter(top_n=2, use_llm=True, client=client)
    assert asyncio.run(flt.filter("q", results)) == [results[2], results[0]]
    assert client.calls[0].role == "small"
    fallback = asyncio.run(flt.filter(results[4].title, results))
    assert fallback[0] == results[4] and flt.llm_fallbacks == 1


def test_extractive_compress_keeps_first_and_most_relevant_sentences():
    obs = "Alpha is a town. It has a river. The mayor of alpha is Bob Stone. Bob likes tea."
    assert extractive_compress(obs, {"mayor", "bob", "stone"}) == "Alpha is a town. The mayor of alpha is Bob Stone."
    assert extractive_compress("Short one.", {"x"}) == "Short one."


def _steps(rng, n):
    out = []
    for i in range(n):
        sentences = [" ".join(rng.choice(SYLLABLES) for _ in range(8)) + "." for _ in range(6)]
        out.append(StepRecord(f"Thought {i + 1}: t{i}\nAction {i + 1}: Search[p{i}]", " ".join(sentences)))
    return out


def test_distillation_runs_in_background_and_replaces_only_observations():
    async def main():
        rng = random.Random(2)
        steps = _steps(rng, 3)
        before = [(s.response, s.observation) for s in steps]
        client = ScriptedClient(["[1] short one\n[3] short three\ngarbage"], latency_s=0.05)
        dist = MemoryDistiller(client, threshold_tokens=50, min_delay_rounds=1, token_counter=words)
        assert dist.maybe_start("q", steps, prompt_tokens=49) is False
        assert dist.maybe_start("q", steps, prompt_tokens=400) is True
        assert dist.running and dist.poll(steps) is False  # started, not awaited
        steps.append(StepRecord("Thought 4: new", "new observation stays"))
        await asyncio.sleep(0.1)
        assert dist.poll(steps) is False  # done, but younger than min_delay_rounds
        dist.maybe_start("q", steps, prompt_tokens=400)  # one more closed round
        assert dist.poll(steps) is True
        assert [s.response for s in steps[:3]] == [r for r, _ in before]
        assert steps[0].observation == "short one" and steps[2].observation == "short three"
        # step 2 was missing from the model's answer: extractive fallback with the question's and steps' words
        context_words = set(re.findall(r"\w\w+", " ".join(["q", *(r.lower() for r, _ in before)])))
        assert steps[1].observation == extractive_compress(before[1][1], context_words) != before[1][1]
        assert steps[3].observation == "new observation stays" and not steps[3].compressed
        saved = sum(words(o) for _, o in before) - sum(words(s.observation) for s in steps[:3])
        assert dist.metrics.tokens_saved == saved > 0
        await dist.aclose()

    asyncio.run(main())


def test_failing_or_absent_small_model_falls_back_and_close_cancels():
    async def main():
        rng = random.Random(3)
        steps = _steps(rng, 2)
        dist = MemoryDistiller(ScriptedClient([RuntimeError("down")]), threshold_tokens=1, min_delay_rounds=0, token_counter=words)
        dist.maybe_start("q", steps, 10)
        await asyncio.sleep(0.01)
        assert dist.poll(steps) and all(s.compressed for s in steps) and dist.metrics.llm_fallbacks == 1
        slow = MemoryDistiller(ScriptedClient(["[1] x"], latency_s=10.0), threshold_tokens=1, token_counter=words)
        slow.maybe_start("q", _steps(rng, 2), 10)
        await slow.aclose()
        assert not slow.running

    asyncio.run(main())


def test_agent_filters_search_misses_and_distils_history():
    rng = random.Random(4)
    corpus = {f"Page {i}": [" ".join(rng.choice(SYLLABLES) for _ in range(10)) + "." for _ in range(8)] for i in range(6)}
    corpus["Mogul River"] = ["The Mogul River flows north.", "It is long."]
    outputs = [f"Thought {i}: read.\nAction {i}: Search[Page {i - 1}]" for i in range(1, 5)]
    outputs.insert(2, "Thought: try.\nAction: Search[mogul river delta]")
    outputs.append("Action: Finish[north]")
    client = ScriptedClient(outputs)
    agent = ReActAgent(
        client,
        SearchTool(corpus),
        config=AgentConfig(max_steps=10),
        features=AgentFeatures(filter_results=True, distill_memory=True),
        result_filter=SearchResultFilter(top_n=1),
        distiller_factory=lambda sid: MemoryDistiller(None, threshold_tokens=300, min_delay_rounds=1, token_counter=words),
        token_counter=words,
    )
    result = asyncio.run(agent.run("Which way does the Mogul River flow?"))
    assert result.answer == "north"
    assert result.steps[2].observation == "Could not find mogul river delta. Similar: ['Mogul River']."
    assert result.metrics.compress["distillations_applied"] >= 1 and result.metrics.compress["tokens_saved"] > 0
    original = " ".join(s.strip() for s in corpus["Page 0"])
    last_prompt = client.calls[-1].messages
    assert result.steps[0].compressed and result.steps[0].observation != original
    assert last_prompt[3]["content"] == f"Observation 1: {result.steps[0].observation}"
    assert client.calls[1].messages[3]["content"] == f"Observation 1: {original}"
    assert [s.response for s in result.steps] == [o for o in outputs]


def test_filter_keeps_results_bm25_cannot_index():
    """Results with no indexable word (empty, or stop words only) made bm25s raise inside the filter
    (the session then lost the search's observation); they now rank in search order."""
    empty = [SearchResult("", ""), SearchResult("the", "of a")]
    assert asyncio.run(SearchResultFilter(top_n=1).filter("Which river?", empty)) == [empty[0]]
    assert asyncio.run(SearchResultFilter(top_n=5).filter("Which river?", empty)) == empty
    llm = SearchResultFilter(top_n=1, use_llm=True, client=ScriptedClient(["no idea"]))  # LLM fallback path
    assert asyncio.run(llm.filter("Which river?", empty)) == [empty[0]] and llm.llm_fallbacks == 1
    assert asyncio.run(SearchResultFilter().filter("q", [])) == []


def test_distiller_failures_fall_back_or_are_counted_never_lost():
    """A small model whose reply is not text used to fail the whole distillation task; it now takes
    the extractive fallback. A distillation that failed after the last poll was dropped without a
    trace at close; it is now counted."""
    from agentinfer_jax.agents.clients import Completion

    async def main():
        rng = random.Random(5)
        steps = _steps(rng, 2)
        broken = MemoryDistiller(ScriptedClient([Completion([None], 0, 0, 0.0)]), threshold_tokens=1,
                                 min_delay_rounds=0, token_counter=words)
        broken.maybe_start("q", steps, 10)
        await asyncio.sleep(0.01)
        applied = broken.poll(steps)

        class Failing(MemoryDistiller):
            async def _distill(self, question, snapshot, started_round):
                raise RuntimeError("distiller bug")

        failing = Failing(None, threshold_tokens=1, token_counter=words)
        failing.maybe_start("q", _steps(rng, 2), 10)
        await asyncio.sleep(0.01)  # it fails in the background; the session ends before the next poll
        await failing.aclose()
        return applied, steps, broken.metrics, failing.metrics

    applied, steps, broken, failing = asyncio.run(main())
    assert applied and all(s.compressed for s in steps) and broken.llm_fallbacks == 1 and broken.tokens_saved > 0
    assert broken.distillations_failed == 0
    assert failing.distillations_started == 1 and failing.distillations_failed == 1
