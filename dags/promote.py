"""Manual promote / rollback of @champion, triggered with a form in the Airflow UI; every move is re-checked."""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, get_current_context

from dags.assets import BOUNDS, bounded_task

PARAMS = {
    "action": Param(
        "promote",
        type="string",
        enum=["promote", "rollback"],
        description="promote: move @champion to `version`; rollback: back to the previous champion.",
    ),
    "version": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        description="Registered version of shopguide-encoder to promote; empty for a rollback.",
    ),
    "reason": Param(
        type="string", minLength=1, maxLength=1000, description="Why (recorded in the registry with who triggered it)."
    ),
    "force": Param(
        False,
        type="boolean",
        description="Promote even though the version failed its evaluation gate (the reason is recorded).",
    ),
}


@dag(
    dag_id="shopguide_promote",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=BOUNDS.default_args,
    dagrun_timeout=BOUNDS.dag_run_timeout,
    params=PARAMS,
    tags=["shopguide", "registry"],
    doc_md=__doc__,
)
def shopguide_promote():
    @bounded_task
    def move_champion() -> dict:
        from pipelines.steps.promote import move_champion

        ctx = get_current_context()
        dag_run = ctx["dag_run"]
        actor = f"airflow:{dag_run.triggering_user_name or 'unknown'} ({dag_run.dag_id}/{dag_run.run_id})"
        return move_champion(dict(ctx["params"]), actor)

    move_champion()


shopguide_promote()
