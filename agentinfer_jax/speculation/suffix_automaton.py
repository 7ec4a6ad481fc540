"""Online suffix automaton (SAM) over token ids, with what drafting needs.

State arrays (index = state id, 0 = root, the empty string):
- `next[s]`: dict token -> state (transitions), `link[s]`: suffix link, `length[s]`: length of the
  longest string in s. Built online (Blumer et al.): `extend(token)` is O(1) amortised, and the
  automaton has at most 2n - 1 states and 3n - 4 transitions for n tokens (memory linear in n).
- `first_end[s]`: end position of the first occurrence of s's strings (exact, set at creation).
- `last_end[s]`: an end position of s's strings, the most recent one known (see below).
- `count[s]`: occurrence count |endpos(s)| (see below).
- `top_table[s]`: `top_next(s)` as a plain list, for hot loops (valid when frozen or track_top).

Every string in a state has the same end positions, so `last_end`/`count` are per state. Keeping
them exact online would mean touching the whole suffix-link path of every new token (O(n) per token
on repetitive text). Instead each new token credits its new occurrence to the first `count_depth`
states of the path from the matched state (O(1) per token). Invariants either way:
`last_end[s]` is a true end position of s, and `count[s] <= |endpos(s)|`; both are exact when the
link path is shorter than `count_depth` (true for almost all states of natural text) or after
`freeze()`, which recomputes them exactly in O(n) and makes the automaton read-only (safe to share
between threads).

Top continuation of every state, kept online: `top_next(s)` = (token, child, count[child], total
count over s's transitions) of the most frequent next token. A count only changes for the states
credited above, and every transition into a credited state starts on the previous text end's
suffix-link path, which `extend` walks anyway; so `extend` refreshes those parents (at most
`4 * count_depth + 16` of them per token: O(1)) and a query is one list lookup, as in a frozen
automaton. Invariants: `top_table[s]` is a real transition `(t, next[s][t])` with t >= 0 (None iff s has
none), its n <= count[child] and its total <= the sum over s's transitions; with
`count_depth=None` (uncapped) both are exact and n is the maximum. Ties keep the continuation that
reached the maximum first. `freeze()` rescans every state.

Matching as the text grows: after each `extend` the state `link[last]` holds the longest suffix of
the text that also occurs ending earlier (a standard SAM fact), so the self-match is O(1) per token.
`Matcher` walks a *different* token stream against a (frozen) automaton: it keeps the longest
suffix of that stream that is a substring of the automaton's text, O(1) amortised per token.

`extend_many` and `frozen_of` run in `_sam_native` (C) where it is built; the Python code is the
reference, and tests compare every field of the two.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

ROOT = 0

try:  # compiled construction of frozen automata (setup.py builds it where a C compiler exists)
    from agentinfer_jax.speculation import _sam_native
except ImportError:  # pragma: no cover - depends on the install
    _sam_native = None


class FrozenAutomatonError(RuntimeError):
    """An `extend` on an automaton after `freeze()`."""


class SuffixAutomaton:
    """Suffix automaton of `tokens`, extended one token at a time (see module docstring)."""

    def __init__(self, tokens: Iterable[int] = (), *, count_depth: int | None = 8,
                 track_top: bool = True, native: bool | None = None) -> None:
        """`track_top=False` skips the online top continuations (automata built only to be frozen,
        which rescans them); `top_next` then scans edges until `freeze()`. `native`: as in
        `extend_many`, for the initial tokens."""
        if count_depth is not None and count_depth < 1:
            raise ValueError(f"count_depth must be >= 1 or None (exact), got {count_depth}")
        self.count_depth = count_depth
        self.track_top = track_top
        # Parents refreshed per token (see module docstring); None: all of them (exact).
        self._refresh_cap = None if count_depth is None else 4 * count_depth + 16
        self.tokens: list[int] = []
        self.next: list[dict[int, int]] = [{}]
        self.link: list[int] = [-1]
        self.length: list[int] = [0]
        self.first_end: list[int] = [-1]
        self.last_end: list[int] = [-1]
        self.count: list[int] = [0]
        self.last = ROOT
        # An end position (< len - 1) of the current self-match; -1 when there is no match.
        self.match_end = -1
        self.frozen = False
        # Per-state top continuation (online if track_top, rebuilt by freeze()) and the summed
        # count over each state's transitions (online only).
        self.top_table: list[tuple[int, int, int, int] | None] = [None]
        self._out_total: list[int] = [0]
        self.extend_many(tokens, native=native)

    @classmethod
    def frozen_of(cls, tokens: Sequence[int], *, native: bool | None = None) -> SuffixAutomaton:
        """`SuffixAutomaton(tokens, count_depth=1, track_top=False).freeze()`, the same fields,
        built in C when `_sam_native` is (None: when built). Memory retrieval builds one per request
        off the critical path, but the sooner it is ready the sooner the request drafts from it."""
        if native is None:
            native = _sam_native is not None
        if not native:
            return cls(tokens, count_depth=1, track_top=False, native=False).freeze()
        if _sam_native is None:
            raise RuntimeError("native=True but agentinfer_jax.speculation._sam_native is not built")
        sam = cls(count_depth=1, track_top=False)
        (sam.tokens, sam.next, sam.link, sam.length, sam.first_end, sam.last_end, sam.count,
         sam.top_table, sam.last, sam.match_end) = _sam_native.build_frozen(list(tokens))
        sam._out_total = []
        sam.frozen = True
        return sam

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_states(self) -> int:
        return len(self.length)

    # ---- construction -------------------------------------------------------------------------

    def _new_state(self, length: int, link: int, first_end: int, last_end: int, count: int,
                   nxt: dict[int, int]) -> int:
        self.next.append(nxt)
        self.link.append(link)
        self.length.append(length)
        self.first_end.append(first_end)
        self.last_end.append(last_end)
        self.count.append(count)
        return len(self.length) - 1

    def _set_top_of_new(self, like: int) -> None:
        """The newest state's top: none (a fresh `cur`, like < 0) or a clone's copy of `like`'s."""
        if like < 0:
            self.top_table.append(None)
            self._out_total.append(0)
        else:
            self.top_table.append(self.top_table[like])
            self._out_total.append(self._out_total[like])

    def extend(self, token: int) -> None:
        """Appends one token (O(1) amortised)."""
        if self.frozen:
            raise FrozenAutomatonError("cannot extend a frozen suffix automaton")
        pos = len(self.tokens)
        self.tokens.append(token)
        nxt, link, length = self.next, self.link, self.length
        track = self.track_top
        top, out_total = self.top_table, self._out_total
        cur = self._new_state(length[self.last] + 1, ROOT, pos, pos, 1, {})
        if track:
            self._set_top_of_new(-1)
        p = self.last
        while p != -1 and token not in nxt[p]:
            nxt[p][token] = cur
            if track:  # a new continuation seen once
                out_total[p] += 1
                t = top[p]
                if t is not None:
                    top[p] = (t[0], t[1], t[2], out_total[p])
                elif token >= 0:
                    top[p] = (token, cur, 1, out_total[p])
            p = link[p]
        first_parent = p
        if p != -1:
            q = nxt[p][token]
            if length[p] + 1 == length[q]:
                link[cur] = q
            else:
                clone = self._new_state(length[p] + 1, link[q], self.first_end[q], self.last_end[q],
                                        self.count[q], dict(nxt[q]))
                if track:
                    self._set_top_of_new(q)
                while p != -1 and nxt[p].get(token) == q:
                    nxt[p][token] = clone
                    if track:  # same count, new child state
                        t = top[p]
                        if t is not None and t[1] == q:
                            top[p] = (t[0], clone, t[2], t[3])
                    p = link[p]
                link[q] = clone
                link[cur] = clone
        self.last = cur
        match = link[cur]
        self.match_end = self.last_end[match] if match != ROOT else -1
        shortest = self._credit_occurrence(match, pos)
        if track and first_parent != -1 and shortest:
            self._refresh_parents(first_parent, token, shortest)

    def _refresh_parents(self, state: int, token: int, shortest: int) -> None:
        """After crediting: `state` and its suffix-link ancestors whose `token` transition leads to
        a credited state (length >= `shortest`) gained one occurrence there; refresh their tops."""
        nxt, link, length, count = self.next, self.link, self.length, self.count
        top, out_total = self.top_table, self._out_total
        budget = self._refresh_cap if self._refresh_cap is not None else len(length)
        while state != -1 and budget > 0:
            child = nxt[state][token]
            if length[child] < shortest:
                break
            out_total[state] += 1
            t = top[state]
            n = count[child]
            if token >= 0 and (t is None or t[1] == child or n > t[2]):
                top[state] = (token, child, n, out_total[state])
            elif t is not None:  # same top, larger total (sentinels count there too)
                top[state] = (t[0], t[1], t[2], out_total[state])
            state = link[state]
            budget -= 1

    def _credit_occurrence(self, state: int, pos: int) -> int:
        """Adds end position `pos` to `state` and its suffix-link ancestors (up to count_depth);
        returns the length of the shortest state credited (0 if none)."""
        depth = self.count_depth if self.count_depth is not None else len(self.length)
        count, last_end, link, length = self.count, self.last_end, self.link, self.length
        shortest = 0
        while state > ROOT and depth > 0:
            count[state] += 1
            last_end[state] = pos
            shortest = length[state]
            state = link[state]
            depth -= 1
        return shortest

    def extend_many(self, tokens: Iterable[int], *, native: bool | None = None) -> None:
        """`extend` for each token. `native`: run the loop in `_sam_native` (None: when built;
        True: required). It updates the same lists in the same way (tested field for field); it
        needs int tokens and checks them all before changing anything."""
        if native is None:
            native = _sam_native is not None
        if not native:
            for t in tokens:
                self.extend(t)
            return
        if _sam_native is None:
            raise RuntimeError("native=True but agentinfer_jax.speculation._sam_native is not built")
        if self.frozen:
            raise FrozenAutomatonError("cannot extend a frozen suffix automaton")
        _sam_native.extend_many(self, tokens if tokens.__class__ is list else list(tokens))

    def freeze(self) -> SuffixAutomaton:
        """Makes counts and last_end exact (O(n)) and the automaton read-only; returns self."""
        if self.frozen:
            return self
        n = self.num_states
        # Own occurrences: 1 for states created as `cur` (first_end's position is their own end),
        # 0 for clones. Then sum up the suffix-link tree in order of decreasing length.
        count = [0] * n
        last_end = list(self.first_end)
        for s in range(1, n):
            # A state is a clone iff a longer-or-equal state shares its first_end... simpler test:
            # non-clones are exactly the states whose length equals first_end + 1.
            if self.length[s] == self.first_end[s] + 1:
                count[s] = 1
        by_len: list[list[int]] = [[] for _ in range(len(self.tokens) + 1)]
        for s in range(1, n):
            by_len[self.length[s]].append(s)
        for states in reversed(by_len):
            for s in states:
                parent = self.link[s]
                if parent > ROOT:
                    count[parent] += count[s]
                    if last_end[s] > last_end[parent]:
                        last_end[parent] = last_end[s]
        count[ROOT] = len(self.tokens) + 1
        self.count, self.last_end = count, last_end
        # Most frequent continuation of every state, so drafting never scans a wide state's edges
        # on the request path (O(transitions) once, here, on whichever thread freezes).
        self.top_table = [self._scan_top(s) for s in range(n)]
        self._out_total = []  # only the online updates need it
        self.frozen = True
        return self

    # ---- queries ------------------------------------------------------------------------------

    def walk(self, tokens: Sequence[int]) -> int:
        """The state reached by reading `tokens` from the root, or -1 if not a substring."""
        s = ROOT
        for t in tokens:
            s = self.next[s].get(t, -1)
            if s < 0:
                return -1
        return s

    def contains(self, tokens: Sequence[int]) -> bool:
        """True iff `tokens` is a (possibly empty) substring of the text."""
        return self.walk(tokens) >= 0

    @property
    def match_length(self) -> int:
        """Length of the longest suffix of the text that also ends at an earlier position."""
        return self.length[self.link[self.last]] if self.last != ROOT else 0

    @property
    def match_state(self) -> int:
        return self.link[self.last] if self.last != ROOT else ROOT

    def top_next(self, state: int) -> tuple[int, int, int, int] | None:
        """(token, child, count of child, total count over state's transitions) of the most frequent
        next token after `state`'s strings, or None if nothing follows. Negative tokens (session
        sentinels) count in the total but are never returned. O(1): kept online (see the module
        docstring for its exactness) or rebuilt by `freeze`; O(out-degree) with track_top=False."""
        if self.frozen or self.track_top:
            return self.top_table[state]
        return self._scan_top(state)

    def _scan_top(self, state: int) -> tuple[int, int, int, int] | None:
        count = self.count
        best_tok, best_child, best, total = -1, -1, 0, 0
        for tok, child in self.next[state].items():
            n = count[child]
            total += n
            if tok >= 0 and n > best:
                best_tok, best_child, best = tok, child, n
        return (best_tok, best_child, best, total) if best_child >= 0 else None


def advance(sam: SuffixAutomaton, state: int, length: int, token: int) -> tuple[int, int]:
    """(state, length) of the longest suffix of (matched string + token) in `sam`'s text.

    `state`, `length` must describe a matched suffix (the last `length` tokens of a stream spell a
    string of `state`); O(1) amortised along a stream. Unknown tokens reset to (ROOT, 0).
    """
    nxt, link, lengths = sam.next, sam.link, sam.length
    while state != ROOT and token not in nxt[state]:
        state = link[state]
        length = lengths[state]
    child = nxt[state].get(token)
    return (ROOT, 0) if child is None else (child, length + 1)


class Matcher:
    """Longest suffix of a token stream that is a substring of an automaton's text.

    Invariant after each `feed`: the last `length` tokens fed spell a string of `state`, and no
    longer suffix of the stream is a substring of the automaton's text.
    """

    __slots__ = ("sam", "state", "length")

    def __init__(self, sam: SuffixAutomaton) -> None:
        self.sam = sam
        self.state = ROOT
        self.length = 0

    def feed(self, token: int) -> None:
        self.state, self.length = advance(self.sam, self.state, self.length, token)

    def feed_many(self, tokens: Iterable[int]) -> None:
        for t in tokens:
            self.feed(t)
