"""Drift of a window against the reference with Evidently: query text (a TF-IDF domain classifier), query embeddings
(a classifier over the champion's embeddings) and the answered category's distribution, and the HTML report."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from pipelines.config import MonitorConfig
from pipelines.monitoring.decision import DriftResult
from pipelines.monitoring.windows import CATEGORY, QUERY, Window


def drift_tests(
    reference: Window,
    current: Window,
    reference_embeddings: np.ndarray,
    current_embeddings: np.ndarray,
    cfg: MonitorConfig,
) -> tuple[dict[str, DriftResult], str]:
    """The three drift tests keyed by signal (decision.DRIFT_SIGNALS), each Evidently's own statistic and verdict at
    the configured method and threshold, and the HTML report of the query text and category tests.

    The embedding test is Evidently's model method called directly rather than its EmbeddingsDrift report metric:
    that metric also projects both windows with t-SNE for its plot, which took 18 s of a 20 s report on 380 points
    (2 cores) and grows with the reference; the statistic and verdict are the same function's.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift
    from evidently.metrics.embeddings import ModelDriftMethod

    definition = DataDefinition(text_columns=[QUERY], categorical_columns=[CATEGORY])
    report = Report(
        metrics=[
            ValueDrift(column=QUERY, method=cfg.text_drift_method, threshold=cfg.text_drift_threshold),
            ValueDrift(column=CATEGORY, method=cfg.category_drift_method, threshold=cfg.category_drift_threshold),
        ],
        include_tests=True,
    )
    snapshot = report.run(
        current_data=Dataset.from_pandas(current.queries.reset_index(drop=True), data_definition=definition),
        reference_data=Dataset.from_pandas(reference.queries.reset_index(drop=True), data_definition=definition),
    )
    results = _value_drifts(snapshot, {QUERY: "query_text", CATEGORY: "category"})
    method = ModelDriftMethod(bootstrap=True, quantile_probability=cfg.embedding_drift_quantile)
    score, detected, name = method(_vectors(current_embeddings), _vectors(reference_embeddings))
    results["query_embedding"] = DriftResult(
        float(score), bool(detected), f"{name} (bootstrap)", cfg.embedding_drift_quantile
    )
    return results, snapshot.get_html_str(as_iframe=False)


def _vectors(embeddings: np.ndarray) -> pd.DataFrame:
    """A fresh frame per call (the method adds its label column to what it gets), with string column names."""
    vectors = np.asarray(embeddings, dtype=np.float64)
    return pd.DataFrame(vectors, columns=[f"e{i}" for i in range(vectors.shape[1])])


def _value_drifts(snapshot: Any, signals: dict[str, str]) -> dict[str, DriftResult]:
    """{signal: result} of the report's ValueDrift metrics (`signals`: column -> signal): the metric's value is the
    score, its default test (FAIL = drift detected at the metric's method and threshold) the verdict."""
    scores = {
        m["config"].get("column"): float(m["value"])
        for m in snapshot.dict()["metrics"]
        if m["config"]["type"].endswith(":ValueDrift")
    }
    out = {}
    for test in snapshot.tests_results:
        params = test.metric_config.params
        column = params.get("column")
        if column in signals and column in scores:
            detected = str(getattr(test.status, "value", test.status)) == "FAIL"
            score = scores[column] if math.isfinite(scores[column]) else None
            out[signals[column]] = DriftResult(score, detected, str(params["method"]), float(params["threshold"]))
    missing = sorted(set(signals.values()) - set(out))
    if missing:
        raise RuntimeError(f"the drift report has no verdict for {missing} (Evidently's ValueDrift tests changed?)")
    return out
