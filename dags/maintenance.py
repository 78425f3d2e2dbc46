"""Housekeeping, daily: apply the retention policy (old versions and their artifacts, run folders, serving cache)."""

from __future__ import annotations

import pendulum
from airflow.sdk import CronTriggerTimetable, Param, dag, get_current_context

from dags.assets import BOUNDS, DEFAULT_PROFILE, PROFILES, bounded_task

PARAMS = {
    "profile": Param(
        DEFAULT_PROFILE, type="string", enum=PROFILES, description="Config profile whose `retention` section applies."
    ),
    "dry_run": Param(False, type="boolean", description="Only report what the policy would delete."),
}


@dag(
    dag_id="shopguide_maintenance",
    schedule=CronTriggerTimetable("0 4 * * *", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=BOUNDS.default_args,
    dagrun_timeout=BOUNDS.dag_run_timeout,
    params=PARAMS,
    tags=["shopguide", "registry"],
    doc_md=__doc__,
)
def shopguide_maintenance():
    @bounded_task
    def prune() -> dict:
        from pipelines.steps.maintenance import prune

        return prune(dict(get_current_context()["params"]))

    prune()


shopguide_maintenance()
