"""The category answer over the real registered champion: the service says which taxonomy it predicts, abstains
exactly where the evaluation measured it would (one rule, pipelines.runtime.category), and an older bundle without a
calibrated threshold keeps answering the top category."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from fastapi.testclient import TestClient

from pipelines.runtime.bundle import CATEGORY_FILE, LABELS_FILE, REPORT_FILE
from serving.app import create_app
from serving.settings import Settings

if TYPE_CHECKING:
    from tests.integration.conftest import RegisteredChampion


@pytest.fixture(scope="module")
def client(champion: RegisteredChampion) -> TestClient:
    settings = Settings(home=champion.paths.home, model_name=champion.model_name, model_poll_seconds=0)
    with TestClient(create_app(settings)) as c:
        yield c


def test_the_service_abstains_where_the_evaluation_measured_it(
    client: TestClient, champion: RegisteredChampion
) -> None:
    report = json.loads((champion.bundle_dir / REPORT_FILE).read_text())
    rule = json.loads((champion.bundle_dir / CATEGORY_FILE).read_text())
    assert report["category_score"] == rule["score"] and report["category_threshold"] == rule["threshold"]
    assert report["category_threshold"] is not None  # calibrated on this version's validation data
    assert 0 <= report["category_coverage"] <= 1 and 0 <= report["category_heldout_term_abstention"] <= 1
    probes = {p["query"]: p for p in report["category_probes"]}
    assert {"dishwasher", "refrigerator", "cordless drill", "paint roller"} <= set(probes)

    info = client.get("/v1/model").json()
    assert info["category_rule"].startswith(f"abstains when {rule['score']} < ")
    labels = json.loads((champion.bundle_dir / LABELS_FILE).read_text())
    body = client.post("/v1/classify", json={"queries": list(probes)}).json()
    assert body["taxonomy"].startswith(f"pricerunner-{len(labels)}: ") and all(lb in body["taxonomy"] for lb in labels)
    for result in body["results"]:
        probe = probes[result["query"]]
        # the same answer as evaluation.json: category or null, on the same side of the same threshold
        assert result["category"] == probe["category"], (result, probe)
        assert (result["category_abstained_reason"] is None) == (probe["category"] is not None)
        assert result["probability"] == pytest.approx(probe["probability"], abs=1e-4)
        search = client.post("/v1/search", json={"query": result["query"], "k": 3}).json()
        assert search["category"] == probe["category"] and search["taxonomy"] == body["taxonomy"]
        assert search["category_abstained_reason"] == result["category_abstained_reason"]
    abstained = [r for r in body["results"] if r["category"] is None]
    for r in abstained:
        assert "outside the taxonomy" in r["category_abstained_reason"]


def test_a_bundle_without_a_threshold_answers_the_top_category_as_before(
    champion: RegisteredChampion, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(champion.bundle_dir, bundle)
    (bundle / CATEGORY_FILE).unlink()  # what every bundle registered before abstention looks like
    settings = Settings(home=tmp_path / "home", bundle_dir=bundle, model_poll_seconds=0)
    queries = ["cordless drill", "paint roller", "2x4 lumber", "wood screws", "dishwasher"]
    with TestClient(create_app(settings)) as c:
        assert c.get("/readyz").json()["status"] == "ready"
        assert "never abstains" in c.get("/v1/model").json()["category_rule"]
        predictor = c.app.state.serving.predictor
        results = c.post("/v1/classify", json={"queries": queries}).json()["results"]
        tops = [predictor.labels[int(lg.argmax())] for q in queries for lg in predictor.encoder.encode([q])[1]]
        assert [r["category"] for r in results] == tops  # never null
        assert all(r["category_abstained_reason"] is None for r in results)
        assert c.post("/v1/search", json={"query": "cordless drill"}).json()["category"] == tops[0]
