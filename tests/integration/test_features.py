"""Feast end to end on temporary homes: build -> write -> apply -> materialize -> online and point-in-time reads."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.config import FEATURE_REPO, Paths
from pipelines.data.dataset import load_judgments, select_terms, simulate_events
from pipelines.features import store as F
from serving.online_features import FeaturesUnavailable, OnlineFeatures

END = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
RECENT_N = 5


def _use_home(monkeypatch: pytest.MonkeyPatch, home: Path) -> Paths:
    monkeypatch.setenv("SHOPGUIDE_HOME", str(home))
    monkeypatch.delenv(F.ONLINE_STORE_ENV, raising=False)
    monkeypatch.delenv(F.REDIS_ENV, raising=False)
    return Paths.from_env()


@pytest.fixture(scope="module")
def events() -> pd.DataFrame:
    return simulate_events(select_terms(load_judgments(), 200), n_users=60, end=END, days=28, seed=3)


@pytest.fixture(scope="module")
def events_file(events: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("snapshot") / "events.parquet"
    events.to_parquet(path, index=False)
    return path


@pytest.fixture(scope="module")
def sqlite_home(events_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Paths, dict]]:
    """One refreshed SQLite-backed home shared by the read-only tests (refresh once: Feast is slow to start)."""
    with pytest.MonkeyPatch.context() as mp:
        paths = _use_home(mp, tmp_path_factory.mktemp("home"))
        result = F.refresh_features(events_file.parent, END, RECENT_N, paths)
        yield paths, result


def expected_user(events: pd.DataFrame, user_id: int, at: datetime, recent_n: int = RECENT_N) -> dict:
    """The user's features at `at`, recomputed naively from the raw log (the test's independent oracle)."""
    ts = events["event_timestamp"]
    mine = events[(events["user_id"] == user_id) & (ts <= at) & (ts > at - timedelta(days=30))]
    last7 = mine[mine["event_timestamp"] > at - timedelta(days=7)]
    last1 = mine[mine["event_timestamp"] > at - timedelta(days=1)]
    recent: list[int] = []
    for pid in mine.iloc[::-1].sort_values("event_timestamp", ascending=False, kind="stable")["product_id"]:
        if int(pid) not in recent:
            recent.append(int(pid))
    return {
        "events_1d": len(last1),
        "events_7d": len(last7),
        "clicks_7d": int((last7["event_type"] == "click").sum()),
        "purchases_30d": int((mine["event_type"] == "purchase").sum()),
        "events_30d": len(mine),
        "last_event_ts": int(mine["event_timestamp"].max().timestamp()),
        "recent_products": recent[:recent_n],
    }


def test_refresh_keeps_state_under_home_and_returns_json(sqlite_home: tuple[Paths, dict]) -> None:
    paths, result = sqlite_home
    json.dumps(result)  # small JSON values for XCom, never frames
    assert result["applied"] == [
        "product",
        "user",
        "product_popularity_source",
        "user_activity_push",
        "user_activity_source",
        "product_popularity",
        "user_activity",
        "product_v1",
        "search_v1",
        "search_v2",
    ]
    assert result["views"] == ["product_popularity", "user_activity"]
    users = result["materialized"]["user_activity"]
    assert users["entities"] == 60 and users["newest_row"] == END.isoformat()
    for name in ("registry.db", "online.db", "data/user_activity.parquet", "data/product_popularity.parquet"):
        assert (paths.feast_dir / name).is_file(), name
    stateful = [p for p in FEATURE_REPO.rglob("*") if p.suffix in {".db", ".parquet"} or p.name == "data"]
    assert not stateful, f"Feast state written into the repo: {stateful}"
    fresh = F.freshness(paths, END + timedelta(hours=2))
    assert fresh["user_activity"]["materialized_until"] == END.isoformat()
    assert fresh["user_activity"]["newest_row_age_s"] == 7200.0


def test_online_read_matches_the_raw_log_most_recent_first(sqlite_home: tuple[Paths, dict], events) -> None:
    paths, _ = sqlite_home
    online = OnlineFeatures(paths)
    for user_id in (1, 17, 60):
        assert online.user_features(user_id) == expected_user(events, user_id, END), user_id
    assert any(len(online.user_features(u)["recent_products"]) == RECENT_N for u in range(1, 61))
    assert online.user_features(10_000) is None


def expected_product(events: pd.DataFrame, product_id: int, at: datetime) -> dict:
    ts = events["event_timestamp"]
    mine = events[(events["product_id"] == product_id) & (ts <= at) & (ts > at - timedelta(days=30))]
    views, clicks = int((mine["event_type"] == "view").sum()), int((mine["event_type"] == "click").sum())
    return {"views_30d": views, "clicks_30d": clicks, "ctr": clicks / views if views else 0.0}


def test_feature_services_are_versioned(sqlite_home: tuple[Paths, dict]) -> None:
    paths, _ = sqlite_home
    store = F.feature_store(paths)

    def names(service: str) -> list[str]:
        return [f.name for p in store.get_feature_service(service).feature_view_projections for f in p.features]

    v1 = ["events_7d", "clicks_7d", "purchases_30d", "events_30d", "last_event_ts", "recent_products"]
    assert names("search_v1") == v1  # the published list never changes under a serving model
    assert names(F.USER_SERVICE) == ["events_1d", *v1]
    assert names(F.PRODUCT_SERVICE) == ["views_30d", "clicks_30d", "ctr"]


def test_batch_user_reads_product_reads_and_popularity(sqlite_home: tuple[Paths, dict], events) -> None:
    paths, _ = sqlite_home
    online = OnlineFeatures(paths)
    assert online.users_features([17, 10_000, 1]) == [
        expected_user(events, 17, END),
        None,
        expected_user(events, 1, END),
    ]
    products = sorted({int(p) for p in events["product_id"]})[:20]
    rows = online.product_features([*products, -1])
    assert rows[-1] is None  # a product without activity has no row
    for product_id, row in zip(products, rows, strict=False):
        want = expected_product(events, product_id, END)
        assert row["views_30d"] == want["views_30d"] and row["clicks_30d"] == want["clicks_30d"], product_id
        assert row["ctr"] == pytest.approx(want["ctr"], rel=1e-6), product_id
    ids = np.asarray([*products, -1])
    scores = online.popularity(ids)
    assert scores[-1] == 0 and online.popularity(ids) is scores  # cached for the same id array
    clicks = np.asarray([r["clicks_30d"] for r in rows[:-1]])
    assert clicks[int(np.argmax(scores[:-1]))] == clicks.max()

    stale = OnlineFeatures(paths, popularity_ttl_s=0)
    first = stale.popularity(ids)
    assert stale.popularity(ids) is first  # past the ttl a call never waits: cached scores, refreshed behind it
    deadline = time.monotonic() + 10
    while stale.popularity(ids) is first and time.monotonic() < deadline:
        time.sleep(0.01)
    refreshed = stale.popularity(ids)
    assert refreshed is not first
    np.testing.assert_array_equal(refreshed, first)

    warming = OnlineFeatures(paths)
    with pytest.raises(FeaturesUnavailable, match="warming up"):
        warming.popularity(ids, wait=False)  # starts the read behind the caller, never holds it
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            np.testing.assert_array_equal(warming.popularity(ids, wait=False), first)
            break
        except FeaturesUnavailable:
            time.sleep(0.01)
    else:
        pytest.fail("the background popularity read never finished")


def test_freshness_reads_back_the_online_store_and_fails_loudly(sqlite_home, events, caplog) -> None:
    paths, _ = sqlite_home
    later = END + timedelta(hours=2)
    fresh = F.freshness(paths, later)
    for view in ("user_activity", "product_popularity"):
        assert fresh[view]["newest_online_row"] == END.isoformat(), view
        assert fresh[view]["newest_row_age_s"] == 7200.0, view
    newest_event = events["event_timestamp"].max().floor("s")
    assert fresh["user_activity"]["newest_event"] == newest_event.isoformat()
    assert fresh["user_activity"]["newest_event_age_s"] == (later - newest_event).total_seconds()

    passed = F.check_freshness(paths, max_age_s=3 * 3600, now=later)
    assert passed["ok"] and passed["stale"] == []
    with pytest.raises(F.StaleFeaturesError, match=r"user_activity: newest online row .* is 2\.00 h old"):
        F.check_freshness(paths, max_age_s=3600, now=later)
    with caplog.at_level(logging.WARNING, logger="pipelines.features.store"):
        warned = F.check_freshness(paths, max_age_s=3600, now=later, on_stale="warn")
    assert not warned["ok"] and len(warned["stale"]) == 2
    assert caplog.text.count("STALE ONLINE FEATURES") == 2


def test_freshness_fails_when_nothing_reached_the_online_store(sqlite_home, events, tmp_path, monkeypatch) -> None:
    paths = _use_home(monkeypatch, tmp_path / "never")
    F.write_feature_tables(F.build_feature_tables(events, END, RECENT_N), paths)
    F.apply_feature_repo(paths)  # offline rows and a registry, but no materialization
    with pytest.raises(F.StaleFeaturesError, match="user_activity: no row online"):
        F.check_freshness(paths, max_age_s=3600, now=END)

    # A materialized home whose online store was lost: the check reads the store, not the registry's bookkeeping.
    source, _ = sqlite_home
    lost = Paths(tmp_path / "lost")
    shutil.copytree(source.feast_dir, lost.feast_dir)
    (lost.feast_dir / "online.db").unlink()
    monkeypatch.setenv("SHOPGUIDE_HOME", str(lost.home))
    with pytest.raises(F.StaleFeaturesError, match="no row online .*online read failed"):
        F.check_freshness(lost, max_age_s=3600, now=END)


def test_apply_registers_the_given_home_and_drops_what_is_no_longer_declared(events, tmp_path, monkeypatch) -> None:
    # The process points elsewhere: `feast apply` must get the home from `paths`, not inherit the caller's.
    monkeypatch.setenv("SHOPGUIDE_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.delenv(F.ONLINE_STORE_ENV, raising=False)
    paths = Paths(tmp_path / "given")
    F.write_feature_tables(F.build_feature_tables(events, END, RECENT_N), paths)
    feast = F.import_feast()
    F.feature_store(paths).apply([feast.Entity(name="retired", join_keys=["retired_id"])])
    cwd = Path.cwd()
    applied = F.apply_feature_repo(paths)
    store = F.feature_store(paths)
    assert "retired" not in applied and "retired" not in {e.name for e in store.list_entities()}
    sources = store.list_data_sources()
    assert {s.path for s in sources if s.name != F.USER_PUSH_SOURCE} == {
        str(p) for p in F.offline_paths(paths).values()
    }
    push = store.get_data_source(F.USER_PUSH_SOURCE)
    assert push.batch_source.path == str(F.offline_paths(paths)[F.USER_VIEW])  # materialize reads it
    assert Path.cwd() == cwd and not (tmp_path / "elsewhere").exists()
    assert not list(paths.feast_dir.glob(".apply-*"))  # the private copy of the configuration is gone


def test_materialize_is_idempotent_and_incremental(events_file: Path, tmp_path, monkeypatch) -> None:
    paths = _use_home(monkeypatch, tmp_path)
    first = F.refresh_features(events_file, END - timedelta(days=2), RECENT_N, paths)
    assert first["materialized"]["user_activity"]["start"] == (END - timedelta(days=32)).isoformat()
    again = F.materialize(paths, END - timedelta(days=2))
    assert "skipped" in again["materialized"]["user_activity"]
    later = F.refresh_features(events_file, END, RECENT_N, paths)
    assert later["materialized"]["user_activity"]["start"] == (END - timedelta(days=2)).isoformat()
    assert later["materialized"]["user_activity"]["newest_row"] == END.isoformat()
    assert F.freshness(paths, END)["user_activity"]["materialized_age_s"] == 0.0


def test_point_in_time_never_leaks_the_future(tmp_path, monkeypatch) -> None:
    paths = _use_home(monkeypatch, tmp_path)
    t0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
    log = pd.DataFrame(
        {
            "user_id": [1, 1, 1],
            "product_id": [10, 20, 30],
            "event_type": ["view", "click", "purchase"],
            "event_timestamp": pd.to_datetime([t0, t0 + timedelta(days=1), t0 + timedelta(days=2)], utc=True),
            "query": ["drill"] * 3,
        }
    )
    as_of = t0 + timedelta(days=2, hours=2)
    tables = F.build_feature_tables(log, as_of, recent_n=10)
    rows = tables["user_activity"]
    assert (pd.to_datetime(rows["last_event_ts"], unit="s", utc=True) <= rows["event_timestamp"]).all()
    F.write_feature_tables(tables, paths)
    F.apply_feature_repo(paths)
    F.materialize(paths, as_of)

    asked = [
        t0 + timedelta(hours=1),
        t0 + timedelta(hours=23),
        t0 + timedelta(days=1, hours=2),
        t0 + timedelta(days=2, hours=1),
        as_of,
    ]
    entity_df = pd.DataFrame({"user_id": [1] * len(asked), "event_timestamp": pd.to_datetime(asked, utc=True)})
    got = F.historical_user_features(paths, entity_df)
    assert len(got) == len(asked)  # the row before any feature row is kept, with nulls
    assert got["recent_products"].isna().iloc[0] and pd.isna(got["events_30d"].iloc[0])
    # Rows are daily snapshots: the day-2 click at 10:00 is not visible at 12:00 until the next snapshot.
    assert [list(v) for v in got["recent_products"].iloc[1:]] == [[10], [10], [20, 10], [30, 20, 10]]
    assert got["purchases_30d"].iloc[1:].tolist() == [0, 0, 0, 1]
    assert got["events_7d"].iloc[1:].tolist() == [1, 1, 2, 3]
    for _, row in got.iloc[1:].iterrows():
        assert pd.Timestamp(row["last_event_ts"], unit="s", tz="UTC") <= row["event_timestamp"]
    assert OnlineFeatures(paths).user_features(1)["recent_products"] == [30, 20, 10]


def test_unavailable_store_raises_features_unavailable(sqlite_home, tmp_path, monkeypatch) -> None:
    paths, _ = sqlite_home
    broken = Paths(tmp_path / "broken")
    shutil.copytree(paths.feast_dir, broken.feast_dir)
    (broken.feast_dir / "online.db").write_bytes(b"this is not a sqlite database" * 100)
    online = OnlineFeatures(broken, retry_after_s=60)
    with pytest.raises(FeaturesUnavailable, match="online read"):
        online.user_features(1)
    with pytest.raises(FeaturesUnavailable, match="still unavailable"):  # no new attempt within retry_after_s
        online.check()

    monkeypatch.setenv(F.ONLINE_STORE_ENV, "redis")
    monkeypatch.setenv(F.REDIS_ENV, f"127.0.0.1:{_free_port()}")  # nothing listens there
    redis_down = OnlineFeatures(Paths(paths.home), retry_after_s=0)
    with pytest.raises(FeaturesUnavailable):
        redis_down.user_features(1)  # builds the store and the read plan (registry only), then fails to connect
    started = time.monotonic()
    with pytest.raises(FeaturesUnavailable, match="online read"):
        redis_down.user_features(1)  # the read alone, timed: building the store is slow under load, not the point
    assert time.monotonic() - started < 2  # fail-fast serving defaults, not redis-py's ~4 s of backoff


def test_warm_up_reports_a_broken_store_without_pausing_requests(sqlite_home, tmp_path) -> None:
    paths, _ = sqlite_home
    assert OnlineFeatures(paths).warm_up() is None
    broken = Paths(tmp_path / "broken")
    shutil.copytree(paths.feast_dir, broken.feast_dir)
    (broken.feast_dir / "online.db").write_bytes(b"this is not a sqlite database" * 100)
    online = OnlineFeatures(broken, retry_after_s=60)
    assert "online read" in online.warm_up()
    with pytest.raises(FeaturesUnavailable, match="online read"):  # a real new attempt, not "still unavailable"
        online.user_features(1)


def test_service_starts_before_features_exist_and_recovers(events_file, tmp_path, monkeypatch) -> None:
    paths = _use_home(monkeypatch, tmp_path)
    online = OnlineFeatures(paths, retry_after_s=0)
    with pytest.raises(FeaturesUnavailable, match="search_v2"):
        online.user_features(1)  # nothing applied yet: no registry, no feature service
    F.refresh_features(events_file, END, RECENT_N, paths)
    assert online.user_features(1) is not None


def test_online_store_switch_rejects_unknown_kinds(monkeypatch) -> None:
    monkeypatch.setenv(F.ONLINE_STORE_ENV, "cassandra")
    with pytest.raises(ValueError, match="sqlite"):
        F.online_store_config()
    monkeypatch.setenv(F.ONLINE_STORE_ENV, "redis")
    monkeypatch.setenv(F.REDIS_ENV, "10.0.0.5:6380,db=2")
    assert F.online_store_config() == {"type": "redis", "connection_string": "10.0.0.5:6380,db=2"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_redis_online_store_round_trip(redis_port: int, events, events_file: Path, tmp_path, monkeypatch) -> None:
    paths = _use_home(monkeypatch, tmp_path)
    monkeypatch.setenv(F.ONLINE_STORE_ENV, "redis")
    monkeypatch.setenv(F.REDIS_ENV, f"127.0.0.1:{redis_port}")
    assert F.repo_config(paths).online_store.type == "redis"
    result = F.refresh_features(events_file, END, RECENT_N, paths)
    assert result["materialized"]["user_activity"]["entities"] == 60
    assert not (paths.feast_dir / "online.db").exists()
    online = OnlineFeatures(paths)
    for user_id in (1, 17, 60):
        assert online.user_features(user_id) == expected_user(events, user_id, END), user_id
    assert online.user_features(10_000) is None
    assert online.users_features([60, 10_000]) == [expected_user(events, 60, END), None]
    product = int(events["product_id"].iloc[-1])
    assert online.product_features([product])[0]["views_30d"] == expected_product(events, product, END)["views_30d"]
    assert F.check_freshness(paths, max_age_s=60, now=END)["ok"]
