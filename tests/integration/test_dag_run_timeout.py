"""A DAG run past its time limit is stopped: the `dags test` process and every process its tasks started are killed,
the run is marked failed in Airflow's DB, and the CLI says so and exits 124 (real Airflow, real processes)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipelines.airflow_env import DagRunTimeout, run_dag_test
from pipelines.cli import TIMEOUT_EXIT, dag_run_timeout_minutes
from pipelines.config import REPO_ROOT, Paths, load_config

# A task that starts a child process (as `feast apply` or a memory probe would) and then outlives any limit; a
# second task waits behind it.
SLOW_DAG = """
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pendulum
from airflow.sdk import dag, task


@dag(dag_id="slow_probe", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def slow_probe():
    @task
    def hangs() -> None:
        child = subprocess.Popen(["sleep", "600"])
        Path({pid_file!r}).write_text(str(child.pid))
        time.sleep(600)

    @task
    def after() -> None:
        pass

    hangs() >> after()


slow_probe()
"""
# Airflow start-up and the run's creation take ~10-30 s on a loaded 2-core machine; the task must have started
TIMEOUT_S = 75


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a killed child of the killed task is reparented and reaped by init; a zombie counts as gone
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


def test_a_dag_run_past_its_timeout_is_stopped_and_marked_failed(airflow_paths: Paths, tmp_path: Path) -> None:
    dags, pid_file = tmp_path / "dags", tmp_path / "child.pid"
    dags.mkdir()
    (dags / "slow_probe.py").write_text(textwrap.dedent(SLOW_DAG.format(pid_file=str(pid_file))))
    started = time.monotonic()
    with pytest.raises(DagRunTimeout) as info:
        run_dag_test(airflow_paths, "slow_probe", capture=True, timeout=TIMEOUT_S, dags_folder=dags)
    elapsed = time.monotonic() - started
    run = info.value.result
    assert pid_file.exists(), f"the task had not started within {TIMEOUT_S} s:\n{run.output[-3000:]}"
    # stopped, not waited for: limit + SIGTERM grace + SIGKILL + marking the run (one Airflow start-up)
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 60, elapsed
    assert not _alive(int(pid_file.read_text())), "the task's child process outlived the stop"
    assert run.run_id and run.state == "failed"
    assert run.task_states == {"hangs": "failed", "after": "skipped"}
    assert f"time limit of {TIMEOUT_S} s" in str(info.value) and run.run_id in str(info.value)


def test_the_cli_stops_a_dag_run_at_its_timeout_and_exits_124(airflow_paths: Paths) -> None:
    # 0.1 s: Airflow is still starting; the stop and the message are the same at any point of the run
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "features", "--profile", "tiny", "--timeout-minutes", "0.002"],
        cwd=REPO_ROOT,
        env={**os.environ},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == TIMEOUT_EXIT, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "shopguide_features TIMED OUT" in proc.stderr and "0.002 min limit" in proc.stderr, proc.stderr
    assert time.monotonic() - started < 90


def test_the_cli_timeout_defaults_to_the_profile_and_the_flag_wins() -> None:
    assert dag_run_timeout_minutes("tiny", None) == load_config("tiny").orchestration.dag_run_timeout_minutes
    assert dag_run_timeout_minutes("tiny", 0.5) == 0.5
