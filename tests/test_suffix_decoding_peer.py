"""The real SuffixDecoding behind our Drafter interface (experiments/suffix_decoding_peer.py).

Skipped unless `make suffix-decoding` has built the peer into build/suffix_decoding. The peer is the
reference: a draft (path or tree) it proposes must be what its own cache speculates for the same
context."""

import importlib.util
import pathlib
import random

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "suffix_decoding_peer.py"
_spec = importlib.util.spec_from_file_location("suffix_decoding_peer", _PATH)
peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer)

pytestmark = pytest.mark.skipif(not peer.available(), reason="SuffixDecoding not built (make suffix-decoding)")


@pytest.mark.parametrize("tree", [False, True])
def test_adapter_drafts_what_the_peer_cache_speculates(tree):
    rng = random.Random(3)
    d = peer.SuffixDecodingDrafter(max_spec_factor=8.0, tree=tree)
    reference = peer._import_cache()(max_tree_depth=64)
    branched = 0
    for trial in range(20):
        prompt = [rng.randrange(4) for _ in range(rng.randrange(8, 60))]
        rid = f"r{trial}"
        d.begin(rid, prompt)
        reference.start_request(rid, prompt)
        for _ in range(5):
            expect = reference.speculate(rid, prompt[-64:], max_spec_tokens=8, max_spec_factor=8.0,
                                         min_token_prob=0.1, use_tree_spec=tree)
            if tree:
                tokens, parents = d.propose_tree(rid, 8)
                assert parents == list(expect.parents) and all(-1 <= p < i for i, p in enumerate(parents))
                branched += len(set(parents)) < len(parents)
            else:
                tokens = d.propose(rid, 8)
            assert tokens == list(expect.token_ids) and len(tokens) <= 8
            step = [rng.randrange(4) for _ in range(rng.randrange(1, 4))]
            d.extend(rid, step)
            reference.add_active_response(rid, step)
            prompt += step
        d.end(rid)
        reference.stop_request(rid)
    assert d.response_tokens > 0 and d.global_bytes() > 0
    assert branched or not tree  # some trees really branch
