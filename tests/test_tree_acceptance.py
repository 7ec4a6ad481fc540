"""How the drafting replay verifies a draft tree (experiments/suffix_decoding_peer.py; runs without the
built peer)."""

import importlib.util
import pathlib
import random

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "suffix_decoding_peer.py"
_spec = importlib.util.spec_from_file_location("suffix_decoding_peer_trees", _PATH)
peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer)


def _random_tree(rng: random.Random, n: int, vocab: int) -> tuple[list[int], list[int]]:
    tokens, parents = [], []
    for i in range(n):
        parent = rng.randrange(-1, i)
        taken = {t for t, p in zip(tokens, parents) if p == parent}
        free = [t for t in range(vocab) if t not in taken]
        if not free:
            break
        tokens.append(rng.choice(free))
        parents.append(parent)
    return tokens, parents


def _longest_agreeing_path(tokens, parents, target) -> int:
    best = 0
    for i in range(len(tokens)):  # every node's root path, built by walking up its parents
        path, node = [], i
        while node != -1:
            path.append(tokens[node])
            node = parents[node]
        path.reverse()
        if path == list(target[:len(path)]):
            best = max(best, len(path))
    return best


def test_tree_acceptance_is_the_longest_root_path_agreeing_with_the_target():
    rng = random.Random(11)
    for _ in range(500):
        tokens, parents = _random_tree(rng, rng.randrange(0, 17), rng.randrange(2, 5))
        target = [rng.randrange(4) for _ in range(rng.randrange(0, 12))]
        if tokens and rng.random() < 0.5:  # a target that follows one of the tree's paths, then goes on
            node, path = rng.randrange(len(tokens)), []
            while node != -1:
                path.append(tokens[node])
                node = parents[node]
            target = path[::-1] + target
        assert peer.tree_accepted(tokens, parents, target) == _longest_agreeing_path(tokens, parents, target)
    # A path is a tree whose every node hangs off the one before it.
    assert peer.tree_accepted([3, 1, 4], [-1, 0, 1], [3, 1, 5]) == 2


def test_tree_acceptance_refuses_a_parent_after_its_child():
    with pytest.raises(ValueError, match="parent"):
        peer.tree_accepted([1, 2], [1, -1], [1, 2])
