"""Catalog: a catalog file landed -> validate it (Great Expectations) -> embed its new products with @champion's own
ONNX encoder -> rebuild the dense + BM25 index over the whole catalog -> publish it for the same model version (the
version's `catalog_index` tag, which the service hot-swaps on). No training, no alias move; a bad catalog fails the
run in `validate` and nothing served changes.

Runs on the Asset `shopguide_catalog` (its event's extra names the file) or by hand with the Param `catalog_path`.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, get_current_context
from airflow.sdk.exceptions import AirflowFailException

from dags.assets import BOUNDS, CATALOG, DEFAULT_PROFILE, PROFILES, bounded_task, dag_run_key


@dag(
    dag_id="shopguide_catalog",
    schedule=[CATALOG],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    # one catalog at a time: each file is the whole catalog, and each run diffs against what the previous published
    max_active_runs=1,
    default_args=BOUNDS.default_args,
    dagrun_timeout=BOUNDS.dag_run_timeout,
    params={
        "profile": Param(
            DEFAULT_PROFILE, type="string", enum=PROFILES, description="Config profile (configs/<profile>.yaml)."
        ),
        "catalog_path": Param(
            None,
            type=["null", "string"],
            description="A catalog file (CSV or parquet: product_uid, product_title) in the landing folder's "
            "catalog/ (SHOPGUIDE_LANDING, default $SHOPGUIDE_HOME/landing): a name relative to it or a path inside "
            "it. Empty: the file named by the triggering shopguide_catalog asset event.",
        ),
    },
    tags=["shopguide", "catalog"],
    doc_md=__doc__,
)
def shopguide_catalog():
    @bounded_task
    def validate() -> dict:
        from pipelines.steps import catalog as steps

        ctx = get_current_context()
        path = ctx["params"].get("catalog_path")
        if not path:
            # an asset-triggered run: the newest event's file (each file is the whole catalog, the newest wins)
            events = [e for evs in ctx["triggering_asset_events"].values() for e in evs]
            named = [e for e in sorted(events, key=lambda e: e.timestamp) if (e.extra or {}).get("catalog_path")]
            if not named:
                raise AirflowFailException("no catalog_path: set the Param, or emit shopguide_catalog with one")
            path = named[-1].extra["catalog_path"]
        dag_run = ctx["dag_run"]
        return steps.validate(ctx["params"]["profile"], dag_run_key(dag_run), path)

    @bounded_task
    def embed(validated: dict) -> dict:
        from pipelines.steps import catalog as steps

        return steps.embed(validated)

    @bounded_task
    def build_index(validated: dict, embedded: dict) -> dict:
        from pipelines.steps import catalog as steps

        return steps.build_index(validated, embedded)

    @bounded_task
    def publish(validated: dict, embedded: dict, built: dict) -> dict:
        from pipelines.steps import catalog as steps

        return steps.publish(validated, embedded, built)

    validated = validate()
    embedded = embed(validated)
    publish(validated, embedded, build_index(validated, embedded))


shopguide_catalog()
