"""POST /v1/events over the real service (the session's registered champion, a copy of its applied and materialized
Feast SQLite stores, real logs in temporary folders): a click moves the next personalised answer, refusals with their
reasons, idempotent repeats, another replica's answers, Feast down, and the event log read back."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from fastapi.testclient import TestClient

from pipelines.data.event_log import read_event_log
from pipelines.runtime import event_log
from pipelines.runtime.event_log import EventRecord
from serving.app import create_app
from serving.log_writer import LogWriter, SegmentFolderSink
from serving.metrics import Metrics
from serving.online_features import OnlineFeatures
from serving.predictor import Predictor
from serving.settings import Settings

if TYPE_CHECKING:
    from tests.integration.conftest import RegisteredChampion

KEY = "events-test-key"
NEW_USER = 700_001  # no online row: neither simulated nor used by any other test


@pytest.fixture(scope="module")
def predictor(champion: RegisteredChampion, tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    """Loaded once through the app's own start-up (@champion from the registry); each test serves it injected."""
    folder = tmp_path_factory.mktemp("events-startup")
    settings = Settings(
        home=champion.paths.home,
        model_name=champion.model_name,
        model_poll_seconds=0,
        request_log_dir=folder / "requests",
        event_log_dir=folder / "events",
    )
    with TestClient(create_app(settings)) as c:
        return c.app.state.serving.predictor


@pytest.fixture(scope="module")
def feast_copy(champion_features: RegisteredChampion, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The champion home's Feast stores (applied with the push source, materialized), copied: this module's pushes
    stay out of the store the other serving tests read."""
    folder = tmp_path_factory.mktemp("events-feast") / "feast"
    shutil.copytree(champion_features.paths.feast_dir, folder)
    return folder


@pytest.fixture
def settings(champion: RegisteredChampion, feast_copy: Path, tmp_path: Path) -> Settings:
    """A home with a fresh copy of the Feast stores and empty logs; 50 ms flushes, so replicas see each other fast."""
    shutil.copytree(feast_copy, tmp_path / "home" / "feast")
    return Settings(
        home=tmp_path / "home",
        model_name=champion.model_name,
        model_poll_seconds=0,
        request_log_flush_seconds=0.05,
        request_log_dir=tmp_path / "requests",
        event_log_dir=tmp_path / "events",
    )


def _client(settings: Settings, predictor: Predictor, **update: Any) -> TestClient:
    return TestClient(create_app(settings.model_copy(update=update), predictor))


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _post(client: TestClient, path: str, body: Any, status: int = 200, **headers: str) -> dict:
    response = client.post(path, json=body, headers=headers)
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    return response.json()


def _event(answer: dict, product_id: Any, kind: str = "click", user_id: int = NEW_USER, **extra: Any) -> dict:
    """An event on `answer` (a /v1/search or /v1/recommend body); `extra` overrides or adds fields."""
    body = {"request_id": answer["request_id"], "user_id": user_id, "product_id": product_id, "type": kind}
    return body | {"ts": _now()} | extra


def _ids(answer: dict) -> list[int]:
    return [r["product_id"] for r in answer["results"]]


def _until(condition: Any, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_click_moves_the_users_next_personalised_answer(
    settings: Settings, predictor: Predictor, metric_value
) -> None:
    with _client(settings, predictor) as client:
        before = _post(client, "/v1/search", {"query": "cordless drill", "user_id": NEW_USER})
        assert before["personalized"] is False and before["fallback_reason"] == "no_online_features"
        other = _post(client, "/v1/search", {"query": "garden hose", "user_id": NEW_USER})
        clicked = next(p for p in _ids(other) if p not in _ids(before))
        started = time.perf_counter()
        ack = _post(client, "/v1/events", _event(other, clicked), 202)
        after = _post(client, "/v1/search", {"query": "cordless drill", "user_id": NEW_USER})
        elapsed = time.perf_counter() - started
        app = client.app
    assert ack == {
        "model_version": predictor.version,
        "received": 1,
        "accepted": 1,
        "duplicates": 0,
        "online": True,
        "online_reason": None,
    }
    # the click is online for the very next request: one event and one search took well under a second
    assert after["personalized"] is True and after["fallback_reason"] is None, after
    assert elapsed < 1.0, f"event + next search took {elapsed:.2f} s"
    assert _ids(after) != _ids(before)
    index = predictor.index
    vec = index.embeddings[index.rows_of([clicked])[0]]

    def closeness(answer: dict) -> float:  # how near the answer's products are to the clicked one
        return float((index.embeddings[index.rows_of(_ids(answer))] @ vec).mean())

    assert closeness(after) > closeness(before)
    row = OnlineFeatures(settings.paths).user_features(NEW_USER)
    assert row is not None and row["recent_products"] == [clicked]
    assert (row["clicks_7d"], row["events_1d"], row["events_30d"], row["purchases_30d"]) == (1, 1, 1, 0)
    assert metric_value(app, "shopguide_events_total", type="click", outcome="accepted") == 1
    assert metric_value(app, "shopguide_feature_pushes_total", result="ok") == 1


def test_events_add_to_a_materialized_history(settings: Settings, predictor: Predictor) -> None:
    online = OnlineFeatures(settings.paths)
    user, history = next(
        (u, r) for u in range(1, 31) if len((r := online.user_features(u) or {}).get("recent_products") or []) >= 3
    )
    with _client(settings, predictor) as client:
        answer = _post(client, "/v1/search", {"query": "paint roller", "user_id": user})
        product = next(p for p in _ids(answer) if p not in history["recent_products"])
        seen = set(_ids(answer)) | set(history["recent_products"])
        catalog_only = next(int(p) for p in predictor.index.product_ids if int(p) not in seen)
        batch = [
            _event(answer, product, user_id=user),
            _event(answer, product, "add_to_cart", user_id=user),
            _event(answer, catalog_only, "purchase", user_id=user),  # bought, not shown: in the catalog, so accepted
        ]
        ack = _post(client, "/v1/events", {"events": batch}, 202)
    assert (ack["accepted"], ack["duplicates"], ack["online"]) == (3, 0, True)
    row = online.user_features(user)
    assert row is not None
    assert row["recent_products"] == ([catalog_only, product] + history["recent_products"])[:10]
    for column, added in [("events_1d", 3), ("events_7d", 3), ("clicks_7d", 1), ("purchases_30d", 1)]:
        assert row[column] == history[column] + added, column
    assert row["last_event_ts"] >= int(datetime.fromisoformat(batch[-1]["ts"]).timestamp()) > history["last_event_ts"]
    logged = read_event_log(folder=settings.event_log_folder).to_pylist()  # after the shutdown's flush
    assert [(r["product_id"], r["event_type"]) for r in logged] == [
        (product, "click"),
        (product, "add_to_cart"),
        (catalog_only, "purchase"),
    ]
    assert [r["position"] for r in logged] == [_ids(answer).index(product)] * 2 + [None]
    assert all(r["request_id"] == answer["request_id"] and r["user_id"] == user for r in logged)
    assert all(r["model_version"] == predictor.version for r in logged)


def test_invalid_events_are_refused_with_the_reason(settings: Settings, predictor: Predictor, metric_value) -> None:
    with _client(settings, predictor, max_events=3) as client:
        mine = _post(client, "/v1/search", {"query": "light bulb", "user_id": 41})
        anonymous = _post(client, "/v1/search", {"query": "light bulb"})
        shown = _ids(mine)[0]
        hidden = next(int(p) for p in predictor.index.product_ids if int(p) not in _ids(mine))
        old = (datetime.now(UTC) - timedelta(minutes=10)).isoformat()
        ahead = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
        refused = [
            (_event(mine, shown, user_id=41, request_id="never-answered"), "unknown_request"),
            (_event(mine, shown, user_id=7), "user_mismatch"),
            (_event(mine, hidden, user_id=41), "not_shown"),
            (_event(mine, 99_999_999, "purchase", user_id=41), "unknown_product"),
            (_event(mine, shown, user_id=41, ts=old), "timestamp"),
            (_event(mine, shown, user_id=41, ts=ahead), "timestamp"),
        ]
        for body, reason in refused:
            detail = _post(client, "/v1/events", body, 422)["detail"]
            assert [d["type"] for d in detail] == [reason], detail
            assert detail[0]["loc"][0] == "body" and detail[0]["msg"]
        malformed = [
            _event(mine, shown, user_id=41, ts="2026-12-04T10:00:00"),  # no UTC offset
            _event(mine, shown, user_id=41, ts=1_733_300_000),  # a number: seconds or milliseconds?
            _event(mine, shown, "view", user_id=41),  # not a feedback type
            _event(mine, shown, user_id=41, extra=1),
            _event(mine, shown, user_id=41, request_id="bad id\n"),
            _event(mine, str(shown), user_id=41),
            _event(mine, shown, user_id=-1),
            {"events": []},
            {"events": [_event(mine, shown, user_id=41)] * 4},  # over max_events
            [_event(mine, shown, user_id=41)],  # a batch is {"events": [...]}
        ]
        for body in malformed:
            assert _post(client, "/v1/events", body, 422)["detail"]
        # a batch is taken or refused whole: its valid event is not accepted either
        batch = {"events": [_event(mine, shown, user_id=41), _event(mine, hidden, user_id=41)]}
        detail = _post(client, "/v1/events", batch, 422)["detail"]
        assert [(d["loc"], d["type"]) for d in detail] == [(["body", "events", 1, "product_id"], "not_shown")]
        padded = json.dumps(_event(mine, shown, user_id=41)).encode() + b" " * 70_000  # over the body limit
        response = client.post("/v1/events", content=padded, headers={"content-type": "application/json"})
        assert response.status_code == 413
        # an answer without a user (an anonymous search) takes the event's
        ack = _post(client, "/v1/events", _event(anonymous, _ids(anonymous)[0], user_id=43), 202)
        assert ack["accepted"] == 1
        app = client.app
    assert [r["user_id"] for r in read_event_log(folder=settings.event_log_folder).to_pylist()] == [43]
    assert OnlineFeatures(settings.paths).user_features(41) is None  # nothing of the refused events went online
    for reason, n in [("unknown_request", 1), ("user_mismatch", 1), ("not_shown", 2), ("timestamp", 2)]:
        assert metric_value(app, "shopguide_events_refused_total", reason=reason) == n, reason
    assert metric_value(app, "shopguide_events_total", outcome="refused") == 8
    assert metric_value(app, "shopguide_events_total", outcome="accepted") == 1


def test_repeats_are_acknowledged_once_also_by_another_replica(
    settings: Settings, predictor: Predictor, metric_value
) -> None:
    with _client(settings, predictor) as client:
        answer = _post(client, "/v1/search", {"query": "ceiling fan", "user_id": NEW_USER})
        first, second, third = _ids(answer)[:3]
        click = _event(answer, first)
        assert _post(client, "/v1/events", click, 202)["accepted"] == 1
        again = _post(client, "/v1/events", click | {"ts": _now()}, 202)  # a retry: same answer, product, type
        batch = _post(client, "/v1/events", {"events": [_event(answer, second)] * 2 + [click]}, 202)
        with ThreadPoolExecutor(8) as pool:  # one event sent 8 times at once
            racing = list(pool.map(lambda _: _post(client, "/v1/events", _event(answer, third), 202), range(8)))
        app = client.app
    assert (again["accepted"], again["duplicates"]) == (0, 1)
    assert (batch["received"], batch["accepted"], batch["duplicates"]) == (3, 1, 2)
    assert sorted(r["accepted"] for r in racing) == [0] * 7 + [1]
    # another replica (a fresh process: nothing in memory) recognises them from the shared event log
    with _client(settings, predictor) as replica:
        repeat = _post(replica, "/v1/events", {"events": [click, _event(answer, second)]}, 202)
    assert (repeat["accepted"], repeat["duplicates"]) == (0, 2)
    logged = read_event_log(folder=settings.event_log_folder, deduplicate=False)
    assert logged["product_id"].to_pylist() == [first, second, third]  # written once each
    row = OnlineFeatures(settings.paths).user_features(NEW_USER)
    assert row is not None and (row["clicks_7d"], row["recent_products"]) == (3, [third, second, first])  # once each
    assert metric_value(app, "shopguide_events_total", outcome="duplicate") == 3 + 7
    assert metric_value(app, "shopguide_events_total", outcome="accepted") == 3


@pytest.fixture
def replicas(settings: Settings, predictor: Predictor) -> Iterator[tuple[TestClient, TestClient]]:
    """Two replicas at once over one request log and one event log, as behind the load balancer."""
    with _client(settings, predictor) as a, _client(settings, predictor) as b:
        yield a, b


def test_an_answer_of_another_replica_is_known(replicas: tuple[TestClient, TestClient]) -> None:
    a, b = replicas
    answer = _post(a, "/v1/search", {"query": "door knob", "user_id": NEW_USER})
    started = time.perf_counter()
    ack = _post(b, "/v1/events", _event(answer, _ids(answer)[0]), 202)  # before a's writer necessarily flushed
    assert ack["accepted"] == 1 and ack["online"] is True
    assert time.perf_counter() - started < 1.0  # at most one flush interval + margin of waiting
    started = time.perf_counter()
    detail = _post(b, "/v1/events", _event(answer | {"request_id": "answered-nowhere"}, _ids(answer)[0]), 422)
    assert detail["detail"][0]["type"] == "unknown_request"
    assert time.perf_counter() - started >= 0.5  # a recent unknown id is final only after the replicas' flush
    assert _post(a, "/v1/events", _event(answer, _ids(answer)[0]), 202)["duplicates"] == 1  # b's event, via the log


class StalledSink(SegmentFolderSink[EventRecord]):
    """The real event log folder behind a gate: an append waits until the test opens it (a disk that stopped)."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder, event_log.SCHEMA)
        self.entered, self.gate = threading.Event(), threading.Event()

    def append(self, records: Sequence[EventRecord]) -> None:
        self.entered.set()
        self.gate.wait(timeout=30)
        super().append(records)


def test_a_full_event_log_queue_refuses_with_503_and_a_retry_is_not_a_repeat(
    settings: Settings, predictor: Predictor, metric_value
) -> None:
    sink = StalledSink(settings.event_log_folder)
    app = create_app(settings.model_copy(update={"event_log_queue": 1}), predictor, event_log_sink=sink)
    opener = threading.Timer(10.0, sink.gate.set)  # a safety: never leave the writer stuck
    opener.start()
    try:
        with TestClient(app) as client:
            answer = _post(client, "/v1/search", {"query": "bath towel", "user_id": NEW_USER})
            first, second, third = (_event(answer, p) for p in _ids(answer)[:3])
            assert _post(client, "/v1/events", first, 202)["accepted"] == 1
            assert sink.entered.wait(10)  # the writer holds `first` and is stuck in the sink
            assert _post(client, "/v1/events", second, 202)["accepted"] == 1  # queued: the one place there is
            response = client.post("/v1/events", json=third)
            assert response.status_code == 503 and response.headers["retry-after"] == "1", response.text
            assert _post(client, "/v1/events", second, 202)["duplicates"] == 1
            sink.gate.set()
            deadline = time.monotonic() + 10
            while (response := client.post("/v1/events", json=third)).status_code == 503:
                assert time.monotonic() < deadline, "the writer did not catch up"
                time.sleep(0.05)
            assert response.status_code == 202 and response.json()["accepted"] == 1  # not taken for a repeat
    finally:
        opener.cancel()
    logged = read_event_log(folder=settings.event_log_folder)["product_id"].to_pylist()
    assert logged == [first["product_id"], second["product_id"], third["product_id"]]
    assert metric_value(app, "shopguide_event_log_dropped_rows_total", reason="queue_full") >= 1


def test_feast_down_still_logs_the_event_and_says_so(settings: Settings, predictor: Predictor, metric_value) -> None:
    (settings.home / "feast" / "online.db").write_bytes(b"not a sqlite database" * 100)
    with _client(settings, predictor) as client:
        answer = _post(client, "/v1/search", {"query": "drill bits"})
        ack = _post(client, "/v1/events", _event(answer, _ids(answer)[0], user_id=NEW_USER), 202)
        app = client.app
    assert ack["accepted"] == 1 and ack["online"] is False and ack["online_reason"], ack
    assert read_event_log(folder=settings.event_log_folder)["user_id"].to_pylist() == [NEW_USER]
    assert metric_value(app, "shopguide_feature_pushes_total", result="failed") == 1


def test_the_api_key_guards_events(settings: Settings, predictor: Predictor) -> None:
    with _client(settings, predictor, api_keys=frozenset({KEY})) as client:
        answer = _post(client, "/v1/search", {"query": "drill"}, **{"X-API-Key": KEY})
        event = _event(answer, _ids(answer)[0], user_id=NEW_USER)
        assert client.post("/v1/events", json=event).status_code == 401
        assert client.post("/v1/events", json=event, headers={"X-API-Key": "wrong"}).status_code == 401
        assert _post(client, "/v1/events", event, 202, **{"X-API-Key": KEY})["accepted"] == 1


def test_the_reader_drops_repeats_two_replicas_both_logged(tmp_path: Path) -> None:
    """Two replicas taking one event within a flush interval both log it; read_event_log keeps its first."""
    at = datetime(2026, 12, 4, 23, 59, 59, tzinfo=UTC)
    rows = [
        EventRecord(at, "r1", 5, 100, "click", at, 0, "3"),
        EventRecord(at + timedelta(seconds=1), "r1", 5, 100, "add_to_cart", at, 0, "3"),
        EventRecord(at + timedelta(seconds=2), "r1", 5, 100, "click", at, 0, "3"),  # the other replica's copy
        EventRecord(at + timedelta(seconds=3), "r2", 5, 101, "purchase", at, None, "3"),
    ]
    for i, writer_rows in enumerate([rows[:2], rows[2:]]):
        writer = LogWriter(SegmentFolderSink(tmp_path, event_log.SCHEMA), 10, 0.01, Metrics().event_log, f"w{i}")
        writer.start()
        assert writer.submit_all(writer_rows)
        writer.close()
    table = read_event_log(folder=tmp_path)
    assert table.schema.equals(event_log.SCHEMA)  # ordered by ts, each (request_id, product_id, type) once
    assert [(r["ts"], r["event_type"]) for r in table.to_pylist()] == [
        (rows[0].ts, "click"),
        (rows[1].ts, "add_to_cart"),
        (rows[3].ts, "purchase"),
    ]
    assert read_event_log(folder=tmp_path, deduplicate=False).num_rows == 4
    # [start, end) by acceptance time, across the date partitions; repeats within the window read
    window = read_event_log(at + timedelta(seconds=1), at + timedelta(seconds=3), folder=tmp_path)
    assert window["event_type"].to_pylist() == ["add_to_cart", "click"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["date=2026-12-04", "date=2026-12-05"]
    # the columns pipelines.features.store builds the feature tables from, with their types
    frame = table.to_pandas()[["user_id", "product_id", "event_type", "event_timestamp"]]
    assert str(frame["event_timestamp"].dtype) == "datetime64[us, UTC]" and frame["user_id"].dtype == "int64"


def test_replicas_on_two_hosts_share_answers_and_events_through_the_log_store(
    settings: Settings, predictor: Predictor, tmp_path: Path
) -> None:
    """Two replicas that share no folder (two hosts), only SHOPGUIDE_LOG_STORE: another replica's answer and event
    are known once its writer rolled them into the store; the shutdown leaves every row there."""
    from pipelines.data.request_log import read_request_log
    from pipelines.runtime.logfolder import LogStore

    base = f"file://{tmp_path / 'store'}"
    requests, events = LogStore.at(base, "request_log"), LogStore.at(base, event_log.EVENT_LOG_DIRNAME)

    def host(name: str) -> TestClient:
        local = {"request_log_dir": tmp_path / name / "requests", "event_log_dir": tmp_path / name / "events"}
        return _client(settings, predictor, log_store=base, request_log_roll_seconds=0.2, **local)

    def stored(store: LogStore) -> int:
        return len([p for p in store.fs.find(store.root) if p.endswith(".parquet")])

    with host("a") as a, host("b") as b:
        answer = _post(a, "/v1/search", {"query": "door knob", "user_id": NEW_USER})
        _until(lambda: stored(requests) == 1)
        assert _post(b, "/v1/events", _event(answer, _ids(answer)[0]), 202)["accepted"] == 1
        _until(lambda: stored(events) == 1)
        assert _post(a, "/v1/events", _event(answer, _ids(answer)[0]), 202)["duplicates"] == 1  # b's, via the store
    assert [p for p in tmp_path.glob("[ab]/**/*") if p.is_file()] == []  # nothing left on either host
    elsewhere = tmp_path / "worker"
    assert read_request_log(folder=elsewhere, store=requests)["request_id"].to_pylist() == [answer["request_id"]]
    assert read_event_log(folder=elsewhere, store=events)["request_id"].to_pylist() == [answer["request_id"]]
