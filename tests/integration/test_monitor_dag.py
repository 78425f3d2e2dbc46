"""The monitor DAG on a real `dags test` run: a hand-made hour of the request log and its feedback events, the
session's champion bundle registered as @champion in an MLflow store of the test's own -> one MLflow run for the
window (tagged with the version, the HTML report as artifact), its row in the window table, the Prometheus textfile
and `shopguide monitor`'s table."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipelines.airflow_env import run_dag_test
from pipelines.config import Paths
from pipelines.runtime.event_log import SCHEMA as EVENT_SCHEMA
from pipelines.runtime.event_log import EventRecord
from pipelines.runtime.logfolder import partition_name, to_batch
from pipelines.runtime.request_log import SCHEMA as REQUEST_SCHEMA
from pipelines.runtime.request_log import RequestRecord
from tests.integration.conftest import RegisteredChampion, monitored_champion

END = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def _write(folder: Path, records: list, schema, day: datetime) -> None:
    part = folder / partition_name(day.date()) / "part-test-0.parquet"
    part.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa_table(records, schema), part)


def pa_table(records: list, schema):
    import pyarrow as pa

    return pa.Table.from_batches([to_batch(records, schema)])


@pytest.fixture
def monitored_home(
    champion: RegisteredChampion, airflow_paths: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Paths, str]:
    """monitored_champion with one hour of answers before END plus one outside it, and clicks on ten of them."""
    paths, version = monitored_champion(champion, tmp_path, monkeypatch)
    terms = sorted(pd.read_parquet(champion.snapshot_dir / "judgments_train.parquet")["search_term"].unique())[:40]
    queries = [str(t) for t in terms] + [f"zorblaxian quuxwidget {i}" for i in range(10)]
    answers = [
        RequestRecord(
            request_id=f"req-{i}",
            ts=END - timedelta(minutes=59) + timedelta(seconds=60 * i),
            endpoint="search",
            model_version=version,
            query=q,
            user_id=None,
            k=3,
            category=None,
            product_ids=[] if i % 25 == 0 else [1, 2, 3],
            scores=[] if i % 25 == 0 else [0.9, 0.5, 0.4],
            personalized=False,
            fallback_reason=None,
            method=None,
            latency_ms=10.0 + i % 7,
        )
        for i, q in enumerate(queries)
    ]
    outside = dataclasses.replace(answers[1], request_id="req-late", ts=END + timedelta(minutes=1))
    _write(paths.home / "request_log", [*answers, outside], REQUEST_SCHEMA, END)
    clicks = [
        EventRecord(a.ts + timedelta(seconds=5), a.request_id, 1, 1, "click", a.ts, 0, version) for a in answers[1:11]
    ]
    _write(paths.home / "event_log", clicks, EVENT_SCHEMA, END)
    return paths, version


def test_monitor_dag_records_the_window(monitored_home: tuple[Paths, str]) -> None:
    from mlflow import MlflowClient
    from prometheus_client.parser import text_string_to_metric_families

    from pipelines.cli import app
    from pipelines.monitoring.decision import retrain_alarms
    from pipelines.monitoring.records import read_windows, textfile_path
    from pipelines.steps.monitor import EXPERIMENT, REPORT_FILE

    paths, version = monitored_home
    run = run_dag_test(paths, "shopguide_monitor", {"profile": "tiny"}, END, capture=True, timeout=300)
    assert run.ok, run.output[-4000:]
    measured, decision = run.xcom("measure"), run.xcom("record")
    assert measured["model_version"] == version and measured["reference"].startswith("snapshot ")
    health = measured["health"]
    assert health["requests"] == 50 and health["empty_rate"] == pytest.approx(2 / 50)  # req-late is outside
    assert measured["engagement"] == [{"model_version": version, "searches": 50, "ctr": 0.2, "add_to_cart_rate": 0.0}]
    assert measured["vocabulary"]["missed_words"] >= 20  # the two invented words of 10 queries
    assert set(measured["drift"]) == {"query_text", "query_embedding", "category"}
    assert "freshness_error" in decision  # no Feast repo in this home: reported, not raised
    assert decision["freshness_error"] and decision["alarms"]["feature_age:no_feature_view_readable"]  # never "fresh"
    # a stale store asks for no retrain: only a drift or vocabulary alarm announces (test_drift_retrain.py)
    announced = "success" if retrain_alarms(decision["alarms"]) else "skipped"
    assert run.task_states["announce_drift"] == announced, (decision["alarms"], run.task_states)

    client = MlflowClient(paths.mlflow_tracking_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == decision["mlflow_run_id"]
    assert runs[0].data.tags["model_version"] == version and runs[0].data.tags["window_end"] == END.isoformat()
    assert runs[0].data.metrics["monitor.requests"] == 50
    assert REPORT_FILE in [a.path for a in client.list_artifacts(runs[0].info.run_id)]

    table = read_windows(paths)
    assert table.num_rows == 1 and table["window_end"][0].as_py() == END
    names = {f.name for f in text_string_to_metric_families(textfile_path(paths).read_text())}
    assert {"shopguide_monitor_last_success_timestamp_seconds", "shopguide_monitor_drift_detected"} <= names
    assert "shopguide_monitor_vocab_miss_ratio" in names

    shown = CliRunner().invoke(app, ["monitor", "--profile", "tiny"], env={"SHOPGUIDE_HOME": str(paths.home)})
    assert shown.exit_code == 0, shown.output
    assert f"@champion v{version}" in shown.output and "vocabulary miss ratio" in shown.output
