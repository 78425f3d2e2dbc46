"""The retrain pipeline's steps, one per DAG task: each takes small values, does one thing, logs it, returns JSON."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from pipelines.config import Paths, ShopguideConfig, load_config

# DAG Params that may override the config, and where they land (everything else comes from configs/<profile>.yaml).
PARAM_FIELDS = {
    "judgments_path": "data.judgments_path",
    "max_steps": "train.max_steps",
    "auto_promote": "registry.auto_promote",
    "min_ndcg_at_10": "gate.min_ndcg_at_10",
    "min_category_accuracy": "gate.min_category_accuracy",
    "max_regression": "gate.max_regression",
}


def config_from_params(params: dict[str, Any]) -> ShopguideConfig:
    overrides = {field: params[name] for name, field in PARAM_FIELDS.items() if params.get(name) is not None}
    return load_config(params.get("profile") or "default", overrides)


def _dirs(run_key: str) -> tuple[Paths, Path]:
    paths = Paths.from_env()
    return paths, paths.run_dir(run_key)


def snapshot(params: dict[str, Any], run_key: str, as_of: str, lineage: dict[str, str]) -> dict[str, Any]:
    """Freeze this run's inputs and open its MLflow run."""
    from pipelines import registry
    from pipelines.data import snapshot_data

    cfg = config_from_params(params)
    paths, run_dir = _dirs(run_key)
    snap = snapshot_data(cfg.data, run_dir / "data", datetime.fromisoformat(as_of))
    mlflow_run = registry.start_run(paths, run_key, {**lineage, "data_snapshot": snap.hash, "profile": cfg.profile})
    registry.log_step(paths, mlflow_run, "config", {}, params={"json": cfg.model_dump_json()})
    return {"snapshot_dir": str(snap.path), "snapshot_hash": snap.hash, "mlflow_run_id": mlflow_run,
            "run_dir": str(run_dir)}


def validate(snap: dict[str, Any]) -> dict[str, Any]:
    """Great Expectations on every table; a failure raises DataValidationError before any training."""
    from pipelines import registry
    from pipelines.validate import DataValidationError, validate_snapshot

    paths = Paths.from_env()
    try:
        summary = validate_snapshot(snap["snapshot_dir"])
    except DataValidationError as err:
        client = registry.client(paths)
        client.set_tag(snap["mlflow_run_id"], "validation", "failed")
        client.log_text(snap["mlflow_run_id"], err.report, "validation_report.txt")
        registry.end_run(paths, snap["mlflow_run_id"], "FAILED")
        raise
    registry.log_step(paths, snap["mlflow_run_id"], "validate", {"expectations": summary.get("expectations", 0)})
    return {"expectations": summary.get("expectations"), "success": True}


def finetune(params: dict[str, Any], snap: dict[str, Any]) -> dict[str, Any]:
    from pipelines import registry
    from pipelines.finetune import finetune_encoder

    cfg = config_from_params(params)
    paths = Paths.from_env()
    result = finetune_encoder(snap["snapshot_dir"], Path(snap["run_dir"]) / "finetune", cfg.train)
    history = result.pop("loss_history")
    registry.log_step(paths, snap["mlflow_run_id"], "finetune", result, params=cfg.train.model_dump(), history=history)
    return {"model_dir": result["model_dir"], "final_loss": result["final_loss"], "steps": result["steps"]}


def export(params: dict[str, Any], snap: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
    from pipelines import registry
    from pipelines.export import export_model

    cfg = config_from_params(params)
    report = export_model(trained["model_dir"], snap["snapshot_dir"], Path(snap["run_dir"]) / "bundle", cfg.export,
                          cfg.train.max_seq_length)
    flat = {"size_mb": report["size_mb"], "size_fp32_mb": report["size_fp32_mb"],
            **{f"{variant}_{k}": v for variant in ("onnx_fp32", "served")
               for k, v in report[f"parity_{variant}"].items()}}
    registry.log_step(Paths.from_env(), snap["mlflow_run_id"], "export", flat, params=cfg.export.model_dump())
    return {"bundle_dir": report["bundle_dir"], "parity_cosine_min": report["parity_served"]["cosine_min"]}


def build_index(snap: dict[str, Any], exported: dict[str, Any]) -> dict[str, Any]:
    from pipelines import registry
    from pipelines.index import build_product_index

    result = build_product_index(exported["bundle_dir"], snap["snapshot_dir"])
    registry.log_step(Paths.from_env(), snap["mlflow_run_id"], "index", result)
    return result


def evaluate(params: dict[str, Any], snap: dict[str, Any], exported: dict[str, Any]) -> dict[str, Any]:
    from pipelines import registry
    from pipelines.evaluate import ERRORS_FILE, evaluate_bundle

    cfg = config_from_params(params)
    report = evaluate_bundle(exported["bundle_dir"], snap["snapshot_dir"], cfg.evaluate,
                             parity_cosine_min=exported["parity_cosine_min"])
    paths = Paths.from_env()
    registry.log_step(paths, snap["mlflow_run_id"], "evaluate", report)
    registry.client(paths).log_artifact(snap["mlflow_run_id"], str(Path(exported["bundle_dir"]) / ERRORS_FILE))
    return report


def gate(params: dict[str, Any], snap: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """Compare with the current champion's stored report; the decision and every reason go to MLflow."""
    from pipelines import registry
    from pipelines.gate import decide

    cfg = config_from_params(params)
    paths = Paths.from_env()
    champion = registry.alias_version(paths, cfg.registry.model_name, registry.CHAMPION)
    champion_report = registry.version_report(paths, cfg.registry.model_name, champion) if champion else None
    decision = decide(report, champion_report, cfg.gate)
    client = registry.client(paths)
    client.set_tag(snap["mlflow_run_id"], "gate_passed", str(decision.passed).lower())
    client.log_text(snap["mlflow_run_id"], decision.summary(), "gate.txt")
    print(f"Gate vs champion {champion or '(none)'}: {decision.summary()}")
    return {**decision.to_dict(), "champion_version": champion}


def register(params: dict[str, Any], snap: dict[str, Any], exported: dict[str, Any], report: dict[str, Any],
             decision: dict[str, Any], lineage: dict[str, str], run_key: str) -> dict[str, Any]:
    """Register the candidate (model card included) and point @challenger at it; never touches @champion."""
    from pipelines import registry

    cfg = config_from_params(params)
    paths = Paths.from_env()
    if not decision["passed"] and not cfg.registry.register_failed:
        return {"version": None, "registered": False}
    champion_report = (registry.version_report(paths, cfg.registry.model_name, decision["champion_version"])
                       if decision.get("champion_version") else None)
    bundle = Path(exported["bundle_dir"])
    lineage = {**lineage, "mlflow_run_id": snap["mlflow_run_id"], "data_snapshot": snap["snapshot_hash"]}
    registry.write_model_card(bundle, report, champion_report, decision, lineage)
    tags = {**lineage, "gate_passed": str(decision["passed"]).lower(),
            "gate_reasons": json.dumps(decision["reasons"])[:5000]}
    version = registry.register_bundle(paths, snap["mlflow_run_id"], bundle, cfg.registry.model_name, run_key, tags)
    # @challenger is the newest candidate: a re-run of an older DAG run finds its version and must not pull it back
    challenger = registry.alias_version(paths, cfg.registry.model_name, registry.CHALLENGER)
    if challenger is None or int(challenger) < int(version):
        registry.set_alias(paths, cfg.registry.model_name, registry.CHALLENGER, version)
    return {"version": version, "registered": True}


def promote(params: dict[str, Any], snap: dict[str, Any], registered: dict[str, Any], decision: dict[str, Any],
            lineage: dict[str, str], run_key: str) -> dict[str, Any]:
    """Move @champion to the candidate when the gate passed and auto-promotion is on, through registry.promote
    (artifact re-check + history); idempotent per run: a re-run never moves the alias a second time."""
    from pipelines import registry

    cfg = config_from_params(params)
    paths = Paths.from_env()
    model = cfg.registry.model_name
    current = registry.alias_version(paths, model, registry.CHAMPION)
    outcome = {"champion": current, "previous_champion": current, "promoted": False, "moved": False}
    if not decision["passed"]:
        note = "gate failed"
    elif not cfg.registry.auto_promote:
        note = "auto-promotion is off: promote it with `shopguide promote VERSION`"
    elif not registered.get("version"):
        note = "nothing registered"
    else:
        actor = f"airflow:{lineage.get('airflow_dag_id')}/{lineage.get('airflow_run_id')}"
        move = registry.promote(paths, model, registered["version"], f"gate passed in retrain run {run_key}", actor,
                                run_key=run_key)
        note = move.summary()
        outcome.update(champion=move.version, promoted=True, moved=move.moved)
    print(f"Promotion: {note}")
    outcome["note"] = note
    client = registry.client(paths)
    client.set_tag(snap["mlflow_run_id"], "outcome", "promoted" if outcome["promoted"] else "not promoted")
    registry.end_run(paths, snap["mlflow_run_id"])
    return outcome


class GateFailed(RuntimeError):
    """Raised at the end of a run whose candidate failed the gate, so the run ends visibly failed."""


def conclude(decision: dict[str, Any], outcome: dict[str, Any]) -> dict[str, Any]:
    """The run's last word: success with the champion it leaves, or GateFailed with every reason."""
    if not decision["passed"]:
        raise GateFailed("candidate failed the gate; champion unchanged ("
                         f"{outcome.get('champion') or 'none'}):\n" + "\n".join(f"- {r}" for r in decision["reasons"]))
    return outcome
