"""Drift triggers retraining, on a real Airflow of the test's own (a temporary AIRFLOW_HOME): the monitor DAG over a
quiet window emits no drift asset event; over a window whose queries are full of new words it emits one, the reason
in its extra; Airflow's own scheduler code turns that event into an Asset-triggered run of the retrain DAG, whose
decide task trains, with the monitor's reason in its decision (the run has no conf)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.airflow_env import airflow_environ, run_dag_test
from pipelines.config import Paths
from pipelines.runtime.logfolder import partition_name, to_batch
from pipelines.runtime.request_log import SCHEMA as REQUEST_SCHEMA
from pipelines.runtime.request_log import RequestRecord
from pipelines.steps.monitor import DRIFT_ASSET
from tests.integration.conftest import RegisteredChampion, monitored_champion

# Far from the other monitor tests' windows: in a shared Airflow their drift events would be in the cool-down
END = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)  # the drifted window ends here, the quiet one an hour before
NEW_WORDS = "zorblaxian quuxwidget"
RETRAIN = "shopguide_retrain"

# In the test's Airflow: one step of Airflow's scheduler (the queued Asset events -> an Asset-triggered run), then
# that run's first task, run the way `airflow tasks test DAG TASK RUN_ID` runs it (one Airflow start-up, not two)
_SCHEDULE_AND_DECIDE = """
import json
from sqlalchemy import select
from airflow.cli.commands.task_command import _get_ti
from airflow.jobs.job import Job
from airflow.jobs.scheduler_job_runner import SchedulerJobRunner
from airflow.models.asset import AssetDagRunQueue, AssetEvent
from airflow.models.dag import DagModel
from airflow.models.dagrun import DagRun
from airflow.models.errors import ParseImportError
from airflow.models.xcom import XComModel
from airflow.sdk.definitions.dag import _run_task
from airflow.utils.cli import get_bagged_dag, get_db_dag
from airflow.utils.session import create_session
from airflow.utils.types import DagRunType

RETRAIN = "shopguide_retrain"
with create_session() as session:
    events = [
        {"asset": e.asset.name, "source_dag_id": e.source_dag_id, "source_run_id": e.source_run_id, "extra": e.extra}
        for e in session.scalars(select(AssetEvent))
    ]
    queued = [[q.asset.name, q.target_dag_id] for q in session.scalars(select(AssetDagRunQueue))]
    dags = [[d.dag_id, d.is_paused, d.is_stale] for d in session.scalars(select(DagModel))]
    errors = [[e.filename, e.stacktrace[-500:]] for e in session.scalars(select(ParseImportError))]
    query, triggered = DagModel.dags_needing_dagruns(session)
    due = [dm for dm in query.all() if dm.dag_id in triggered]
    SchedulerJobRunner(job=Job())._create_dag_runs_asset_triggered(dag_models=due, session=session)
with create_session() as session:
    runs = [
        {"dag_id": r.dag_id, "run_id": r.run_id, "consumed": [e.source_run_id for e in r.consumed_asset_events]}
        for r in session.scalars(select(DagRun).where(DagRun.run_type == DagRunType.ASSET_TRIGGERED))
    ]
decision = state = None
if len(runs) == 1 and runs[0]["dag_id"] == RETRAIN:
    task = get_db_dag(None, RETRAIN).get_task("decide")
    ti, _ = _get_ti(task, -1, logical_date_or_run_id=runs[0]["run_id"], create_if_necessary="db")
    _run_task(ti=ti, task=get_bagged_dag(None, RETRAIN).get_task("decide"))
    state = str(getattr(ti.state, "value", ti.state))
    with create_session() as session:
        query = XComModel.get_many(run_id=runs[0]["run_id"], dag_ids=RETRAIN, task_ids="decide", key="decision")
        decision = XComModel.deserialize_value(session.scalars(query).one())
result = {"events": events, "queued": queued, "dags": dags, "errors": errors, "runs": runs}
print("RESULT " + json.dumps({**result, "state": state, "decision": decision}))
"""


def _airflow_python(paths: Paths, code: str) -> tuple[dict[str, Any], str]:
    """Run `code` against the test's own Airflow DB (the test process holds the session's): its RESULT, its output."""
    import os

    env = {**os.environ, **airflow_environ(paths)}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    (result,) = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1:]
    return json.loads(result.removeprefix("RESULT ")), output


def _log(folder: Path, records: list[RequestRecord]) -> None:
    part = folder / partition_name(END.date()) / "part-test-0.parquet"
    part.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_batches([to_batch(records, REQUEST_SCHEMA)]), part)


def _searches(prefix: str, start: datetime, queries: list[str], version: str) -> list[RequestRecord]:
    return [
        RequestRecord(
            f"{prefix}-{i}",
            start + timedelta(minutes=i),
            "search",
            version,
            q,
            None,
            3,
            None,
            [1, 2, 3],
            [0.9, 0.5, 0.4],
            False,
            None,
            None,
            10.0,
        )
        for i, q in enumerate(queries)
    ]


def test_a_drift_alarm_schedules_a_retrain_that_trains_for_the_monitors_reason(
    champion: RegisteredChampion, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = time.perf_counter()
    # An Airflow DB of the test's own. The session's (tests/conftest.py sets AIRFLOW_HOME for the whole run) holds the
    # retrain DAG created paused by earlier tests' runs, and a paused DAG queues no run for an asset event: in the
    # full suite the event was dropped while the test passed alone.
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    # the champion's snapshot is a day older than the windows: their alarms are news to it
    paths, version = monitored_champion(champion, tmp_path, monkeypatch, data_as_of=END - timedelta(days=1))
    # its DAGs are created unpaused, so an asset event queues the retrain DAG as in a deployment that unpaused it
    monkeypatch.setenv("AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION", "False")
    # fewer distinct queries than monitor.min_queries: no drift test runs, the vocabulary decides (and it is fast)
    terms = [str(t) for t in sorted(pd.read_parquet(champion.snapshot_dir / "judgments_train.parquet")["search_term"])]
    terms = list(dict.fromkeys(terms))[:20]
    quiet = _searches("quiet", END - timedelta(hours=2), terms, version)
    drifted = _searches("new", END - timedelta(hours=1), terms[:10] + [f"{NEW_WORDS} {i}" for i in range(10)], version)
    _log(paths.home / "request_log", quiet + drifted)

    lap = time.perf_counter()
    calm = run_dag_test(paths, "shopguide_monitor", {"profile": "tiny"}, END - timedelta(hours=1), capture=True)
    assert calm.ok, calm.output[-4000:]
    assert calm.task_states["announce_drift"] == "skipped", calm.task_states
    assert calm.xcom("record")["alarms"]["vocabulary"] is False, calm.xcom("record")["reasons"]
    assert "drift NOT announced: no drift or vocabulary-miss alarm" in calm.output

    laps = {"quiet window (with the Airflow DB's migration)": time.perf_counter() - lap}
    lap = time.perf_counter()
    alarm = run_dag_test(paths, "shopguide_monitor", {"profile": "tiny"}, END, capture=True)
    laps["drifted window"] = time.perf_counter() - lap
    assert alarm.ok, alarm.output[-4000:]
    assert alarm.task_states["announce_drift"] == "success", alarm.task_states
    announced = alarm.xcom("announce_drift")
    extra = announced["extra"]
    assert extra["alarms"] == ["vocabulary"] and extra["model_version"] == version
    assert extra["window_end"] == END.isoformat() and "vocabulary: ALARM" in extra["reason"]

    lap = time.perf_counter()
    airflow, output = _airflow_python(paths, _SCHEDULE_AND_DECIDE)
    laps["scheduler step + retrain decide"] = time.perf_counter() - lap
    # one drift event, the drifted window's, its extra as announced; the quiet window emitted none
    drift_events = [e for e in airflow["events"] if e["asset"] == DRIFT_ASSET]
    assert [(e["source_dag_id"], e["source_run_id"]) for e in drift_events] == [("shopguide_monitor", alarm.run_id)]
    assert drift_events[0]["extra"] == extra
    # it queued the retrain DAG (scheduled on user events | drift), and the scheduler started it from the event (the
    # DAGs' pause flags and parse errors in the message: a paused or unparsed retrain DAG queues nothing)
    assert airflow["queued"] == [[DRIFT_ASSET, RETRAIN]], (airflow["dags"], airflow["errors"])
    (run,) = airflow["runs"]
    assert run["dag_id"] == RETRAIN and run["consumed"] == [alarm.run_id]
    assert airflow["state"] == "success", output[-3000:]
    decision = airflow["decision"]
    assert decision["go"], decision["reason"]
    assert decision["facts"]["run_type"] == "asset_triggered" and decision["facts"]["champion"] == version
    assert decision["trigger_reason"] == f"asset {DRIFT_ASSET} from shopguide_monitor/{alarm.run_id}: {extra['reason']}"
    assert "the monitor announced drift (vocabulary) in the window ending " + END.isoformat() in decision["reason"]
    assert decision["reason"].endswith(f"started by: {decision['trigger_reason']}")
    assert decision["facts"]["drift_events"] == [
        {"model_version": version, "window_end": END.isoformat(), "alarms": ["vocabulary"]}
    ]
    laps["total"] = time.perf_counter() - started
    print("drift -> asset -> retrain decide: " + ", ".join(f"{k} {v:.1f} s" for k, v in laps.items()))
