"""Features: land + validate the (simulated) event log -> Feast apply + materialize_incremental -> freshness."""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from dags.assets import USER_EVENTS


@dag(
    dag_id="shopguide_features",
    schedule="@hourly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params={"profile": Param("default", type="string", enum=["default", "tiny"],
                             description="Config profile (configs/<profile>.yaml).")},
    tags=["shopguide", "features"],
    doc_md=__doc__,
)
def shopguide_features():
    @task
    def land_events() -> dict:
        from pipelines.config import Paths, load_config
        from pipelines.events import land_events

        ctx = get_current_context()
        dag_run = ctx["dag_run"]
        as_of = ctx.get("logical_date") or dag_run.run_after
        cfg = load_config(ctx["params"]["profile"])
        out = Paths.from_env().run_dir(f"{dag_run.dag_id}__{dag_run.run_id}")
        return {**land_events(cfg.data, out, as_of), "as_of": as_of.isoformat()}

    @task(outlets=[USER_EVENTS])
    def materialize(landed: dict) -> dict:
        from datetime import datetime

        from pipelines.config import load_config
        from pipelines.features import refresh_features

        cfg = load_config(get_current_context()["params"]["profile"])
        return refresh_features(landed["events_path"], datetime.fromisoformat(landed["as_of"]),
                                cfg.features.recent_products)

    @task
    def check_freshness(materialized: dict) -> dict:
        from pipelines.config import Paths
        from pipelines.features import freshness

        report = freshness(Paths.from_env())
        print(f"Feast online store freshness: {report}")
        return report

    check_freshness(materialize(land_events()))


shopguide_features()
