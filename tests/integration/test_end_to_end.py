"""End to end on real components: both DAGs under `airflow dags test`, the real MiniLM, MLflow, Feast, ORT, serving."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from pipelines.airflow_env import run_dag_test
from pipelines.config import MODEL_NAME
from pipelines.data.dataset import HOMEDEPOT_FILE
from pipelines.registry import mlflow_client as registry

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline_run(tiny_pipeline):
    """The session's features DAG run then retrain DAG run on the tiny profile (tests/integration/conftest.py)."""
    return tiny_pipeline.paths, tiny_pipeline.features, tiny_pipeline.retrain


def test_retrain_registers_a_complete_champion(pipeline_run, tmp_path):
    paths, _, retrain = pipeline_run
    version = retrain.xcom("register")["version"]
    # what the run did; other tests of the session may move the aliases after it
    assert retrain.xcom("promote")["champion"] == version and retrain.xcom("promote")["moved"]
    run_key = f"shopguide_retrain__{retrain.run_id}"
    promoted = [e for e in registry.champion_history(paths, MODEL_NAME) if e.get("run_key") == run_key]
    assert [(e["action"], e["version"]) for e in promoted] == [("promote", version)]
    assert registry.alias_version(paths, MODEL_NAME, registry.CHALLENGER) == version
    bundle = registry.download_bundle(paths, MODEL_NAME, version, tmp_path)
    assert registry.missing_files(bundle) == []
    tags = registry.client(paths).get_model_version(MODEL_NAME, version).tags
    assert tags["gate_passed"] == "true"
    assert tags["airflow_dag_id"] == "shopguide_retrain" and tags["airflow_run_id"] == retrain.run_id
    assert len(tags["data_snapshot"]) == 16
    report = retrain.xcom("evaluate")
    assert 0 < report["ndcg_at_10"] <= 1 and 0 < report["category_accuracy"] <= 1
    assert report["parity_cosine_min"] > 0.95
    client = registry.client(paths)
    run = client.get_run(tags["mlflow_run_id"])
    assert run.data.tags["trigger_reason"] == "manual run"  # decide's, tagged by snapshot on the run it opens
    assert {
        "finetune.final_loss",
        "evaluate.ndcg_at_10",
        "selected.parity_cosine_min",
        "variants.teacher-torch.ndcg_at_10",
        "distill.student2.final_loss",
    } <= set(run.data.metrics)


def test_the_registered_version_is_the_selected_compression_variant(pipeline_run, tmp_path):
    paths, _, retrain = pipeline_run
    selected = retrain.xcom("select_variant")
    evaluated = {r["variant"]: r for r in retrain.xcom("evaluate_variants")["rows"]}
    # the tiny profile builds every stage: a distilled, vocabulary-pruned student beside the teacher INT8
    assert set(evaluated) == {"teacher-torch", "teacher-int8", "student2-vocab-int8"}
    assert evaluated["student2-vocab-int8"]["vocab_size"] < evaluated["teacher-int8"]["vocab_size"]
    assert selected["variant"] in evaluated and selected["variant"] in selected["reason"]
    version = retrain.xcom("register")["version"]
    encoder = json.loads((registry.download_bundle(paths, MODEL_NAME, version, tmp_path) / "encoder.json").read_text())
    assert encoder["variant"] == selected["variant"]
    client = registry.client(paths)
    run_id = client.get_model_version(MODEL_NAME, version).tags["mlflow_run_id"]
    assert client.get_run(run_id).data.tags["compression_variant"] == selected["variant"]
    logged = {Path(f.path).name for f in client.list_artifacts(run_id, "compression")}
    assert {"compression.md", "pareto.png", "compression.json"} <= logged


def test_champion_loads_as_an_mlflow_pyfunc(pipeline_run):
    import mlflow

    out = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion").predict(
        pd.DataFrame({"query": ["cordless drill", "garden hose"]}), params={"k": 5}
    )
    assert list(out["query"]) == ["cordless drill", "garden hose"]
    assert all(len(ids) == 5 for ids in out["product_ids"])


def test_service_answers_with_the_champion_for_a_query_and_a_user(pipeline_run):
    from serving.app import create_app

    paths, features, _ = pipeline_run
    version = registry.alias_version(paths, MODEL_NAME, registry.CHAMPION)
    events = pd.read_parquet(features.xcom("land_events")["events_path"])
    user = int(events["user_id"].iloc[-1])
    with TestClient(create_app()) as client:
        anon = client.post("/v1/search", json={"query": "cordless drill", "k": 5})
        assert anon.status_code == 200, anon.text
        assert anon.json()["model_version"] == version and len(anon.json()["results"]) == 5
        personal = client.post("/v1/search", json={"query": "cordless drill", "k": 5, "user_id": user})
        assert personal.status_code == 200, personal.text
        body = personal.json()
        assert body["model_version"] == version and len(body["results"]) == 5
        assert body["personalized"] is True, body


def test_broken_data_stops_before_training_and_keeps_the_champion(pipeline_run, tmp_path):
    """One breakage through the whole DAG (~25 s a run); each kind of breakage and its report is in
    tests/unit/test_validate.py, on the same suites."""
    paths, _, _ = pipeline_run
    champion = registry.alias_version(paths, MODEL_NAME, registry.CHAMPION)
    # fewer distinct terms than the tiny profile keeps, so every row (the broken one too) is in the snapshot
    df = pd.read_csv(HOMEDEPOT_FILE, encoding="latin-1", nrows=250)
    assert df["search_term"].nunique() < 300
    df.loc[3, "relevance"] = 7.0  # the grades are 1-3
    # the DAG reads judgments only from the landing folder (pipelines.data.dataset.landed_judgments)
    broken = paths.landing / "judgments-relevance_out_of_range.csv"
    broken.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(broken, index=False)
    run = run_dag_test(
        paths,
        "shopguide_retrain",
        {"profile": "tiny", "judgments_path": str(broken)},
        "2026-11-03T00:00:00+00:00",
        capture=True,
    )
    assert not run.ok, run.output[-3000:]
    assert "validate" in run.task_states, run.output[-3000:]
    assert run.task_states["validate"] == "failed"
    assert run.task_states["finetune"] == "upstream_failed"
    assert "Data validation failed" in run.output and "expect_column_values_to_be_between" in run.output
    assert registry.alias_version(paths, MODEL_NAME, registry.CHAMPION) == champion
