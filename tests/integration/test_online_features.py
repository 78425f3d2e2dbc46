"""The service's reads below Feast's SDK (serving.online_features) against the SDK's own get_online_features."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from pipelines.config import Paths
from pipelines.data.dataset import load_judgments, select_terms, simulate_events
from pipelines.features import store as F
from pipelines.features.push import UserEvent, user_row_with_events
from serving import online_features
from serving.online_features import FeatureServiceReader, FeaturesUnavailable, OnlineFeatures

END = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
UNKNOWN = {"user_id": 10**9, "product_id": -1}  # ids the store has no row for
SERVICES = [(F.USER_SERVICE, "user_id"), (F.PRODUCT_SERVICE, "product_id")]


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    """A small simulated event log and the snapshot folder holding it."""
    log = simulate_events(select_terms(load_judgments(), 120), n_users=40, end=END, days=28, seed=11)
    folder = tmp_path_factory.mktemp("snapshot")
    log.to_parquet(folder / "events.parquet", index=False)
    return log, folder


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def home(
    request: pytest.FixtureRequest, events, tmp_path_factory: pytest.TempPathFactory, private_redis
) -> Iterator[Paths]:
    """A temporary SHOPGUIDE_HOME whose Feast repo is applied and materialized up to END, per online store."""
    _, folder = events
    root = tmp_path_factory.mktemp(f"home-{request.param}")
    with pytest.MonkeyPatch.context() as mp, contextlib.ExitStack() as stack:
        mp.setenv("SHOPGUIDE_HOME", str(root))
        mp.delenv(F.ONLINE_STORE_ENV, raising=False)
        mp.delenv(F.REDIS_ENV, raising=False)
        if request.param == "redis":
            port = stack.enter_context(private_redis(root))
            mp.setenv(F.ONLINE_STORE_ENV, "redis")
            mp.setenv(F.REDIS_ENV, f"127.0.0.1:{port}")
        paths = Paths.from_env()
        result = F.refresh_features(folder, END, 5, paths)
        assert result["materialized"][F.USER_VIEW]["entities"] > 0
        yield paths


def _sdk_rows(store: Any, service: str, join_key: str, ids: list[int]) -> list[dict[str, Any] | None]:
    """FeatureStore.get_online_features, row by row: features by name, None for an id without a row."""
    answer = store.get_online_features(
        features=store.get_feature_service(service), entity_rows=[{join_key: i} for i in ids]
    ).to_dict()
    assert answer.pop(join_key) == ids
    rows: list[dict[str, Any] | None] = []
    for n in range(len(ids)):
        row = {name: values[n] for name, values in answer.items()}
        rows.append(row if any(v is not None for v in row.values()) else None)
    return rows


@pytest.mark.parametrize(("service", "join_key"), SERVICES)
def test_reader_answers_what_get_online_features_answers(
    home: Paths, events, service: str, join_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every user or product of the log plus an unknown id (and one asked twice): the same rows, the same features
    (in the service's order), the same values of the same Python types."""
    log, _ = events
    known = sorted(int(i) for i in log[join_key].unique())
    ids = [UNKNOWN[join_key], *known, known[0]]
    store = F.feature_store(home, serving=True)
    expected = _sdk_rows(store, service, join_key, ids)
    reader = FeatureServiceReader(store, service)
    got = reader.read(ids)
    assert expected[0] is None and all(row is not None for row in expected[1:])  # the log's ids all have rows
    for i, mine, theirs in zip(ids, got, expected, strict=True):
        assert (mine is None) == (theirs is None), i
        if mine is not None and theirs is not None:
            assert list(mine) == list(reader.columns) and set(theirs) == set(mine), i  # the SDK's own order differs
            for name in mine:
                assert mine[name] == theirs[name] and type(mine[name]) is type(theirs[name]), (i, name)
    monkeypatch.setattr(online_features, "READ_CHUNK", 7)  # SQLite's bound on keys per statement, hit on purpose
    assert reader.read(ids) == got
    # what the service calls: OnlineFeatures over the same adapter
    online = OnlineFeatures(home)
    via_service = online.users_features(ids) if join_key == "user_id" else online.product_features(ids)
    assert via_service == got


def test_concurrent_pushes_all_land(home: Paths) -> None:
    """POST /v1/events pushes different users' rows from several threads at once (serving/events.py locks per user
    only): every push lands, none refused. Feast's SQLite store shares one connection between threads, and before
    pushes to it were serialised (pipelines.features.push) some failed with "database is locked" or "cannot start a
    transaction within a transaction" (a few of these 160 each run)."""
    threads, pushes = 8, 20
    online = OnlineFeatures(home, retry_after_s=0.0)  # no pause after a failure: each push counts on its own
    now = datetime.now(UTC)
    failures: list[str] = []

    def push(t: int) -> None:
        for i in range(pushes):
            user = 10**6 + t * pushes + i
            try:  # what serving/events.py does per request: read the row, add the event, push it
                (row,) = online.users_features([user])
                online.push_user_rows({user: user_row_with_events(row, [UserEvent(t + 1, "click", now)], now, 5)}, now)
            except FeaturesUnavailable as exc:
                failures.append(str(exc))

    workers = [threading.Thread(target=push, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert failures == []
    users = [10**6 + n for n in range(threads * pushes)]
    rows = online.users_features(users)
    assert [r["recent_products"] if r else None for r in rows] == [[n // pushes + 1] for n in range(len(users))]
    assert all(r is not None and r["clicks_7d"] == 1 for r in rows)
