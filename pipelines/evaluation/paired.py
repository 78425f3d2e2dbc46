"""Paired comparison of two models on the same queries: a bootstrap confidence interval of the mean difference."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class PairedDifference:
    """Mean over queries of (candidate - champion) and its bootstrap confidence interval [low, high]."""

    metric: str
    queries: int
    candidate: float  # the candidate's mean over the paired queries
    champion: float
    mean_difference: float
    low: float
    high: float
    confidence: float
    resamples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_bootstrap(
    candidate: Mapping[str, float],
    champion: Mapping[str, float],
    metric: str = "ndcg_at_10",
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> PairedDifference:
    """Per-query values of two models on the same queries -> the paired bootstrap CI of their mean difference.

    Queries are resampled with replacement, both models' values together (scipy.stats.bootstrap, paired=True), so
    the interval reflects how much the mean difference depends on which queries the held-out split happened to hold.
    Percentile intervals: BCa's jackknife is undefined when every difference is equal (two identical models), the
    case a re-run against itself produces. Seeded, so one decision is reproducible.

    Both must cover the same queries (same snapshot, same code); anything else is a bug upstream and raises.
    """
    from scipy.stats import bootstrap

    if set(candidate) != set(champion):
        only_c, only_p = sorted(set(candidate) - set(champion)), sorted(set(champion) - set(candidate))
        raise ValueError(
            f"paired {metric}: the models were scored on different queries "
            f"({len(only_c)} only the candidate's, e.g. {only_c[:3]}; {len(only_p)} only the champion's, e.g. "
            f"{only_p[:3]})"
        )
    if not candidate:
        raise ValueError(f"paired {metric}: no queries to compare on")
    terms = sorted(candidate)
    new = np.asarray([candidate[t] for t in terms], np.float64)
    old = np.asarray([champion[t] for t in terms], np.float64)
    diff = new - old
    mean = float(diff.mean())
    if np.all(diff == diff[0]):  # every resample has the same mean: the interval is that point
        low = high = mean
    else:
        ci = bootstrap(
            (new, old),
            lambda a, b, axis: np.mean(a - b, axis=axis),
            paired=True,
            vectorized=True,
            n_resamples=resamples,
            confidence_level=confidence,
            method="percentile",
            rng=np.random.default_rng(seed),
        ).confidence_interval
        low, high = float(ci.low), float(ci.high)
    return PairedDifference(
        metric=metric,
        queries=len(terms),
        candidate=float(new.mean()),
        champion=float(old.mean()),
        mean_difference=mean,
        low=low,
        high=high,
        confidence=confidence,
        resamples=resamples,
    )
