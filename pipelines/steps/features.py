"""The features pipeline's steps, one per DAG task: land the event log, materialize it in Feast, check freshness.
The landed log passes between tasks through the run store (pipelines/registry/handoff.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pipelines.config import Paths, load_config
from pipelines.registry.handoff import task_folders


def land_events(profile: str, run_key: str, as_of: datetime) -> dict[str, Any]:
    """Generate (SIMULATED) and validate the run's event log under its own run folder."""
    from pipelines.data.events import land_events as land

    cfg = load_config(profile)
    with task_folders(run_key) as t:
        landed = land(cfg.data, t.output("events"), as_of)
        return t.publish({**landed, "as_of": as_of.isoformat(), "run_key": run_key})


def materialize(profile: str, landed: dict[str, Any]) -> dict[str, Any]:
    """Feature tables from the landed log -> offline store -> `feast apply` + materialize into the online store."""
    from pipelines.features.store import refresh_features

    cfg = load_config(profile)
    with task_folders(landed["run_key"]) as t:
        events = t.stage(landed)["events_path"]
        return refresh_features(events, datetime.fromisoformat(landed["as_of"]), cfg.features.recent_products)


def announce_events(landed: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """Whether this run's landing is news for the retrain DAG (pipelines.data.newness.should_announce), given the
    previous user-events asset event ({"extra", "timestamp"}, None: there was none): {"announce", "reason", "extra"},
    `extra` being what the asset event carries (the as-of time it covers, where the next run counts from)."""
    from pipelines.data.event_log import read_event_log
    from pipelines.data.newness import should_announce

    as_of = datetime.fromisoformat(landed["as_of"])
    previous_until = None
    if previous is not None:
        # an event without our extra (emitted by hand, or before it was written): its own time bounds the window
        stamp = (previous.get("extra") or {}).get("landed_until") or previous["timestamp"]
        previous_until = datetime.fromisoformat(stamp)
    new_events = 0
    if previous_until is not None and previous_until < as_of:
        new_events = read_event_log(previous_until, as_of).num_rows
    decision = should_announce(previous_until, as_of, new_events)
    print(f"user events {'announced' if decision.go else 'NOT announced'}: {decision.reason}")
    extra = {"landed_until": as_of.isoformat(), "new_feedback_events": new_events, "run_key": landed["run_key"]}
    return {"announce": decision.go, "reason": decision.reason, "extra": extra}


def check_freshness(landed: dict[str, Any], max_age_hours: float, on_stale: str) -> dict[str, Any]:
    """Fail (or warn) when the online store's newest rows are older than the bound at the run's own time."""
    from pipelines.features.store import check_freshness as check

    # Against the run's own time, so a backfill or `airflow dags test` of a past date is judged fairly.
    report = check(
        Paths.from_env(), max_age_hours * 3600, now=datetime.fromisoformat(landed["as_of"]), on_stale=on_stale
    )
    print(f"Feast online store freshness: {report}")
    return report


def evaluate_personalization(profile: str, landed: dict[str, Any]) -> dict[str, Any]:
    """Personalised vs plain ranking of the held-out events with the @champion model, logged to MLflow."""
    from pipelines.evaluation.personalization import evaluate_registered

    cfg = load_config(profile)
    with task_folders(landed["run_key"]) as t:
        return evaluate_registered(
            t.stage(landed)["events_path"],
            datetime.fromisoformat(landed["as_of"]),
            model_name=cfg.registry.model_name,
            weight=cfg.features.personalization_weight,
            recent_n=cfg.features.recent_products,
        )
