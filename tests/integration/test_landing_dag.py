"""The retrain DAG's judgments_path Param reads nothing outside the landing folder: a real `dags test` run stops in
its snapshot task (right after decide), once (no retry), with the readable reason, and no task after it runs."""

from __future__ import annotations

from pathlib import Path

from pipelines.airflow_env import run_dag_test
from pipelines.config import Paths


def test_retrain_refuses_a_judgments_path_outside_the_landing_folder(airflow_paths: Paths, tmp_path: Path) -> None:
    outside = tmp_path / "judgments.csv"  # a real file, readable, just not landed
    outside.write_text("id,product_uid,product_title,search_term,relevance\n1,100001,bracket,bracket,3.0\n")
    run = run_dag_test(
        airflow_paths,
        "shopguide_retrain",
        {"profile": "tiny", "judgments_path": str(outside)},
        "2026-10-01T00:00:00+00:00",
        capture=True,
        timeout=600,
    )
    assert run.state == "failed", run.output[-3000:]
    assert run.task_states["snapshot"] == "failed" and run.task_tries["snapshot"] == 1, run.output[-3000:]
    # decide let it through (a manual run trains), then the snapshot refused the file
    assert run.task_states["decide"] == "success", run.output[-3000:]
    assert {s for t, s in run.task_states.items() if t not in ("decide", "snapshot")} == {"upstream_failed"}
    assert f"JudgmentsPathError (not retried): judgments_path {str(outside)!r} resolves outside" in run.output
    assert str(airflow_paths.landing) in run.output
