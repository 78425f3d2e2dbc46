"""The shipped data, the project-wide split rules and the simulated event log."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pipelines.data.dataset import (
    catalog_from,
    is_heldout_term,
    load_judgments,
    load_offers,
    select_terms,
    simulate_events,
    split_judgments,
    split_offers,
)
from pipelines.evaluation.evaluate import heldout_qrels

END = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def judgments():
    return load_judgments()


def test_heldout_split_matches_the_project_figures(judgments):
    train, heldout = split_judgments(judgments)
    assert heldout["search_term"].nunique() == 1499 and len(heldout) == 9292
    assert len(heldout_qrels(heldout)) == 1326
    assert len(catalog_from(judgments)) == 54667
    assert not set(train["search_term"].str.strip().str.lower()) & set(heldout["search_term"].str.strip().str.lower())


def test_heldout_rule_normalises_the_term():
    assert is_heldout_term("Angle Bracket") == is_heldout_term("  angle bracket ")


def test_offers_split_by_cluster():
    train, test = split_offers(load_offers())
    assert len(train) + len(test) == 35311
    assert not set(train["cluster_id"]) & set(test["cluster_id"])
    assert train["category_label"].nunique() == 10


def test_select_terms_is_deterministic_and_keeps_unusable_rows(judgments):
    a, b = select_terms(judgments, 50), select_terms(judgments, 50)
    assert a.equals(b) and a["search_term"].nunique() == 50
    broken = judgments.head(20).copy()
    broken.loc[0, "search_term"] = None
    assert broken["search_term"].isna().sum() == select_terms(broken, 10)["search_term"].isna().sum() == 1


def test_event_log_is_simulated_deterministically(judgments):
    sample = select_terms(judgments, 100)
    a = simulate_events(sample, 50, END, days=14, seed=3)
    b = simulate_events(sample, 50, END, days=14, seed=3)
    assert a.equals(b)
    assert not a.equals(simulate_events(sample, 50, END, days=14, seed=4))
    assert set(a["event_type"]) <= {"view", "click", "add_to_cart", "purchase"}
    assert a["event_timestamp"].max() <= END and a["event_timestamp"].min() >= END - timedelta(days=14)
    assert set(a["product_id"]) <= set(sample["product_uid"])


def test_clicks_rise_with_graded_relevance(judgments):
    sample = select_terms(judgments, 400)
    events = simulate_events(sample, 400, END, seed=1)
    grade = sample.drop_duplicates(["search_term", "product_uid"]).set_index(
        [sample["search_term"].str.strip().str.lower(), "product_uid"]
    )["relevance"]
    views = events[events["event_type"] == "view"]
    clicked = set(
        zip(
            events.loc[events["event_type"] == "click", "user_id"],
            events.loc[events["event_type"] == "click", "product_id"],
            strict=True,
        )
    )
    views = views.assign(
        clicked=[(u, p) in clicked for u, p in zip(views["user_id"], views["product_id"], strict=True)],
        relevance=[grade.get((q, p)) for q, p in zip(views["query"], views["product_id"], strict=True)],
    )
    high = views[views["relevance"] >= 2.67]["clicked"].mean()
    low = views[views["relevance"] <= 1.67]["clicked"].mean()
    assert high > low + 0.2
