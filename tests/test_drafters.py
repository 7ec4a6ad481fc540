"""Drafters (prompt lookup, suffix tree, AgentSAM) against brute-force references."""

import random

import pytest

from agentinfer_jax.speculation import (Drafter, PromptLookupDrafter, SAMDrafter, SessionMemory,
                                        SuffixTreeDrafter, UnknownRequestError)


def brute_prompt_lookup(ctx, k, max_n, min_n):
    for n in range(min(max_n, len(ctx) - 1), min_n - 1, -1):
        suf = ctx[len(ctx) - n:]
        for j in range(len(ctx) - n - 1, -1, -1):  # most recent earlier occurrence first
            if ctx[j:j + n] == suf:
                return ctx[j + n:j + n + k]
    return []


def brute_longest_earlier_suffix(ctx):
    n = len(ctx)
    for length in range(n - 1, 0, -1):
        suf = ctx[n - length:]
        if any(ctx[j:j + length] == suf for j in range(0, n - length)):
            return length
    return 0


def test_prompt_lookup_matches_brute_force():
    rng = random.Random(1)
    d = PromptLookupDrafter(max_ngram=3, min_ngram=1)
    for trial in range(30):
        ctx = [rng.randrange(4) for _ in range(rng.randrange(1, 40))]
        d.begin(f"r{trial}", ctx[:5])
        d.extend(f"r{trial}", ctx[5:])
        k = rng.randrange(1, 6)
        assert d.propose(f"r{trial}", k) == brute_prompt_lookup(ctx, k, 3, 1)
        d.end(f"r{trial}")


@pytest.mark.parametrize("factor", [1.0, 8.0])
def test_sam_session_draft_continues_an_earlier_occurrence_of_the_longest_match(factor):
    rng = random.Random(2)
    d = SAMDrafter(min_match=2, factor=factor, min_prob=0.0)
    for trial in range(30):
        ctx = [rng.randrange(3) for _ in range(rng.randrange(2, 40))]
        d.begin(f"r{trial}", ctx)
        k = rng.randrange(1, 9)
        draft = d.propose(f"r{trial}", k)
        L = brute_longest_earlier_suffix(ctx)
        if L < 2:
            assert draft == []
        else:
            assert 1 <= len(draft) <= min(k, int(factor * L + 0.999))
            # the draft follows automaton transitions: matched suffix + draft is a substring of ctx
            pattern = ctx[len(ctx) - L:] + draft
            assert any(ctx[j:j + len(pattern)] == pattern for j in range(len(ctx) - len(pattern) + 1))
        d.end(f"r{trial}")


def test_sam_prefers_most_frequent_continuation_and_stops_when_ambiguous():
    d = SAMDrafter(min_match=1, factor=8.0, min_prob=0.4)
    a, b, c = 10, 11, 12
    ctx = [a, b, 1, a, b, 1, a, b, 2, a, b]  # after [a, b]: 1 twice, 2 once
    d.begin("r", ctx)
    assert d.propose("r", 1) == [1]
    d.end("r")
    d.begin("q", [a, c, 5, a, c, 6, a, c, 7, a, c])  # three-way tie after [a, c]: below 0.4
    assert d.propose("q", 4) == []
    d.end("q")


def test_sam_session_reuse_extends_incrementally():
    d = SAMDrafter()
    d.begin("r1", [1, 2, 3, 4], session_id="s")
    d.extend("r1", [5, 6])
    d.end("r1")
    state = d._sessions["s"]
    d.begin("r2", [1, 2, 3, 4, 5, 6, 7, 1, 2], session_id="s")
    assert d._sessions["s"] is state and state.sam.tokens == [1, 2, 3, 4, 5, 6, 7, 1, 2]
    assert d.propose("r2", 3) == [3, 4, 5]
    d.end("r2")
    d.begin("r3", [9, 9, 1], session_id="s")  # diverged context: rebuilt
    assert d._sessions["s"].sam.tokens == [9, 9, 1]
    d.end("r3")


def test_cross_session_memory_drafts_a_continuation_seen_only_in_another_session():
    rng = random.Random(3)
    story = [rng.randrange(100, 200) for _ in range(30)]
    with SessionMemory(top_k=2) as memory:
        d = SAMDrafter(memory, min_match=2, factor=8.0)
        for i in range(3):  # unrelated sessions
            d.begin(f"x{i}", [rng.randrange(300, 400) for _ in range(30)], session_id=f"x{i}")
            d.end(f"x{i}")
        d.begin("a", story, session_id="A")
        d.end("a")
        memory.flush()
        d.begin("b", [7, 8] + story[:10], session_id="B")
        d.wait_for_memory("b")
        assert d.propose("b", 8) == story[10:18]
        session_only = SAMDrafter(min_match=2)
        session_only.begin("b", [7, 8] + story[:10])
        assert session_only.propose("b", 8) == []
        d.end("b")


@pytest.mark.parametrize("make", [PromptLookupDrafter, SuffixTreeDrafter, SAMDrafter])
def test_drafter_protocol_and_bad_input(make):
    d = make()
    assert isinstance(d, Drafter)
    with pytest.raises(UnknownRequestError):
        d.propose("nope", 4)
    with pytest.raises(ValueError):
        d.begin("r", [1, -2])
    with pytest.raises(ValueError):
        d.begin("r", "abc")
    d.begin("r", [1, 2, 3, 1, 2])
    with pytest.raises(ValueError):
        d.begin("r", [1])
    with pytest.raises(ValueError):
        d.propose("r", -1)
    with pytest.raises(ValueError):
        d.extend("r", [1.5])
    assert d.propose("r", 0) == []
    assert len(d.propose("r", 2)) <= 2
    d.end("r")
    with pytest.raises(UnknownRequestError):
        d.end("r")


def test_suffix_tree_uses_global_tree_of_past_responses():
    d = SuffixTreeDrafter(min_prob=0.1, factor=4.0)
    resp = [50, 51, 52, 53, 54, 55]
    for i in range(3):
        d.begin(f"r{i}", [1, 2, 3])
        d.extend(f"r{i}", resp)
        d.end(f"r{i}")
    d.begin("new", [9, 9, 50, 51])
    assert d.propose("new", 4) == [52, 53, 54, 55]
    d.end("new")
