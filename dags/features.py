"""Features: land + validate the (simulated) event log -> Feast apply + materialize_incremental -> freshness check.

Optionally (Param `evaluate_personalization`) scores personalised vs plain ranking of the held-out events with the
@champion model and logs it to MLflow.
"""

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
    params={
        "profile": Param("default", type="string", enum=["default", "tiny"],
                         description="Config profile (configs/<profile>.yaml)."),
        "max_feature_age_hours": Param(2.0, type="number", exclusiveMinimum=0, maximum=24 * 30,
                                       description="Freshness bound: the newest online row of each feature view may "
                                                   "be at most this old at the run's time."),
        "on_stale": Param("fail", type="string", enum=["fail", "warn"],
                          description="When the online store is older than the bound: fail the run, or log a "
                                      "warning and continue."),
        "evaluate_personalization": Param(False, type="boolean",
                                          description="Also score personalised vs plain ranking of the held-out "
                                                      "events with the @champion model (minutes) and log to MLflow."),
    },
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
    def check_freshness(landed: dict, materialized: dict) -> dict:
        from datetime import datetime

        from pipelines.config import Paths
        from pipelines.features import check_freshness

        params = get_current_context()["params"]
        # Against the run's own time, so a backfill or `airflow dags test` of a past date is judged fairly.
        report = check_freshness(Paths.from_env(), float(params["max_feature_age_hours"]) * 3600,
                                 now=datetime.fromisoformat(landed["as_of"]), on_stale=params["on_stale"])
        print(f"Feast online store freshness: {report}")
        return report

    @task
    def evaluate_personalization(landed: dict, freshness: dict) -> dict:
        params = get_current_context()["params"]
        if not params["evaluate_personalization"]:
            return {"skipped": "Param evaluate_personalization is off"}
        from datetime import datetime

        from pipelines.config import load_config
        from pipelines.personalization import evaluate_registered

        cfg = load_config(params["profile"])
        return evaluate_registered(landed["events_path"], datetime.fromisoformat(landed["as_of"]),
                                   model_name=cfg.registry.model_name,
                                   weight=cfg.features.personalization_weight,
                                   recent_n=cfg.features.recent_products)

    landed = land_events()
    freshness = check_freshness(landed, materialize(landed))
    evaluate_personalization(landed, freshness)


shopguide_features()
