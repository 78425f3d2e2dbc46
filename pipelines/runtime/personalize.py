"""Personalisation maths over one model version's product index: user vector, blended scores, recommendations."""

from __future__ import annotations

import numpy as np

from pipelines.runtime.topk import top_k

# Cosines of related products differ by a few tenths; at temperature 1 a softmax over them is almost the plain mean.
# 0.1 lets the products closest to the query dominate the user vector while the rest still contribute.
ATTENTION_TEMPERATURE = 0.1
# Without a query, the i-th most recent product weighs 0.5 ** (i / half-life): the last few interactions say most
# about what the user wants now, older ones still count.
RECENCY_HALF_LIFE = 5.0
# Bayesian prior for a product's click-through in the popularity fallback: a product needs views before its own CTR
# outweighs the catalog's.
CTR_PRIOR_VIEWS = 20.0


def recency_weights(n: int, half_life: float = RECENCY_HALF_LIFE) -> np.ndarray:
    """Weights of n products ordered most recent first, summing to 1."""
    if half_life <= 0:
        raise ValueError("half_life must be > 0")
    weights = 0.5 ** (np.arange(n, dtype=np.float64) / half_life)
    return (weights / weights.sum()).astype(np.float32)


def user_vector(
    history_embeddings: np.ndarray,
    query_vec: np.ndarray | None = None,
    temperature: float = ATTENTION_TEMPERATURE,
    half_life: float = RECENCY_HALF_LIFE,
) -> np.ndarray | None:
    """Unit vector r = sum_i a_i p_i over the user's recent product embeddings (rows most recent first).

    With a query, a_i = softmax(q . p_i / temperature): the history items closest to what is being searched now
    dominate. Without one (recommendations), a_i are recency weights (`recency_weights`). None when the history is
    empty or the pooled vector is degenerate (norm ~ 0), i.e. whenever there is nothing to personalise with.
    """
    products = np.asarray(history_embeddings, dtype=np.float32)
    if products.ndim != 2 or len(products) == 0:
        return None
    if query_vec is None:
        weights = recency_weights(len(products), half_life)
    else:
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        logits = products @ np.asarray(query_vec, dtype=np.float32) / temperature
        weights = np.exp(logits - logits.max())
        weights /= weights.sum()
    pooled = weights @ products
    norm = float(np.linalg.norm(pooled))
    return (pooled / norm).astype(np.float32) if norm > 1e-6 else None


def blend_query(query_vec: np.ndarray, user_vec: np.ndarray | None, weight: float) -> np.ndarray:
    """q + weight * u: with unit rows p, (q + w u) . p = cos(q, p) + w cos(u, p), so one matmul scores both."""
    if user_vec is None or weight == 0:
        return np.asarray(query_vec, dtype=np.float32)
    return (np.asarray(query_vec, dtype=np.float32) + np.float32(weight) * user_vec).astype(np.float32)


def blend_scores(
    index_embeddings: np.ndarray, query_vec: np.ndarray, user_vec: np.ndarray | None = None, weight: float = 0.0
) -> np.ndarray:
    """Scores of every index row: cos(q, p) + weight * cos(u, p); weight 0 or no user vector = the plain search."""
    return index_embeddings @ blend_query(query_vec, user_vec, weight)


def popularity_scores(
    views_30d: np.ndarray, clicks_30d: np.ndarray, prior_views: float = CTR_PRIOR_VIEWS
) -> np.ndarray:
    """Popularity of products from their product_popularity features (product_v1): clicks, ties broken by CTR.

    score = clicks_30d + smoothed CTR, where the CTR is shrunk towards the catalog's with `prior_views` pseudo-views;
    the CTR lies in [0, 1), so it only orders products with the same click count. Products without views or clicks
    (no row: NaN) score 0.
    """
    views = np.nan_to_num(np.asarray(views_30d, dtype=np.float64))
    clicks = np.nan_to_num(np.asarray(clicks_30d, dtype=np.float64))
    overall = clicks.sum() / views.sum() if views.sum() > 0 else 0.0
    ctr = (clicks + prior_views * overall) / (views + prior_views)
    return np.where(views + clicks > 0, clicks + np.minimum(ctr, 0.999), 0.0).astype(np.float32)


def recommend(
    index_embeddings: np.ndarray,
    history_rows: np.ndarray | list[int],
    k: int,
    exclude_history: bool = True,
    popularity: np.ndarray | None = None,
    half_life: float = RECENCY_HALF_LIFE,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k index rows for a user from their history alone: (rows, scores), best first.

    `history_rows` are the index rows of the user's recent products, most recent first (search_v2's
    `recent_products` mapped through ProductIndex.rows_of). Personalised: score = cos(u, p) with u the
    recency-weighted `user_vector` of the history; history rows are excluded unless `exclude_history` is False.

    Fallback, used when `history_rows` is empty (no online row, an empty history, or a history of products outside
    this version's index) or its vectors cancel out (norm ~ 0, never seen with real embeddings): the most popular
    products, `popularity` being one score per index row (e.g.
    `popularity_scores` of the product_popularity view read through the product_v1 FeatureService); without
    popularity the fallback is empty. The caller flags the answer as non-personalised in that case.
    """
    emb = np.asarray(index_embeddings, dtype=np.float32)
    rows = np.asarray(history_rows, dtype=np.int64).reshape(-1)
    exclude = rows if exclude_history else None
    user = user_vector(emb[rows], half_life=half_life) if len(rows) else None
    if user is None:
        if popularity is None:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if len(popularity) != len(emb):
            raise ValueError(f"popularity has {len(popularity)} scores for {len(emb)} index rows")
        return top_k(np.asarray(popularity, dtype=np.float32), k, exclude)
    return top_k(emb @ user, k, exclude)


__all__ = [
    "ATTENTION_TEMPERATURE",
    "RECENCY_HALF_LIFE",
    "blend_query",
    "blend_scores",
    "popularity_scores",
    "recency_weights",
    "recommend",
    "top_k",
    "user_vector",
]
