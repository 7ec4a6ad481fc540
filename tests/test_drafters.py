"""Drafters (prompt lookup, suffix tree, AgentSAM) against brute-force references."""

import math
import random
import threading

import pytest

from test_suffix_automaton import brute_continuations

from agentinfer_jax.speculation import (Drafter, PromptLookupDrafter, SAMDrafter, SessionMemory,
                                        UnknownRequestError)
from agentinfer_jax.speculation.calibrator import CELLS_PER_CLASS, CONTEXT, FIRST, PAIR
from agentinfer_jax.speculation.sam_drafter import GLOBAL, MEMORY, OWN, AcceptanceCalibrator


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
def test_sam_session_draft_follows_the_most_frequent_continuation_of_an_earlier_match(factor):
    """Own context only, exact counts: the draft continues some suffix w of the context (|w| >=
    min_match, w occurred earlier) with, token by token, a most frequent continuation of w + draft
    so far; it is empty iff nothing of length >= min_match matched; its length obeys the caps."""
    rng = random.Random(2)
    d = SAMDrafter(min_match=2, factor=factor, count_depth=None)
    for trial in range(60):
        ctx = [rng.randrange(3) for _ in range(rng.randrange(2, 40))]
        d.begin(f"r{trial}", ctx)
        k = rng.randrange(1, 9)
        draft = d.propose(f"r{trial}", k)
        L = brute_longest_earlier_suffix(ctx)
        if L < 2:
            assert draft == []
        else:
            assert 1 <= len(draft) <= min(k, math.ceil(factor * L))

            def explains(w_len):
                w = ctx[len(ctx) - w_len:]
                for j, t in enumerate(draft):
                    cont = brute_continuations(ctx, w + draft[:j])
                    if not cont or cont.get(t, 0) != max(cont.values()):
                        return False
                return True

            assert any(explains(n) for n in range(2, L + 1)), (ctx, draft)
        d.end(f"r{trial}")


def _top_path(sam, st, limit):
    toks = []
    while len(toks) < limit and sam.top_next(st) is not None:
        tok, st, _, _ = sam.top_next(st)
        toks.append(tok)
    return toks


def exhaustive_choice(d, rid):
    """SAMDrafter's selection rule evaluated without pruning, from its public pieces: the draft of
    the candidate with the most expected accepted tokens, cut where the path probability < min_prob;
    a drafted token is in class source + 3 while another cursor's top path agrees with the
    candidate's path up to and including it, + 6 more while both other cursors' paths do."""
    state = d._requests[rid]
    cursors = []
    if state.sam.match_length >= d.min_match:
        cursors.append((OWN, state.sam, state.sam.match_state, state.sam.match_length))
    for src, m in ((MEMORY, state.memory_matcher), (GLOBAL, state.global_matcher)):
        if m is not None and m.length >= d.min_match:
            cursors.append((src, m.sam, m.state, m.length))
    if not cursors:
        return [], 0.0
    cal, tokens = d.calibrator, state.sam.tokens
    limit = min(8, math.ceil(d.factor * max(c[3] for c in cursors)))
    best, best_score = [], 0.0
    paths = {src: _top_path(sam, st, limit) for src, sam, st, _ in cursors}
    for src, sam, st, length in cursors:
        mine = paths[src]
        common = sorted((next((j for j, (a, b) in enumerate(zip(mine, other)) if a != b), min(len(mine), len(other)))
                         for o, other in paths.items() if o != src), reverse=True)
        agreed = common[0] if common else 0
        agreed_by_two = common[1] if len(common) > 1 else 0
        toks, probs = [], []
        prev2, prev = (int(tokens[-2]) if len(tokens) > 1 else -1), int(tokens[-1])
        while len(toks) < limit and sam.top_next(st) is not None:
            tok, st, n, total = sam.top_next(st)
            cls = (src + 3 if len(toks) < agreed else src) + (6 if len(toks) < agreed_by_two else 0)
            q = cal.prob(cal.cell(cls, length + len(toks), n, total), n, total)
            q = cal.token_prob(cls, len(toks), prev2, prev, tok, q)
            probs.append(q * probs[-1] if probs else q)
            toks.append(tok)
            prev2, prev = prev, tok
        keep = next((i for i, p in enumerate(probs) if p < d.min_prob), len(probs))
        score = sum(probs[:keep])
        if score > best_score + 1e-12:
            best, best_score = toks[:keep], score
    return best, best_score


@pytest.mark.parametrize("min_prob,token_context", [(0.0, False), (0.2, False), (0.0, True), (0.2, True)])
def test_sam_pruned_selection_equals_exhaustive_evaluation(min_prob, token_context):
    """The lazily pruned compiled search returns the exhaustive rule's draft, across
    sources (own, memory, global) and a calibrator that has learned from earlier verify steps."""
    rng = random.Random(5)
    with SessionMemory(top_k=2, global_min_rebuild=1) as memory:
        d = SAMDrafter(memory, min_prob=min_prob, calibrator=AcceptanceCalibrator(token_context=token_context))
        checked = 0
        for trial in range(40):
            ctx = [rng.randrange(6) for _ in range(rng.randrange(3, 30))]
            rid = f"r{trial}"
            d.begin(rid, ctx, session_id=f"s{trial}")
            d.wait_for_memory(rid)
            for _ in range(rng.randrange(1, 6)):
                d.wait_for_memory(rid)  # a refresh retrieval may finish between the two otherwise
                expect, score = exhaustive_choice(d, rid)
                assert d.propose(rid, 8) == expect
                assert d.expected_accepted(rid) == pytest.approx(score)
                checked += bool(expect)
                d.extend(rid, [rng.randrange(6) for _ in range(rng.randrange(1, 4))])
            d.end(rid)
        assert checked > 20


def _shrink_check(cal):
    # (1 + w * 0.5) / (2 + w) for the held pair key, with its context level absent (prev2 = 7).
    w = cal.prior_weight
    return cal.token_prob(0, 1, 7, 0, 0, 0.5) == pytest.approx((1 + w * 0.5) / (2 + w), rel=1e-12)


def _first_prob(cal, src, last, tok, q):
    """The FIRST level alone (context levels switched off on the same tables)."""
    saved, cal.token_context = cal.token_context, False
    try:
        return cal.token_prob(src, 0, -1, last, tok, q)
    finally:
        cal.token_context = saved


def test_calibrator_first_token_estimates_match_a_float64_reference_and_stay_bounded():
    """first_prob shrinks each (source, last, token)'s observed rate towards the cell's estimate
    with weight w, computed here independently from the raw observations; a full table learns no
    new keys but keeps updating the ones it holds."""
    rng = random.Random(11)
    cal = AcceptanceCalibrator(prior_weight=3.0, max_first_tokens=40)
    seen: dict[tuple[int, int, int], list[int]] = {}
    for _ in range(3000):
        key = (rng.randrange(3), rng.randrange(6), rng.randrange(10))
        ok = rng.random() < 0.3 + 0.1 * key[0]
        cal.update(FIRST, key[0], -1, key[1], key[2], ok)
        if key in seen or len(seen) < 40:
            seen.setdefault(key, [0, 0])
            seen[key][0] += ok
            seen[key][1] += 1
    assert cal.level_sizes()["first"] == len(seen) == 40
    for src in range(3):
        for last in range(6):
            for tok in range(10):
                q = rng.random()
                got = _first_prob(cal, src, last, tok, q)
                if (src, last, tok) in seen:
                    a, n = seen[(src, last, tok)]
                    assert got == pytest.approx((a + 3.0 * q) / (n + 3.0), rel=1e-12)
                else:
                    assert got == q


def test_calibrator_context_tables_match_a_float64_reference():
    """token_prob = the cell's estimate shrunk towards the (source, prev, token) rate (first table at
    position 0, pair table later) with weight w, then towards the (source, prev2, prev, token) rate
    with the context weight, at draft positions below context_positions (later: the cell alone);
    recomputed here from raw observations in float64."""
    rng = random.Random(12)
    w, wc = 3.0, 1.5
    cal = AcceptanceCalibrator(prior_weight=w, context_weight=wc, max_first_tokens=1 << 12,
                               token_context=True, context_positions=4)
    first, pair, ctx = {}, {}, {}
    for _ in range(4000):
        src, tok = rng.randrange(3), rng.randrange(6)
        prev2, prev = rng.randrange(-1, 4), rng.randrange(-1, 4)
        ok = rng.random() < 0.2 + 0.15 * src + 0.05 * (tok == prev)
        kind = rng.randrange(3)
        table, key = ((first, (src, prev, tok)), (pair, (src, prev, tok)), (ctx, (src, prev2, prev, tok)))[kind]
        if kind == 2:
            cal.update(CONTEXT, *key, ok)
        else:
            cal.update((FIRST, PAIR)[kind], key[0], -1, key[1], key[2], ok)
        stats = table.setdefault(key, [0, 0])
        stats[0] += ok
        stats[1] += 1

    def shrink(stats, prior, weight):
        return prior if stats is None else (stats[0] + weight * prior) / (stats[1] + weight)

    for src in range(3):
        for prev2 in range(-1, 4):
            for prev in range(-1, 4):
                for tok in range(6):
                    q = rng.random()
                    for pos in (0, 1, 3, 4, 6):
                        level = (first if pos == 0 else pair).get((src, prev, tok))
                        expect = shrink(ctx.get((src, prev2, prev, tok)), shrink(level, q, w), wc)
                        if pos >= 4:  # past context_positions: the cell's estimate alone
                            expect = q
                        got = cal.token_prob(src, pos, prev2, prev, tok, q)
                        assert got == pytest.approx(expect, rel=1e-12)
                        # Off: only the first-token level refines the cell; later positions get
                        # the cell's estimate alone.
                        off = shrink(first.get((src, prev, tok)), q, w) if pos == 0 else q
                        cal.token_context = False
                        try:
                            assert cal.token_prob(src, pos, prev2, prev, tok, q) == pytest.approx(off, rel=1e-12)
                        finally:
                            cal.token_context = True
    sizes = cal.level_sizes()
    assert sizes["context"] == len(ctx) and sizes["pair"] == len(pair) and sizes["first"] == len(first)
    small = AcceptanceCalibrator(max_first_tokens=5)
    for i in range(20):
        small.update(PAIR, 0, -1, i, i, True)
        small.update(CONTEXT, 1, i, i, i, True)
    small.update(PAIR, 0, -1, 0, 0, False)  # a held key keeps learning: 1 of 2 accepted
    assert small.level_sizes() == {"first": 0, "pair": 5, "context": 5}
    assert _shrink_check(small)


def test_sam_learns_which_source_to_trust():
    """Own context and memory propose different continuations of the same match; verification keeps
    confirming memory's, so the calibrator moves the drafter from the own text to memory's."""
    own_tail, mem_tail = [50, 51, 52, 53], [60, 61, 62, 63]
    with SessionMemory(top_k=1) as memory:
        d = SAMDrafter(memory)
        d.begin("m", [1, 2, 3] + mem_tail + [9], session_id="M")
        d.end("m")
        memory.flush()
        choices = []
        for i in range(40):
            rid = f"q{i}"
            # the own text continues [1, 2, 3] with own_tail; the target always emits mem_tail
            d.begin(rid, [1, 2, 3] + own_tail + [8, 1, 2, 3], session_id=f"Q{i}")
            d.wait_for_memory(rid)
            choices.append(d.propose(rid, 4))
            d.extend(rid, mem_tail)
            d.end(rid)
        assert choices[0] == own_tail  # a fresh calibrator trusts counts; own's match is longer
        assert choices[-1] == mem_tail


def test_global_memory_drafts_a_response_no_retrieved_session_shares():
    resp = [50, 51, 52, 53, 54, 55]
    with SessionMemory(top_k=1, global_min_rebuild=1) as memory:
        d = SAMDrafter(memory)
        for i in range(3):
            d.begin(f"r{i}", [300 + i, 301 + i], session_id=f"s{i}")
            d.extend(f"r{i}", resp)
            d.end(f"r{i}")
        memory.flush()
        d.begin("new", [9, 9, 50, 51], session_id="new")
        d.wait_for_memory("new")
        assert d.propose("new", 4) == [52, 53, 54, 55]
        d.end("new")
        no_global = SAMDrafter(memory, global_memory=False)
        no_global.begin("new", [9, 9, 50, 51], session_id="other")
        no_global.wait_for_memory("new")
        assert no_global.propose("new", 4) != [52, 53, 54, 55]


def test_sam_session_reuse_extends_incrementally():
    d = SAMDrafter()
    d.begin("r1", [1, 2, 3, 4], session_id="s")
    d.extend("r1", [5, 6])
    d.end("r1")
    state = d._idle["s"]
    d.begin("r2", [1, 2, 3, 4, 5, 6, 7, 1, 2], session_id="s")
    assert d._busy["s"] is state and state.sam.tokens.tolist() == [1, 2, 3, 4, 5, 6, 7, 1, 2]
    assert d.propose("r2", 3) == [3, 4, 5]
    d.end("r2")
    d.begin("r3", [9, 9, 1], session_id="s")  # diverged context: rebuilt
    assert d._busy["s"].sam.tokens.tolist() == [9, 9, 1]
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


def test_memory_retrieval_is_picked_up_by_propose_without_waiting():
    """The serving path never blocks on retrieval: propose drafts without memory while it runs and
    installs it at the first step after the worker finishes (a done-callback raises a flag)."""
    rng = random.Random(4)
    story = [rng.randrange(100, 200) for _ in range(30)]
    with SessionMemory(top_k=1) as memory:
        d = SAMDrafter(memory, min_match=2)
        d.begin("a", story, session_id="A")
        d.end("a")
        memory.flush()
        gate = threading.Event()
        memory._submit(gate.wait)  # holds the worker: the retrieval below stays pending
        d.begin("b", [7, 8] + story[:10], session_id="B")
        assert d.propose("b", 8) == [] and d._requests["b"].memory_matcher is None
        gate.set()
        memory.flush()
        assert d.propose("b", 8) == story[10:18]
        d.end("b")


@pytest.mark.parametrize("make", [PromptLookupDrafter, SAMDrafter])
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


@pytest.mark.parametrize("kwargs", [dict(prior_weight=0.0), dict(context_weight=-1.0),
                                    dict(max_first_tokens=-1), dict(context_positions=0)])
def test_calibrator_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        AcceptanceCalibrator(**kwargs)


def test_calibrator_cells_are_the_documented_bins():
    """A cell = ((class * 8 + log2 bin of the match length) * 8 + log2 bin of the total) * 5 + share
    bin, bins capped at 7; computed here from bit lengths of fresh random inputs."""
    rng = random.Random(13)
    for _ in range(3000):
        src, length = rng.randrange(6), rng.choice([rng.randrange(1, 140), rng.randrange(1, 1 << 20)])
        total = rng.choice([rng.randrange(1, 140), rng.randrange(1, 1 << 20)])
        n = rng.randrange(1, total + 1)
        share = 4 if n == total else (4 * n) // total
        expect = ((src * 8 + min(length.bit_length(), 7)) * 8 + min(total.bit_length(), 7)) * 5 + share
        assert AcceptanceCalibrator.cell(src, length, n, total) == expect


def test_sources_that_agree_on_a_first_token_form_their_own_evidence_class():
    """A candidate whose first token another source's top continuation shares is scored (and
    calibrated) in class source + 3; one that no other source backs keeps its plain class."""
    classes = {}
    for own_next in (4, 9):  # memory continues 1 2 3 with 4; the session itself with own_next
        with SessionMemory(top_k=2, global_min_rebuild=1) as memory:
            d = SAMDrafter(memory, min_prob=0.0)
            d.begin("old", [1, 2, 3, 4, 5, 6, 7], session_id="old")
            d.end("old")
            d.begin("new", [1, 2, 3, own_next, 8, 1, 2, 3], session_id="new")
            d.wait_for_memory("new")
            assert d.propose("new", 3)
            st = d._requests["new"]
            classes[own_next] = {int(st.cand_src[h]): int(st.cand_toks[h, 0]) for h in range(st.n_cand)}
            d.end("new")
    assert classes[4].get(OWN + 3) == 4 and classes[4].get(MEMORY + 3) == 4
    assert OWN not in classes[4] and MEMORY not in classes[4]
    assert classes[9].get(OWN) == 9 and classes[9].get(MEMORY) == 4
    assert all(src < 3 for src in classes[9])


def test_a_token_all_three_sources_back_forms_its_own_evidence_class():
    """Where the session, a retrieved session and the global store of past responses all continue
    with the same token, each candidate's token there is in class source + 3 + 6 (both other
    cursors agree); the session's tokens past the others' paths are in its plain class."""
    with SessionMemory(top_k=2, global_min_rebuild=1) as memory:
        d = SAMDrafter(memory, min_prob=0.0)
        d.begin("old", [1, 2, 3], session_id="old")
        d.extend("old", [4, 5, 6])  # memory holds 1..6, the global store the response 4 5 6
        d.end("old")
        memory.flush()
        d.begin("new", [5, 4, 5, 6, 7, 4, 5], session_id="new")  # all three: 4 5 -> 6
        d.wait_for_memory("new")
        assert d.propose("new", 4) == [6, 7, 4, 5]
        st = d._requests["new"]
        classes = {int(st.cand_src[h]) % 3: [int(c) // CELLS_PER_CLASS for c in st.cand_cells[h, :st.cand_len[h]]]
                   for h in range(st.n_cand)}
        d.end("new")
    assert classes == {OWN: [OWN + 9, OWN, OWN, OWN], MEMORY: [MEMORY + 9], GLOBAL: [GLOBAL + 9]}


def test_idle_session_automata_stay_within_the_live_cap():
    """Finished sessions keep their automaton for reuse, least recently used dropped first once
    their bytes pass live_cap_mb; an active session is never dropped."""
    rng = random.Random(4)
    d = SAMDrafter(live_cap_mb=0.5)
    d.begin("busy", [1, 2, 3], session_id="B")
    for i in range(60):
        d.begin(f"r{i}", [rng.randrange(1000) for _ in range(800)], session_id=f"s{i}")
        d.end(f"r{i}")
        assert sum(s.sam.nbytes for s in d._idle.values()) <= 0.5 * 2**20
    assert "B" in d._busy and "s59" in d._idle and "s0" not in d._idle
    d.extend("busy", [1, 2])
    assert d.propose("busy", 2) == [3, 1]


def test_idle_sessions_beyond_the_count_cap_go_least_recently_used_first():
    """With more sessions than max_live_sessions, idle ones are dropped oldest first and busy ones
    never, however many are busy; a kept idle session's next call extends its automaton (drafts
    from its history at once), a dropped one starts afresh."""
    d = SAMDrafter(max_live_sessions=3)
    history = [7, 8, 9, 7, 8]
    for i in range(6):  # six busy sessions: over the cap, and none may go
        d.begin(f"b{i}", history, session_id=f"s{i}")
    assert len(d._busy) == 6 and not d._idle
    for i in range(6):  # they finish in order s0..s5; only the three most recent can stay
        d.end(f"b{i}")
    assert list(d._idle) == ["s3", "s4", "s5"]
    d.begin("again", history + [9, 7], session_id="s5")  # extends its kept automaton
    assert list(d._idle) == ["s3", "s4"] and "s5" in d._busy
    assert d.propose("again", 2) == [8, 9]
    d.begin("new", [1, 2, 3], session_id="n")  # 2 busy + 2 idle > 3: the oldest idle goes
    assert list(d._idle) == ["s4"] and set(d._busy) == {"s5", "n"}
    d.begin("gone", history, session_id="s0")  # dropped earlier: rebuilt from its prompt
    assert d._requests["gone"].sam.tokens.tolist() == history
