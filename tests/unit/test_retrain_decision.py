"""Retrain only when there is something to learn: the decision table-driven (each rule, the threshold's edge), the
cheap count of new feedback, and the retrain DAG's first step reading its facts from the logs and MLflow."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import RetrainConfig
from pipelines.data.dataset import is_heldout_term, is_training_term, is_validation_term
from pipelines.data.feedback import FeedbackSource, count_new_feedback
from pipelines.data.newness import DriftEvent, NewData, Trigger, drift_event, should_retrain, trigger_reason
from pipelines.runtime.event_log import SCHEMA as EVENT_SCHEMA
from pipelines.runtime.event_log import EventRecord
from pipelines.runtime.logfolder import partition_name, to_batch
from pipelines.runtime.request_log import SCHEMA as REQUEST_SCHEMA
from pipelines.runtime.request_log import RequestRecord

CFG = RetrainConfig(min_new_feedback=10)
SINCE = datetime(2026, 3, 1, tzinfo=UTC)
WINDOW = SINCE + timedelta(days=2)
# a scheduled run with a champion and nothing new: the base every row changes one fact of
NOTHING = NewData("scheduled", "3", SINCE, 0, (), WINDOW, None)
# the monitor's drift announcement against the champion, from a window after its snapshot
DRIFTED = DriftEvent("3", SINCE + timedelta(hours=5), ("vocabulary",), "monitor window ...: vocabulary: ALARM")


@pytest.mark.parametrize(
    ("name", "facts", "go", "reason"),
    [
        ("no champion, scheduled", replace(NOTHING, champion=None, since=None), True, "no @champion yet"),
        ("no champion, manual", replace(NOTHING, run_type="manual", champion=None), True, "no @champion yet"),
        ("scheduled, nothing new", NOTHING, False, "scheduled run: nothing new to learn, skipped"),
        ("asset, nothing new", replace(NOTHING, run_type="asset_triggered"), False, "asset_triggered run: nothing"),
        ("feedback one short", replace(NOTHING, new_feedback=9), False, "9 answers with feedback"),
        ("feedback at the threshold", replace(NOTHING, new_feedback=10), True, "10 answers with feedback >= 10"),
        ("asset, feedback", replace(NOTHING, run_type="asset_triggered", new_feedback=50), True, ">= 10"),
        ("drift alarm", replace(NOTHING, alarms=("query_text",)), True, "the monitor alarmed (query_text)"),
        ("vocabulary alarm", replace(NOTHING, alarms=("vocabulary",)), True, "the monitor alarmed (vocabulary)"),
        ("no window since", replace(NOTHING, window_end=None), False, "no monitor window recorded"),
        ("judgments given", replace(NOTHING, judgments="new.csv"), True, "a judgments file was given"),
        ("a backfill is the machine's", replace(NOTHING, run_type="backfill"), False, "backfill run: nothing new"),
        ("manual always trains", replace(NOTHING, run_type="manual"), True, "manual run: trains"),
        (
            "manual, only with new data, nothing",
            replace(NOTHING, run_type="manual", only_with_new_data=True),
            False,
            "manual run with only_with_new_data: nothing new to learn, skipped",
        ),
        (
            "manual, only with new data, feedback",
            replace(NOTHING, run_type="manual", only_with_new_data=True, new_feedback=10),
            True,
            "manual run with only_with_new_data: new data: 10 answers",
        ),
        (
            "only_with_new_data means nothing to the machine's runs",
            replace(NOTHING, only_with_new_data=True),
            False,
            "scheduled run: nothing new",
        ),
        (
            # the latest window is quiet again: the announced window's drifted queries are still in the log
            "drift announced",
            replace(NOTHING, run_type="asset_triggered", drift_events=(DRIFTED,)),
            True,
            "asset_triggered run: new data: the monitor announced drift (vocabulary) in the window ending "
            "2026-03-01T05:00:00+00:00",
        ),
        (
            "drift announced against another version",
            replace(NOTHING, run_type="asset_triggered", drift_events=(replace(DRIFTED, model_version="2"),)),
            False,
            "drift announced against v2 (window ending 2026-03-01T05:00:00+00:00) ignored",
        ),
        (
            "drift announced before the champion's snapshot",
            replace(
                NOTHING,
                run_type="asset_triggered",
                drift_events=(replace(DRIFTED, window_end=SINCE - timedelta(hours=1)),),
            ),
            False,
            "nothing new to learn",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_should_retrain(name: str, facts: NewData, go: bool, reason: str) -> None:
    decision = should_retrain(facts, CFG)
    assert decision.go is go, decision.reason
    assert reason in decision.reason, decision.reason


def test_a_skip_says_what_was_counted() -> None:
    reason = should_retrain(replace(NOTHING, new_feedback=4), CFG).reason
    assert "since @champion 3's snapshot (2026-03-01T00:00:00+00:00): 4 answers with feedback" in reason
    assert "retrain.min_new_feedback 10" in reason and "no drift or vocabulary alarm" in reason
    assert "no judgments file" in reason


def test_the_drift_assets_extra_becomes_the_runs_drift_event_and_trigger_reason() -> None:
    extra = {
        "reason": "monitor window A -> B against @champion v3: vocabulary: ALARM, share 0.3 > 0.1",
        "alarms": ["vocabulary"],
        "window_end": "2026-03-01T05:00:00+00:00",
        "model_version": "3",
    }
    drift = Trigger("shopguide_drift", extra, SINCE, "shopguide_monitor/scheduled__x")
    assert drift_event(drift) == DriftEvent("3", SINCE + timedelta(hours=5), ("vocabulary",), extra["reason"])
    # emitted by hand through the API, without the monitor's fields: names the trigger, states no alarm
    by_hand = Trigger("shopguide_drift", {"note": "new brand launched"})
    assert drift_event(by_hand) is None and drift_event(Trigger("x", {"window_end": "never", "alarms": ["a"]})) is None
    assert drift_event(Trigger("x", {**extra, "alarms": []})) is None
    events = Trigger("shopguide_user_events", {"landed_until": "T"}, SINCE, "shopguide_features/r")
    assert trigger_reason("asset_triggered", [drift, events, by_hand]) == (
        f"asset shopguide_drift from shopguide_monitor/scheduled__x: {extra['reason']}; "
        'asset shopguide_user_events from shopguide_features/r: {"landed_until": "T"}; '
        'asset shopguide_drift from the API: {"note": "new brand launched"}'
    )
    assert trigger_reason("manual", []) == "manual run"
    assert trigger_reason("scheduled", []) == "the weekly schedule"
    assert trigger_reason("backfill", []) == "backfill run"


NAMES = [f"synthetic term {i}" for i in range(200)]
TRAIN, HELDOUT, VALIDATION = (
    next(t for t in NAMES if rule(t)) for rule in (is_training_term, is_heldout_term, is_validation_term)
)


def _write(folder: Path, records: list, schema: pa.Schema) -> None:
    """One rolled part per record's day, as the service's log writers leave them."""
    for i, record in enumerate(records):
        part = folder / partition_name(record.ts.date()) / f"part-test-{i}.parquet"
        part.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_batches([to_batch([record], schema)]), part)


def _answer(rid: str, ts: datetime, query: str, products: list[int]) -> RequestRecord:
    scores = [1.0 - 0.1 * i for i in range(len(products))]
    return RequestRecord(
        rid, ts, "search", "1", query, 7, len(products), None, products, scores, False, None, None, 5.0
    )


def _click(rid: str, ts: datetime, product: int, position: int, kind: str = "click") -> EventRecord:
    return EventRecord(ts + timedelta(seconds=3), rid, 7, product, kind, ts, position, "1")  # type: ignore[arg-type]


def _logs(folder: Path, until: datetime) -> None:
    """Answers with feedback in the window: two on a training term (one clicked twice, one carted), one each on a
    held-out and a validation term; a training-term answer without feedback, one before the window, one after."""
    at = until - timedelta(hours=1)
    answers = [
        _answer("a", at, TRAIN, [1, 2, 3]),
        _answer("b", at, TRAIN.upper(), [1, 2]),
        _answer("held", at, HELDOUT, [1, 2]),
        _answer("val", at, VALIDATION, [1, 2]),
        _answer("quiet", at, TRAIN, [1, 2]),
        _answer("old", SINCE - timedelta(hours=1), TRAIN, [1, 2]),
        _answer("late", until + timedelta(minutes=1), TRAIN, [1, 2]),
    ]
    events = [
        _click("a", at, 2, 1),
        _click("a", at, 3, 2),
        _click("b", at, 1, 0, "add_to_cart"),
        _click("held", at, 1, 0),
        _click("val", at, 1, 0),
        _click("old", SINCE, 1, 0),
        _click("late", until + timedelta(minutes=1), 1, 0),
    ]
    _write(folder / "requests", answers, REQUEST_SCHEMA)
    _write(folder / "events", events, EVENT_SCHEMA)


def test_new_feedback_counts_training_term_answers_with_an_event_in_the_window(tmp_path: Path) -> None:
    until = SINCE + timedelta(days=1)
    _logs(tmp_path, until)
    source = FeedbackSource(SINCE, tmp_path / "requests", tmp_path / "events")
    assert count_new_feedback(source, until) == 2
    assert count_new_feedback(replace(source, since=None), until) == 3  # the old answer too
    assert count_new_feedback(source, SINCE) == 0
    assert count_new_feedback(FeedbackSource(None, tmp_path / "no-requests", tmp_path / "no-events"), until) == 0


def test_the_decide_step_counts_since_the_champions_snapshot_and_reads_the_monitors_latest_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.config import MODEL_NAME, Paths, load_config
    from pipelines.registry import mlflow_client as registry
    from pipelines.steps import monitor, retrain

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # a champion of its own
    monkeypatch.setenv("SHOPGUIDE_REQUEST_LOG_DIR", str(tmp_path / "requests"))
    monkeypatch.setenv("SHOPGUIDE_EVENT_LOG_DIR", str(tmp_path / "events"))
    paths = Paths.from_env()
    until = SINCE + timedelta(days=1)
    params = {"profile": "tiny", "judgments_path": None, "only_with_new_data": True}

    first = retrain.decide(params, "scheduled", until.isoformat())
    assert first["go"] and first["facts"]["champion"] is None and first["facts"]["new_feedback"] is None

    _logs(tmp_path, until)
    c = registry.client(paths)
    c.create_registered_model(MODEL_NAME)
    run = c.create_run(registry.experiment_id(paths))
    champion = str(
        c.create_model_version(
            MODEL_NAME, run.info.artifact_uri, run.info.run_id, tags={registry.DATA_AS_OF_TAG: SINCE.isoformat()}
        ).version
    )
    registry.set_alias(paths, MODEL_NAME, registry.CHAMPION, champion)

    def window(end: datetime, alarms: str, version: str = champion) -> None:
        tags = {"model_version": version, "window_end": end.isoformat(), "alarms": alarms}
        c.create_run(registry.experiment_id(paths, monitor.EXPERIMENT), tags=tags)

    quiet = retrain.decide(params, "manual", until.isoformat())
    assert not quiet["go"], quiet["reason"]
    assert quiet["facts"] | {"since": SINCE.isoformat(), "new_feedback": 2, "window_end": None} == quiet["facts"]
    assert "manual run with only_with_new_data: nothing new to learn" in quiet["reason"]

    window(SINCE - timedelta(hours=1), "query_text")  # before the champion's snapshot: it learnt from that traffic
    window(SINCE + timedelta(hours=5), "query_text,latency", version="other")  # against another model
    window(SINCE + timedelta(hours=3), "latency")  # not a sign of something to learn
    assert not retrain.decide(params, "scheduled", until.isoformat())["go"]
    window(SINCE + timedelta(hours=2), "vocabulary")  # older than the latest window of the champion: not read
    assert (
        retrain.decide(params, "scheduled", until.isoformat())["facts"]["window_end"]
        == (SINCE + timedelta(hours=3)).isoformat()
    )
    window(SINCE + timedelta(hours=4), "empty_answers,query_embedding,vocabulary")
    drift = retrain.decide(params, "scheduled", until.isoformat())
    assert drift["go"] and drift["facts"]["alarms"] == ["query_embedding", "vocabulary"], drift
    assert "the monitor alarmed (query_embedding, vocabulary)" in drift["reason"]

    assert drift["facts"]["min_new_feedback"] == load_config("tiny").retrain.min_new_feedback
    # the manual run that asked for the machine's rule: the alarm is new data for it too
    assert retrain.decide(params, "manual", until.isoformat())["go"]
    assert drift["trigger_reason"] == "the weekly schedule" and drift["facts"]["drift_events"] == []

    # started by the monitor's drift event: the reason comes from the event's extra, the run has no conf
    window(SINCE + timedelta(hours=6), "")  # the latest window is quiet: the announced drift still counts
    announced = {
        "asset": monitor.DRIFT_ASSET,
        "extra": {
            "reason": "monitor window X -> Y against @champion v1: vocabulary: ALARM",
            "alarms": ["vocabulary"],
            "window_end": (SINCE + timedelta(hours=5)).isoformat(),
            "model_version": champion,
        },
        "timestamp": (SINCE + timedelta(hours=5, minutes=2)).isoformat(),
        "source": "shopguide_monitor/scheduled__y",
    }
    triggered = retrain.decide(params, "asset_triggered", until.isoformat(), [announced])
    assert triggered["go"] and "the monitor announced drift (vocabulary)" in triggered["reason"], triggered
    assert triggered["reason"].endswith(f"; started by: {triggered['trigger_reason']}")
    assert triggered["trigger_reason"] == (
        "asset shopguide_drift from shopguide_monitor/scheduled__y: monitor window X -> Y against @champion v1: "
        "vocabulary: ALARM"
    )
    assert triggered["facts"]["drift_events"] == [
        {"model_version": champion, "window_end": (SINCE + timedelta(hours=5)).isoformat(), "alarms": ["vocabulary"]}
    ]


def test_the_features_run_announces_new_user_events_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.steps.features import announce_events

    monkeypatch.setenv("SHOPGUIDE_EVENT_LOG_DIR", str(tmp_path / "events"))
    until = SINCE + timedelta(days=1)
    _logs(tmp_path, until)  # feedback events an hour before `until`, one at SINCE, one after `until`
    landed = {"as_of": until.isoformat(), "run_key": "features__test"}

    first = announce_events(landed, None)
    assert first["announce"] and "first landing" in first["reason"]
    assert first["extra"] == {"landed_until": until.isoformat(), "new_feedback_events": 0, "run_key": "features__test"}
    covered = {"extra": {"landed_until": (until - timedelta(minutes=30)).isoformat()}, "timestamp": "ignored"}
    assert not announce_events(landed, covered)["announce"]
    news = announce_events(landed, {"extra": {"landed_until": (until - timedelta(hours=2)).isoformat()}})
    assert news["announce"] and news["extra"]["new_feedback_events"] == 5, news
    # an asset event without our extra (emitted by hand): its own time starts the window
    by_hand = announce_events(landed, {"extra": {}, "timestamp": (SINCE + timedelta(hours=1)).isoformat()})
    assert by_hand["announce"] and by_hand["extra"]["new_feedback_events"] == 5
    assert not announce_events({**landed, "as_of": SINCE.isoformat()}, covered)["announce"]  # a re-run of an old one
