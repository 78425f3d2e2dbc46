"""Personalisation with real components: point-in-time histories from Feast, the registered encoder, MLflow logging."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest

from pipelines.config import Paths
from pipelines.evaluation.personalization import evaluate_registered, heldout_events, point_in_time_histories
from pipelines.features.store import apply_feature_repo, build_feature_tables, write_feature_tables
from pipelines.runtime import personalize as P

if TYPE_CHECKING:
    from tests.integration.conftest import RegisteredChampion

T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)


def _log(rows: list[tuple[int, int, str, datetime, str]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["user_id", "product_id", "event_type", "event_timestamp", "query"])
    df["event_timestamp"] = pd.to_datetime(df["event_timestamp"], utc=True)
    return df


def test_heldout_events_are_the_later_clicks_once_each() -> None:
    log = _log(
        [
            (1, 10, "click", T0, "drill"),
            (1, 20, "view", T0 + timedelta(days=2), "drill"),
            (1, 20, "click", T0 + timedelta(days=2), "drill"),
            (1, 20, "click", T0 + timedelta(days=3), "drill"),  # the same (user, query, product) again
            (2, 30, "click", T0 + timedelta(days=3), "saw"),
            (2, 40, "purchase", T0 + timedelta(days=3), "saw"),
        ]
    )
    held = heldout_events(log, T0 + timedelta(days=1))
    assert held[["user_id", "product_id"]].values.tolist() == [[1, 20], [2, 30]]
    assert held["event_timestamp"].iloc[0] == pd.Timestamp(T0 + timedelta(days=2))


def test_evaluation_histories_never_see_the_event_or_its_future(tmp_path) -> None:
    paths = Paths(tmp_path)
    log = _log(
        [
            (1, 10, "click", T0, "drill"),
            (1, 20, "click", T0 + timedelta(days=1), "drill bits"),
            (1, 30, "click", T0 + timedelta(days=2, hours=3), "drill case"),
        ]
    )
    # as_of falls exactly on the second click: a feature row is stamped at that instant and includes it.
    as_of = T0 + timedelta(days=1)
    write_feature_tables(build_feature_tables(log, as_of, recent_n=10), paths)
    apply_feature_repo(paths)
    held = heldout_events(log[log["event_timestamp"] <= as_of], T0 + timedelta(hours=1))
    assert held["product_id"].tolist() == [20]
    assert point_in_time_histories(paths, held) == [[10]]  # not [20, 10]: the event itself never leaks


@pytest.fixture(scope="module")
def bundle(champion: RegisteredChampion):
    from pipelines.runtime.encoder import OnnxEncoder
    from pipelines.runtime.index import ProductIndex

    return OnnxEncoder.load(champion.bundle_dir, threads=1), ProductIndex.load(champion.bundle_dir)


def test_real_encoder_history_of_one_kind_moves_that_kind_up(champion: RegisteredChampion, bundle) -> None:
    """A user who interacted with products of one search term: the term's other products rank higher for an
    unrelated query, and lead the history-only recommendations."""
    encoder, index = bundle
    judged = pd.read_parquet(champion.snapshot_dir / "judgments_train.parquet")
    judged = judged.assign(term=judged["search_term"].str.strip().str.lower())
    sizes = judged.groupby("term")["product_uid"].nunique()
    term = str(sizes[sizes >= 6].index[0])
    kind = list(dict.fromkeys(int(p) for p in judged.loc[judged["term"] == term, "product_uid"]))
    history, others = index.rows_of(kind[:3]), index.rows_of(kind[3:])
    assert len(history) == 3 and len(others) >= 3
    other_terms = judged.groupby("term")["product_uid"].apply(set)
    query = next(t for t, products in other_terms.items() if not products & set(kind))
    q = encoder.encode([query])[0][0]
    user = P.user_vector(index.embeddings[history], q)

    def mean_rank(scores: np.ndarray) -> float:
        order = np.argsort(-scores, kind="stable")
        position = np.empty(len(order), np.int64)
        position[order] = np.arange(len(order))
        return float(position[others].mean())

    plain = mean_rank(P.blend_scores(index.embeddings, q))
    personal = mean_rank(P.blend_scores(index.embeddings, q, user, 0.3))
    assert personal < plain, (term, query, plain, personal)
    rows, _ = P.recommend(index.embeddings, history, 10)
    assert not set(rows) & set(history)
    assert set(rows) & set(others), (term, [index.titles[r] for r in rows])


def test_evaluation_of_the_registered_champion_is_logged_to_mlflow(champion: RegisteredChampion) -> None:
    from pipelines.registry import mlflow_client as registry

    result = evaluate_registered(
        champion.snapshot_dir / "events.parquet",
        champion.as_of,
        paths=champion.paths,
        model_name=champion.model_name,
        heldout_days=7,
        sweep=(1.0,),
    )
    assert result["version"] == champion.version
    assert result["events"] > 0 and result["events_with_history"] <= result["events"]
    for name in (
        "plain_hit_rate_at_10",
        "personalized_hit_rate_at_10",
        "plain_ndcg_at_10",
        "personalized_ndcg_at_10",
        "recommend_hit_rate_at_10",
        "popularity_hit_rate_at_10",
        "sweep_w1_hit_rate_at_10",
    ):
        assert 0.0 <= result[name] <= 1.0, name
    assert result["delta_hit_rate_at_10"] == pytest.approx(
        result["personalized_hit_rate_at_10"] - result["plain_hit_rate_at_10"]
    )
    assert result["delta_hit_rate_at_10_ci95_low"] <= result["delta_hit_rate_at_10_ci95_high"]
    assert not math.isnan(result["plain_ndcg_at_10"])
    run = registry.client(champion.paths).get_run(result["run_id"])
    assert run.data.metrics["personalization.personalized_hit_rate_at_10"] == pytest.approx(
        result["personalized_hit_rate_at_10"]
    )
    assert run.data.tags["model_version"] == champion.version
    assert run.data.params["personalization.feature_service"] == "search_v2"
