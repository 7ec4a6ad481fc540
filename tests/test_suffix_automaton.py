"""Suffix automaton (numba kernels over arrays) vs brute force on random small-alphabet sequences."""

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentinfer_jax.speculation.suffix_automaton import N_EDGES, FrozenAutomatonError, Matcher, SuffixAutomaton

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
        assert sam.walk(prefix[i + 1 - sam.match_length:]) == sam.match_state or sam.match_length == 0


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
def test_counts_exact_after_freeze_and_with_unbounded_depth(seq):
    online = SuffixAutomaton(seq, count_depth=None)
    approx = SuffixAutomaton(seq, count_depth=1)
    frozen = SuffixAutomaton(seq, count_depth=1).freeze()
    built = SuffixAutomaton.frozen_of(seq)
    for sub in substrings(seq) - {()}:
        ends = end_positions(seq, list(sub))
        for sam in (online, frozen, built):
            assert sam.count[sam.walk(list(sub))] == len(ends)
        assert 1 <= approx.count[approx.walk(list(sub))] <= len(ends)


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
    frozen = SuffixAutomaton.frozen_of(seq)
    for sub in substrings(seq) - {()}:
        cont = brute_continuations(seq, list(sub))
        real = {t: n for t, n in cont.items() if t >= 0}
        for sam in (online, frozen):
            top = sam.top_next(sam.walk(list(sub)))
            if not real:
                assert top is None
                continue
            tok, child, n, total = top
            assert n == real[tok] == max(real.values())
            assert total == sum(cont.values())
            assert child == sam.walk(list(sub) + [tok])


def test_equally_frequent_continuations_go_to_the_most_recent():
    """A context continued by a different token each time (each seen once): its top continuation is
    the latest one, online (approximate and exact counts) and frozen; a continuation seen twice
    still beats a newer one seen once."""
    rng = random.Random(21)
    for _ in range(20):
        w = [rng.randrange(100, 110) for _ in range(rng.randrange(1, 4))]
        conts = rng.sample(range(10, 60), rng.randrange(2, 8))
        seq = []
        for c in conts:
            seq += w + [c, rng.randrange(60, 100)]
        seq += w
        for sam in (SuffixAutomaton(seq), SuffixAutomaton(seq, count_depth=None), SuffixAutomaton.frozen_of(seq)):
            assert sam.top_next(sam.walk(w))[0] == conts[-1]
        twice = seq + [conts[0], 99] + w + [77, 98] + w
        for sam in (SuffixAutomaton(twice, count_depth=None), SuffixAutomaton.frozen_of(twice)):
            assert sam.top_next(sam.walk(w))[0] == conts[0]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(-1, 2), min_size=1, max_size=40), st.integers(1, 3))
def test_online_top_invariants_with_bounded_depth(seq, depth):
    """With approximate counts the kept top is still a real transition whose counts never exceed
    what the automaton holds (the docstring's invariants), after every token."""
    sam = SuffixAutomaton(count_depth=depth)
    for t in seq:
        sam.extend(t)
        for s in range(sam.num_states):
            kept = sam.top_next(s)
            edges = sam.transitions(s)
            real = {tok: c for tok, c in edges.items() if tok >= 0}
            assert (kept is None) == (not real)
            if kept is not None:
                tok, child, n, total = kept
                assert real[tok] == child
                assert total <= sum(int(sam.count[c]) for c in edges.values())


def test_frozen_rejects_extend_and_bad_input():
    sam = SuffixAutomaton([1, 2]).freeze()
    with pytest.raises(FrozenAutomatonError):
        sam.extend(3)
    with pytest.raises(ValueError, match="count_depth"):
        SuffixAutomaton(count_depth=0)
    sam = SuffixAutomaton([1, 2, 1, 2])
    before = (sam.num_states, sam.tokens.tolist(), sam.count.tolist())
    for bad in ([3, "4"], [3, 1 << 40], [[1, 2]]):
        with pytest.raises(ValueError):
            sam.extend_many(bad)
    assert (sam.num_states, sam.tokens.tolist(), sam.count.tolist()) == before


def test_growth_keeps_every_substring_and_counts_on_long_texts():
    """Texts far beyond the initial capacity (state rows, token buffer and the edge table all grow
    several times): a sample of substrings and non-substrings against brute force, counts exact
    after freeze, and frozen_of (one-call build) agrees with online-then-freeze."""
    rng = random.Random(5)
    for vocab, n in ((2, 3000), (50, 4000), (10 ** 9, 1500)):
        seq = [rng.randrange(vocab) for _ in range(n)]
        sam = SuffixAutomaton(count_depth=None)
        for i in range(0, n, 97):
            sam.extend_many(seq[i:i + 97])
        text = " ".join(map(str, seq))
        for _ in range(200):
            i = rng.randrange(n)
            sub = seq[i:i + rng.randrange(1, 12)]
            assert sam.contains(sub)
            probe = [rng.randrange(vocab) for _ in range(rng.randrange(1, 6))]
            inside = (" " + " ".join(map(str, probe)) + " ") in (" " + text + " ")
            assert sam.contains(probe) == inside
        built = SuffixAutomaton.frozen_of(seq)
        frozen = sam.freeze()
        assert built.num_states == frozen.num_states
        assert np.array_equal(built.count, frozen.count) and np.array_equal(built.length, frozen.length)


def _held_arrays_nbytes(obj):
    """Bytes of every numpy array the object holds, found by inspection, not by listing fields."""
    return sum(v.nbytes for v in vars(obj).values() if isinstance(v, np.ndarray))


def test_nbytes_counts_every_array_held_and_shrinks_on_freeze():
    rng = random.Random(6)
    seq = [rng.randrange(50) for _ in range(3000)]
    sam = SuffixAutomaton(count_depth=2)
    for i in range(0, len(seq), 250):  # grown several times
        sam.extend_many(seq[i:i + 250])
        assert sam.nbytes == _held_arrays_nbytes(sam) > 0
    growing = sam.nbytes
    sam.freeze()
    assert sam.nbytes == _held_arrays_nbytes(sam) < growing  # trimmed to the read-only fields
    built = SuffixAutomaton.frozen_of(seq)
    assert built.nbytes == _held_arrays_nbytes(built)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=3, max_size=40))
def test_transition_count_within_the_documented_bound(seq):
    """At most 3n - 4 transitions for n >= 3 tokens (Blumer et al.), counted from the table."""
    sam = SuffixAutomaton(seq)
    edges = sum(len(sam.transitions(s)) for s in range(sam.num_states))
    assert edges == sam.meta[N_EDGES] <= 3 * len(seq) - 4
