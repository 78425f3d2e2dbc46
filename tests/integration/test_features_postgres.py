"""The offline store on PostgreSQL (SHOPGUIDE_FEAST_OFFLINE): one worker refreshes, another with an empty home reads."""

from __future__ import annotations

import math
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psycopg
import pytest

from pipelines.config import Paths
from pipelines.data.dataset import load_judgments, select_terms, simulate_events
from pipelines.features import store as F

END = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
RECENT_N = 5
SWITCHES = (F.OFFLINE_ENV, F.REGISTRY_ENV, F.ONLINE_STORE_ENV, F.REDIS_ENV)


def _worker(monkeypatch: pytest.MonkeyPatch, home: Path, **switches: str) -> Paths:
    """Point the process at `home` with exactly the given store switches (a task starting on some worker)."""
    monkeypatch.setenv("SHOPGUIDE_HOME", str(home))
    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)
    for name, value in switches.items():
        monkeypatch.setenv(name, value)
    return Paths.from_env()


def _normalized(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as plain Python values: the two stores return the same data in different dtypes (NaN vs None, arrays)."""

    def plain(value: Any) -> Any:
        if isinstance(value, list | np.ndarray):
            return [int(v) for v in value]
        if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
            return None
        if isinstance(value, pd.Timestamp):
            return value.tz_convert("UTC").isoformat()
        return int(value) if float(value).is_integer() else float(value)

    return [{k: plain(v) for k, v in row.items()} for row in df.to_dict(orient="records")]


def _files(home: Path) -> list[Path]:
    return sorted(p for p in home.rglob("*") if p.is_file())


def test_offline_store_url_is_parsed_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(F.OFFLINE_ENV, raising=False)
    assert F.offline_store_config() == {}
    monkeypatch.setenv(F.OFFLINE_ENV, "postgresql+psycopg2://feast:s%40cret@db.internal:6543/features?sslmode=require")
    assert F.offline_store_config() == {
        "type": "postgres",
        "host": "db.internal",
        "port": 6543,
        "database": "features",
        "user": "feast",
        "password": "s@cret",
        "sslmode": "require",
    }
    monkeypatch.setenv(F.OFFLINE_ENV, "postgresql://postgres@127.0.0.1/features")
    assert F.offline_store_config()["sslmode"] == "prefer"  # libpq's default, as the registry gets from psycopg2
    for wrong in ("mysql://u@h/db", "postgresql://u@h", "postgresql://u@h/db?schema=x"):
        monkeypatch.setenv(F.OFFLINE_ENV, wrong)
        with pytest.raises(ValueError, match=F.OFFLINE_ENV):
            F.offline_store_config()


def test_a_worker_with_an_empty_home_reads_what_another_wrote(
    postgres_database: str, redis_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = simulate_events(select_terms(load_judgments(), 120), n_users=40, end=END, days=28, seed=11)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    events.to_parquet(snapshot / "events.parquet", index=False)
    asked = [END - timedelta(days=40), END - timedelta(days=9, hours=5), END - timedelta(days=2), END]
    asked.append(END + timedelta(days=31))  # the newest row is older than the views' 30-day ttl: nulls
    users = [*range(1, 41), 10**9]  # every simulated user and one the store has never seen
    entity_df = pd.DataFrame(
        {"user_id": users * len(asked), "event_timestamp": pd.to_datetime(np.repeat(asked, len(users)), utc=True)}
    )
    landed = {"as_of": END.isoformat()}  # what the freshness task gets from the landing task
    from pipelines.steps.features import check_freshness

    # The reference: the default profile (parquet offline, SQLite online, file registry) in one home.
    reference_home = _worker(monkeypatch, tmp_path / "default")
    F.refresh_features(snapshot, END, RECENT_N, reference_home)
    reference = F.historical_user_features(reference_home, entity_df)
    reference_fresh = check_freshness(landed, max_age_hours=1, on_stale="fail")["views"]
    reference_products = F.offline_entities(reference_home, F.PRODUCT_VIEW)

    shared = {
        F.OFFLINE_ENV: postgres_database,
        F.REGISTRY_ENV: postgres_database,
        F.ONLINE_STORE_ENV: "redis",
        F.REDIS_ENV: f"127.0.0.1:{redis_port}",
    }
    writer = _worker(monkeypatch, tmp_path / "worker-a", **shared)
    result = F.refresh_features(snapshot, END, RECENT_N, writer)
    assert {name: t["path"].rsplit("=", 1)[1] for name, t in result["tables"].items()} == F.OFFLINE_TABLES
    assert result["materialized"]["user_activity"]["entities"] == 40
    sources = F.feature_store(writer).list_data_sources()
    assert {type(s).__name__ for s in sources if s.name != F.USER_PUSH_SOURCE} == {"PostgreSQLSource"}

    reader = _worker(monkeypatch, tmp_path / "worker-b", **shared)
    fresh = check_freshness(landed, max_age_hours=1, on_stale="fail")
    assert fresh["ok"] and fresh["views"] == reference_fresh  # same offline rows probed, same online rows found
    got = F.historical_user_features(reader, entity_df)
    assert list(got.columns) == list(reference.columns)
    assert _normalized(got) == _normalized(reference)
    assert got["events_30d"].notna().sum() > len(users)  # the comparison is not of two empty joins
    assert F.offline_entities(reader, F.PRODUCT_VIEW) == reference_products

    # A rewrite replaces the tables whole (an earlier as_of has fewer snapshots) and leaves no staging table behind.
    earlier = F.build_feature_tables(events, END - timedelta(days=7), RECENT_N)
    F.write_feature_tables(earlier, reader)
    with psycopg.connect(postgres_database) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert set(F.OFFLINE_TABLES.values()) <= tables and not {t for t in tables if t.endswith("__incoming")}
        indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")}
        assert {f"{t}_key_ts" for t in F.OFFLINE_TABLES.values()} <= indexes  # the same names after every rewrite
        for view, table in F.OFFLINE_TABLES.items():
            count = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            assert count is not None and count[0] == len(earlier[view]), view

    for home in (writer, reader):
        assert not (home.feast_dir / "data").exists()
        assert _files(home.home) == [], f"a worker kept Feast state on its own disk: {_files(home.home)}"


def test_readers_see_the_old_tables_or_the_new_never_a_mix(
    postgres_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _worker(monkeypatch, tmp_path / "worker", **{F.OFFLINE_ENV: postgres_database})
    events = simulate_events(select_terms(load_judgments(), 60), n_users=20, end=END, days=28, seed=5)
    versions = [F.build_feature_tables(events, at, RECENT_N) for at in (END, END - timedelta(days=7))]
    consistent = {tuple(len(v[view]) for view in F.VIEWS) for v in versions}
    assert len(consistent) == 2
    F.write_feature_tables(versions[0], paths)
    counts = ", ".join(f"(SELECT count(*) FROM {F.OFFLINE_TABLES[view]})" for view in F.VIEWS)
    seen: list[tuple[int, ...]] = []
    errors: list[str] = []
    stop = threading.Event()

    def read() -> None:  # one statement reads both tables, as a join over the two views would
        with psycopg.connect(postgres_database, autocommit=True) as conn:
            while not stop.is_set():
                try:
                    row = conn.execute(f"SELECT {counts}").fetchone()
                    seen.append(tuple(row) if row else ())
                except psycopg.Error as err:
                    errors.append(repr(err))

    readers = [threading.Thread(target=read) for _ in range(3)]
    for reader in readers:
        reader.start()
    try:
        for i in range(10):
            F.write_feature_tables(versions[(i + 1) % 2], paths)
    finally:
        stop.set()
        for reader in readers:
            reader.join(timeout=30)
    assert not errors, errors[:3]
    assert seen and set(seen) <= consistent, set(seen) - consistent
    assert len(set(seen)) == 2, "the readers never saw a swap: the check proved nothing"
