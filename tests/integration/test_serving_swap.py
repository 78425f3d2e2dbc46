"""Hot swaps over real HTTP (uvicorn in a thread) and the real SQLite MLflow registry: under load, with a corrupt
version, with the registry down, and shadow traffic on the challenger."""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from serving.app import create_app
from serving.settings import Settings
from tests.search_load import SearchLoad

if TYPE_CHECKING:
    from tests.integration.conftest import RegisteredChampion

# The same run key as test_serving.py's hot-swap test: register_bundle is idempotent per run key, so the session
# registers this second version of the fixture bundle once.
SWAP_RUN_KEY = "integration-serving-hot-swap"


def _register(champion: RegisteredChampion, bundle: Path, run_key: str) -> str:
    from pipelines.registry.mlflow_client import end_run, register_bundle, start_run

    run_id = start_run(champion.paths, run_key, {})
    version = register_bundle(champion.paths, run_id, bundle, champion.model_name, run_key, {})
    end_run(champion.paths, run_id)
    return version


@pytest.fixture(scope="module")
def newer(champion: RegisteredChampion) -> str:
    version = _register(champion, champion.bundle_dir, SWAP_RUN_KEY)
    assert version != champion.version
    return version


@pytest.fixture()
def move_champion(champion: RegisteredChampion) -> Iterator[Callable[[str], None]]:
    """Moves @champion of the fixture model; always moved back to the fixture's version afterwards."""
    from pipelines.registry.mlflow_client import CHAMPION, set_alias

    def move(version: str) -> None:
        set_alias(champion.paths, champion.model_name, CHAMPION, version)

    yield move
    move(champion.version)


@pytest.fixture()
def settings(champion: RegisteredChampion, tmp_path: Path) -> Settings:
    """A home of its own (serving cache, ANN cache) on the session's MLflow store, polling fast."""
    return Settings(home=tmp_path / "home", model_name=champion.model_name, model_poll_seconds=0.2)


@pytest.fixture(scope="module")
def serve(serve_app) -> Callable[[Settings], AbstractContextManager[str]]:
    """`with serve(settings) as url:` create_app(settings) under uvicorn (conftest's serve_app)."""
    return lambda settings: serve_app(create_app(settings))


def _wait_for(url: str, version: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/readyz").json().get("model_version") != version:
        assert time.monotonic() < deadline, f"version {version} was not picked up"
        time.sleep(0.05)


def _wait_metric(url: str, name: str, at_least: float, why: str, **labels: str) -> None:
    """Poll /metrics until the labelled series reaches at_least; fail with `why` after 60 s."""
    deadline = time.monotonic() + 60
    while _metric(url, name, **labels) < at_least:
        assert time.monotonic() < deadline, why
        time.sleep(0.1)


def _metric(url: str, name: str, **labels: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        head, _, value = line.rpartition(" ")
        if (head == name or head.startswith(name + "{")) and all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return 0.0


SWAP_QUERIES = ["cordless drill", "paint", "garden hose", "light bulb", "door knob"]


def test_swap_under_load_fails_no_request(
    settings: Settings, champion: RegisteredChampion, newer: str, move_champion, serve
) -> None:
    old = champion.version
    with serve(settings) as url, SearchLoad(url, SWAP_QUERIES, clients=4, k=5, users=7) as load:
        _wait_for(url, old)
        load.wait(old)
        move_champion(newer)
        _wait_for(url, newer)
        load.wait(newer)
        move_champion(old)  # a rollback is the same move
        _wait_for(url, old)
        load.wait(old)
        swaps = _metric(url, "shopguide_model_swaps_total", alias="champion", result="ok")
    assert not load.failures, load.failures[:5]
    assert set(load.versions) == {old, newer}, load.versions
    assert swaps == 2


def test_corrupt_version_is_refused_and_the_old_one_kept(
    settings: Settings, champion: RegisteredChampion, move_champion, tmp_path: Path, serve
) -> None:
    bundle = tmp_path / "corrupt-bundle"
    shutil.copytree(champion.bundle_dir, bundle)
    (bundle / "model.onnx").write_bytes(b"\x08\x07garbage, not a protobuf" * 1000)
    corrupt = _register(champion, bundle, "integration-serving-corrupt")
    with serve(settings) as url, SearchLoad(url, SWAP_QUERIES, clients=2, k=5, users=7) as load:
        _wait_for(url, champion.version)
        load.wait(champion.version)
        move_champion(corrupt)
        _wait_metric(
            url,
            "shopguide_model_swaps_total",
            1,
            "the corrupt version was never tried",
            alias="champion",
            result="failed",
        )
        ready = httpx.get(f"{url}/readyz")
        info = httpx.get(f"{url}/v1/model").json()
        failing = _metric(url, "shopguide_model_load_failing", alias="champion")
        served = _metric(url, "shopguide_model_info", version=champion.version)
        move_champion(champion.version)
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/readyz").json()["detail"] is not None:  # healthy again once the alias is back
            assert time.monotonic() < deadline
            time.sleep(0.1)
        recovered = _metric(url, "shopguide_model_load_failing", alias="champion")
        load.wait(champion.version)
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready" and body["model_version"] == champion.version
    assert f"version {corrupt} not loaded" in body["detail"], body
    assert info["version"] == champion.version and info["problem"] == body["detail"]
    assert failing == 1 and served == 1 and recovered == 0
    assert not load.failures and set(load.versions) == {champion.version}, (load.failures[:3], load.versions)


def _registry_down(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def test_registry_down_during_reloads(
    settings: Settings, champion: RegisteredChampion, monkeypatch: pytest.MonkeyPatch, serve
) -> None:
    import os

    store = os.environ["MLFLOW_TRACKING_URI"]
    with serve(settings) as url, SearchLoad(url, SWAP_QUERIES, clients=2, k=5, users=7) as load:
        _wait_for(url, champion.version)
        load.wait(champion.version)
        _registry_down(monkeypatch)
        _wait_metric(
            url,
            "shopguide_model_polls_total",
            2,
            "no poll saw the registry down",
            alias="champion",
            outcome="registry_unavailable",
        )
        down = httpx.get(f"{url}/readyz")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # the registry is back
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/readyz").json()["detail"] is not None:
            assert time.monotonic() < deadline, "the service did not notice the registry is back"
            time.sleep(0.1)
        load.wait(champion.version)
    assert down.status_code == 200 and down.json()["model_version"] == champion.version
    assert "cannot resolve" in down.json()["detail"]
    assert not load.failures and set(load.versions) == {champion.version}, (load.failures[:3], load.versions)


def test_shadow_mode_replays_on_the_challenger(
    settings: Settings, champion: RegisteredChampion, newer: str, serve
) -> None:
    from pipelines.registry.mlflow_client import CHALLENGER, client, set_alias

    set_alias(champion.paths, champion.model_name, CHALLENGER, newer)
    shadowing = settings.model_copy(
        update={"shadow_alias": CHALLENGER, "shadow_fraction": 1.0, "model_poll_seconds": 0}
    )
    try:
        with serve(shadowing) as url:
            _wait_for(url, champion.version)
            info = httpx.get(f"{url}/v1/model").json()
            for query in ["cordless drill", "paint roller", "garden hose", "light bulb", "door knob"]:
                started = time.perf_counter()
                assert httpx.post(f"{url}/v1/search", json={"query": query}).status_code == 200
                assert time.perf_counter() - started < 5
            deadline = time.monotonic() + 30
            while _metric(url, "shopguide_shadow_requests_total", result="ok") < 5:
                assert time.monotonic() < deadline, "shadow replays did not finish"
                time.sleep(0.05)
            count = _metric(url, "shopguide_shadow_overlap_at_10_count")
            overlap = _metric(url, "shopguide_shadow_overlap_at_10_sum")
            agree = _metric(url, "shopguide_shadow_category_agreement_total", result="agree")
            latency = _metric(url, "shopguide_shadow_duration_seconds_count", model="shadow")
            shadow_info = _metric(url, "shopguide_shadow_model_info", alias=CHALLENGER, version=newer)
    finally:
        client(champion.paths).delete_registered_model_alias(champion.model_name, CHALLENGER)
    assert info["shadow"]["alias"] == CHALLENGER and info["shadow"]["version"] == newer
    # The challenger here is the champion's bundle registered again: identical answers, measured as such.
    assert count == 5 and overlap == pytest.approx(5.0) and agree == 5 and latency == 5 and shadow_info == 1
