"""A servable bundle straight from a snapshot, without a DAG run: the retrain steps' own functions in one call, for
test fixtures and benchmarks that need a real model to serve (fine-tune, export ONNX INT8, dense + BM25 index,
evaluate, model card)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.config import EvaluateConfig, ExportConfig, SearchConfig, ShopguideConfig, TrainConfig


def build_bundle(
    snapshot_dir: str | Path,
    work: Path,
    train: TrainConfig,
    parity_texts: int,
    evaluation: EvaluateConfig,
    reason: str,
    lineage: dict[str, str],
) -> tuple[Path, dict[str, Any]]:
    """(work/bundle, its evaluation report): the model trained into work/model, the bundle marked as passed for
    `reason` in its model card (it is not gated: whoever calls this decides)."""
    from pipelines.compression.export import build_product_index, export_bundle
    from pipelines.evaluation.evaluate import evaluate_bundle
    from pipelines.evaluation.fusion import build_lexical_index
    from pipelines.registry.mlflow_client import write_model_card
    from pipelines.training.finetune import finetune_encoder

    finetune_encoder(snapshot_dir, work / "model", train)
    bundle = work / "bundle"
    export = ShopguideConfig(train=train, export=ExportConfig(parity_texts=parity_texts))
    export_bundle(work / "model", snapshot_dir, bundle, export)
    build_product_index(bundle, snapshot_dir)
    build_lexical_index(bundle, snapshot_dir, SearchConfig(), evaluation)
    report = evaluate_bundle(bundle, snapshot_dir, evaluation)
    write_model_card(bundle, report, None, {"passed": True, "reasons": [reason]}, lineage)
    return bundle, report
