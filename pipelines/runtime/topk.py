"""Top-k selection: the k best scores, best first, equal scores in row order; every ranking in the project uses it."""

from __future__ import annotations

import numpy as np


def top_k(
    scores: np.ndarray, k: int, exclude_rows: np.ndarray | list[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores) of the k highest scores, best first, equal scores in row order.

    `scores` is (n,) for one ranking or (m, n) for m rankings of the same n rows; the results have the same number
    of dimensions, with min(k, n) columns. `exclude_rows` (row numbers: positions along the last axis) are never
    returned, so fewer than k come back when fewer than k rows are left.

    One argpartition (O(n)) and a sort of the k picked, instead of sorting all n. Where equal scores straddle the
    k-th place, which of them get in is argpartition's choice, as it always was here: BM25 scores tie there all the
    time (every product without a query term has the same floor score), and a rule of our own would change every
    hybrid ranking and evaluation figure built so far.
    """
    scores = np.asarray(scores)
    if scores.ndim == 2:  # each ranking on its own: the same picks as one at a time, bit for bit
        picks = [top_k(row, k, exclude_rows) for row in scores]
        if not picks:
            width = min(max(int(k), 0), scores.shape[1])
            return np.zeros((0, width), np.int64), np.zeros((0, width), scores.dtype)
        return np.stack([rows for rows, _ in picks]), np.stack([top for _, top in picks])
    n = len(scores)
    if exclude_rows is not None and len(exclude_rows):
        excluded = np.unique(np.asarray(exclude_rows, dtype=np.int64))
        scores = scores.copy()
        scores[excluded] = -np.inf
        n -= len(excluded)
    k = max(0, min(int(k), n))
    rows = np.argpartition(-scores, k - 1)[:k] if 0 < k < len(scores) else np.arange(k)
    rows.sort()  # row order first: the stable sort by score below keeps equal scores in row order
    rows = rows[np.argsort(-scores[rows], kind="stable")].astype(np.int64, copy=False)
    return rows, scores[rows]
