"""The service end to end: FastAPI TestClient over real ONNX Runtime, a real SQLite MLflow registry and real Feast."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from pipelines.config import REPO_ROOT, SearchConfig
from pipelines.runtime.bundle import LABELS_FILE, REPORT_FILE
from pipelines.runtime.personalize import ATTENTION_TEMPERATURE, recency_weights
from serving.app import create_app
from serving.online_features import OnlineFeatures
from serving.predictor import Predictor
from serving.settings import Settings

if TYPE_CHECKING:
    from tests.integration.conftest import RegisteredChampion

K = 10


@pytest.fixture(scope="module")
def settings(champion: RegisteredChampion) -> Settings:
    return Settings(home=champion.paths.home, model_name=champion.model_name, model_poll_seconds=0)


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    """The app as `uvicorn serving.app:app` runs it: nothing injected, @champion resolved and loaded in the lifespan."""
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def predictor(client: TestClient) -> Predictor:
    return client.app.state.serving.predictor


@pytest.fixture(scope="module")
def online(champion_features: RegisteredChampion) -> OnlineFeatures:
    """The snapshot's simulated events built, applied and materialized into the fixture home's Feast stores."""
    return OnlineFeatures(champion_features.paths)


@pytest.fixture(scope="module")
def known_user(online: OnlineFeatures) -> tuple[int, list[int]]:
    """A simulated user with at least three distinct recent products online."""
    for user_id in range(1, 31):
        recent = (online.user_features(user_id) or {}).get("recent_products") or []
        if len(recent) >= 3:
            return user_id, list(recent)
    raise AssertionError("no simulated user with a history of 3+ products")


def _unrelated_query(champion: RegisteredChampion, recent: list[int]) -> str:
    """A real search term whose judged products share nothing with the user's history."""
    judged = pd.read_parquet(champion.snapshot_dir / "judgments_train.parquet")
    for term, group in judged.groupby("search_term", sort=True):
        if not set(group["product_uid"]) & set(recent):
            return str(term)
    raise AssertionError("every term overlaps the user's history")


def _registry_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tracking server that refuses connections (nothing listens), without MLflow's minutes of retries."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def _search(client: TestClient, **body) -> dict:
    response = client.post("/v1/search", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_search_answers_with_the_champion_version(client: TestClient, champion: RegisteredChampion) -> None:
    body = _search(client, query="  cordless drill  ", k=K)
    assert body["model_version"] == champion.version
    assert body["query"] == "cordless drill"
    # a category of the taxonomy, or none (with the reason) outside it
    assert body["category"] in json.loads((champion.bundle_dir / LABELS_FILE).read_text()) + [None]
    assert (body["category"] is None) == (body["category_abstained_reason"] is not None)
    assert body["personalized"] is False and body["fallback_reason"] is None
    results = body["results"]
    assert len(results) == K
    catalog = pd.read_parquet(champion.snapshot_dir / "catalog.parquet")
    titles = dict(zip(catalog["product_uid"], catalog["product_title"], strict=True))
    assert all(titles[r["product_id"]] == r["title"] for r in results)
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True) and -1.0 <= scores[-1] <= scores[0] <= 1.0 + 1e-5
    assert _search(client, query="cordless drill")["results"] == results[:10]  # default k, same ranking
    assert len(_search(client, query="paint", k=100)["results"]) == 100


def test_search_is_hybrid_with_the_weight_chosen_on_validation_terms(
    client: TestClient, predictor: Predictor, champion: RegisteredChampion
) -> None:
    report = json.loads((champion.bundle_dir / REPORT_FILE).read_text())
    lexical = predictor.lexical
    assert lexical is not None and lexical.weight == report["lexical_weight"] in SearchConfig().weight_grid
    assert {"dense_ndcg_at_10", "lexical_latency_p99_ms"} <= report.keys()
    # a title's rarest word (a model number, a brand) finds it lexically even where the dense ranking does not
    catalog = pd.read_parquet(champion.snapshot_dir / "catalog.parquet")
    words = catalog["product_title"].str.lower().str.findall(r"[a-z]*\d[a-z0-9]{3,}")
    counts = words.explode().value_counts()
    row = next(i for i, ws in words.items() if any(counts[w] == 1 for w in ws))
    token = next(w for w in words[row] if counts[w] == 1)
    expected = int(catalog["product_uid"][row])
    lexical_only = predictor.rank(predictor.encode(token)[0], 10, query=token)
    assert expected in [h.product_id for h in lexical_only[:3]], token
    body = _search(client, query=token, k=10)
    assert [r["product_id"] for r in body["results"]] == [h.product_id for h in lexical_only]
    assert all(0.0 <= r["score"] <= 1.0 + 1e-6 for r in body["results"])  # fused scores


@pytest.mark.parametrize(
    "body",
    [
        {"query": ""},
        {"query": "   "},
        {"query": "x" * 257},
        {"query": "drill", "k": 0},
        {"query": "drill", "k": 1000},
        {"query": "drill", "k": "10"},
        {"query": "drill", "k": 2.5},
        {"query": "drill", "k": True},
        {"query": 42},
        {"query": ["drill"]},
        {"query": "drill", "user_id": "alice"},
        {"query": "drill", "user_id": -1},
        {"query": "drill", "top_k": 5},
        {"k": 5},
        None,
    ],
    ids=[
        "empty",
        "blank",
        "too-long",
        "k=0",
        "k=1000",
        "k-string",
        "k-float",
        "k-bool",
        "query-int",
        "query-list",
        "user-string",
        "user-negative",
        "unknown-field",
        "no-query",
        "no-body",
    ],
)
def test_malformed_requests_are_422_with_the_reason(client: TestClient, body: dict | None) -> None:
    response = client.post("/v1/search", json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail and all("loc" in d and "msg" in d for d in detail)
    assert "Traceback" not in response.text


def test_invalid_json_is_422_not_500(client: TestClient) -> None:
    response = client.post("/v1/search", content=b"{query: drill", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "Traceback" not in response.text


def test_ops_endpoints(client: TestClient, champion: RegisteredChampion) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "model_version": champion.version, "detail": None}
    info = client.get("/v1/model").json()
    assert info["model_name"] == champion.model_name and info["alias"] == "champion"
    assert info["version"] == champion.version and info["source"] == "registry"
    assert info["products"] == len(pd.read_parquet(champion.snapshot_dir / "catalog.parquet"))
    assert info["categories"] == len(json.loads((champion.bundle_dir / LABELS_FILE).read_text()))
    assert pd.Timestamp(info["loaded_at"]).tzinfo is not None


def test_registry_down_serves_the_cached_champion(
    client: TestClient, settings: Settings, champion, monkeypatch
) -> None:
    # The client fixture's start-up downloaded the champion into the cache; now the registry cannot be reached.
    _registry_down(monkeypatch)
    with TestClient(create_app(settings)) as c:
        info = c.get("/v1/model").json()
        assert (info["version"], info["source"]) == (champion.version, "cache")
        assert _search(c, query="cordless drill", k=3)["model_version"] == champion.version


def test_not_ready_without_registry_or_cache(tmp_path: Path, monkeypatch) -> None:
    _registry_down(monkeypatch)
    with TestClient(create_app(Settings(home=tmp_path / "home", model_poll_seconds=0))) as c:
        assert c.get("/healthz").status_code == 200
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "not_ready"
        assert "ModelUnavailable" in ready.json()["detail"]
        for response in (c.post("/v1/search", json={"query": "drill"}), c.get("/v1/model")):
            assert response.status_code == 503 and response.json() == {"detail": "model not loaded"}


def test_fixed_bundle_dir_needs_no_registry(champion: RegisteredChampion, tmp_path: Path, monkeypatch) -> None:
    _registry_down(monkeypatch)
    settings = Settings.from_env(
        {
            "SHOPGUIDE_HOME": str(tmp_path),
            "SHOPGUIDE_BUNDLE_DIR": str(champion.bundle_dir),
            "SHOPGUIDE_MODEL_POLL_SECONDS": "0",
            "SHOPGUIDE_MAX_K": "5",
        }
    )
    with TestClient(create_app(settings)) as c:
        info = c.get("/v1/model").json()
        assert info["source"] == "bundle_dir" and info["version"].startswith("local-")
        assert len(_search(c, query="drill", k=5)["results"]) == 5
        assert c.post("/v1/search", json={"query": "drill", "k": 6}).status_code == 422  # the deployment's max_k


# The service's own process: serving never imports torch, whose OpenMP runtime (loaded in this test process) changes
# how OpenBLAS takes a limit; the lifespan runs on the main thread, as under uvicorn.
BLAS_PROBE = """
import asyncio, json, sys
from threadpoolctl import threadpool_info, threadpool_limits
from serving.app import create_app
from serving.settings import Settings

app = create_app(Settings.from_env(
    {"SHOPGUIDE_HOME": sys.argv[1], "SHOPGUIDE_BUNDLE_DIR": sys.argv[2], "SHOPGUIDE_MODEL_POLL_SECONDS": "0"}
))


def blas():
    return sorted({lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"})


async def serve():
    async with app.router.lifespan_context(app):
        return blas()


with threadpool_limits(2, user_api="blas"):
    print(json.dumps([blas(), asyncio.run(serve()), blas()]))
"""


def test_the_service_limits_blas_threads_while_it_runs(champion: RegisteredChampion, tmp_path: Path) -> None:
    """numpy's BLAS threads spin between a request's small matmuls and starve the other requests' cores: the service
    runs with SHOPGUIDE_BLAS_THREADS (default 1) and gives the process its own limit back when it stops."""
    env = {k: v for k, v in os.environ.items() if k != "SHOPGUIDE_BLAS_THREADS"}
    proc = subprocess.run(
        [sys.executable, "-c", BLAS_PROBE, str(tmp_path), str(champion.bundle_dir)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, serving, after = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (before, serving, after) == ([2], [1], [2])


def test_unknown_user_gets_the_anonymous_ranking_and_a_reason(client: TestClient, online: OnlineFeatures) -> None:
    assert online.user_features(999_999) is None
    anonymous = _search(client, query="cordless drill", k=K)
    body = _search(client, query="cordless drill", k=K, user_id=999_999)
    assert body["personalized"] is False and body["fallback_reason"] == "no_online_features"
    assert body["results"] == anonymous["results"]


def test_known_user_history_ranks_higher(
    client: TestClient,
    settings: Settings,
    predictor: Predictor,
    champion: RegisteredChampion,
    known_user: tuple[int, list[int]],
) -> None:
    user_id, recent = known_user
    query = _unrelated_query(champion, recent)
    anonymous = _search(client, query=query, k=K)
    assert _search(client, query=query, k=K, user_id=user_id)["personalized"] is True  # default weight 0.3

    strong = settings.model_copy(update={"personalization_weight": 1.0})
    with TestClient(create_app(strong, predictor=predictor)) as c:
        body = _search(c, query=query, k=K, user_id=user_id)
    assert body["personalized"] is True and body["fallback_reason"] is None
    assert body["model_version"] == champion.version

    def ranks(results: list[dict]) -> list[int]:
        ids = [r["product_id"] for r in results]
        return [ids.index(p) if p in ids else K for p in recent]

    before, after = ranks(anonymous["results"]), ranks(body["results"])
    assert sum(r < K for r in after) > sum(r < K for r in before), (query, before, after)
    assert all(a <= b for a, b in zip(after, before, strict=True)), (query, before, after)


def test_user_vector_and_blended_scores(predictor: Predictor, known_user: tuple[int, list[int]]) -> None:
    _, recent = known_user
    emb = predictor.index.embeddings[predictor.index.rows_of(recent)]
    recency = predictor.user_vector(recent)  # no query: the most recent products weigh most
    pooled = recency_weights(len(emb)) @ emb
    np.testing.assert_allclose(recency, pooled / np.linalg.norm(pooled), atol=1e-5)

    query_vec, _ = predictor.encode("garden hose")
    attended = predictor.user_vector(recent + [-1], query_vec)  # ids outside the catalog are ignored
    weights = np.exp(emb @ query_vec / ATTENTION_TEMPERATURE)
    expected = (weights / weights.sum()) @ emb
    np.testing.assert_allclose(attended, expected / np.linalg.norm(expected), atol=1e-5)
    assert predictor.user_vector([-1, -2], query_vec) is None

    hits = predictor.rank(query_vec, K, attended, weight=0.7)
    rows = predictor.index.rows_of([h.product_id for h in hits])
    blended = predictor.index.embeddings[rows] @ query_vec + 0.7 * predictor.index.embeddings[rows] @ attended
    np.testing.assert_allclose([h.score for h in hits], blended, atol=1e-5)
    everything = predictor.index.embeddings @ query_vec + 0.7 * predictor.index.embeddings @ attended
    assert hits[-1].score >= np.sort(everything)[-K] - 1e-5  # truly the top k of the whole catalog


@pytest.mark.parametrize("broken", ["corrupt_online_store", "no_feature_repo"])
def test_feast_down_still_answers_and_says_so(
    broken: str, settings: Settings, predictor: Predictor, champion: RegisteredChampion, known_user, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    if broken == "corrupt_online_store":
        shutil.copytree(champion.paths.feast_dir, home / "feast")
        (home / "feast" / "online.db").write_bytes(b"not a sqlite database" * 100)
    user_id, _ = known_user
    with TestClient(create_app(settings.model_copy(update={"home": home}), predictor=predictor)) as c:
        body = _search(c, query="cordless drill", k=K, user_id=user_id)
        assert body["personalized"] is False and body["fallback_reason"] == "features_unavailable"
        assert body["results"] == _search(c, query="cordless drill", k=K)["results"]


def test_personalization_weight_zero_skips_features(settings: Settings, predictor: Predictor, known_user) -> None:
    off = settings.model_copy(update={"personalization_weight": 0.0})
    with TestClient(create_app(off, predictor=predictor)) as c:
        body = _search(c, query="cordless drill", user_id=known_user[0])
    assert body["personalized"] is False and body["fallback_reason"] == "personalization_disabled"


def test_alias_move_is_hot_swapped(client: TestClient, settings: Settings, champion: RegisteredChampion) -> None:
    from pipelines.registry.mlflow_client import CHAMPION, end_run, register_bundle, set_alias, start_run

    paths = champion.paths
    run_id = start_run(paths, "integration-serving-hot-swap", {})
    name = champion.model_name
    newer = register_bundle(paths, run_id, champion.bundle_dir, name, "integration-serving-hot-swap", {})
    end_run(paths, run_id)
    assert newer != champion.version
    polling = settings.model_copy(update={"model_poll_seconds": 0.2})
    try:
        with TestClient(create_app(polling)) as c:
            assert c.get("/v1/model").json()["version"] == champion.version
            set_alias(paths, name, CHAMPION, newer)
            deadline = time.monotonic() + 30
            while c.get("/readyz").json()["model_version"] != newer:
                assert time.monotonic() < deadline, "the alias move was not picked up"
                time.sleep(0.1)
            assert _search(c, query="drill", k=3)["model_version"] == newer
            set_alias(paths, name, CHAMPION, champion.version)  # a rollback is the same move
            while c.get("/readyz").json()["model_version"] != champion.version:
                assert time.monotonic() < deadline, "the rollback was not picked up"
                time.sleep(0.1)
    finally:
        set_alias(paths, name, CHAMPION, champion.version)


def test_serving_never_imports_torch(champion: RegisteredChampion, known_user) -> None:
    """Importing the app loads nothing; a full start-up plus a personalised search still never imports torch."""
    code = """
import json, sys
import serving.app
heavy = [m for m in ("torch", "onnxruntime", "mlflow", "feast") if m in sys.modules]
assert not heavy, f"importing serving.app imported {heavy}"
from fastapi.testclient import TestClient
from serving.settings import Settings
with TestClient(serving.app.create_app(Settings.from_env())) as client:
    body = client.post("/v1/search", json={"query": "drill", "k": 3, "user_id": int(sys.argv[1])}).json()
assert body["personalized"], body
assert "torch" not in sys.modules, "serving imported torch"
print(json.dumps(body["model_version"]))
"""
    env = {
        **os.environ,
        "SHOPGUIDE_HOME": str(champion.paths.home),
        "SHOPGUIDE_MODEL_NAME": champion.model_name,
        "SHOPGUIDE_MODEL_POLL_SECONDS": "0",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("SHOPGUIDE_BUNDLE_DIR", None)
    done = subprocess.run(
        [sys.executable, "-c", code, str(known_user[0])],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == champion.version
