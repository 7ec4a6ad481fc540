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


def test_frequent_continuation_follows_majority_and_stops_at_low_probability():
    rng = random.Random(0)
    seq = []
    for _ in range(30):  # after [7, 8]: 9 three times out of four, else 5
        seq += [7, 8, 9 if rng.random() < 0.75 else 5, rng.randrange(20, 40)]
    sam = SuffixAutomaton(seq).freeze()
    state = sam.walk([7, 8])
    toks, probs = sam.frequent_continuation(state, 3, min_prob=0.0)
    nines = sum(1 for i in range(len(seq) - 2) if seq[i:i + 3] == [7, 8, 9])
    fives = sum(1 for i in range(len(seq) - 2) if seq[i:i + 3] == [7, 8, 5])
    assert toks[0] == (9 if nines >= fives else 5)
    assert probs[0] == pytest.approx(max(nines, fives) / (nines + fives))
    # the token after [7, 8, 9] is random among 20 values: a 0.5 floor stops there
    toks, _ = sam.frequent_continuation(state, 3, min_prob=0.5)
    assert len(toks) == 1


def test_frozen_rejects_extend_and_bad_depth():
    sam = SuffixAutomaton([1, 2]).freeze()
    with pytest.raises(FrozenAutomatonError):
        sam.extend(3)
    with pytest.raises(ValueError, match="count_depth"):
        SuffixAutomaton(count_depth=0)
