"""The popularity fallback of /v1/recommend (issue 17, item 7): read once per model version, at load, off the request
path; concurrent requests right after a hot swap cause one Feast read, not one each. Real app, real registry swap,
real Feast online store."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from fastapi.testclient import TestClient

from pipelines.features.store import PRODUCT_SERVICE
from serving import online_features
from serving.app import create_app
from serving.settings import Settings

if TYPE_CHECKING:
    from tests.integration.conftest import RegisteredChampion

# The same run key as test_serving.py's hot-swap test: the session registers this second version once.
SWAP_RUN_KEY = "integration-serving-hot-swap"
# The fixture catalog (~600 products) reads in milliseconds; the served one (54,667) took 1.5-6 s on a busy 2-core
# machine. Each whole-catalog read is held this long, so that requests arriving during it are counted as they come.
READ_DELAY_S = 1.5
CLIENTS = 8
UNKNOWN_USER = 999_999  # no online row: /v1/recommend falls back to popularity


@pytest.fixture(scope="module")
def newer(champion: RegisteredChampion) -> str:
    from pipelines.features.store import refresh_features
    from pipelines.registry.mlflow_client import end_run, register_bundle, start_run

    refresh_features(champion.snapshot_dir, champion.as_of, paths=champion.paths)  # product_v1 rows online
    run_id = start_run(champion.paths, SWAP_RUN_KEY, {})
    version = register_bundle(champion.paths, run_id, champion.bundle_dir, champion.model_name, SWAP_RUN_KEY, {})
    end_run(champion.paths, run_id)
    assert version != champion.version
    return version


@pytest.fixture()
def catalog_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Every whole-catalog read of product_v1 through the real FeatureServiceReader (its number of ids each);
    each is held READ_DELAY_S before it reads."""
    reads: list[int] = []
    lock = threading.Lock()
    real = online_features.FeatureServiceReader.read

    def read(self: online_features.FeatureServiceReader, ids):  # type: ignore[no-untyped-def]
        if self.service_name == PRODUCT_SERVICE and len(ids) > 1:
            with lock:
                reads.append(len(ids))
            time.sleep(READ_DELAY_S)
        return real(self, ids)

    monkeypatch.setattr(online_features.FeatureServiceReader, "read", read)
    yield reads


def _recommend(c: TestClient) -> tuple[dict, float]:
    started = time.perf_counter()
    response = c.post("/v1/recommend", json={"user_id": UNKNOWN_USER, "k": 5})
    assert response.status_code == 200, response.text
    return response.json(), time.perf_counter() - started


def _wait_for_popularity(c: TestClient, version: str) -> None:
    deadline = time.monotonic() + 90
    while True:
        body, _ = _recommend(c)
        if body["method"] == "popularity" and body["model_version"] == version:
            return
        assert time.monotonic() < deadline, f"version {version} never answered with popularity: {body}"
        time.sleep(0.1)


def test_concurrent_requests_after_a_swap_read_popularity_once(
    champion: RegisteredChampion, newer: str, catalog_reads: list[int]
) -> None:
    from pipelines.registry.mlflow_client import CHAMPION, set_alias

    settings = Settings(home=champion.paths.home, model_name=champion.model_name, model_poll_seconds=0)
    try:
        with TestClient(create_app(settings)) as c:
            state = c.app.state.serving
            _wait_for_popularity(c, champion.version)
            assert len(catalog_reads) == 1, catalog_reads  # the start-up version's one read
            set_alias(champion.paths, champion.model_name, CHAMPION, newer)
            state.refresh()  # one poll: the hot swap
            assert state.predictor.version == newer
            products = len(state.predictor.index)

            answers: list[tuple[dict, float]] = []
            go = threading.Barrier(CLIENTS)

            def client() -> None:
                go.wait()
                answers.append(_recommend(c))

            threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            _wait_for_popularity(c, newer)
            after_swap = catalog_reads[1:]
    finally:
        set_alias(champion.paths, champion.model_name, CHAMPION, champion.version)
    assert after_swap == [products], catalog_reads  # one read of the new version's catalog, whoever asked
    assert len(answers) == CLIENTS and all(body["model_version"] == newer for body, _ in answers)
    for body, seconds in answers:
        # never held by the read: the popularity of the new version, or the documented flagged empty fallback
        assert seconds < READ_DELAY_S, (seconds, body)
        assert body["personalized"] is False and body["fallback_reason"] == "no_online_features", body
        assert body["method"] == "popularity" or (body["method"] == "none" and body["results"] == []), body
