"""The request log over the real service (the session's registered champion, real parquet in temporary folders):
every answer once with the id the client got, drops instead of waits, flush on shutdown, a SIGKILLed writer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pyarrow.dataset as ds
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from pipelines.data.request_log import read_request_log
from pipelines.runtime.request_log import SCHEMA, RequestRecord, is_part, is_segment
from serving.app import create_app
from serving.metrics import Metrics
from serving.predictor import Predictor
from serving.request_log import ParquetFolderSink, RequestLog, RequestLogSink
from serving.settings import Settings

if TYPE_CHECKING:
    from tests.integration.conftest import RegisteredChampion

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def settings(champion: RegisteredChampion) -> Settings:
    return Settings(home=champion.paths.home, model_name=champion.model_name, model_poll_seconds=0)


@pytest.fixture(scope="module")
def predictor(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    """Loaded once through the app's own start-up (@champion from the registry); each test serves it injected."""
    folder = tmp_path_factory.mktemp("request-log-startup")
    with TestClient(create_app(settings.model_copy(update={"request_log_dir": folder}))) as c:
        return c.app.state.serving.predictor


@pytest.fixture(scope="module")
def terms(champion: RegisteredChampion) -> list[str]:
    judged = pd.read_parquet(champion.snapshot_dir / "judgments_train.parquet")
    return sorted(judged["search_term"].astype(str).unique())[:40]


def _app(
    settings: Settings, predictor: Predictor, folder: Path, sink: RequestLogSink | None = None, **update: object
) -> FastAPI:
    return create_app(settings.model_copy(update={"request_log_dir": folder, **update}), predictor, sink)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_every_answer_is_logged_once_with_the_id_the_client_got(
    settings: Settings, predictor: Predictor, terms: list[str], tmp_path: Path, metric_value
) -> None:
    app = _app(settings, predictor, tmp_path)
    calls: list[tuple[str, dict, dict]] = [
        ("/v1/search", {"query": f"  {t} ", "k": 1 + i % 10, **({"user_id": i} if i % 4 == 0 else {})}, {})
        for i, t in enumerate(terms * 2)
    ]
    calls += [("/v1/recommend", {"user_id": u, "k": 5}, {}) for u in range(1, 21)]
    calls.append(("/v1/search", {"query": "cordless drill"}, {"X-Request-ID": "client-chosen:7"}))
    started = datetime.now(UTC)
    with TestClient(app) as client:
        with ThreadPoolExecutor(8) as pool:  # concurrent requests, one writer
            responses = list(pool.map(lambda c: client.post(c[0], json=c[1], headers=c[2]), calls))
        # neither answer of these endpoints is logged
        assert client.post("/v1/classify", json={"queries": ["drill"]}).status_code == 200
        assert client.post("/v1/embed", json={"texts": ["drill"]}).status_code == 200
    ended = datetime.now(UTC)  # after the shutdown: everything is durable and rolled now

    answers = {}
    for (path, request, headers), response in zip(calls, responses, strict=True):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["request_id"] == response.headers["x-request-id"] == headers.get("X-Request-ID", body["request_id"])
        answers[body["request_id"]] = (path, request, body)
    assert len(answers) == len(calls)  # fresh ids are unique

    log = read_request_log(started - timedelta(seconds=1), ended, folder=tmp_path)
    rows = log.to_pylist()
    assert len(rows) == len(calls) and {r["request_id"] for r in rows} == answers.keys()  # each exactly once
    for row in rows:
        path, request, body = answers[row["request_id"]]
        assert row["endpoint"] == path.removeprefix("/v1/")
        assert row["user_id"] == request.get("user_id") and row["k"] == request.get("k", 10)
        assert row["model_version"] == body["model_version"] == predictor.version
        assert row["product_ids"] == [h["product_id"] for h in body["results"]]
        assert row["scores"] == pytest.approx([h["score"] for h in body["results"]], abs=1e-6)
        assert row["personalized"] == body["personalized"] and row["fallback_reason"] == body["fallback_reason"]
        assert started <= row["ts"] <= ended and 0 < row["latency_ms"] < 60_000
        if path == "/v1/search":
            assert row["query"] == body["query"] == request["query"].strip() and row["method"] is None
            assert row["category"] == body["category"]
        else:
            assert row["query"] is None and row["category"] is None and row["method"] == body["method"]
    assert [r["ts"] for r in rows] == sorted(r["ts"] for r in rows)
    assert metric_value(app, "shopguide_request_log_written_rows_total") == len(calls)
    assert metric_value(app, "shopguide_request_log_dropped_rows_total") == 0
    # the clean shutdown rolled every segment: only parquet parts, readable by any hive-partitioned reader
    files = _files(tmp_path)
    assert files and all(is_part(p) for p in files), files
    assert ds.dataset(tmp_path, format="parquet", partitioning="hive").count_rows() == len(calls)


def test_malformed_requests_are_not_logged(
    settings: Settings, predictor: Predictor, tmp_path: Path, metric_value
) -> None:
    app = _app(settings, predictor, tmp_path)
    malformed = [
        ("/v1/search", {"query": ""}),
        ("/v1/search", {"query": "drill", "k": 0}),
        ("/v1/search", {"query": "drill", "unknown": 1}),
        ("/v1/recommend", {"user_id": -1}),
        ("/v1/recommend", {"user_id": "7"}),
    ]
    with TestClient(app) as client:
        for path, body in malformed:
            assert client.post(path, json=body).status_code == 422
        answered = client.post("/v1/search", json={"query": "drill"}).json()
    assert metric_value(app, "shopguide_requests_total", status="422") == len(malformed)
    assert read_request_log(folder=tmp_path)["request_id"].to_pylist() == [answered["request_id"]]


def test_disabled_writes_nothing(settings: Settings, predictor: Predictor, tmp_path: Path) -> None:
    app = _app(settings, predictor, tmp_path / "log", request_log_enabled=False)
    with TestClient(app) as client:
        assert client.post("/v1/search", json={"query": "drill"}).status_code == 200
    assert not (tmp_path / "log").exists()


class StalledSink(ParquetFolderSink):
    """The real folder sink behind a gate: an append waits until the test opens it, like a disk that stopped
    answering (the writer thread blocks in it; requests must not)."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.entered, self.gate = threading.Event(), threading.Event()

    def append(self, records: Sequence[RequestRecord]) -> None:
        self.entered.set()
        self.gate.wait(timeout=30)
        super().append(records)


def test_a_full_queue_drops_and_counts_without_slowing_requests(
    settings: Settings, predictor: Predictor, terms: list[str], tmp_path: Path, metric_value
) -> None:
    sink = StalledSink(tmp_path)
    app = _app(settings, predictor, tmp_path, sink, request_log_queue=1, request_log_flush_seconds=0.05)
    # a safety: if submitting waited for the writer, the requests below would take until this opens the gate
    opener = threading.Timer(6.0, sink.gate.set)
    opener.start()
    try:
        with TestClient(app) as client:
            first = client.post("/v1/search", json={"query": terms[0]}).json()["request_id"]
            assert sink.entered.wait(10)  # the writer holds `first` and is stuck in the sink
            started = time.perf_counter()
            later = [client.post("/v1/search", json={"query": t}) for t in terms[1:13]]
            elapsed = time.perf_counter() - started
            assert all(r.status_code == 200 for r in later)
            assert elapsed < 3.0, f"12 searches took {elapsed:.1f} s while the log writer was stuck"
            metrics = client.get("/metrics").text
            assert metric_value(metrics, "shopguide_request_log_dropped_rows_total", reason="queue_full") == 11
            assert metric_value(metrics, "shopguide_request_log_queue_depth") == 1  # the one that fitted
            sink.gate.set()
    finally:
        opener.cancel()
    # what was accepted is written on shutdown: the stuck row and the queued one
    logged = read_request_log(folder=tmp_path)["request_id"].to_pylist()
    assert logged == [first, later[0].json()["request_id"]]
    assert metric_value(app, "shopguide_request_log_written_rows_total") == 2


def test_clean_shutdown_flushes_everything(
    settings: Settings, predictor: Predictor, terms: list[str], tmp_path: Path
) -> None:
    # nothing is due before the shutdown: a flush interval and a roll interval far longer than the test
    app = _app(settings, predictor, tmp_path, request_log_flush_seconds=60, request_log_roll_seconds=3600)
    with TestClient(app) as client:
        ids = [client.post("/v1/search", json={"query": t}).json()["request_id"] for t in terms[:20]]
        ids.append(client.post("/v1/recommend", json={"user_id": 3}).json()["request_id"])
        assert read_request_log(folder=tmp_path).num_rows == 0  # still queued: only the shutdown writes them
    assert read_request_log(folder=tmp_path)["request_id"].to_pylist() == ids
    assert [p.name.startswith("part-") for p in _files(tmp_path)] == [True]  # one part, no segment


WRITER = """
import sys, time
from datetime import UTC, datetime
from pathlib import Path
from pipelines.runtime.request_log import RequestRecord
from serving.metrics import Metrics
from serving.request_log import ParquetFolderSink, RequestLog

log = RequestLog(ParquetFolderSink(Path(sys.argv[1])), 10_000, float(sys.argv[2]), Metrics())
log.start()
for i in range(1_000_000):
    rid = f"r{i:07d}"
    log.submit(RequestRecord(rid, datetime.now(UTC), "search", "7", "drill", None, 2, None, [1, 2], [0.5, 0.25],
                             False, None, None, 1.0))
    print(rid, time.monotonic(), flush=True)
    time.sleep(0.002)
"""


def test_a_killed_writer_loses_at_most_the_last_flush_interval(tmp_path: Path) -> None:
    flush = 0.25
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), str(flush)], stdout=subprocess.PIPE, text=True, env=env
    )
    submitted: list[tuple[str, float]] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            rid, at = line.split()
            submitted.append((rid, float(at)))
            if submitted[-1][1] - submitted[0][1] >= 1.5:  # several flushes in
                break
        killed_at = time.monotonic()  # CLOCK_MONOTONIC: the same clock in both processes
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    submitted += [(rid, float(at)) for rid, at in (line.split() for line in rest.splitlines() if line.strip())]
    assert proc.returncode == -signal.SIGKILL

    # no roll yet (every 60 s): what survives is the dead writer's segment, read up to its last complete batch
    assert [is_segment(p) for p in _files(tmp_path)] == [True]
    logged = read_request_log(folder=tmp_path)["request_id"].to_pylist()
    order = [rid for rid, _ in submitted]
    assert logged == order[: len(logged)]  # a prefix, in order, nothing twice
    # a flush is a write + fsync; on this loaded 2-core machine allow it 0.5 s on top of the interval
    due = [rid for rid, at in submitted if at < killed_at - flush - 0.5]
    assert len(due) > 50 and set(due) <= set(logged), f"{len(set(due) - set(logged))} of {len(due)} due rows lost"

    # the next writer to start rolls the orphan into its part; the log reads the same
    assert ParquetFolderSink(tmp_path).recover() == 1
    assert [is_part(p) for p in _files(tmp_path)] == [True]
    assert read_request_log(folder=tmp_path)["request_id"].to_pylist() == logged


def _record(rid: str, ts: datetime) -> RequestRecord:
    return RequestRecord(rid, ts, "recommend", "3", None, 9, 1, None, [5], [0.5], True, None, "history", 2.0)


def _until(condition: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def live_log(tmp_path: Path) -> Iterator[RequestLog]:
    log = RequestLog(ParquetFolderSink(tmp_path), 100, 0.05, Metrics())
    log.start()
    yield log
    log.close()


def test_a_live_writers_segment_is_not_taken_for_an_orphan(live_log: RequestLog, tmp_path: Path) -> None:
    live_log.submit(_record("a", datetime.now(UTC)))
    _until(lambda: read_request_log(folder=tmp_path).num_rows == 1)  # durable within the flush interval
    assert ParquetFolderSink(tmp_path).recover() == 0  # locked by its writer: left alone
    live_log.submit(_record("b", datetime.now(UTC)))
    live_log.close()
    assert read_request_log(folder=tmp_path)["request_id"].to_pylist() == ["a", "b"]


def test_segments_roll_into_parts_while_the_writer_runs(tmp_path: Path) -> None:
    log = RequestLog(ParquetFolderSink(tmp_path, roll_seconds=0.3), 100, 0.05, Metrics())
    log.start()
    try:
        log.submit(_record("a", datetime.now(UTC)))
        _until(lambda: any(is_part(p) for p in _files(tmp_path)))  # rolled by age, not by a shutdown
        log.submit(_record("b", datetime.now(UTC)))
        _until(lambda: read_request_log(folder=tmp_path).num_rows == 2)
        # the reader joins the rolled part and the live segment, each row once
        assert read_request_log(folder=tmp_path)["request_id"].to_pylist() == ["a", "b"]
    finally:
        log.close()
    assert [is_part(p) for p in _files(tmp_path)] == [True, True]
    assert read_request_log(folder=tmp_path)["request_id"].to_pylist() == ["a", "b"]


def test_a_time_window_reads_across_date_partitions(live_log: RequestLog, tmp_path: Path) -> None:
    midnight = datetime(2026, 12, 4, tzinfo=UTC)
    times = [midnight + timedelta(minutes=m) for m in (-90, -1, 0, 1, 90)]
    for i, ts in enumerate(times):
        live_log.submit(_record(f"r{i}", ts))
    live_log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["date=2026-12-03", "date=2026-12-04"]

    def window(start: datetime | None, end: datetime | None) -> list[str]:
        table = read_request_log(start, end, folder=tmp_path)
        assert table.schema.equals(SCHEMA)
        return table["request_id"].to_pylist()

    assert window(None, None) == ["r0", "r1", "r2", "r3", "r4"]
    assert window(times[1], times[3]) == ["r1", "r2"]  # [start, end)
    assert window(midnight, None) == ["r2", "r3", "r4"]
    assert window(None, midnight) == ["r0", "r1"]
    assert window(midnight + timedelta(days=1), None) == []
    with pytest.raises(ValueError, match="timezone-aware"):
        read_request_log(datetime(2026, 12, 4), folder=tmp_path)
