"""Every task of every DAG runs under bounds from the config (retries, retry delay, execution timeout), and Airflow
enforces them: a task over its timeout fails and is retried, a permanent error fails at once (real `dags test`)."""

from __future__ import annotations

import json
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from pipelines.airflow_env import DAGS_FOLDER, run_dag_test
from pipelines.config import REPO_ROOT, OrchestrationConfig, Paths, load_config
from pipelines.steps.bounds import PERMANENT_ERRORS, bounds_of, dag_bounds, is_permanent


@pytest.fixture(scope="module")
def dags() -> dict:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=DAGS_FOLDER, safe_mode=False)
    assert not bag.import_errors, bag.import_errors
    return bag.dags


def test_every_task_of_every_dag_has_retries_a_retry_delay_and_a_timeout(dags: dict) -> None:
    bounds = dag_bounds()
    assert bounds.retries >= 1 and bounds.retry_delay > timedelta(0)
    assert {"shopguide_retrain", "shopguide_features", "shopguide_promote"} <= set(dags)
    for dag in dags.values():
        assert dag.dagrun_timeout == bounds.dag_run_timeout, dag.dag_id
        for task in dag.tasks:
            where = f"{dag.dag_id}.{task.task_id}"
            assert task.retries == bounds.retries, where
            assert task.retry_delay == bounds.retry_delay, where
            assert task.execution_timeout is not None, where
            assert task.execution_timeout == bounds.timeout(task.task_id), where


def test_every_per_task_timeout_names_a_task(dags: dict) -> None:
    # a renamed task would otherwise silently fall back to the default timeout
    task_ids = {t.task_id for dag in dags.values() for t in dag.tasks}
    configured = {
        t
        for p in (REPO_ROOT / "configs").glob("*.yaml")
        for t in load_config(p.stem).orchestration.task_timeout_minutes
    }
    assert configured and configured <= task_ids, configured - task_ids


def test_the_long_steps_have_headroom_over_the_measured_full_profile() -> None:
    # the largest shipped profile's fine-tuning, measured on 2 cores (README, bench/results)
    seconds = json.loads((REPO_ROOT / "bench/results/quality-full-2026-12-02.json").read_text())["seconds"]
    bounds = dag_bounds()
    assert bounds.timeout("finetune").total_seconds() >= 2.5 * seconds["finetune"]
    assert bounds.timeout("evaluate").total_seconds() >= 2.5 * (
        seconds["finetuned_eval"] + seconds["export_index_eval"]
    )
    # nothing may be allowed longer than the whole CLI run
    assert max([bounds.default_timeout, *bounds.timeouts.values()]) < bounds.dag_run_timeout


def test_bounds_take_the_largest_value_over_the_profiles() -> None:
    small = OrchestrationConfig(
        retries=1, retry_delay_seconds=5, default_task_timeout_minutes=2, task_timeout_minutes={"finetune": 3}
    )
    large = OrchestrationConfig(
        retries=3,
        retry_delay_seconds=60,
        default_task_timeout_minutes=10,
        task_timeout_minutes={"distill": 90},
        dag_run_timeout_minutes=600,
    )
    bounds = bounds_of([small, large])
    assert (bounds.retries, bounds.retry_delay, bounds.default_timeout) == (
        3,
        timedelta(seconds=60),
        timedelta(minutes=10),
    )
    # finetune: small's 3 min against large's default of 10; distill: large's own 90 against small's default 2
    assert bounds.timeout("finetune") == timedelta(minutes=10)
    assert bounds.timeout("distill") == timedelta(minutes=90)
    assert bounds.timeout("anything_else") == timedelta(minutes=10)
    assert bounds.dag_run_timeout == timedelta(minutes=600)
    assert bounds.default_args == {
        "retries": 3,
        "retry_delay": timedelta(seconds=60),
        "execution_timeout": timedelta(minutes=10),
    }
    assert dag_bounds() == bounds_of(load_config(p.stem).orchestration for p in (REPO_ROOT / "configs").glob("*.yaml"))
    with pytest.raises(ValueError):
        bounds_of([])


def test_permanent_errors_name_real_exception_classes() -> None:
    import importlib

    for name in PERMANENT_ERRORS:
        module, _, cls = name.rpartition(".")
        error = getattr(importlib.import_module(module), cls)
        assert issubclass(error, Exception), name

        class Narrower(error):  # type: ignore[misc, valid-type]
            pass

        assert is_permanent(Narrower.__new__(Narrower)), name
    assert not is_permanent(RuntimeError("MLflow is unreachable"))
    # a refused move fails at once; the lock held by another move or an unreachable store may pass on a retry
    from pipelines.registry.mlflow_client import PromotionError, PromotionRefused

    assert is_permanent(PromotionRefused("gate failed")) and not is_permanent(PromotionError("lock held"))
    assert not is_permanent(TimeoutError())


# A DAG in its own folder, on the session's Airflow DB: three tasks under bounds built by the same helper as the
# real DAGs' (1 retry, 1 s apart, 1 s execution timeout), each showing one rule.
BOUNDS_DAG = """
from __future__ import annotations

import time
from pathlib import Path

import pendulum
from airflow.sdk import dag, task

from dags.assets import bounded_task
from pipelines.config import OrchestrationConfig
from pipelines.data.dataset import JudgmentsPathError
from pipelines.steps.bounds import bounds_of

BOUNDS = bounds_of([OrchestrationConfig(retries=1, retry_delay_seconds=1, default_task_timeout_minutes=1 / 60)])
MARKS = Path(MARKS_DIR)


@dag(dag_id="bounds_probe", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
     default_args=BOUNDS.default_args)
def bounds_probe():
    @task
    def sleeps_past_its_timeout() -> None:
        MARKS.joinpath("started").open("a").write("x")
        time.sleep(5)
        MARKS.joinpath("finished").write_text("the sleep was not interrupted")

    @bounded_task
    def transient_error() -> None:
        raise RuntimeError("MLflow is unreachable")

    @bounded_task
    def permanent_error() -> None:
        raise JudgmentsPathError("judgments_path '../x.csv' contains '..'")

    @bounded_task
    def produce() -> dict:
        return {"n": 1}

    @bounded_task
    def consume(got: dict, extra: int = 2) -> dict:
        return {"n": got["n"] + extra}

    sleeps_past_its_timeout()
    transient_error()
    permanent_error()
    consume(produce())


bounds_probe()
"""


def test_airflow_enforces_the_bounds(airflow_paths: Paths, tmp_path: Path) -> None:
    dags, marks = tmp_path / "dags", tmp_path / "marks"
    dags.mkdir()
    marks.mkdir()
    (dags / "bounds_probe.py").write_text(textwrap.dedent(BOUNDS_DAG.replace("MARKS_DIR", repr(str(marks)))))
    run = run_dag_test(airflow_paths, "bounds_probe", capture=True, timeout=600, dags_folder=dags)
    assert run.state == "failed", run.output[-3000:]
    assert run.task_states == {
        "sleeps_past_its_timeout": "failed",
        "transient_error": "failed",
        "permanent_error": "failed",
        "produce": "success",
        "consume": "success",
    }, run.output[-3000:]
    # bounded_task keeps TaskFlow's wiring: XCom arguments in, the return value out
    assert run.xcom("consume") == {"n": 3}
    # over its 1 s timeout: stopped in the sleep (never finished), on both tries
    assert run.task_tries["sleeps_past_its_timeout"] == 2
    assert (marks / "started").read_text() == "xx" and not (marks / "finished").exists()
    assert "AirflowTaskTimeout" in run.output
    # a transient error is retried once; a permanent one fails at once, saying why
    assert run.task_tries["transient_error"] == 2
    assert run.task_tries["permanent_error"] == 1
    assert "JudgmentsPathError (not retried): judgments_path '../x.csv' contains '..'" in run.output
