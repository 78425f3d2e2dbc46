"""The logs' shared store (SHOPGUIDE_LOG_STORE) on real files and fsspec's memory filesystem: writers on two "hosts"
(their own local folders) roll their parts into one store, a crashed writer's segment goes there on restart, a clean
shutdown leaves nothing behind, and the pipelines' readers on a host without the logs read the store."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from pipelines.data.event_log import read_event_log
from pipelines.data.request_log import read_request_log
from pipelines.runtime import event_log
from pipelines.runtime.event_log import EventRecord
from pipelines.runtime.logfolder import LogStore, is_part
from pipelines.runtime.request_log import REQUEST_LOG_DIRNAME, RequestRecord
from serving.log_writer import LogWriter, SegmentFolderSink
from serving.metrics import Metrics
from serving.request_log import ParquetFolderSink, RequestLog

REPO_ROOT = Path(__file__).resolve().parents[2]


def _record(rid: str, ts: datetime | None = None, query: str | None = None) -> RequestRecord:
    endpoint = "search" if query else "recommend"
    ts = ts or datetime.now(UTC)
    return RequestRecord(rid, ts, endpoint, "3", query, 9, 2, None, [5, 6], [0.5, 0.4], True, None, None, 2.0)


def _until(condition: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _ids(folder: Path, store: LogStore) -> list[str]:
    return read_request_log(folder=folder, store=store)["request_id"].to_pylist()


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_two_writers_roll_into_one_store_and_a_clean_shutdown_leaves_nothing_behind(
    scheme: str, tmp_path: Path
) -> None:
    base = f"file://{tmp_path / 'store'}" if scheme == "file" else f"memory://{tmp_path.name}"
    store = LogStore.at(base, REQUEST_LOG_DIRNAME)
    host_a, host_b, elsewhere = tmp_path / "a", tmp_path / "b", tmp_path / "worker"
    # a rolls by age; b only writes on its shutdown (nothing is due before it)
    a = RequestLog(ParquetFolderSink(host_a, roll_seconds=0.2, store=store), 100, 0.05, Metrics())
    b = RequestLog(ParquetFolderSink(host_b, roll_seconds=3600, store=store), 100, 60, Metrics())
    a.start(), b.start()
    try:
        a.submit(_record("a1"))
        b.submit(_record("b1"))
        _until(lambda: _ids(elsewhere, store) == ["a1"])  # rolled into the store while a runs
        assert not [p for p in _files(host_a) if is_part(p)]  # parts never stay on the writer's disk
        a.submit(_record("a2"))
        _until(lambda: _ids(host_a, store) == ["a1", "a2"])  # a's host: the store's part and the live segment
        assert _ids(elsewhere, store) == ["a1"]  # another host: up to a's last roll
    finally:
        a.close()
        b.close()
    assert _files(host_a) == _files(host_b) == []  # every segment rolled and uploaded
    parts = store.fs.find(store.root)
    assert len(parts) == 3 and all(p.rsplit("/", 1)[-1].startswith("part-") for p in parts)
    assert _ids(elsewhere, store) == ["a1", "b1", "a2"]  # each row once, by ts
    # any hive-partitioned parquet reader over the store's URL sees the same rows
    assert ds.dataset(store.root, filesystem=store.fs, format="parquet", partitioning="hive").count_rows() == 3


CRASHING_WRITER = """
import os, sys
from datetime import UTC, datetime
from pathlib import Path
from pipelines.runtime.logfolder import LogStore
from pipelines.runtime.request_log import RequestRecord
from serving.request_log import ParquetFolderSink

sink = ParquetFolderSink(Path(sys.argv[1]), store=LogStore.at(sys.argv[2], "request_log"))
sink.open()
for rid in ("c1", "c2"):
    sink.append([RequestRecord(rid, datetime.now(UTC), "recommend", "3", None, 9, 1, None, [5], [0.5], True, None,
                               None, 2.0)])
os._exit(0)  # no close, no roll: what a crash leaves
"""


def test_a_crashed_writers_segment_and_an_older_local_part_go_to_the_store_on_restart(tmp_path: Path) -> None:
    host, elsewhere, base = tmp_path / "replica", tmp_path / "worker", f"file://{tmp_path / 'store'}"
    store = LogStore.at(base, REQUEST_LOG_DIRNAME)
    before = RequestLog(ParquetFolderSink(host), 10, 0.01, Metrics())  # before the store was configured
    before.start()
    before.submit(_record("old", datetime.now(UTC) - timedelta(seconds=5)))
    before.close()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-c", CRASHING_WRITER, str(host), base], env=env, check=True, timeout=60)

    # the writer uploaded the older part when it started; its own rows are in the orphan segment on its disk
    assert [p.suffix for p in _files(host)] == [".arrows"]
    assert _ids(host, store) == ["old", "c1", "c2"]
    assert _ids(elsewhere, store) == ["old"]  # the segment is not shared yet
    assert ParquetFolderSink(host, store=store).recover() == 1  # what the next writer does when it starts
    assert _files(host) == []
    assert _ids(elsewhere, store) == ["old", "c1", "c2"]


def test_the_pipelines_read_the_store_on_a_host_without_the_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a Celery worker on another host does: the features DAG's count of new events, the retrain decision's
    count of learnable feedback, the monitor's windows (read_request_log / read_event_log with their defaults)."""
    from pipelines.data.dataset import is_training_term
    from pipelines.data.feedback import FeedbackSource, count_new_feedback
    from pipelines.steps.features import announce_events

    base = f"file://{tmp_path / 'store'}"
    monkeypatch.setenv("SHOPGUIDE_LOG_STORE", base)
    monkeypatch.setenv("SHOPGUIDE_REQUEST_LOG_DIR", str(tmp_path / "worker" / "requests"))
    monkeypatch.setenv("SHOPGUIDE_EVENT_LOG_DIR", str(tmp_path / "worker" / "events"))
    replica = tmp_path / "replica"
    requests = RequestLog(
        ParquetFolderSink(replica / "requests", store=LogStore.at(base, REQUEST_LOG_DIRNAME)), 100, 0.01, Metrics()
    )
    events_store = LogStore.at(base, event_log.EVENT_LOG_DIRNAME)
    events = LogWriter(
        SegmentFolderSink(replica / "events", event_log.SCHEMA, store=events_store), 100, 0.01, Metrics().event_log
    )
    requests.start(), events.start()
    term = next(t for t in (f"synthetic term {i}" for i in range(100)) if is_training_term(t))
    now = datetime.now(UTC)
    since, until = now - timedelta(hours=1), now + timedelta(minutes=1)
    requests.submit(_record("s1", now - timedelta(seconds=2), term))
    requests.submit(_record("r1", now - timedelta(seconds=2)))
    events.submit_all(
        [
            EventRecord(now, "s1", 7, 5, "click", now, 0, "3"),
            EventRecord(now, "r1", 7, 6, "add_to_cart", now, 1, "3"),
        ]
    )
    requests.close(), events.close()
    assert _files(tmp_path / "worker") == []

    assert read_request_log(since, until).num_rows == 2 and read_event_log(since, until).num_rows == 2
    assert count_new_feedback(FeedbackSource(since), until) == 1  # the search answer with a click
    landed = {"as_of": until.isoformat(), "run_key": "store-test"}
    announced = announce_events(landed, {"extra": {"landed_until": since.isoformat()}, "timestamp": since})
    assert announced["extra"]["new_feedback_events"] == 2
