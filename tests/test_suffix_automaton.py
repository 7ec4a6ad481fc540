"""Suffix automaton vs brute force on random small-alphabet sequences."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentinfer_jax.speculation.suffix_automaton import FrozenAutomatonError, Matcher, SuffixAutomaton

SEQ = st.lists(st.integers(0, 2), min_size=0, max_size=28)


def substrings(seq):
    return {tuple(seq[i:j]) for i in range(len(seq) + 1) for j in range(i, len(seq) + 1)}


def brute_longest_earlier_suffix(seq):
    """Longest suffix of seq that also ends at an earlier position."""
    n = len(seq)
    best = 0
    for length in range(1, n):
        suf = seq[n - length:]
        if any(seq[e - length + 1:e + 1] == suf for e in range(length - 1, n - 1)):
            best = length
    return best


def end_positions(seq, pattern):
    m = len(pattern)
    return [e for e in range(m - 1, len(seq)) if seq[e - m + 1:e + 1] == pattern]


@settings(max_examples=35, deadline=None)
@given(SEQ, st.lists(st.integers(0, 3), max_size=6))
def test_recognises_exactly_the_substrings(seq, probe):
    sam = SuffixAutomaton(seq)
    subs = substrings(seq)
    assert sam.contains(probe) == (tuple(probe) in subs)
    for sub in subs:
        assert sam.contains(list(sub))
    assert sam.num_states <= max(2 * len(seq) - 1, 1) + 1


@settings(max_examples=35, deadline=None)
@given(SEQ)
def test_online_self_match_is_the_brute_force_longest_match(seq):
    sam = SuffixAutomaton()
    for i, t in enumerate(seq):
        sam.extend(t)
        prefix = seq[:i + 1]
        assert sam.match_length == brute_longest_earlier_suffix(prefix)
        if sam.match_length:
            # match_end is a true earlier end position of the matched suffix.
            ends = end_positions(prefix, prefix[i + 1 - sam.match_length:])
            assert sam.match_end in ends and sam.match_end < i


@settings(max_examples=35, deadline=None)
@given(SEQ, st.lists(st.integers(0, 2), max_size=30))
def test_matcher_keeps_longest_suffix_that_is_a_substring(seq, stream):
    sam = SuffixAutomaton(seq).freeze()
    subs = substrings(seq)
    m = Matcher(sam)
    for i, t in enumerate(stream):
        m.feed(t)
        fed = stream[:i + 1]
        expect = max(n for n in range(len(fed) + 1) if tuple(fed[len(fed) - n:]) in subs)
        assert m.length == expect
        assert sam.walk(fed[len(fed) - m.length:]) == m.state


@settings(max_examples=25, deadline=None)
@given(SEQ)
def test_counts_and_last_end_exact_after_freeze_and_with_unbounded_depth(seq):
    online = SuffixAutomaton(seq, count_depth=None)
    approx = SuffixAutomaton(seq, count_depth=1)
    frozen = SuffixAutomaton(seq, count_depth=1).freeze()
    for sub in substrings(seq) - {()}:
        ends = end_positions(seq, list(sub))
        for sam in (online, frozen):
            s = sam.walk(list(sub))
            assert sam.count[s] == len(ends)
            assert sam.last_end[s] == max(ends)
        s = approx.walk(list(sub))
        assert approx.count[s] <= len(ends) and approx.last_end[s] in ends
        assert approx.first_end[s] == min(ends)


def brute_continuations(seq, pattern):
    """Token -> occurrences of pattern + token in seq (negative tokens included)."""
    m = len(pattern)
    out = {}
    for i in range(len(seq) - m):
        if seq[i:i + m] == pattern:
            out[seq[i + m]] = out.get(seq[i + m], 0) + 1
    return out


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(-2, 3), min_size=1, max_size=30))
def test_top_next_is_the_most_frequent_continuation_online_and_frozen(seq):
    """top_next(state of w) = an argmax over tokens >= 0 of count(w + token), with the total over
    all continuations (sentinels < 0 included); exact with unbounded count depth and once frozen."""
    online = SuffixAutomaton(seq, count_depth=None)
    frozen = SuffixAutomaton(seq, count_depth=1).freeze()
    for sub in substrings(seq) - {()}:
        cont = brute_continuations(seq, list(sub))
        real = {t: n for t, n in cont.items() if t >= 0}
        for sam in (online, frozen):
            top = sam.top_next(sam.walk(list(sub)))
            assert sam.top_table[sam.walk(list(sub))] == top
            if not real:
                assert top is None
                continue
            tok, child, n, total = top
            assert n == real[tok] == max(real.values())
            assert total == sum(cont.values())
            assert child == sam.walk(list(sub) + [tok])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(-2, 3), min_size=1, max_size=30))
def test_online_top_matches_a_rescan_after_every_extend(seq):
    """The top kept by extend() equals a fresh scan of each state's edges (the count of the most
    frequent continuation and the total), at every prefix, uncapped and exact."""
    sam = SuffixAutomaton(count_depth=None)
    for t in seq:
        sam.extend(t)
        for s in range(sam.num_states):
            kept, scan = sam.top_next(s), sam._scan_top(s)
            assert (kept is None) == (scan is None)
            if kept is not None:
                tok, child, n, total = kept
                assert sam.next[s][tok] == child and tok >= 0
                assert (n, total) == (scan[2], scan[3]) == (sam.count[child], scan[3])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(-1, 2), min_size=1, max_size=40), st.integers(1, 3))
def test_online_top_invariants_with_bounded_depth(seq, depth):
    """With approximate counts the kept top is still a real transition whose counts never exceed
    what the automaton holds (the docstring's invariants)."""
    sam = SuffixAutomaton(count_depth=depth)
    for t in seq:
        sam.extend(t)
    for s in range(sam.num_states):
        kept = sam.top_next(s)
        real = {tok: c for tok, c in sam.next[s].items() if tok >= 0}
        assert (kept is None) == (not real)
        if kept is not None:
            tok, child, n, total = kept
            assert real[tok] == child and tok >= 0
            assert n <= sam.count[child] and total <= sum(sam.count[c] for c in sam.next[s].values())


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(-1, 3), min_size=1, max_size=30))
def test_untracked_automaton_scans_and_freezes_to_the_same_tops(seq):
    """track_top=False (the memory's build-then-freeze automata) answers by scanning edges; once
    frozen it answers like a tracked automaton frozen from the same text."""
    plain = SuffixAutomaton(seq, count_depth=1, track_top=False)
    for s in range(plain.num_states):
        assert plain.top_next(s) == plain._scan_top(s)
    tracked = SuffixAutomaton(seq, count_depth=1).freeze()
    plain.freeze()
    assert plain.top_table == tracked.top_table


def test_frozen_rejects_extend_and_bad_depth():
    sam = SuffixAutomaton([1, 2]).freeze()
    with pytest.raises(FrozenAutomatonError):
        sam.extend(3)
    with pytest.raises(ValueError, match="count_depth"):
        SuffixAutomaton(count_depth=0)


ONLINE_FIELDS = ("tokens", "link", "length", "first_end", "last_end", "count", "top_table", "_out_total",
                 "last", "match_end")


@pytest.mark.parametrize("count_depth,track_top", [(1, True), (2, True), (8, True), (None, True), (8, False)])
def test_compiled_online_extend_equals_the_python_extend_field_for_field(count_depth, track_top):
    """extend_many in C changes an online automaton exactly as the Python extend does: every state
    array, the transition dicts in insertion order, the approximate counts and the online top
    table, after every chunk, on repetitive and huge-id texts with session sentinels."""
    rng = random.Random(31 + (count_depth or 0) + track_top)
    for trial in range(60):
        vocab = rng.choice([2, 3, 7, 60, 10 ** 12])
        python = SuffixAutomaton(count_depth=count_depth, track_top=track_top, native=False)
        native = SuffixAutomaton(count_depth=count_depth, track_top=track_top, native=True)
        for _ in range(rng.randrange(1, 8)):
            chunk = [rng.randrange(vocab) if rng.random() > 0.04 else -1 - rng.randrange(3)
                     for _ in range(rng.randrange(0, 70))]
            python.extend_many(chunk, native=False)
            native.extend_many(chunk, native=True)
            for name in ONLINE_FIELDS:
                assert getattr(python, name) == getattr(native, name), (trial, name)
            assert [list(d.items()) for d in python.next] == [list(d.items()) for d in native.next]
    # The default (native=None) constructor path builds the same automaton as the Python one.
    seq = [rng.randrange(5) for _ in range(300)]
    a = SuffixAutomaton(seq, count_depth=count_depth, track_top=track_top, native=False)
    b = SuffixAutomaton(seq, count_depth=count_depth, track_top=track_top)
    assert all(getattr(a, name) == getattr(b, name) for name in ONLINE_FIELDS)


def test_compiled_online_extend_rejects_bad_input_unchanged():
    sam = SuffixAutomaton([1, 2, 1, 2], native=True)
    before = {name: list(getattr(sam, name)) for name in ONLINE_FIELDS[:-2]}
    before["next"] = [dict(d) for d in sam.next]
    with pytest.raises(TypeError):
        sam.extend_many([3, "4"], native=True)
    with pytest.raises(OverflowError):
        sam.extend_many([3, 1 << 70], native=True)
    assert {name: getattr(sam, name) for name in before} == before
    assert (sam.last, sam.match_end) == (len(sam.length) - 1, 1)
    sam.freeze()
    with pytest.raises(FrozenAutomatonError):
        sam.extend_many([1], native=True)


def test_compiled_frozen_build_equals_the_python_build_field_for_field():
    """SuffixAutomaton.frozen_of in C builds exactly what the Python construction + freeze() builds:
    every state array, the transition dicts in the same insertion order (top ties depend on it),
    the top table and the self-match, on random texts with session sentinels and huge ids."""
    rng = random.Random(23)
    fields = ("tokens", "next", "link", "length", "first_end", "last_end", "count", "top_table", "last",
              "match_end", "frozen", "count_depth", "track_top")
    for trial in range(150):
        vocab = rng.choice([2, 3, 7, 60, 10 ** 12])
        seq = [rng.randrange(vocab) for _ in range(rng.randrange(0, 250))]
        for i in range(rng.randrange(4)):
            seq.insert(rng.randrange(len(seq) + 1), -1 - i)
        python = SuffixAutomaton.frozen_of(seq, native=False)
        native = SuffixAutomaton.frozen_of(seq, native=True)
        for name in fields:
            assert getattr(python, name) == getattr(native, name), (trial, name)
        assert [list(d) for d in python.next] == [list(d) for d in native.next]
        with pytest.raises(FrozenAutomatonError):
            native.extend(1)
    with pytest.raises(TypeError):
        SuffixAutomaton.frozen_of([1, "2"], native=True)
