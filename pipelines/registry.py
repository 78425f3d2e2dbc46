"""The only MLflow client user: tracking runs, registering bundles, moving the champion/challenger aliases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pipelines.config import REPO_ROOT, Paths
from pipelines.encoder import ENCODER_FILE, LABELS_FILE, ONNX_FILE, TOKENIZER_FILE
from pipelines.evaluate import REPORT_FILE
from pipelines.index import EMBEDDINGS_FILE, INDEX_DIR, PRODUCTS_FILE

EXPERIMENT = "shopguide"
PYFUNC_FILE = REPO_ROOT / "pipelines" / "pyfunc_model.py"
MODEL_CARD_FILE = "model_card.md"
# A version is servable only if its bundle holds all of these.
REQUIRED_FILES = (ONNX_FILE, TOKENIZER_FILE, LABELS_FILE, ENCODER_FILE, REPORT_FILE, MODEL_CARD_FILE,
                  f"{INDEX_DIR}/{EMBEDDINGS_FILE}", f"{INDEX_DIR}/{PRODUCTS_FILE}")
BUNDLE_ARTIFACT = "bundle"
CHAMPION, CHALLENGER = "champion", "challenger"


def client(paths: Paths):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(paths.mlflow_tracking_uri)
    mlflow.set_registry_uri(paths.mlflow_tracking_uri)
    return MlflowClient(paths.mlflow_tracking_uri, paths.mlflow_tracking_uri)


def experiment_id(paths: Paths) -> str:
    """The shopguide experiment, with artifacts under SHOPGUIDE_HOME (not ./mlruns of whatever cwd)."""
    c = client(paths)
    exp = c.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    paths.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
    return c.create_experiment(EXPERIMENT, artifact_location=paths.mlflow_artifacts.as_uri())


def start_run(paths: Paths, run_key: str, tags: dict[str, str]) -> str:
    """One MLflow run per pipeline run, found again by its key so a re-run of the same DAG run reuses it."""
    c = client(paths)
    exp = experiment_id(paths)
    found = c.search_runs([exp], filter_string=f"tags.shopguide_run_key = '{run_key}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = c.create_run(exp, run_name=run_key, tags={"shopguide_run_key": run_key, **tags})
    c.set_terminated(run.info.run_id, status="RUNNING")
    return run.info.run_id


def log_step(
    paths: Paths, run_id: str, step: str, metrics: dict[str, Any], params: dict[str, Any] | None = None,
    history: list[dict[str, float]] | None = None,
) -> None:
    """Numeric metrics as `<step>.<name>`, params once, and a per-step curve (e.g. training loss)."""
    import time

    from mlflow.entities import Metric, Param

    c = client(paths)
    now = int(time.time() * 1000)
    flat = [Metric(f"{step}.{k}", float(v), now, 0) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)]
    for point in history or []:
        flat.append(Metric(f"{step}.loss", float(point["loss"]), now, int(point["step"])))
    existing = c.get_run(run_id).data.params
    new_params = [Param(f"{step}.{k}", str(v)[:6000]) for k, v in (params or {}).items()
                  if f"{step}.{k}" not in existing]  # params are immutable in MLflow: a retried task skips them
    c.log_batch(run_id, metrics=flat, params=new_params)
    c.log_dict(run_id, metrics, f"steps/{step}.json")


def end_run(paths: Paths, run_id: str, status: str = "FINISHED") -> None:
    client(paths).set_terminated(run_id, status=status)


def write_model_card(bundle_dir: Path, report: dict[str, Any], champion: dict[str, Any] | None,
                     decision: dict[str, Any], lineage: dict[str, str]) -> None:
    rows = "\n".join(
        f"| {k} | {report[k]:.4f} | {champion.get(k, float('nan')) if champion else float('nan'):.4f} |"
        for k in ("ndcg_at_10", "mrr_at_10", "recall_at_100", "category_accuracy", "latency_p99_ms", "size_mb")
        if isinstance(report.get(k), int | float)
    )
    encoder = json.loads((bundle_dir / ENCODER_FILE).read_text())
    reasons = "\n".join(f"- {r}" for r in decision.get("reasons", []))
    card = f"""# shopguide-encoder

Sentence encoder (mean pooling, L2-normalised) with a category head, served as ONNX ({encoder.get("quantization")}).
Fine-tuned from all-MiniLM-L6-v2 on Home Depot search relevance (real), category head on PriceRunner (real).

## Data snapshot
`{report.get("snapshot_hash")}`; held-out search terms: {report.get("heldout_terms")};
catalog: {report.get("catalog_products")} products

## Metrics (candidate vs champion at evaluation time)
| metric | candidate | champion |
| --- | --- | --- |
{rows}

## Gate: {"passed" if decision.get("passed") else "failed"}
{reasons}

## Lineage
{chr(10).join(f"- {k}: {v}" for k, v in lineage.items())}
"""
    (bundle_dir / MODEL_CARD_FILE).write_text(card)


def missing_files(bundle_dir: Path) -> list[str]:
    return [f for f in REQUIRED_FILES if not (bundle_dir / f).is_file()]


def find_version(paths: Paths, model_name: str, run_key: str):
    """The version a previous attempt of this pipeline run registered, if any (idempotent re-runs)."""
    c = client(paths)
    try:
        versions = c.search_model_versions(f"name = '{model_name}' and tags.shopguide_run_key = '{run_key}'")
    except Exception:  # the registered model may not exist yet
        return None
    return versions[0] if versions else None


def register_bundle(
    paths: Paths, run_id: str, bundle_dir: str | Path, model_name: str, run_key: str, tags: dict[str, str]
) -> str:
    """Log the bundle as a pyfunc (models-from-code over ONNX Runtime) and register it; returns the version."""
    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    bundle = Path(bundle_dir)
    missing = missing_files(bundle)
    if missing:
        raise FileNotFoundError(f"bundle {bundle} is incomplete, missing: {missing}")
    existing = find_version(paths, model_name, run_key)
    if existing is not None:
        return str(existing.version)
    client(paths)
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "query")]),
        outputs=Schema([ColSpec("string", "query"), ColSpec("string", "category")]),
        params=ParamSchema([ParamSpec("k", "long", 10)]),
    )
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_FILE),
            artifacts={BUNDLE_ARTIFACT: str(bundle)},
            code_paths=[str(REPO_ROOT / "pipelines")],
            signature=signature,
            input_example=pd.DataFrame({"query": ["cordless drill"]}),
            # explicit requirements: inferring them would load the model in a subprocess for nothing
            pip_requirements=["mlflow", "onnxruntime", "tokenizers", "numpy", "pandas", "pyarrow"],
        )
    version = mlflow.register_model(info.model_uri, model_name, tags={"shopguide_run_key": run_key, **tags})
    return str(version.version)


def set_alias(paths: Paths, model_name: str, alias: str, version: str, tags: dict[str, str] | None = None) -> None:
    """The alias move is the one atomic step; who/why goes onto the version as tags."""
    c = client(paths)
    c.set_registered_model_alias(model_name, alias, str(version))
    for k, v in (tags or {}).items():
        c.set_model_version_tag(model_name, str(version), k, v)


def alias_version(paths: Paths, model_name: str, alias: str) -> str | None:
    c = client(paths)
    try:
        return str(c.get_model_version_by_alias(model_name, alias).version)
    except Exception:  # no such model or alias yet
        return None


def download_bundle(paths: Paths, model_name: str, version: str, dst: str | Path) -> Path:
    """Fetch a version's bundle into dst/<version>/ (a local cache: the service can start with MLflow down)."""
    import mlflow

    client(paths)
    target = Path(dst) / str(version)
    bundle = target / "model" / "artifacts" / BUNDLE_ARTIFACT
    if bundle.is_dir() and not missing_files(bundle):
        return bundle
    tmp = Path(dst) / f".{version}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    mlflow.artifacts.download_artifacts(f"models:/{model_name}/{version}", dst_path=str(tmp / "model"))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic: a half-downloaded version never looks complete
    return bundle


def version_report(paths: Paths, model_name: str, version: str) -> dict[str, Any] | None:
    """The evaluation report stored with a version (what the gate compares a candidate with)."""
    import mlflow

    client(paths)
    try:
        text = mlflow.artifacts.load_text(
            f"models:/{model_name}/{version}/artifacts/{BUNDLE_ARTIFACT}/{REPORT_FILE}")
    except Exception:
        return None
    return json.loads(text)
