"""The only MLflow client user: tracking runs, registering bundles, moving the champion/challenger aliases."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipelines.config import REPO_ROOT, Paths
from pipelines.runtime.bundle import ENCODER_FILE, MODEL_CARD_FILE, REPORT_FILE, REQUIRED_FILES

EXPERIMENT = "shopguide"
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
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
    paths: Paths,
    run_id: str,
    step: str,
    metrics: dict[str, Any],
    params: dict[str, Any] | None = None,
) -> None:
    """Numeric metrics as `<step>.<name>` and params once (curves come through metrics_sink while a step runs)."""
    import time

    from mlflow.entities import Metric, Param

    c = client(paths)
    now = int(time.time() * 1000)
    flat = [
        Metric(f"{step}.{k}", float(v), now, 0)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    existing = c.get_run(run_id).data.params
    new_params = [
        Param(f"{step}.{k}", str(v)[:6000]) for k, v in (params or {}).items() if f"{step}.{k}" not in existing
    ]  # params are immutable in MLflow: a retried task skips them
    c.log_batch(run_id, metrics=flat, params=new_params)
    c.log_dict(run_id, metrics, f"steps/{step}.json")


def metrics_sink(paths: Paths, run_id: str) -> Callable[[dict[str, float], int], None]:
    """metrics, step -> logged on the run now: training curves fill in while the task runs."""
    import time

    from mlflow.entities import Metric

    c = client(paths)

    def log(metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        c.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    return log


def end_run(paths: Paths, run_id: str, status: str = "FINISHED") -> None:
    client(paths).set_terminated(run_id, status=status)


def write_model_card(
    bundle_dir: Path,
    report: dict[str, Any],
    champion: dict[str, Any] | None,
    decision: dict[str, Any],
    lineage: dict[str, str],
) -> None:
    rows = "\n".join(
        f"| {k} | {report[k]:.4f} | {champion.get(k, float('nan')) if champion else float('nan'):.4f} |"
        for k in (
            "ndcg_at_10",
            "dense_ndcg_at_10",
            "bm25_ndcg_at_10",
            "mrr_at_10",
            "recall_at_100",
            "category_accuracy",
            "latency_p99_ms",
            "lexical_latency_p99_ms",
            "size_mb",
        )
        if isinstance(report.get(k), int | float)
    )
    encoder = json.loads((bundle_dir / ENCODER_FILE).read_text())
    reasons = "\n".join(f"- {r}" for r in decision.get("reasons", []))
    search = (
        f"Hybrid: BM25 over the titles fused with the dense ranking, lexical weight {report['lexical_weight']} "
        "(chosen on validation terms); ndcg_at_10 is the fused ranking, dense_ndcg_at_10 the encoder alone."
        if report.get("lexical_weight") is not None
        else "Dense only."
    )
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

## Search
{search}

## Compression
Served variant: `{report.get("variant") or "teacher-int8"}`. {report.get("compression_reason") or ""}

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
    import tempfile

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
    with tempfile.TemporaryDirectory(prefix="shopguide-register-") as tmp, mlflow.start_run(run_id=run_id):
        if bundle.name != BUNDLE_ARTIFACT:
            # MLflow stores a directory artifact under its own basename, and every reader expects artifacts/bundle
            bundle = Path(shutil.copytree(bundle, Path(tmp) / BUNDLE_ARTIFACT))
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
        text = mlflow.artifacts.load_text(f"models:/{model_name}/{version}/artifacts/{BUNDLE_ARTIFACT}/{REPORT_FILE}")
    except Exception:
        return None
    return json.loads(text)


# --- promotion and rollback -----------------------------------------------------------------------------------------
# Every move of @champion made here is recorded as one registered-model tag `champion_history.<UTC timestamp>` whose
# value is a JSON object {action, version, previous, reason, actor, at, forced, run_key}. One tag per move (not one
# growing JSON list) because registry tag values are VARCHAR(5000) in the SQL stores and appending never rewrites
# older entries. The promoted version also gets `promoted_*` tags (and `forced` / `force_reason` when forced).
HISTORY_TAG_PREFIX = "champion_history."
PROMOTE, ROLLBACK = "promote", "rollback"
_REASON_MAX = 1000


class PromotionError(RuntimeError):
    """A promotion or rollback was refused; nothing moved. The message says why and what would make it pass."""


@dataclass(frozen=True)
class AliasMove:
    """The outcome of promote()/rollback(): where @champion was and is, and why; moved=False for a no-op."""

    action: str
    model_name: str
    version: str
    previous: str | None
    moved: bool
    reason: str
    actor: str
    forced: bool = False
    at: str = ""
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        if not self.moved:
            return f"{self.action}: {self.model_name}@{CHAMPION} stays at version {self.version} ({self.note})"
        forced = "; FORCED past a failed gate" if self.forced else ""
        return (
            f"{self.action}: {self.model_name}@{CHAMPION} {self.previous or '(none)'} -> {self.version} "
            f"(reason: {self.reason}; by {self.actor}{forced})"
        )


def champion_history(paths: Paths, model_name: str) -> list[dict[str, Any]]:
    """Every recorded move of @champion, oldest first (empty when the model does not exist yet)."""
    try:
        tags = client(paths).get_registered_model(model_name).tags
    except Exception:  # no such registered model
        return []
    return [json.loads(tags[k]) for k in sorted(k for k in tags if k.startswith(HISTORY_TAG_PREFIX))]


def champion_lineage(history: list[dict[str, Any]]) -> list[str]:
    """The stack of champions the history implies, oldest first; its top is the current champion.

    A promotion pushes (after the champion it replaced, if that was set outside these functions); a rollback pops
    back to the version it restored. So rollback after rollback walks further back, never forward again.
    """
    stack: list[str] = []
    for entry in history:
        if entry["action"] == PROMOTE:
            if entry.get("previous") and (not stack or stack[-1] != entry["previous"]):
                stack.append(entry["previous"])
            if not stack or stack[-1] != entry["version"]:
                stack.append(entry["version"])
        else:
            while stack and stack[-1] != entry["version"]:
                stack.pop()
            if not stack:
                stack.append(entry["version"])
    return stack


def check_version(paths: Paths, model_name: str, version: str, force: bool) -> bool:
    """Re-check a version before it becomes champion; returns whether the gate had to be forced.

    Raises PromotionError when the version does not exist, its bundle misses a required file (downloaded and listed),
    or it did not pass its gate (tag `gate_passed`) and `force` is off.
    """
    import tempfile

    c = client(paths)
    try:
        mv = c.get_model_version(model_name, str(version))
    except Exception as err:
        raise PromotionError(f"{model_name} version {version} does not exist in the registry") from err
    if mv.status != "READY":
        raise PromotionError(f"{model_name} version {version} is {mv.status}, not READY")
    with tempfile.TemporaryDirectory(prefix="shopguide-check-") as tmp:
        try:
            bundle = download_bundle(paths, model_name, str(version), tmp)
        except Exception as err:
            raise PromotionError(f"{model_name} version {version}: cannot download its artifacts: {err}") from err
        missing = missing_files(bundle)
    if missing:
        raise PromotionError(
            f"{model_name} version {version} is not servable, its bundle is missing: {', '.join(missing)}"
        )
    gate = mv.tags.get("gate_passed")
    if gate == "true":
        return False
    if not force:
        reasons = mv.tags.get("gate_reasons", "")
        failed = [r for r in json.loads(reasons) if not r.startswith("ok")] if reasons.startswith("[") else []
        raise PromotionError(
            f"{model_name} version {version} did not pass its gate (gate_passed={gate or 'missing'})"
            + (": " + "; ".join(failed) if failed else "")
            + "; promoting it anyway needs force with a reason"
        )
    return True


def _move(
    paths: Paths,
    model_name: str,
    action: str,
    version: str,
    previous: str | None,
    reason: str,
    actor: str,
    forced: bool,
    run_key: str | None,
    note: str = "",
) -> AliasMove:
    """The single atomic alias call, then the record of who/why (a crash in between leaves a move unrecorded,
    which rollback detects: the champion is then not the top of the recorded lineage)."""
    from datetime import UTC, datetime

    c = client(paths)
    now = datetime.now(UTC)
    c.set_registered_model_alias(model_name, CHAMPION, str(version))
    entry = {
        "action": action,
        "version": str(version),
        "previous": previous,
        "reason": reason[:_REASON_MAX],
        "actor": actor,
        "at": now.isoformat(timespec="seconds"),
        "forced": forced,
        "run_key": run_key,
    }
    c.set_registered_model_tag(model_name, f"{HISTORY_TAG_PREFIX}{now:%Y%m%dT%H%M%S.%fZ}", json.dumps(entry))
    version_tags = {
        "promoted_at": entry["at"],
        "promoted_by": actor,
        "promotion_reason": entry["reason"],
        "promoted_from": previous or "none",
        "promotion_action": action,
    }
    if forced:
        version_tags.update(forced="true", force_reason=entry["reason"])
    for k, v in version_tags.items():
        c.set_model_version_tag(model_name, str(version), k, v)
    return AliasMove(
        action, model_name, str(version), previous, True, entry["reason"], actor, forced, entry["at"], note
    )


def _require_reason(reason: str, action: str) -> str:
    if not reason or not reason.strip():
        raise PromotionError(f"{action} needs a non-empty reason (it is recorded with the alias move)")
    return reason.strip()


def promote(
    paths: Paths,
    model_name: str,
    version: str | int,
    reason: str,
    actor: str,
    force: bool = False,
    run_key: str | None = None,
) -> AliasMove:
    """Move @champion to `version` after re-checking it (check_version); records the move in the history.

    Idempotent: promoting the current champion, or promoting again from the same pipeline run (`run_key`, e.g. a
    re-run of a retrain DAG run after a later rollback), moves nothing and says so.
    """
    reason = _require_reason(reason, PROMOTE)
    version = str(version)
    current = alias_version(paths, model_name, CHAMPION)
    if run_key is not None:
        history = champion_history(paths, model_name)
        done = [e for e in history if e.get("run_key") == run_key and e["action"] == PROMOTE]
        if done:
            return AliasMove(
                PROMOTE,
                model_name,
                current or done[-1]["version"],
                current,
                False,
                reason,
                actor,
                note=f"run {run_key} already promoted version {done[-1]['version']} at {done[-1]['at']}",
            )
    if current == version:
        return AliasMove(
            PROMOTE,
            model_name,
            version,
            current,
            False,
            reason,
            actor,
            note=f"version {version} already is the champion",
        )
    forced = check_version(paths, model_name, version, force)
    return _move(paths, model_name, PROMOTE, version, current, reason, actor, forced, run_key)


def rollback(paths: Paths, model_name: str, reason: str, actor: str, force: bool = False) -> AliasMove:
    """Move @champion back to the version it held before the current champion was promoted.

    Walks the recorded lineage (champion_lineage): a second rollback goes one further back; with no earlier champion
    recorded, or when @champion was moved outside promote()/rollback() since the last recorded move, it refuses.
    The target is re-checked like a promotion (artifacts, gate tag unless forced).
    """
    reason = _require_reason(reason, ROLLBACK)
    current = alias_version(paths, model_name, CHAMPION)
    if current is None:
        raise PromotionError(f"{model_name} has no @{CHAMPION}: nothing to roll back")
    lineage = champion_lineage(champion_history(paths, model_name))
    if not lineage or lineage[-1] != current:
        raise PromotionError(
            f"{model_name}@{CHAMPION} is version {current}, but the last recorded move left version "
            f"{lineage[-1] if lineage else '(none)'}: the alias was moved outside shopguide promote/rollback, so "
            "the version it held before is unknown; promote the version you want explicitly"
        )
    if len(lineage) < 2:
        raise PromotionError(
            f"{model_name}@{CHAMPION} is version {current} and no earlier champion is recorded: nothing to roll back to"
        )
    target = lineage[-2]
    forced = check_version(paths, model_name, target, force)
    return _move(
        paths,
        model_name,
        ROLLBACK,
        target,
        current,
        reason,
        actor,
        forced,
        None,
        note=f"back to the champion before version {current}",
    )
