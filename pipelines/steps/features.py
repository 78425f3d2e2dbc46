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
