"""Features: land + validate the (simulated) event log -> Feast apply + materialize_incremental -> freshness check;
announce_events emits the Asset that schedules retraining, only on the first landing or when the service logged new
feedback events since the previous announcement.

Optionally (Param `evaluate_personalization`) scores personalised vs plain ranking of the held-out events with the
@champion model and logs it to MLflow.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, get_current_context
from airflow.sdk.exceptions import AirflowSkipException

from dags.assets import BOUNDS, DEFAULT_PROFILE, PROFILES, USER_EVENTS, bounded_task, dag_run_key


@dag(
    dag_id="shopguide_features",
    schedule="@hourly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=BOUNDS.default_args,
    dagrun_timeout=BOUNDS.dag_run_timeout,
    params={
        "profile": Param(
            DEFAULT_PROFILE, type="string", enum=PROFILES, description="Config profile (configs/<profile>.yaml)."
        ),
        "max_feature_age_hours": Param(
            2.0,
            type="number",
            exclusiveMinimum=0,
            maximum=24 * 30,
            description="Freshness bound: the newest online row of each feature view may "
            "be at most this old at the run's time.",
        ),
        "on_stale": Param(
            "fail",
            type="string",
            enum=["fail", "warn"],
            description="When the online store is older than the bound: fail the run, or log a warning and continue.",
        ),
        "evaluate_personalization": Param(
            False,
            type="boolean",
            description="Also score personalised vs plain ranking of the held-out "
            "events with the @champion model (minutes) and log to MLflow.",
        ),
    },
    tags=["shopguide", "features"],
    doc_md=__doc__,
)
def shopguide_features():
    @bounded_task
    def land_events() -> dict:
        from pipelines.steps import features as steps

        ctx = get_current_context()
        dag_run = ctx["dag_run"]
        as_of = ctx.get("logical_date") or dag_run.run_after
        return steps.land_events(ctx["params"]["profile"], dag_run_key(dag_run), as_of)

    @bounded_task
    def materialize(landed: dict) -> dict:
        from pipelines.steps import features as steps

        return steps.materialize(get_current_context()["params"]["profile"], landed)

    # Airflow records an outlet's asset event only when its task succeeds: when nothing new landed this task skips
    # itself, so the retrain DAG scheduled on USER_EVENTS is not started for nothing (the run still succeeds)
    @bounded_task(inlets=[USER_EVENTS], outlets=[USER_EVENTS])
    def announce_events(landed: dict, materialized: dict) -> dict:
        from pipelines.steps import features as steps

        ctx = get_current_context()
        latest = list(ctx["inlet_events"][USER_EVENTS].ascending(False).limit(1))
        previous = (
            {"extra": dict(latest[0].extra or {}), "timestamp": latest[0].timestamp.isoformat()} if latest else None
        )
        announced = steps.announce_events(landed, previous)
        if not announced["announce"]:
            raise AirflowSkipException(announced["reason"])
        ctx["outlet_events"][USER_EVENTS].extra = announced["extra"]
        return announced

    @bounded_task
    def check_freshness(landed: dict, materialized: dict) -> dict:
        from pipelines.steps import features as steps

        params = get_current_context()["params"]
        return steps.check_freshness(landed, float(params["max_feature_age_hours"]), params["on_stale"])

    @bounded_task
    def evaluate_personalization(landed: dict, freshness: dict) -> dict:
        params = get_current_context()["params"]
        if not params["evaluate_personalization"]:
            return {"skipped": "Param evaluate_personalization is off"}
        from pipelines.steps import features as steps

        return steps.evaluate_personalization(params["profile"], landed)

    landed = land_events()
    materialized = materialize(landed)
    announce_events(landed, materialized)
    freshness = check_freshness(landed, materialized)
    evaluate_personalization(landed, freshness)


shopguide_features()
