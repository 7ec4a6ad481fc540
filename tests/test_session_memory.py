"""SessionMemory: BM25 retrieval against a brute-force BM25, bounds, thread-safety."""

import math
import random
import threading
from collections import Counter

import pytest

from agentinfer_jax.speculation import SessionMemory


def brute_bm25_scores(docs: dict[str, list[int]], query: list[int], k1=1.5, b=0.75) -> dict[str, float]:
    """Lucene BM25 in float64 over token ids as words; query words deduplicated (as documented)."""
    n = len(docs)
    avg = sum(len(d) for d in docs.values()) / n
    df = Counter(t for d in docs.values() for t in set(d))
    scores = {}
    for sid, d in docs.items():
        tf = Counter(d)
        s = 0.0
        for t in set(query):
            if tf[t]:
                idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
                s += idf * tf[t] * (k1 + 1) / (tf[t] + k1 * (1 - b + b * len(d) / avg))
        scores[sid] = s
    return scores


def brute_bm25_top(docs: dict[str, list[int]], query: list[int], k: int, k1=1.5, b=0.75) -> list[str]:
    scores = brute_bm25_scores(docs, query, k1, b)
    return sorted((s for s in scores if scores[s] > 0), key=lambda s: -scores[s])[:k]


def make_docs(rng, n):
    # each session draws from its own topic vocabulary plus shared tokens, so scores are well separated
    return {f"s{i}": [rng.choice([rng.randrange(10 * i + 100, 10 * i + 110), rng.randrange(5)])
                      for _ in range(rng.randrange(20, 60))] for i in range(n)}


def test_retrieval_matches_brute_force_bm25_and_excludes_the_caller():
    rng = random.Random(0)
    docs = make_docs(rng, 12)
    with SessionMemory(top_k=3, rebuild_fraction=0.5) as mem:
        for sid, toks in docs.items():
            mem.add(sid, toks)
        for trial in range(5):
            target = f"s{rng.randrange(12)}"
            query = rng.sample(docs[target], 8)
            sam, ids = mem.retrieve(query).result()
            assert set(ids) == set(brute_bm25_top(docs, query, 3))
            _, ids_ex = mem.retrieve(query, exclude=target).result()
            assert target not in ids_ex
            # the merged automaton holds every retrieved session's text, and no cross-session string
            for sid in ids:
                assert sam.contains(docs[sid])
            assert sam is not None and sam.frozen


def test_bounded_with_oldest_evicted_and_replacement():
    # Cap: 110 int32 words = 440 bytes; a session of n equal tokens takes n + 2 words.
    with SessionMemory(max_sessions=3, cap_mb=440 / 2**20) as mem:
        for i in range(5):
            mem.add(f"s{i}", [i] * 10)
        assert mem.session_ids() == ["s2", "s3", "s4"]
        mem.add("s2", [2] * 90)  # replaced, becomes newest; the byte cap evicts the oldest ones
        assert mem.session_ids() == ["s4", "s2"] and mem.total_tokens() == 100
        assert mem.store_bytes() <= 440 + 2 * 40 and mem.bytes_per_token() <= 16
        _, ids = mem.retrieve([3, 3]).result()
        assert ids == []  # s3 was evicted: never returned from a stale index


def test_concurrent_adds_and_retrievals_are_consistent():
    rng = random.Random(1)
    docs = make_docs(rng, 40)
    errors = []
    with SessionMemory(max_sessions=25, top_k=4, rebuild_fraction=0.2) as mem:
        def writer(items):
            for sid, toks in items:
                mem.add(sid, toks)

        def reader(seed):
            r = random.Random(seed)
            for _ in range(10):
                q = r.sample(docs[f"s{r.randrange(40)}"], 5)
                sam, ids = mem.retrieve(q).result()
                if len(set(ids)) != len(ids) or len(ids) > 4 or (ids and sam is None):
                    errors.append(ids)

        items = list(docs.items())
        threads = [threading.Thread(target=writer, args=(items[i::2],)) for i in range(2)]
        threads += [threading.Thread(target=reader, args=(s,)) for s in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert len(mem.session_ids()) == 25
        stored = set(mem.session_ids())
        q = docs[sorted(stored)[0]][:6]
        _, ids = mem.retrieve(q).result()
        assert set(ids) <= stored


def test_bad_arguments_and_closed_memory():
    with pytest.raises(ValueError):
        SessionMemory(top_k=0)
    mem = SessionMemory()
    with pytest.raises(ValueError):
        mem.add(3, [1])
    with pytest.raises(ValueError):
        mem.retrieve([1], top_k=0)
    mem.close()
    mem.close()
    with pytest.raises(RuntimeError, match="closed"):
        mem.add("s", [1])


def test_global_automaton_over_recent_responses_is_bounded_and_rebuilt_by_growth():
    with SessionMemory(global_tokens=50, global_min_rebuild=20, rebuild_fraction=0.5) as mem:
        assert mem.global_automaton() == (0, None)
        mem.add_response(list(range(100, 110)))
        mem.flush()
        assert mem.global_automaton() == (0, None)  # 10 new tokens < global_min_rebuild
        mem.add_response(list(range(200, 215)))
        mem.flush()
        version, sam = mem.global_automaton()
        assert version == 1 and sam.frozen
        assert sam.contains(list(range(100, 110))) and sam.contains(list(range(200, 215)))
        assert not sam.contains([109, 200])  # a sentinel separates responses: no match spans two
        for i in range(4):  # 60 more tokens: the oldest responses leave the 50-token window
            mem.add_response(list(range(300 + 20 * i, 315 + 20 * i)))
        mem.flush()
        version, sam = mem.global_automaton()
        assert version >= 2
        assert not sam.contains([100, 101]) and sam.contains(list(range(360, 375)))
        assert len([t for t in sam.tokens if t >= 0]) <= 50


def test_global_memory_off_and_bad_arguments():
    with SessionMemory(global_tokens=0) as mem:
        mem.add_response([1, 2, 3] * 400)
        mem.flush()
        assert mem.global_automaton() == (0, None)
    with pytest.raises(ValueError):
        SessionMemory(global_tokens=-1)
    with pytest.raises(ValueError):
        SessionMemory(global_min_rebuild=0)


def test_arena_stays_within_its_cap_and_keeps_texts_through_compactions():
    """Far more sessions than the cap holds (the arena evicts and compacts many times): the arena
    never grows past the cap, live sessions are the newest ones, the stored bytes per token stay
    <= 16, and every retrieved session's text is intact in the merged automaton."""
    rng = random.Random(8)
    cap_words = 4000
    docs = {}
    with SessionMemory(cap_mb=4 * cap_words / 2**20, top_k=3) as mem:
        for i in range(400):
            doc = [rng.randrange(300) for _ in range(rng.randrange(5, 120))]
            docs[f"s{i}"] = doc
            mem.add(f"s{i}", doc)
        ids = mem.session_ids()
        assert ids == [f"s{i}" for i in range(400 - len(ids), 400)]
        assert mem.stats["compactions"] > 3 and mem._arena.nbytes <= 4 * cap_words
        assert mem.store_bytes() <= 4 * cap_words + 40 * len(ids) and mem.bytes_per_token() <= 16
        for sid in rng.sample(ids, 20):
            sam, got = mem.retrieve(docs[sid], top_k=3).result()
            assert sid in got
            for g in got:
                assert sam.contains(docs[g])


def test_merged_text_is_the_best_sessions_tails_within_the_budget_most_similar_last():
    """The retrieved automaton's text, rebuilt independently: each session stored as its last
    doc_tokens tokens without negative ones; the top-k by brute-force BM25 taken best first, whole
    while they fit the token budget, then the most recent tokens of the first that does not, none
    after; concatenated most similar last, each followed by its own negative sentinel."""
    rng = random.Random(9)
    doc_tokens, budget, k = 40, 70, 4
    checked = 0
    with SessionMemory(top_k=k, doc_tokens=doc_tokens, retrieved_tokens=budget) as mem:
        stored = {}
        for sid, toks in make_docs(rng, 14).items():
            toks = [t if rng.random() > 0.1 else -rng.randrange(1, 5) for t in toks]  # a few sentinels
            mem.add(sid, toks)
            stored[sid] = [t for t in toks[-doc_tokens:] if t >= 0]
        for _ in range(12):
            query = rng.sample(stored[f"s{rng.randrange(14)}"], 6) + [rng.randrange(5)]
            scores = brute_bm25_scores(stored, query)
            best = sorted((s for s in scores if scores[s] > 0), key=lambda s: -scores[s])[:k + 1]
            if any(math.isclose(scores[a], scores[b], rel_tol=1e-9) for a, b in zip(best, best[1:])):
                continue  # a tie: the order is not defined
            picked, left = [], budget
            for sid in best[:k]:
                if left <= 0:
                    break
                take = min(len(stored[sid]), left)
                picked.append((sid, stored[sid][len(stored[sid]) - take:]))
                left -= take
            picked.reverse()
            want = []
            for i, (_, tail) in enumerate(picked):
                want += tail + [-1 - i]
            sam, ids = mem.retrieve(query).result()
            assert ids == [sid for sid, _ in picked]
            assert sam.tokens.tolist() == want
            checked += 1
    assert checked >= 8
