"""The service's API surface over the real registered champion: new endpoints, auth, limits, metrics, logs, ANN,
settings, and a property-based run of the app's own OpenAPI schema (schemathesis)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from pipelines.runtime.search import AnnOptions, HnswSearch, build_search
from serving.app import create_app
from serving.predictor import Predictor, load_options
from serving.settings import Settings

if TYPE_CHECKING:
    from tests.integration.conftest import RegisteredChampion

KEY = "test-key-0123456789"


def _import_all(package) -> None:
    """pytest rewrites the asserts of every module of a pytest plugin's distribution when it is first imported, and
    Python 3.11.7's ast.parse can then fail mid-test ("AST constructor recursion depth mismatch"); importing
    schemathesis whole at collection, from a shallow stack, keeps that off the test's path."""
    import importlib
    import pkgutil

    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        # optional integrations (e.g. GraphQL servers) whose extras are not installed fail to import: skip them
        with contextlib.suppress(Exception):
            importlib.import_module(module.name)


_import_all(schemathesis)


@pytest.fixture(scope="module")
def settings(champion: RegisteredChampion) -> Settings:
    return Settings(home=champion.paths.home, model_name=champion.model_name, model_poll_seconds=0)


@pytest.fixture(scope="module")
def predictor(settings: Settings) -> Predictor:
    with TestClient(create_app(settings)) as c:
        return c.app.state.serving.predictor


@pytest.fixture(scope="module")
def client(settings: Settings, predictor: Predictor) -> Iterator[TestClient]:
    with TestClient(create_app(settings, predictor=predictor)) as c:
        yield c


@pytest.fixture(scope="module")
def terms(champion: RegisteredChampion) -> list[str]:
    judged = pd.read_parquet(champion.snapshot_dir / "judgments_train.parquet")
    return sorted(judged["search_term"].astype(str).unique())[:40]


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return 0.0


def test_classify_and_embed_match_the_encoder(
    client: TestClient, predictor: Predictor, champion: RegisteredChampion
) -> None:
    queries = ["cordless drill", "  iphone 12 case ", "60 watt led bulb"]
    body = client.post("/v1/classify", json={"queries": queries}).json()
    assert body["model_version"] == champion.version
    assert not predictor.batch_invariant  # dynamic INT8: each text is encoded alone, as /v1/search does
    alone = [predictor.encoder.encode([q.strip()]) for q in queries]
    emb, logits = np.concatenate([e for e, _ in alone]), np.concatenate([lg for _, lg in alone])
    assert [r["query"] for r in body["results"]] == [q.strip() for q in queries]
    answers = predictor.categories(logits, emb)  # the top category, or null outside the taxonomy
    assert [a.top_category for a in answers] == [predictor.labels[i] for i in logits.argmax(1)]
    assert [r["category"] for r in body["results"]] == [a.category for a in answers]
    assert all(0 < r["probability"] <= 1 for r in body["results"])

    response = client.post("/v1/embed", json={"texts": queries})
    body = response.json()
    assert body["model_version"] == champion.version and body["dim"] == emb.shape[1]
    got = np.asarray(body["embeddings"], dtype=np.float32)
    np.testing.assert_allclose(got, emb, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    assert response.headers["x-model-version"] == champion.version


def test_recommend_from_history_and_fallbacks(
    client: TestClient, settings: Settings, predictor: Predictor, champion: RegisteredChampion
) -> None:
    from pipelines.features.store import refresh_features
    from serving.online_features import OnlineFeatures

    refresh_features(champion.snapshot_dir, champion.as_of, paths=champion.paths)
    online = OnlineFeatures(champion.paths)
    user_id, recent = next(
        (u, r) for u in range(1, 31) if len(r := (online.user_features(u) or {}).get("recent_products") or []) >= 2
    )
    with TestClient(create_app(settings, predictor=predictor)) as c:  # a fresh Feast connection after the apply
        body = c.post("/v1/recommend", json={"user_id": user_id, "k": 5}).json()
        assert body["model_version"] == champion.version
        assert body["personalized"] is True and body["fallback_reason"] is None and body["method"] == "history"
        ids = [r["product_id"] for r in body["results"]]
        assert len(ids) == 5 and not set(ids) & set(recent)  # what the user already saw is not recommended
        scores = [r["score"] for r in body["results"]]
        assert scores == sorted(scores, reverse=True)

        unknown = c.post("/v1/recommend", json={"user_id": 999_999, "k": 5}).json()
        assert unknown["personalized"] is False and unknown["fallback_reason"] == "no_online_features"
        assert unknown["method"] in ("popularity", "none")
    assert client.post("/v1/recommend", json={"user_id": -1}).status_code == 422


def test_recommend_with_feast_down_is_flagged_not_500(settings: Settings, predictor: Predictor, tmp_path: Path) -> None:
    with TestClient(create_app(settings.model_copy(update={"home": tmp_path}), predictor=predictor)) as c:
        response = c.post("/v1/recommend", json={"user_id": 3, "k": 5})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["personalized"] is False and body["fallback_reason"] == "features_unavailable"
        assert body["results"] == [] and body["method"] == "none"
        metrics = c.get("/metrics").text
    assert (
        _metric(metrics, "shopguide_features_fallbacks_total", endpoint="/v1/recommend", reason="features_unavailable")
        == 1
    )


@pytest.mark.parametrize(
    ("path", "body", "reason"),
    [
        ("/v1/classify", {"queries": []}, "at least 1"),
        ("/v1/classify", {"queries": ["drill"] * 9}, "at most 8"),
        ("/v1/classify", {"queries": ["x" * 257]}, "at most 256"),
        ("/v1/classify", {"queries": "drill"}, "list"),
        ("/v1/embed", {"texts": ["drill", ""]}, "at least 1"),
        ("/v1/embed", {"texts": ["drill"], "extra": 1}, "Extra inputs"),
        ("/v1/recommend", {"user_id": 1, "k": 101}, "less than or equal to 100"),
        ("/v1/recommend", {"k": 5}, "Field required"),
        ("/v1/search", {"query": "drill", "k": 101}, "less than or equal to 100"),
    ],
)
def test_limits_are_422_with_the_reason(
    settings: Settings, predictor: Predictor, path: str, body: dict, reason: str
) -> None:
    with TestClient(create_app(settings.model_copy(update={"max_batch": 8}), predictor=predictor)) as c:
        response = c.post(path, json=body)
    assert response.status_code == 422, response.text
    assert reason in response.text
    assert "Traceback" not in response.text


def test_body_size_limit_is_413_before_parsing(settings: Settings, predictor: Predictor) -> None:
    with TestClient(create_app(settings.model_copy(update={"max_body_bytes": 2048}), predictor=predictor)) as c:
        big = json.dumps({"texts": ["drill " * 40] * 20}).encode()
        response = c.post("/v1/embed", content=big, headers={"content-type": "application/json"})
        assert response.status_code == 413
        assert response.json() == {"detail": "request body larger than 2048 bytes"}

        def chunks():  # no Content-Length: the middleware counts the streamed body itself
            yield big[:1000]
            yield big[1000:]

        response = c.post("/v1/embed", content=chunks(), headers={"content-type": "application/json"})
        assert response.status_code == 413
        small = json.dumps({"texts": ["drill"]}).encode()
        response = c.post(
            "/v1/embed", content=iter([small[:5], small[5:]]), headers={"content-type": "application/json"}
        )
        assert response.status_code == 200, response.text


def test_settings_come_from_the_shopguide_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Settings() reads each field's SHOPGUIDE_* variable only; blank counts as unset; arguments win; errors name
    the variable."""
    monkeypatch.setenv("SHOPGUIDE_HOME", str(tmp_path))
    monkeypatch.setenv("SHOPGUIDE_MAX_K", "7")
    monkeypatch.setenv("SHOPGUIDE_API_KEYS", " a , b ,")
    monkeypatch.setenv("SHOPGUIDE_SHADOW_QUEUE", "  ")  # blank: the default
    monkeypatch.setenv("max_batch", "3")  # a field's own name is not its variable
    settings = Settings()
    assert (settings.home, settings.max_k, settings.api_keys) == (tmp_path, 7, frozenset({"a", "b"}))
    assert (settings.shadow_queue, settings.max_batch) == (256, 64)
    assert Settings(max_k=9).max_k == 9 and Settings.from_env() == settings
    assert Settings.from_env({"SHOPGUIDE_MAX_K": "2"}).max_k == 2  # that mapping alone
    monkeypatch.setenv("SHOPGUIDE_MAX_K", "0")
    with pytest.raises(ValueError, match="SHOPGUIDE_MAX_K"):
        Settings()


def test_api_keys(settings: Settings, predictor: Predictor) -> None:
    secured = Settings.from_env(
        {
            "SHOPGUIDE_HOME": str(settings.home),
            "SHOPGUIDE_MODEL_NAME": settings.model_name,
            "SHOPGUIDE_API_KEYS": f" {KEY} , other-key ",
        }
    )
    assert secured.api_keys == frozenset({KEY, "other-key"})
    with TestClient(create_app(secured, predictor=predictor)) as c:
        for path, body in [
            ("/v1/search", {"query": "drill"}),
            ("/v1/classify", {"queries": ["drill"]}),
            ("/v1/embed", {"texts": ["drill"]}),
            ("/v1/recommend", {"user_id": 1}),
        ]:
            for headers in (
                {},
                {"X-API-Key": "wrong"},
                {"X-API-Key": KEY[:-1]},
                {"Authorization": f"Basic {KEY}"},
                {"Authorization": f"Bearer {KEY[:-1]}"},
            ):
                response = c.post(path, json=body, headers=headers)
                assert response.status_code == 401, (path, headers)
                assert response.json() == {
                    "detail": "missing or invalid API key (header X-API-Key, or Authorization: Bearer)"
                }
            assert c.post(path, json=body, headers={"X-API-Key": KEY}).status_code == 200
            assert c.post(path, json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
            assert c.post(path, json=body, headers={"X-API-Key": "other-key"}).status_code == 200
        # auth comes before parsing: a bad body without a key is a 401, not a 422 that describes the API
        assert c.post("/v1/search", content=b"{", headers={"content-type": "application/json"}).status_code == 401
        assert c.get("/v1/model").status_code == 401 and c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"X-API-Key": KEY}).status_code == 200
        # Prometheus sends the key from a file as a bearer token (scrape_config `authorization: credentials_file`)
        assert c.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200  # probes stay open
        schema = c.get("/openapi.json").json()
        assert schema["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"


def test_request_id_logs_and_no_stack_traces(
    client: TestClient, predictor: Predictor, champion, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="serving"):
        response = client.post("/v1/search", json={"query": "drill", "k": 3}, headers={"X-Request-ID": "req-42"})
        generated = client.post("/v1/search", json={"query": "drill"}, headers={"X-Request-ID": "bad id\n!"})
    assert response.headers["x-request-id"] == "req-42"
    assert response.headers["x-model-version"] == champion.version
    assert len(generated.headers["x-request-id"]) == 32  # an invalid id is replaced, not echoed
    access = [r for r in caplog.records if r.name == "serving.access" and r.request_id == "req-42"]
    assert len(access) == 1
    line = access[0]
    assert line.status == 200 and line.model_version == champion.version and line.path == "/v1/search"
    assert set(line.stages_ms) == {"encode", "rank"} and line.duration_ms > 0

    from serving.logs import JsonFormatter

    parsed = json.loads(JsonFormatter().format(line))
    assert parsed["request_id"] == "req-42" and parsed["stages_ms"]["encode"] > 0 and parsed["level"] == "info"

    broken = Predictor(predictor.encoder, predictor.index, predictor.version, predictor.bundle_dir)
    broken.encode = None  # any bug on the request path
    with TestClient(create_app(champion_settings(champion), predictor=broken), raise_server_exceptions=False) as c:
        response = c.post("/v1/search", json={"query": "drill"}, headers={"X-Request-ID": "boom"})
    assert response.status_code == 500 and response.json() == {"detail": "internal error"}
    assert response.headers["x-request-id"] == "boom"
    assert "Traceback" not in response.text and "NoneType" not in response.text


def champion_settings(champion: RegisteredChampion) -> Settings:
    return Settings(home=champion.paths.home, model_name=champion.model_name, model_poll_seconds=0)


def test_metrics_are_exposed(client: TestClient, champion: RegisteredChampion) -> None:
    client.post("/v1/search", json={"query": "drill", "k": 3})
    client.post("/v1/search", json={"query": ""})
    client.post("/v1/classify", json={"queries": ["a", "b", "c"]})
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert _metric(text, "shopguide_requests_total", endpoint="/v1/search", status="200") >= 1
    assert _metric(text, "shopguide_requests_total", endpoint="/v1/search", status="422") >= 1
    assert _metric(text, "shopguide_request_duration_seconds_count", endpoint="/v1/search", status="200") >= 1
    assert _metric(text, "shopguide_model_info", version=champion.version, search="exact") == 1
    assert _metric(text, "shopguide_batch_size_count", kind="classify") >= 1
    assert _metric(text, "shopguide_stage_duration_seconds_count", stage="encode") >= 1
    assert "process_resident_memory_bytes" in text


def test_ann_index_matches_brute_force_and_is_cached(predictor: Predictor, tmp_path: Path) -> None:
    index = predictor.index
    options = AnnOptions(min_products=1, expansion_search=64)
    ann = build_search(index, options, tmp_path)
    assert isinstance(ann, HnswSearch)
    cached = list(tmp_path.glob("*.usearch"))
    assert len(cached) == 1
    queries, _ = predictor.encoder.encode(["cordless drill", "paint roller", "garden hose", "light bulb"])
    for q in queries:
        exact_rows, exact_scores = predictor.search_backend.top_k(q, 10)
        rows, scores = ann.top_k(q, 10)
        assert len(set(rows) & set(exact_rows)) >= 9  # small catalog: HNSW is (almost) exact
        np.testing.assert_allclose(scores, index.embeddings[rows] @ q, atol=1e-6)  # re-scored exactly
        assert list(scores) == sorted(scores, reverse=True)
    again = build_search(index, options, tmp_path)  # restored from the cache file, not rebuilt
    assert list(again.top_k(queries[0], 10)[0]) == list(ann.top_k(queries[0], 10)[0])
    cached[0].write_bytes(b"torn")
    rebuilt = build_search(index, options, tmp_path)  # a corrupt cache file is rebuilt, never served
    assert len(set(rebuilt.top_k(queries[0], 10)[0]) & set(ann.top_k(queries[0], 10)[0])) >= 9
    assert isinstance(build_search(index, AnnOptions(min_products=len(index) + 1)), type(predictor.search_backend))


def test_service_with_ann_search(settings: Settings, champion: RegisteredChampion, tmp_path: Path) -> None:
    """Start-up serves at once with exact search, builds the HNSW graph in the background and switches to it; the
    next start loads the cached graph before it is ready."""
    ann = settings.model_copy(update={"ann_min_products": 10, "home": tmp_path / "home"})
    for start in ("first", "cached"):
        with TestClient(create_app(ann)) as c:
            if start == "cached":
                assert c.get("/v1/model").json()["search"] == "hnsw"
            deadline = time.monotonic() + 60
            while (info := c.get("/v1/model").json())["search"] != "hnsw":
                assert time.monotonic() < deadline, "the HNSW graph was never built"
                assert c.post("/v1/search", json={"query": "drill"}).status_code == 200  # exact meanwhile
                time.sleep(0.05)
            assert info["version"] == champion.version
            body = c.post("/v1/search", json={"query": "cordless drill", "k": 10}).json()
            assert len(body["results"]) == 10
            assert _metric(c.get("/metrics").text, "shopguide_model_info", search="hnsw") == 1
        assert len(list(load_options(ann).ann_cache.glob("*.usearch"))) == 1


def test_only_batch_invariant_graphs_encode_texts_together(predictor: Predictor, terms: list[str]) -> None:
    """/v1/classify and /v1/embed encode a request's texts in one run only where a text's outputs do not depend on
    the texts beside it; this fixture's graph is dynamic INT8 (one activation scale per batch), so one run each."""
    assert not predictor.batch_invariant
    alone = predictor.encoder.encode([terms[0]])[0][0]
    np.testing.assert_array_equal(predictor.encode_many(terms[:8])[0][0], alone)
    invariant = dataclasses.replace(predictor, variant="fp32", backend=predictor.search_backend)
    np.testing.assert_array_equal(invariant.encode_many(terms[:8])[0], predictor.encoder.encode(terms[:8])[0])


# --- property-based: the app's own OpenAPI schema, every operation, bounded examples --------------------------------


def test_openapi_property_based_no_server_errors(settings: Settings, predictor: Predictor) -> None:
    """schemathesis requests from the app's own OpenAPI schema, valid (positive) and invalid (negative), for every
    operation: never a 5xx, every status documented, every response matching its schema.

    Driven with hypothesis directly: schemathesis' pytest fixture loader (`from_fixture`) does not run under
    pytest 9 (it reads the removed `Node._nodeid`).
    """
    app = create_app(settings.model_copy(update={"max_batch": 8}), predictor=predictor)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {
        "/v1/search",
        "/v1/recommend",
        "/v1/classify",
        "/v1/embed",
        "/v1/model",
        "/metrics",
        "/healthz",
        "/readyz",
    }
    seen: dict[int, int] = {}
    for operation in operations:
        # a GET without parameters has nothing to make invalid
        for mode in GenerationMode if operation.method.upper() == "POST" else [GenerationMode.POSITIVE]:

            @given(case=operation.as_strategy(generation_mode=mode))
            @hypothesis_settings(
                max_examples=15, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
            )
            def check(case) -> None:
                response = case.call()
                seen[response.status_code] = seen.get(response.status_code, 0) + 1
                case.validate_response(
                    response, checks=[not_a_server_error, status_code_conformance, response_schema_conformance]
                )

            check()
    assert not [code for code in seen if code >= 500], seen
    assert seen.get(200) and seen.get(422), seen  # both valid and invalid requests were generated
