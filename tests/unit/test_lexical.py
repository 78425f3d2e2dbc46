"""Hybrid search's lexical half: fusion arithmetic on hand-built lists, and the BM25 index on real titles."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.runtime.lexical import LexicalIndex, _stemmer, fuse, tokenize


def lists(rows, scores):
    return np.asarray(rows, np.int64), np.asarray(scores, np.float32)


DENSE = lists([1, 2, 3], [0.9, 0.5, 0.1])
BM25 = lists([3, 4], [10.0, 5.0])


@pytest.mark.parametrize(
    ("weight", "rows", "scores"),
    [
        # min-max per list: dense (1, .5, 0), bm25 (1, 0); product 3 is last by meaning, first by words
        (0.5, [1, 3, 2, 4], [0.5, 0.5, 0.25, 0.0]),  # 1 and 3 tie: the dense order breaks it
        (0.0, [1, 2, 3, 4], [1.0, 0.5, 0.0, 0.0]),  # dense only
        (1.0, [3, 1, 2, 4], [1.0, 0.0, 0.0, 0.0]),  # lexical only, then the dense order
        (0.2, [1, 2, 3, 4], [0.8, 0.4, 0.2, 0.0]),
    ],
)
def test_fuse_is_a_convex_mix_of_min_max_scores(weight, rows, scores):
    got_rows, got_scores = fuse(DENSE, BM25, weight, k=10)
    assert got_rows.tolist() == rows
    np.testing.assert_allclose(got_scores, scores, atol=1e-6)


def test_fuse_keeps_k_and_handles_an_empty_lexical_list():
    rows, scores = fuse(DENSE, lists([], []), 0.5, k=2)
    assert rows.tolist() == [1, 2]
    np.testing.assert_allclose(scores, [0.5, 0.25], atol=1e-6)
    rows, _ = fuse(lists([7], [0.3]), lists([7], [2.0]), 0.5, k=5)  # one candidate in both: scored once
    assert rows.tolist() == [7]


def test_served_fuse_agrees_with_the_offline_ranx_fusion():
    # Evaluation fuses whole runs with ranx, serving fuses one query with runtime.lexical.fuse: the figures measure
    # what is served only while both give the same top k, lone and missing BM25 hits included.
    from pipelines.evaluation.evaluate import fused_runs
    from pipelines.runtime.index import ProductIndex

    rng = np.random.default_rng(0)
    n, depth, k = 500, 100, 10
    index = ProductIndex(np.arange(1000, 1000 + n, dtype=np.int64), np.asarray(["t"] * n, object), np.zeros((n, 4)))
    terms = [f"q{i}" for i in range(30)]
    dense = [lists(rng.choice(n, depth, replace=False), np.sort(rng.random(depth))[::-1]) for _ in terms]
    lexical = [lists(rng.choice(n, depth, replace=False), np.sort(rng.random(depth) * 20)[::-1]) for _ in terms]
    lexical[0] = lists([], [])  # no known word in the query
    lexical[1] = lists([int(dense[1][0][5])], [3.0])  # one BM25 hit, also a dense candidate
    lexical[2] = lists([7], [3.0])  # one BM25 hit of its own
    for weight, run in fused_runs(index, terms, dense, lexical, [0.0, 0.3, 0.6, 1.0], k).items():
        for term, d, lx in zip(terms, dense, lexical, strict=True):
            rows, scores = fuse(d, lx, weight, k)
            served = {str(index.product_ids[r]): float(s) for r, s in zip(rows, scores, strict=True)}
            offline = run[term]
            if weight in (0.0, 1.0):  # one list alone leaves ties at 0: compare the scores that are not tied
                served = {p: s for p, s in served.items() if s > 0}
                offline = {p: s for p, s in offline.items() if s > 0}
            assert offline.keys() == served.keys(), (weight, term)
            np.testing.assert_allclose([offline[p] for p in served], list(served.values()), atol=1e-6)


TITLES = [
    "Milwaukee M18 cordless drill kit",
    "Philips 60 watt LED light bulb",
    "Minwax oak wood stain",
    "Round white toilet seat",
    "DEWALT 20V hammer drill",
]


def test_bm25_index_stems_drops_stopwords_and_round_trips(tmp_path):
    index = LexicalIndex.build(TITLES, weight=0.3, candidates=10)
    (rows, scores), (none, _) = index.top_k(["drills", "the of and"])
    assert sorted(rows.tolist()) == [0, 4] and (scores > 0).all()  # "drills" -> "drill"
    assert none.size == 0  # only stopwords: no lexical candidates, the dense list decides
    index.save(tmp_path)
    loaded = LexicalIndex.load(tmp_path)
    assert loaded is not None and (loaded.weight, loaded.candidates, loaded.size) == (0.3, 10, len(TITLES))
    again, again_scores = loaded.top_k(["drills"])[0]
    assert again.tolist() == rows.tolist()
    np.testing.assert_allclose(again_scores, scores)
    assert LexicalIndex.load(tmp_path / "dense-only-bundle") is None


def test_query_tokenisation_matches_bm25s_and_top_k_matches_its_retrieve():
    import bm25s

    texts = ["Drills, 18-Volt!", "the LED bulbs of 60W", "Café table ø 80 cm", "a", "", "Hampton Bay's ceiling fans"]
    expected = bm25s.tokenize(texts, stopwords="en", stemmer=_stemmer(), return_ids=False, show_progress=False)
    assert [tokenize(t, _stemmer()) for t in texts] == expected
    index = LexicalIndex.build(TITLES, weight=0.5, candidates=3)
    for query in ["drill kit", "white wood", "60 watt bulb"]:
        rows, scores = index.top_k([query])[0]
        ref_rows, ref_scores = index.retriever.retrieve([tokenize(query, _stemmer())], k=3, show_progress=False)
        keep = ref_scores[0] > 0
        np.testing.assert_allclose(scores, ref_scores[0][keep], rtol=1e-6)
        assert set(rows.tolist()) == set(ref_rows[0][keep].tolist())
