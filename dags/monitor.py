"""Monitor, hourly: the last window of the request log against the champion's training reference (query text and
embedding drift, vocabulary misses, category shift, empty / low-score answers, CTR and add-to-cart by version,
latency vs the SLO) and Feast's freshness -> one MLflow run per window, the window table, the Prometheus textfile;
announce_drift emits the Asset that schedules retraining when the window alarmed on drift or vocabulary misses."""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, get_current_context
from airflow.sdk.exceptions import AirflowSkipException

from dags.assets import BOUNDS, DEFAULT_PROFILE, DRIFT, PROFILES, bounded_task

PARAMS = {
    "profile": Param(
        DEFAULT_PROFILE, type="string", enum=PROFILES, description="Config profile whose `monitor` section applies."
    ),
    "window_minutes": Param(
        None,
        type=["null", "integer"],
        minimum=5,
        maximum=7 * 24 * 60,
        description="Length of the window that ends at the run's logical date; empty = the profile's.",
    ),
    "min_queries": Param(
        None,
        type=["null", "integer"],
        minimum=5,
        description="Distinct queries a window needs for the drift tests; empty = the profile's.",
    ),
}


@dag(
    dag_id="shopguide_monitor",
    schedule="@hourly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=BOUNDS.default_args,
    dagrun_timeout=BOUNDS.dag_run_timeout,
    params=PARAMS,
    tags=["shopguide", "monitoring"],
    doc_md=__doc__,
)
def shopguide_monitor():
    def window_end() -> str:
        ctx = get_current_context()
        return (ctx.get("logical_date") or ctx["dag_run"].run_after).isoformat()

    @bounded_task
    def measure() -> dict:
        from pipelines.steps import monitor as steps

        return steps.measure(dict(get_current_context()["params"]), window_end())

    @bounded_task
    def feature_freshness() -> dict:
        from pipelines.steps import monitor as steps

        return steps.feature_freshness(window_end())

    @bounded_task
    def record(measured: dict, freshness: dict) -> dict:
        from pipelines.steps import monitor as steps

        return steps.record(dict(get_current_context()["params"]), measured, freshness)

    # Airflow records an outlet's asset event only when its task succeeds: a quiet window (or one inside the
    # cool-down) skips this task, so the retrain DAG scheduled on DRIFT is not started; the run still succeeds.
    # The reason goes in the event's extra, since an Asset-triggered run has no conf to carry it.
    @bounded_task(inlets=[DRIFT], outlets=[DRIFT])
    def announce_drift(recorded: dict) -> dict:
        from pipelines.steps import monitor as steps

        ctx = get_current_context()
        latest = list(ctx["inlet_events"][DRIFT].ascending(False).limit(1))
        previous = (
            {"extra": dict(latest[0].extra or {}), "timestamp": latest[0].timestamp.isoformat()} if latest else None
        )
        announced = steps.announce_drift(dict(ctx["params"]), recorded, previous)
        if not announced["announce"]:
            raise AirflowSkipException(announced["reason"])
        ctx["outlet_events"][DRIFT].extra = announced["extra"]
        return announced

    announce_drift(record(measure(), feature_freshness()))


shopguide_monitor()
