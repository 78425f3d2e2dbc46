"""Retraining learns from feedback: the skip-above pair rule on hand-built log rows, the held-out terms kept out, the
judged-at-launch snapshot, feedback pairs in the training sets, and where the champion's feedback window starts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import DataConfig, Paths, TrainConfig
from pipelines.data.dataset import (
    Snapshot,
    is_heldout_term,
    is_judged_at_launch,
    is_training_term,
    is_validation_term,
    normalize_term,
    snapshot_data,
)
from pipelines.data.feedback import (
    COLUMNS,
    FEEDBACK_TABLE,
    MAX_TERM_CHARS,
    SEARCHED_TABLE,
    FeedbackSource,
    feedback_pairs,
)
from pipelines.runtime.event_log import SCHEMA as EVENT_SCHEMA
from pipelines.runtime.event_log import EventRecord
from pipelines.runtime.logfolder import partition_name, to_batch
from pipelines.runtime.request_log import SCHEMA as REQUEST_SCHEMA
from pipelines.runtime.request_log import RequestRecord
from pipelines.training.finetune import feedback_judgments, training_sets

NAMES = [f"synthetic term {i}" for i in range(200)]
TRAIN_TERMS = [t for t in NAMES if is_training_term(t)]
HELDOUT_TERMS = [t for t in NAMES if is_heldout_term(t)]
VALIDATION_TERMS = [t for t in NAMES if is_validation_term(t)]
CATALOG = pd.DataFrame({"product_uid": range(1, 11), "product_title": [f"title {i}" for i in range(1, 11)]})


def _answers(rows: list[tuple[str, str | None, list[int]]], endpoint: str = "search") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "request_id": [r[0] for r in rows],
            "endpoint": endpoint,
            "query": [r[1] for r in rows],
            "product_ids": [r[2] for r in rows],
        }
    )


def _events(rows: list[tuple[str, int, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["request_id", "product_id", "event_type"])


def _labels(pairs: pd.DataFrame) -> dict[tuple[str, int], str]:
    return {(t, int(p)): str(label) for t, p, label in pairs[["search_term", "product_uid", "label"]].itertuples(False)}


def test_clicked_products_are_positives_and_skipped_above_ones_negatives() -> None:
    a, b = TRAIN_TERMS[:2]
    answers = _answers(
        [
            ("r1", f"  {a.upper()} ", [1, 2, 3, 4, 5]),  # interactions at ranks 2 and 4: ranks 1 and 3 were skipped
            ("r2", a, [6, 7, 8]),  # no event: says nothing, not even about rank 1
            ("r3", b, [2, 1, 3]),  # an event on rank 1 only: nothing above it, so no negative
            ("r4", b, [2, 9]),  # 2 skipped here, clicked on r3: a pair is positive when any answer acted on it
        ]
    )
    events = _events(
        [
            ("r1", 2, "click"),
            ("r1", 2, "click"),  # the same event twice (a retry) counts once
            ("r1", 4, "click"),
            ("r1", 4, "add_to_cart"),
            ("r1", 4, "purchase"),
            ("r1", 10, "add_to_cart"),  # not shown (from the product page): positive, and no position
            ("r3", 2, "click"),
            ("r4", 9, "click"),
            ("gone", 1, "click"),  # its answer is outside the window
        ]
    )
    pairs, stats = feedback_pairs(answers, events, CATALOG)
    assert list(pairs.columns) == list(COLUMNS)
    assert _labels(pairs) == {
        (a, 1): "negative",
        (a, 2): "positive",
        (a, 3): "negative",
        (a, 4): "positive",
        (a, 10): "positive",
        (b, 2): "positive",
        (b, 9): "positive",
    }
    row = pairs.set_index(["search_term", "product_uid"])
    assert row.loc[(a, 4), ["clicks", "add_to_carts", "purchases", "skips", "answers"]].tolist() == [1, 1, 1, 0, 1]
    assert row.loc[(a, 2), "clicks"] == 1  # the retried click once
    assert row.loc[(b, 2), ["clicks", "skips", "answers"]].tolist() == [1, 1, 1]
    assert row.loc[(a, 3), "product_title"] == "title 3"
    assert (stats.pairs, stats.positives, stats.negatives) == (7, 5, 2)
    assert (stats.answers, stats.answers_with_events, stats.events_unmatched) == (4, 3, 1)


def test_heldout_and_validation_terms_never_become_pairs() -> None:
    train, held, val = TRAIN_TERMS[0], HELDOUT_TERMS[0], VALIDATION_TERMS[0]
    answers = pd.concat(
        [
            _answers([("t", train, [1, 2]), ("h1", held, [1, 2]), ("h2", held.upper(), [3]), ("v", val, [1, 2])]),
            _answers([("rec", None, [1, 2])], endpoint="recommend"),  # no query: nothing to learn for a term
            _answers([("long", "x" * (MAX_TERM_CHARS + 1), [1, 2])]),  # no query the service or validation takes
        ]
    )
    events = _events(
        [("t", 2, "click"), ("h1", 2, "purchase"), ("h2", 3, "click"), ("v", 2, "click"), ("rec", 2, "click")]
        + [("long", 2, "click")]
    )
    catalog = CATALOG[CATALOG["product_uid"] != 1]  # product 1 is not in this snapshot's catalog: no title
    pairs, stats = feedback_pairs(answers, events, catalog)
    assert _labels(pairs) == {(train, 2): "positive"}
    assert not any(is_heldout_term(t) or is_validation_term(t) for t in pairs["search_term"])
    assert (stats.heldout_answers, stats.dropped_heldout) == (2, 3)  # (held, 1) (held, 2) (held, 3)
    assert stats.dropped_validation == 2 and stats.dropped_unknown_product == 1  # (train, 1) had no title
    assert stats.answers == 4 and stats.events_unmatched == 2  # the recommendation's and the long query's clicks
    empty, none = feedback_pairs(answers.iloc[:0], events.iloc[:0], catalog)
    assert empty.empty and dict(empty.dtypes.astype(str)) == {
        c: str(pd.Series(dtype=t).dtype) for c, t in COLUMNS.items()
    }
    assert none.pairs == none.answers == 0


AS_OF = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SMALL = {"max_terms": 300, "max_offers": 200, "event_users": 10}


def _write(folder: Path, records: list, schema: pa.Schema) -> None:
    day = records[0].ts
    part = folder / partition_name(day.date()) / "part-test-0.parquet"
    part.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_batches([to_batch(records, schema)]), part)


def _answer(rid: str, ts: datetime, query: str, products: list[int]) -> RequestRecord:
    scores = [1.0 - 0.1 * i for i in range(len(products))]
    return RequestRecord(
        rid, ts, "search", "1", query, 7, len(products), None, products, scores, False, None, None, 5.0
    )


def _click(rid: str, ts: datetime, product: int, position: int, kind: str = "click") -> EventRecord:
    return EventRecord(ts + timedelta(seconds=3), rid, 7, product, kind, ts, position, "1")  # type: ignore[arg-type]


class Snapshots(NamedTuple):
    full: Snapshot  # every training term judged, no traffic
    launch: Snapshot  # 40% judged at launch, no traffic
    feedback: Snapshot  # 40% judged at launch, with the logged traffic
    term: str  # a click-only training term the traffic searched
    shown: list[int]  # what its answer showed, best first (the second was clicked)


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory: pytest.TempPathFactory) -> Snapshots:
    """The same 300 terms judged in full and at 40%, the latter with a click on a click-only term's answer, one on a
    held-out term's, and one before the feedback window."""
    root = tmp_path_factory.mktemp("feedback-snapshots")
    full = snapshot_data(DataConfig(**SMALL), root / "full", AS_OF)
    judgments = pd.concat([full.table("judgments_train"), full.table("judgments_heldout")])
    by_term = judgments.assign(term=judgments["search_term"].map(normalize_term)).groupby("term")["product_uid"]
    click_only = next(t for t, g in by_term if is_training_term(t) and not is_judged_at_launch(t, 0.4) and len(g) > 2)
    held = next(t for t, g in by_term if is_heldout_term(t) and len(g) > 1)
    shown, shown_held = by_term.get_group(click_only).tolist()[:3], by_term.get_group(held).tolist()[:2]
    since, at = AS_OF - timedelta(days=2), AS_OF - timedelta(hours=1)
    answers = [
        _answer("in", at, click_only, shown),
        _answer("held", at, held, shown_held),
        _answer("old", since - timedelta(hours=1), click_only, shown),
    ]
    events = [_click("in", at, shown[1], 1), _click("held", at, shown_held[1], 1), _click("old", since, shown[2], 2)]
    _write(root / "requests", answers, REQUEST_SCHEMA)
    _write(root / "events", events, EVENT_SCHEMA)
    cfg = DataConfig(**SMALL, judged_at_launch=0.4)
    return Snapshots(
        full,
        snapshot_data(cfg, root / "launch", AS_OF),  # no feedback asked for: none read
        snapshot_data(
            cfg, root / "feedback", AS_OF, feedback=FeedbackSource(since, root / "requests", root / "events")
        ),
        click_only,
        [int(p) for p in shown],
    )


def test_judged_at_launch_keeps_that_share_of_training_terms_and_the_test_set_as_is(
    snapshots: Snapshots,
) -> None:
    full, launch = snapshots.full, snapshots.launch
    terms = full.table("judgments_train")["search_term"].map(normalize_term)
    kept = launch.table("judgments_train")["search_term"].map(normalize_term)
    training = {t for t in terms if is_training_term(t)}
    judged = {t for t in training if is_judged_at_launch(t, 0.4)}
    assert set(kept) == judged | {t for t in terms if not is_training_term(t)}  # validation terms keep every row
    assert 0.25 < len(judged) / len(training) < 0.55 and set(kept) < set(terms)
    full_rows = full.table("judgments_train")
    assert launch.table("judgments_train").equals(full_rows[terms.isin(set(kept))].reset_index(drop=True))
    for table in ("judgments_heldout", "catalog", "offers_train", "offers_test", "events"):
        assert launch.table(table).equals(full.table(table)), table  # the test set and the shop are the same
    assert launch.hash != full.hash
    manifest = pd.read_json(launch.path / "manifest.json", typ="series")
    assert manifest["judged_at_launch"]["judged_terms"] == len(judged)
    assert manifest["judged_at_launch"]["click_only_terms"] == len(training - judged)


def test_the_snapshot_holds_the_window_feedback_without_heldout_terms(snapshots: Snapshots) -> None:
    launch, snap, term, shown = snapshots.launch, snapshots.feedback, snapshots.term, snapshots.shown
    pairs = snap.table(FEEDBACK_TABLE)
    assert _labels(pairs) == {(term, shown[0]): "negative", (term, shown[1]): "positive"}  # "old" is before `since`
    assert launch.table(FEEDBACK_TABLE).empty and launch.hash != snap.hash  # the hash covers the feedback
    assert pd.read_json(launch.path / "manifest.json", typ="series")["feedback"] is None
    window = pd.read_json(snap.path / "manifest.json", typ="series")["feedback"]
    assert window["since"] == (AS_OF - timedelta(days=2)).isoformat() and window["until"] == AS_OF.isoformat()
    assert (window["heldout_answers"], window["dropped_heldout"], window["pairs"]) == (1, 2, 2)


def test_feedback_pairs_reach_the_training_sets(snapshots: Snapshots) -> None:
    snap, term, shown = snapshots.feedback, snapshots.term, snapshots.shown
    judgments = snap.table("judgments_train")
    assert term not in set(judgments["search_term"].map(normalize_term))  # its relevance comes only from the click
    titles = dict(zip(snap.table("catalog")["product_uid"], snap.table("catalog")["product_title"], strict=True))
    cfg = TrainConfig(mined_negatives=False, feedback_weight=2.0)
    extra, counts = feedback_judgments(snap.table(FEEDBACK_TABLE), judgments, cfg.feedback_weight, cfg.seed)
    assert counts == {
        "feedback_positive_pairs": 1,
        "feedback_positive_rows": 2,
        "feedback_negative_rows": 1,
        "feedback_judged_overlap": 0,
    }
    sets = training_sets(pd.concat([judgments, extra], ignore_index=True), snap.table("offers_train"), cfg)
    mine = sets["triplets"][sets["triplets"]["anchor"] == term]
    assert mine["positive"].tolist() == [titles[shown[1]]] * 2  # the weight: two copies
    assert set(mine["negative"]) == {titles[shown[0]]}  # the skipped-above product is its hard negative
    off, nothing = feedback_judgments(snap.table(FEEDBACK_TABLE), judgments, 0.0, cfg.seed)
    assert off.empty and nothing["feedback_positive_rows"] == 0


def test_feedback_weight_is_an_expected_count_and_judgments_win() -> None:
    terms = TRAIN_TERMS[:40]
    feedback = pd.DataFrame(
        {
            "search_term": terms + [HELDOUT_TERMS[0]],
            "product_uid": range(41),
            "product_title": [f"title {i}" for i in range(41)],
            "label": ["positive"] * 39 + ["negative", "positive"],
        }
    )
    judged = pd.DataFrame({"search_term": [terms[0].upper()], "product_title": ["title 0"], "relevance": [1.0]})
    rows, counts = feedback_judgments(feedback, judged, 1.5, seed=0)
    assert counts["feedback_judged_overlap"] == 1  # the human judged (term 0, title 0): the click is not needed
    assert counts["feedback_positive_pairs"] == 38 and 38 < counts["feedback_positive_rows"] < 76
    assert len(rows) == counts["feedback_positive_rows"] + 1
    assert set(rows["relevance"]) == {3.0, 1.0} and HELDOUT_TERMS[0] not in set(rows["search_term"])
    again, _ = feedback_judgments(feedback, judged, 1.5, seed=0)
    assert again.equals(rows)  # seeded


def test_the_snapshot_step_reads_the_traffic_since_the_champions_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.config import MODEL_NAME
    from pipelines.data.dataset import load_judgments, select_terms
    from pipelines.registry import mlflow_client as registry
    from pipelines.steps import retrain

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # a champion of its own
    monkeypatch.setenv("SHOPGUIDE_REQUEST_LOG_DIR", str(tmp_path / "requests"))
    monkeypatch.setenv("SHOPGUIDE_EVENT_LOG_DIR", str(tmp_path / "events"))
    paths = Paths.from_env()
    c = registry.client(paths)
    c.create_registered_model(MODEL_NAME)
    exp = registry.experiment_id(paths)

    def version(run_tags: dict[str, str], version_tags: dict[str, str]) -> str:
        run = c.create_run(exp, tags=run_tags)
        return str(
            c.create_model_version(MODEL_NAME, run.info.artifact_uri, run.info.run_id, tags=version_tags).version
        )

    since = AS_OF - timedelta(days=1)
    champion = version({}, {registry.DATA_AS_OF_TAG: since.isoformat()})
    on_run = version({registry.DATA_AS_OF_TAG: "2026-02-01T00:00:00+00:00"}, {})
    untagged = version({}, {})
    assert registry.data_as_of(paths, MODEL_NAME, champion) == since
    assert registry.data_as_of(paths, MODEL_NAME, on_run) == datetime(2026, 2, 1, tzinfo=UTC)
    start_ms = c.get_run(c.get_model_version(MODEL_NAME, untagged).run_id).info.start_time
    assert registry.data_as_of(paths, MODEL_NAME, untagged) == datetime.fromtimestamp(start_ms / 1000, UTC)
    registry.set_alias(paths, MODEL_NAME, registry.CHAMPION, champion)

    judged = select_terms(load_judgments(), 300)  # the tiny profile's terms
    term = next(t for t in judged["search_term"].map(normalize_term) if is_training_term(t))
    products = judged.loc[judged["search_term"].map(normalize_term) == term, "product_uid"].tolist()[:2]
    answers = [_answer("new", AS_OF - timedelta(hours=1), term, products)]
    answers.append(_answer("before", since - timedelta(hours=1), term, products))  # the champion learnt from it
    _write(tmp_path / "requests", answers, REQUEST_SCHEMA)
    _write(tmp_path / "events", [_click("new", answers[0].ts, products[1], 1)], EVENT_SCHEMA)

    why = "asset shopguide_drift from shopguide_monitor/r: monitor window ...: vocabulary: ALARM"
    snap = retrain.snapshot({"profile": "tiny"}, f"feedback-{tmp_path.name}", AS_OF.isoformat(), {}, why)
    assert _labels(Snapshot.open(snap["snapshot_dir"]).table(FEEDBACK_TABLE)) == {
        (term, products[0]): "negative",
        (term, products[1]): "positive",
    }
    run = c.get_run(snap["mlflow_run_id"])
    assert run.data.tags[registry.DATA_AS_OF_TAG] == snap["data_as_of"] == AS_OF.isoformat()
    assert run.data.tags[retrain.TRIGGER_REASON_TAG] == why  # decide's trigger_reason, on the run it opens
    searched = Snapshot.open(snap["snapshot_dir"]).table(SEARCHED_TABLE)
    assert searched.to_dict("records") == [{"search_term": term, "answers": 1}]  # "before" predates the window
    metrics = run.data.metrics
    assert (metrics["feedback.pairs"], metrics["feedback.positives"], metrics["feedback.negatives"]) == (2, 1, 1)
    assert metrics["feedback.answers"] == 1 and metrics["feedback.dropped_heldout"] == 0
    assert metrics["feedback.searched_terms"] == 1
    assert run.data.params["feedback.since"] == since.isoformat() and run.data.params["feedback.champion"] == champion


def test_a_click_only_term_enters_the_pruned_vocabulary_texts(snapshots: Snapshots) -> None:
    """The vocabulary a "-vocab" variant is pruned to covers what shoppers searched (training terms only), so a new
    term's words are served whole after the next retrain; the held-out term of the traffic stays out."""
    from pipelines.compression.variants import vocabulary_texts

    launch, snap, term = snapshots.launch, snapshots.feedback, snapshots.term
    assert term not in vocabulary_texts(launch) and term in vocabulary_texts(snap)
    heldout = {normalize_term(t) for t in snap.table("judgments_heldout")["search_term"]}
    assert not heldout & set(snap.table(FEEDBACK_TABLE)["search_term"])
