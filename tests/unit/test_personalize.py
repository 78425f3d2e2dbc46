"""runtime.personalize on a small synthetic embedding matrix: user vector, blended ranking, recommend + fallback."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.runtime import personalize as P

DIM = 16
PER_KIND = 20


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def catalog() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two kinds of product (rows 0-19 along axis 0, rows 20-39 along axis 1) and a query halfway between them."""
    rng = np.random.default_rng(0)
    kinds = np.repeat([0, 1], PER_KIND)
    base = np.zeros((2 * PER_KIND, DIM))
    base[np.arange(2 * PER_KIND), kinds] = 1.0
    emb = _unit(base + 0.25 * rng.normal(size=base.shape))
    query = np.zeros(DIM)
    query[[0, 1]] = 1.0
    return emb, kinds, _unit(query)


def _kind_share(rows: np.ndarray, kinds: np.ndarray, kind: int) -> float:
    return float((kinds[rows] == kind).mean())


def test_history_of_one_kind_pulls_the_ranking_towards_that_kind(catalog) -> None:
    emb, kinds, query = catalog
    for kind in (0, 1):
        history = np.flatnonzero(kinds == kind)[:5]
        user = P.user_vector(emb[history], query)
        assert user is not None and np.linalg.norm(user) == pytest.approx(1.0, abs=1e-5)
        plain, _ = P.top_k(P.blend_scores(emb, query), 10)
        personal, _ = P.top_k(P.blend_scores(emb, query, user, 0.5), 10)
        assert _kind_share(personal, kinds, kind) > _kind_share(plain, kinds, kind)
        assert _kind_share(personal, kinds, kind) >= 0.8
        # Monotone in the weight: more weight never lowers the share of the user's kind in the top 10.
        shares = [
            _kind_share(P.top_k(P.blend_scores(emb, query, user, w), 10)[0], kinds, kind) for w in (0.0, 0.1, 0.3, 1.0)
        ]
        assert shares == sorted(shares)


def test_weight_zero_or_no_user_is_the_plain_ranking(catalog) -> None:
    emb, kinds, query = catalog
    user = P.user_vector(emb[:3], query)
    plain = P.blend_scores(emb, query)
    np.testing.assert_array_equal(P.blend_scores(emb, query, user, 0.0), plain)
    np.testing.assert_array_equal(P.blend_scores(emb, query, None, 0.7), plain)
    # (q + w u) . p is cos(q, p) + w cos(u, p): one matmul for both terms.
    np.testing.assert_allclose(P.blend_scores(emb, query, user, 0.3), plain + 0.3 * (emb @ user), rtol=1e-5)


def test_attention_follows_the_query_and_recency_without_one(catalog) -> None:
    emb, kinds, _ = catalog
    history = np.r_[np.flatnonzero(kinds == 0)[:3], np.flatnonzero(kinds == 1)[:3]]
    towards_1 = np.zeros(DIM, np.float32)
    towards_1[1] = 1.0
    attended = P.user_vector(emb[history], towards_1)
    assert attended[1] > attended[0]  # the history items closest to the query dominate
    # Cooler attention concentrates on the closest item; a hot one approaches the plain mean.
    closest = emb[history][np.argmax(emb[history] @ towards_1)]
    assert attended @ closest > P.user_vector(emb[history], towards_1, temperature=10.0) @ closest
    recent_first = P.user_vector(emb[history])  # no query: the most recent (first) rows weigh most
    assert recent_first[0] > recent_first[1]
    assert P.user_vector(emb[history[::-1]])[1] > P.user_vector(emb[history[::-1]])[0]
    weights = P.recency_weights(4, half_life=1.0)
    np.testing.assert_allclose(weights, np.array([8, 4, 2, 1]) / 15, rtol=1e-6)


def test_user_vector_is_none_without_history_or_direction() -> None:
    assert P.user_vector(np.zeros((0, DIM), np.float32)) is None
    assert P.user_vector(np.zeros((0, DIM), np.float32), np.ones(DIM, np.float32)) is None
    opposite = np.zeros((2, DIM), np.float32)
    opposite[0, 0], opposite[1, 0] = 1.0, -1.0
    assert P.user_vector(opposite, half_life=1e9) is None  # equal weights cancel out: nothing to personalise with
    with pytest.raises(ValueError, match="temperature"):
        P.user_vector(opposite, np.ones(DIM, np.float32), temperature=0)


def test_recommend_ranks_by_history_and_excludes_it(catalog) -> None:
    emb, kinds, _ = catalog
    history = np.flatnonzero(kinds == 1)[:4]
    rows, scores = P.recommend(emb, history, 10)
    assert len(rows) == 10 and not set(rows) & set(history)
    assert _kind_share(rows, kinds, 1) == 1.0
    assert np.all(np.diff(scores) <= 0)
    kept, _ = P.recommend(emb, history, 10, exclude_history=False)
    assert set(history) & set(kept)
    everything, _ = P.recommend(emb, history, 1000)
    assert len(everything) == len(emb) - len(history)


def test_recommend_falls_back_to_popularity_without_history(catalog) -> None:
    emb, _, _ = catalog
    popularity = P.popularity_scores(np.arange(len(emb)) % 7 * 10.0, np.arange(len(emb)) % 7)
    rows, scores = P.recommend(emb, [], 5, popularity=popularity)
    np.testing.assert_array_equal(rows, P.top_k(popularity, 5)[0])
    assert np.all(popularity[rows] == popularity.max())
    assert P.recommend(emb, np.array([], np.int64), 5)[0].size == 0  # no history, no popularity: nothing to say
    with pytest.raises(ValueError, match="popularity"):
        P.recommend(emb, [], 5, popularity=popularity[:-1])


def test_popularity_orders_by_clicks_then_smoothed_ctr() -> None:
    views = np.array([100, 10, 10, 0, np.nan, 50])
    clicks = np.array([5, 5, 2, 0, np.nan, 0])
    scores = P.popularity_scores(views, clicks)
    assert scores[1] > scores[0] > scores[2] > scores[5] > 0  # same clicks: the better CTR first
    assert scores[3] == 0 and scores[4] == 0  # no activity (or no row) at all


def test_top_k_excludes_rows_and_breaks_ties_by_row() -> None:
    scores = np.array([1.0, 3.0, 3.0, 2.0, 0.5], np.float32)
    rows, top = P.top_k(scores, 3)
    assert rows.tolist() == [1, 2, 3] and top.tolist() == [3.0, 3.0, 2.0]
    assert P.top_k(scores, 3, exclude_rows=np.array([1, 3]))[0].tolist() == [2, 0, 4]
    assert P.top_k(scores, 10, exclude_rows=np.arange(5))[0].size == 0


# --- runtime.topk.top_k: the one top-k every ranking uses ------------------------------------------------------------


def _argpartition_2d(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The hand-written top-k ProductIndex.search and evaluation.personalization._top used before runtime.topk."""
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(top_scores, order, axis=1)


def _lexsort_1d(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The hand-written top-k personalize.top_k and the BM25 candidates (LexicalIndex.top_k) used before."""
    k = min(k, len(scores))
    top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    order = np.lexsort((top, -scores[top]))
    return top[order], scores[top[order]]


def _by_row_within_ties(rows: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The same picks ordered best first, equal scores by row (what argpartition's order left arbitrary)."""
    return np.stack([r[np.lexsort((r, -s))] for r, s in zip(np.atleast_2d(rows), np.atleast_2d(scores), strict=True)])


@pytest.mark.parametrize("k", [1, 10, 100, 1999, 2000, 5000])
def test_top_k_ranks_a_random_matrix_exactly_as_the_hand_written_ones_did(k: int) -> None:
    """The same rows in the same order with the same scores, for one ranking and for many: bit for bit where no two
    scores are equal (float64), and where float32 cosines do tie (a few per 2,000), the old order up to those ties,
    which now come in row order."""
    from pipelines.runtime.topk import top_k

    rng = np.random.default_rng(k)
    emb = _unit(rng.normal(size=(2000, DIM)))
    queries = _unit(rng.normal(size=(50, DIM)))
    for scores in (queries.astype(np.float64) @ emb.T.astype(np.float64), queries @ emb.T):
        rows, top = top_k(scores, k)
        old_rows, old_top = _argpartition_2d(scores, k)
        assert rows.dtype == np.int64 and top.dtype == scores.dtype and rows.shape == (50, min(k, 2000))
        np.testing.assert_array_equal(top, old_top)
        if scores.dtype == np.float64:
            assert all(len(np.unique(row)) == row.size for row in scores)  # no ties: nothing is left to choose
            np.testing.assert_array_equal(rows, old_rows)
        np.testing.assert_array_equal(rows, _by_row_within_ties(old_rows, old_top))
        for i in range(0, 50, 7):
            one_rows, one_top = top_k(scores[i], k)
            lex_rows, lex_top = _lexsort_1d(scores[i], k)
            np.testing.assert_array_equal(one_rows, lex_rows)
            np.testing.assert_array_equal(one_top, lex_top)
            np.testing.assert_array_equal(one_rows, rows[i])
            full = np.argsort(-scores[i], kind="stable")[:k]  # a full stable sort (HnswSearch over its candidates)
            np.testing.assert_array_equal(one_rows, full)


def test_top_k_orders_equal_scores_by_row() -> None:
    from pipelines.runtime.topk import top_k

    scores = np.array([0.5, 2.0, 1.0, 2.0, 1.0, 1.0, 1.0, 3.0], np.float32)
    best_first = np.lexsort((np.arange(len(scores)), -scores))  # best first, then row order
    for k in range(len(scores) + 2):
        rows, top = top_k(scores, k)
        np.testing.assert_array_equal(top, scores[best_first[:k]])
        if k in (0, 1, 3, 7, 8, 9):  # cuts between two different scores: the picks are the best k, in row order
            assert rows.tolist() == best_first[:k].tolist(), k
        # equal scores within the answer come in row order; which tied rows get in at the cut is argpartition's
        assert rows.tolist() == sorted(rows.tolist(), key=lambda r: (-scores[r], r)), k
    many = np.stack([scores, np.arange(8.0)[::-1], scores[::-1]])  # several rankings at once, each on its own
    rows, top = top_k(many, 3)
    assert rows.tolist() == [[7, 1, 3], [0, 1, 2], [0, 4, 6]] and top.shape == (3, 3)
    assert top_k(many, 0)[0].shape == (3, 0) and top_k(many, 20)[0].shape == (3, 8)
    assert top_k(np.ones((2, 5)), 5)[0].tolist() == [[0, 1, 2, 3, 4]] * 2
    assert top_k(scores, 5, exclude_rows=[7, 3])[0].tolist() == [1, 2, 4, 5, 6]
    assert top_k(many, 2, exclude_rows=np.array([1, 1]))[0].tolist() == [[7, 3], [0, 2], [0, 4]]
    assert top_k(scores, 10, exclude_rows=[0, 2, 4])[0].tolist() == [7, 1, 3, 5, 6]
