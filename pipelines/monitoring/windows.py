"""The two sides of a monitored window: the reference (the champion's training terms) and the current window (the
request log's answers in [start, end) and the feedback events that follow them), and the window's answer health."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

QUERY, CATEGORY = "query", "category"
# the category column's value for an abstention (the served answer `null`): one more value of the distribution
ABSTAINED = "(abstained)"


@dataclass(frozen=True)
class Window:
    """Queries (one row each) with the category the served model answered, on one side of the comparison."""

    queries: pd.DataFrame  # columns QUERY, CATEGORY

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def texts(self) -> list[str]:
        return self.queries[QUERY].tolist()


def sample_terms(terms: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """Up to `n` distinct, non-empty terms, a deterministic sample (the same terms every window of one champion)."""
    unique = sorted({t.strip() for t in terms if isinstance(t, str) and t.strip()})
    if len(unique) <= n:
        return unique
    picked = np.random.default_rng(seed).choice(len(unique), size=n, replace=False)
    return [unique[i] for i in sorted(picked)]


def categories_of(answers: Sequence[str | None]) -> list[str]:
    """Served category answers as distribution values: an abstention (None) is ABSTAINED."""
    return [a if a is not None else ABSTAINED for a in answers]


def reference_window(terms: Sequence[str], categories: Sequence[str | None]) -> Window:
    """The reference: training terms and the champion's own category answers for them."""
    return Window(pd.DataFrame({QUERY: list(terms), CATEGORY: categories_of(categories)}))


def search_answers(log: pa.Table) -> pd.DataFrame:
    """The request log's /v1/search answers (recommendations have no query), oldest first."""
    frame = log.to_pandas()
    return frame[frame["endpoint"] == "search"].reset_index(drop=True)


def current_window(answers: pd.DataFrame, distinct: bool) -> Window:
    """The window's queries with the category each was answered; `distinct`: each query once (case-insensitive, its
    first answer), comparable with the reference's distinct terms."""
    frame = answers[answers[QUERY].notna()]
    if distinct:
        frame = frame.loc[~frame[QUERY].str.lower().duplicated()]
    return Window(pd.DataFrame({QUERY: frame[QUERY].tolist(), CATEGORY: categories_of(frame[CATEGORY].tolist())}))


def _quantile(values: pd.Series, q: float) -> float | None:
    return float(values.quantile(q)) if len(values) else None


def answer_health(answers: pd.DataFrame, low_score: float) -> dict[str, Any]:
    """Requests, distinct queries, the share of empty answers and of answers whose best score is below `low_score`,
    and the latency p50 / p99 (ms, in the app, as the service's histogram measures it)."""
    n = len(answers)
    sizes = answers["product_ids"].map(len) if n else pd.Series(dtype="int64")
    best = answers["scores"].map(lambda s: float(s[0]) if len(s) else np.nan) if n else pd.Series(dtype="float64")
    answered = best.dropna()
    return {
        "requests": n,
        "distinct_queries": int(answers[QUERY].dropna().str.lower().nunique()) if n else 0,
        "empty_rate": float((sizes == 0).mean()) if n else None,
        "low_score_rate": float((answered < low_score).mean()) if len(answered) else None,
        "latency_p50_ms": _quantile(answers["latency_ms"], 0.50),
        "latency_p99_ms": _quantile(answers["latency_ms"], 0.99),
    }


def engagement_by_version(answers: pd.DataFrame, events: pa.Table) -> list[dict[str, Any]]:
    """Per model version that answered: searches, and the share of them followed by at least one click (CTR) and by
    at least one add-to-cart, from the feedback events joined on request_id.

    Only events already in the log count, so answers near the window's end (their clicks still to come) pull the
    rates down a little: compare windows with each other, not with an offline click model.
    """
    if answers.empty:
        return []
    frame = events.select(["request_id", "event_type"]).to_pandas() if events.num_rows else None
    out = []
    for version, group in answers.groupby("model_version", sort=True):
        ids = set(group["request_id"])
        row: dict[str, Any] = {"model_version": str(version), "searches": len(group)}
        for event_type, name in (("click", "ctr"), ("add_to_cart", "add_to_cart_rate")):
            if frame is None:
                row[name] = 0.0
                continue
            hit = frame.loc[(frame["event_type"] == event_type) & frame["request_id"].isin(ids), "request_id"]
            row[name] = hit.nunique() / len(group)
        out.append(row)
    return out
