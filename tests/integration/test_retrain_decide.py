"""Retrain only when there is something to learn: with a champion and no traffic since its snapshot, a real `airflow
dags test` run asking for new data stops in its first task; every other task is skipped and the run succeeds."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from pipelines.airflow_env import run_dag_test
from pipelines.config import MODEL_NAME, Paths
from pipelines.registry import mlflow_client as registry


def test_a_run_with_nothing_new_to_learn_is_skipped_after_decide(
    airflow_paths: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # decide reads @champion's alias and data_as_of tag only: a version without a bundle, in an MLflow store and logs
    # of the test's own (the DAG run inherits the environment), leaves the session's registry and aliases untouched
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("SHOPGUIDE_REQUEST_LOG_DIR", str(tmp_path / "requests"))
    monkeypatch.setenv("SHOPGUIDE_EVENT_LOG_DIR", str(tmp_path / "events"))
    now = datetime.now(UTC).replace(microsecond=0)
    c = registry.client(airflow_paths)
    c.create_registered_model(MODEL_NAME)
    run = c.create_run(registry.experiment_id(airflow_paths))
    tags = {registry.DATA_AS_OF_TAG: now.isoformat()}
    version = c.create_model_version(MODEL_NAME, run.info.artifact_uri, run.info.run_id, tags=tags).version
    registry.set_alias(airflow_paths, MODEL_NAME, registry.CHAMPION, str(version))

    started = time.perf_counter()
    result = run_dag_test(
        airflow_paths,
        "shopguide_retrain",
        {"profile": "tiny", "only_with_new_data": True},
        now,
        capture=True,
        timeout=600,
    )
    print(f"retrain with nothing new: {result.state} in {time.perf_counter() - started:.1f} s (airflow dags test)")
    assert result.state == "success", result.output[-3000:]
    assert result.task_states["decide"] == "success", result.output[-3000:]
    assert {s for t, s in result.task_states.items() if t != "decide"} == {"skipped"}, result.task_states
    assert "SKIP: manual run with only_with_new_data: nothing new to learn, skipped" in result.output
    assert f"since @champion {version}'s snapshot ({now.isoformat()}): 0 answers with feedback" in result.output
    # a short-circuit that skips pushes no return value (Airflow 3 raises DownstreamTasksSkipped past it): the
    # decision is the XCom `decision`, pushed either way
    decision = _xcom(result.run_id, "decide", "decision")
    assert decision["go"] is False and decision["facts"]["new_feedback"] == 0, decision
    assert decision["facts"]["run_type"] == "manual" and decision["facts"]["champion"] == str(version)
    # nothing was logged for the skip: the store holds the one run the champion's version was made from
    assert [r.info.run_id for r in c.search_runs([registry.experiment_id(airflow_paths)])] == [run.info.run_id]


def _xcom(run_id: str, task_id: str, key: str) -> Any:
    """An XCom of the session's Airflow DB (the test process has its AIRFLOW_HOME: tests/conftest.py)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        query = XComModel.get_many(run_id=run_id, dag_ids="shopguide_retrain", task_ids=task_id, key=key)
        (row,) = session.scalars(query)
        return XComModel.deserialize_value(row)
