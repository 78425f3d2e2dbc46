"""The retrain pipeline's steps, one per DAG task: each takes small values, does one thing, logs it, returns JSON.

What one step hands the next (snapshot, models, bundles, reports) lives in the run store (registry/handoff.py):
each step stages its inputs, writes its outputs and publishes them, so that any step can run on any worker.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.config import Paths, ShopguideConfig, load_config
from pipelines.registry.handoff import task_folders

if TYPE_CHECKING:
    from pipelines.evaluation.gate import UnreadableChampion

# The snapshot's MLflow run tag saying why the run was started (the drift reason of the monitor's asset event, ...)
TRIGGER_REASON_TAG = "trigger_reason"
# well inside MLflow's limit on a tag value (8,000 characters in MLflow 3): several events' reasons can be long
MAX_TAG_CHARS = 5000
# The export step's output folder: one bundle per variant; the evaluation steps add indexes to them.
BUNDLES = "bundles"
# The evaluate step's output folder: the selected bundle's per-query figures, for the gate
HELDOUT = "heldout"

# DAG Params that may override the config, and where they land (everything else comes from configs/<profile>.yaml).
PARAM_FIELDS = {
    "judgments_path": "data.judgments_path",
    "judged_at_launch": "data.judged_at_launch",
    "max_steps": "train.max_steps",
    "feedback_weight": "train.feedback_weight",
    "auto_promote": "registry.auto_promote",
    "min_ndcg_at_10": "gate.min_ndcg_at_10",
    "min_category_accuracy": "gate.min_category_accuracy",
    "max_regression": "gate.max_regression",
    "gate_confidence": "gate.confidence",
    "lexical_weight": "search.lexical_weight",
}


def config_from_params(params: dict[str, Any]) -> ShopguideConfig:
    overrides = {field: params[name] for name, field in PARAM_FIELDS.items() if params.get(name) is not None}
    return load_config(params.get("profile") or "default", overrides)


def decide(
    params: dict[str, Any], run_type: str, as_of: str, triggers: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The run's first step: is there anything to learn since @champion's snapshot? Counts the facts cheaply (the
    answers with feedback in the service's logs, the monitor's latest window in MLflow, the run's Params, the asset
    events that started it: `triggers`, {"asset", "extra", "timestamp", "source"} each) and asks
    pipelines.data.newness; {"go", "reason", "trigger_reason", "facts"}. Opens no MLflow run: a skipped run leaves
    nothing there (the snapshot step tags the run it opens with `trigger_reason`)."""
    from pipelines.data.feedback import FeedbackSource, count_new_feedback
    from pipelines.data.newness import NewData, Trigger, drift_event, should_retrain, trigger_reason
    from pipelines.registry import mlflow_client as registry
    from pipelines.steps.monitor import DRIFT_ASSET, latest_window

    cfg = config_from_params(params)
    paths = Paths.from_env()
    started_by = [
        Trigger(
            asset=str(t["asset"]),
            extra=dict(t.get("extra") or {}),
            timestamp=datetime.fromisoformat(t["timestamp"]) if t.get("timestamp") else None,
            source=t.get("source"),
        )
        for t in triggers or []
    ]
    drift = tuple(e for t in started_by if t.asset == DRIFT_ASSET and (e := drift_event(t)) is not None)
    reason = trigger_reason(run_type, started_by)
    champion = registry.alias_version(paths, cfg.registry.model_name, registry.CHAMPION)
    since = feedback = window = None
    if champion is not None:  # without one the run trains anyway: nothing to count
        since = registry.data_as_of(paths, cfg.registry.model_name, champion)
        feedback = count_new_feedback(FeedbackSource(since), datetime.fromisoformat(as_of))
        window = latest_window(paths, champion, since)
    facts = NewData(
        run_type=run_type,
        champion=champion,
        since=since,
        new_feedback=feedback or 0,
        alarms=window[1] if window else (),
        window_end=window[0] if window else None,
        judgments=params.get("judgments_path") or None,
        only_with_new_data=bool(params.get("only_with_new_data")),
        drift_events=drift,
    )
    decision = should_retrain(facts, cfg.retrain)
    text = f"{decision.reason}; started by: {reason}"
    print(f"{'train' if decision.go else 'SKIP'}: {text}")
    summary = {
        "run_type": run_type,
        "champion": champion,
        "since": since.isoformat() if since else None,
        "new_feedback": feedback,
        "min_new_feedback": cfg.retrain.min_new_feedback,
        "alarms": list(facts.alarms),
        "window_end": facts.window_end.isoformat() if facts.window_end else None,
        "judgments": facts.judgments,
        "only_with_new_data": facts.only_with_new_data,
        "drift_events": [
            {"model_version": e.model_version, "window_end": e.window_end.isoformat(), "alarms": list(e.alarms)}
            for e in drift
        ],
    }
    return {"go": decision.go, "reason": text, "trigger_reason": reason, "facts": summary}


def snapshot(
    params: dict[str, Any],
    run_key: str,
    as_of: str,
    lineage: dict[str, str],
    trigger_reason: str | None = None,
) -> dict[str, Any]:
    """Freeze this run's inputs, with the logged traffic since @champion's snapshot (the whole log when there is no
    champion) as feedback pairs and searched queries, and open its MLflow run; the feedback's volume goes to it
    (`feedback.*`), and why the run was started (decide's `trigger_reason`) to its tag `trigger_reason`."""
    from pipelines.data.dataset import snapshot_data
    from pipelines.data.feedback import FeedbackSource
    from pipelines.registry import mlflow_client as registry

    cfg = config_from_params(params)
    paths = Paths.from_env()
    until = datetime.fromisoformat(as_of)
    champion = registry.alias_version(paths, cfg.registry.model_name, registry.CHAMPION)
    since = registry.data_as_of(paths, cfg.registry.model_name, champion) if champion else None
    with task_folders(run_key, paths) as t:
        snap = snapshot_data(cfg.data, t.output("data"), until, feedback=FeedbackSource(since), launch=champion is None)
        feedback = json.loads((snap.path / "manifest.json").read_text())["feedback"]
        tags = {**lineage, "data_snapshot": snap.hash, registry.DATA_AS_OF_TAG: as_of, "profile": cfg.profile}
        if trigger_reason:
            tags[TRIGGER_REASON_TAG] = trigger_reason[:MAX_TAG_CHARS]
        mlflow_run = registry.start_run(paths, run_key, tags)
        registry.log_step(paths, mlflow_run, "config", {}, params={"json": cfg.model_dump_json()})
        window = {"since": feedback["since"] or "start of the log", "until": feedback["until"], "champion": champion}
        registry.log_step(paths, mlflow_run, "feedback", feedback, params=window)
        print(
            f"feedback since {window['since']} (champion {champion or 'none'}): {feedback['pairs']} pairs "
            f"({feedback['positives']} positive, {feedback['negatives']} negative) from {feedback['answers']} answers; "
            f"dropped: {feedback['dropped_heldout']} pairs of {feedback['heldout_answers']} answers to held-out "
            f"terms, {feedback['dropped_validation']} of validation terms, {feedback['dropped_unknown_product']} "
            "of products outside the catalog"
        )
        return t.publish(
            {
                "snapshot_dir": str(snap.path),
                "snapshot_hash": snap.hash,
                "data_as_of": as_of,
                "mlflow_run_id": mlflow_run,
                "run_key": run_key,
            }
        )


def validate(snap: dict[str, Any]) -> dict[str, Any]:
    """Great Expectations on every table in a GX project inside the run; its Data Docs go to the MLflow run (failed
    runs too, logged before the raise), and a failure raises DataValidationError before any training."""
    from pipelines.data.validate import DataValidationError, validate_snapshot
    from pipelines.registry import mlflow_client as registry

    paths = Paths.from_env()
    run_id = snap["mlflow_run_id"]
    client = registry.client(paths)

    def log_data_docs(index_html: str | None) -> None:
        if index_html:
            client.log_artifacts(run_id, str(Path(index_html).parent), "data_docs")
            # the report's address on the run's page; the Artifacts tab renders data_docs/index.html itself
            client.set_tag(run_id, "data_docs", f"{client.get_run(run_id).info.artifact_uri}/data_docs/index.html")
            print(f"Data Docs: {index_html}")

    with task_folders(snap["run_key"], paths) as t:
        try:
            summary = validate_snapshot(t.stage(snap)["snapshot_dir"], t.output("validation"))
        except DataValidationError as err:
            log_data_docs(err.data_docs)
            client.set_tag(run_id, "validation", "failed")
            client.log_text(run_id, err.report, "validation_report.txt")
            registry.end_run(paths, run_id, "FAILED")
            raise
        log_data_docs(summary["data_docs"])
        registry.log_step(paths, run_id, "validate", {"expectations": summary["expectations"]})
        return t.publish({"expectations": summary["expectations"], "success": True, "data_docs": summary["data_docs"]})


def finetune(params: dict[str, Any], snap: dict[str, Any]) -> dict[str, Any]:
    from pipelines.registry import mlflow_client as registry
    from pipelines.training.finetune import finetune_encoder

    cfg = config_from_params(params)
    paths = Paths.from_env()
    sink = registry.metrics_sink(paths, snap["mlflow_run_id"])  # finetune.loss, finetune.eval_* as they come
    with task_folders(snap["run_key"], paths) as t:
        result = finetune_encoder(t.stage(snap)["snapshot_dir"], t.output("finetune"), cfg.train, sink)
        result.pop("loss_history")
        # method, trainable_parameters / total_parameters and the augmentation counts are in params and result;
        # the nested sections (lora, augment) as one param per field: finetune.lora.r, finetune.augment.share
        train = cfg.train.model_dump()
        params = {k: v for k, v in train.items() if not isinstance(v, dict)}
        params |= {
            f"{k}.{f}": v for k, section in train.items() if isinstance(section, dict) for f, v in section.items()
        }
        registry.log_step(paths, snap["mlflow_run_id"], "finetune", result, params=params)
        return t.publish(
            {"model_dir": result["model_dir"], "final_loss": result["final_loss"], "steps": result["steps"]}
        )


def train_reranker(params: dict[str, Any], snap: dict[str, Any]) -> dict[str, Any]:
    """The cross-encoder reranker from the base model's weights on the snapshot's training judgments, when
    rerank.enabled; {"enabled": false} otherwise (the evaluate step then bundles none)."""
    from pipelines.registry import mlflow_client as registry
    from pipelines.training.reranker import train_reranker as train

    cfg = config_from_params(params)
    if not cfg.rerank.enabled:
        return {"enabled": False}
    paths = Paths.from_env()
    sink = registry.metrics_sink(paths, snap["mlflow_run_id"])  # rerank.loss as it trains
    with task_folders(snap["run_key"], paths) as t:
        result = train(
            t.stage(snap)["snapshot_dir"],
            t.output("reranker"),
            cfg.rerank,
            cfg.train.base_model,
            cfg.train.mined_negative_ranks,
            cfg.train.seed,
            sink,
        )
        registry.log_step(paths, snap["mlflow_run_id"], "rerank", result, params=cfg.rerank.model_dump())
        return t.publish({"enabled": True, "reranker_dir": result["reranker_dir"]})


def _flat(prefix_rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    """{name: {metric: value}} -> {name.metric: value} for MLflow, numbers only."""
    return {
        f"{name}.{k}": v
        for name, row in prefix_rows.items()
        for k, v in row.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def distill(params: dict[str, Any], snap: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
    """Compression stage 1: students initialised from the teacher's layers, trained to reproduce its embeddings."""
    from pipelines.compression.variants import distill_students
    from pipelines.registry import mlflow_client as registry

    cfg = config_from_params(params)
    paths = Paths.from_env()
    sink = registry.metrics_sink(paths, snap["mlflow_run_id"])  # distill.<student>.loss as it trains
    with task_folders(snap["run_key"], paths) as t:
        local, teacher = t.stage(snap), t.stage(trained)
        result = distill_students(teacher["model_dir"], local["snapshot_dir"], t.output("students"), cfg, sink)
        registry.log_step(
            paths,
            snap["mlflow_run_id"],
            "distill",
            {"seconds": result["seconds"], **_flat(result["students"])},
            params=cfg.compress.model_dump(),
        )
        return t.publish({"models": result["models"], "seconds": result["seconds"]})


def prune(params: dict[str, Any], snap: dict[str, Any], distilled: dict[str, Any]) -> dict[str, Any]:
    """Compression stage 2: vocabulary pruning to the domain's tokens for every "-vocab" variant."""
    from pipelines.compression.variants import prune_vocabulary
    from pipelines.registry import mlflow_client as registry

    cfg = config_from_params(params)
    with task_folders(snap["run_key"]) as t:
        local, models = t.stage(snap), t.stage(distilled)["models"]
        result = prune_vocabulary(models, local["snapshot_dir"], t.output("pruned"), cfg)
        registry.log_step(
            Paths.from_env(), snap["mlflow_run_id"], "prune", {"seconds": result["seconds"], **_flat(result["pruned"])}
        )
        return t.publish({"models": result["models"], "seconds": result["seconds"]})


def export(params: dict[str, Any], snap: dict[str, Any], pruned: dict[str, Any]) -> dict[str, Any]:
    """Compression stage 3: an ONNX bundle per variant (optimizer fusions, INT8 per-channel) with its parity."""
    from pipelines.compression.variants import export_variants

    cfg = config_from_params(params)
    with task_folders(snap["run_key"]) as t:
        local, models = t.stage(snap), t.stage(pruned)["models"]
        result = export_variants(models, local["snapshot_dir"], t.output(BUNDLES), cfg)
        return t.publish(_exported(cfg, snap, result))


def _exported(cfg: ShopguideConfig, snap: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """The export's metrics to MLflow; what later steps need of each variant to XCom."""
    from pipelines.registry import mlflow_client as registry

    rows = {
        name: {"size_mb": v["size_mb"], **{f"parity_{k}": x for k, x in v["parity"].items()}}
        for name, v in result["variants"].items()
    }
    registry.log_step(
        Paths.from_env(),
        snap["mlflow_run_id"],
        "export",
        {"seconds": result["seconds"], **_flat(rows)},
        params=cfg.export.model_dump(),
    )
    variants = {
        name: {k: v[k] for k in ("bundle_dir", "model_dir", "parity", "size_mb", "layers", "vocab_size")}
        for name, v in result["variants"].items()
    }
    return {"variants": variants, "models": result["models"], "seconds": result["seconds"]}


def evaluate_variants(params: dict[str, Any], snap: dict[str, Any], exported: dict[str, Any]) -> dict[str, Any]:
    """Compression stage 4: every variant and the PyTorch fp32 teacher measured in one run (each ONNX bundle gets
    the product index built with its own graph)."""
    from pipelines.compression.variants import evaluate_variants as evaluate_all
    from pipelines.registry import mlflow_client as registry

    cfg = config_from_params(params)
    with task_folders(snap["run_key"]) as t:
        t.extend(BUNDLES)  # each variant's bundle gets the product index it is evaluated with
        local = t.stage({"snap": snap, "exported": exported})
        result = evaluate_all(local["exported"], local["snap"]["snapshot_dir"], t.output("evaluation"), cfg)
        rows = {r["variant"]: {k: v for k, v in r.items() if k not in ("layers", "vocab_size")} for r in result["rows"]}
        registry.log_step(
            Paths.from_env(), snap["mlflow_run_id"], "variants", {"seconds": result["seconds"], **_flat(rows)}
        )
        return t.publish(result)


def select_variant(params: dict[str, Any], snap: dict[str, Any], evaluated: dict[str, Any]) -> dict[str, Any]:
    """Compression stage 5: the configured rule picks the served variant; the report (table, Pareto plot, JSON) goes
    to the MLflow run and the task log. No qualifying variant and fallback 'fail' ends the run here."""
    from pipelines.compression.variants import CompressionFailed
    from pipelines.compression.variants import select_variant as choose
    from pipelines.registry import mlflow_client as registry

    cfg = config_from_params(params)
    paths = Paths.from_env()
    client = registry.client(paths)
    with task_folders(snap["run_key"], paths) as t:
        out = t.output("compression")
        try:
            chosen = choose(evaluated, out, cfg)  # the rows' bundle URLs pass through as they are
        except CompressionFailed as err:
            client.log_artifacts(snap["mlflow_run_id"], str(out / "report"), "compression")
            client.set_tag(snap["mlflow_run_id"], "compression", f"failed: {err}"[:5000])
            registry.end_run(paths, snap["mlflow_run_id"], "FAILED")
            raise
        client.log_artifacts(snap["mlflow_run_id"], chosen["report_dir"], "compression")
        client.set_tag(snap["mlflow_run_id"], "compression_variant", chosen["variant"])
        client.set_tag(snap["mlflow_run_id"], "compression_reason", chosen["reason"][:5000])
        registry.log_step(paths, snap["mlflow_run_id"], "selected", chosen["metrics"])
        return {
            "bundle_dir": chosen["bundle_dir"],
            "parity_cosine_min": chosen["parity_cosine_min"],
            "variant": chosen["variant"],
            "reason": chosen["reason"],
            "fallback": chosen["fallback"],
        }


def evaluate(
    params: dict[str, Any], snap: dict[str, Any], exported: dict[str, Any], reranker: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The selected bundle on the held-out terms and offers: its report, plus `per_query_url`, the per-term nDCG@10
    the gate pairs with the champion's (a small file of its own, so the gate stages no bundle). A trained reranker
    (train_reranker's output) is exported into the bundle first, so it is registered with the same version and the
    report holds the figures without and with it."""
    from pipelines.runtime.bundle import PER_QUERY_FILE

    cfg = config_from_params(params)
    with task_folders(snap["run_key"]) as t:
        t.extend(BUNDLES)  # the selected bundle gets its BM25 index, category calibration and error sample
        local = t.stage({"snap": snap, "selected": exported, "reranker": reranker or {}})
        if local["reranker"].get("enabled"):
            _bundle_reranker(cfg, snap["mlflow_run_id"], local)
        report = _evaluate(cfg, snap["mlflow_run_id"], local["snap"]["snapshot_dir"], local["selected"])
        per_query = t.output(HELDOUT) / PER_QUERY_FILE
        shutil.copyfile(Path(local["selected"]["bundle_dir"]) / PER_QUERY_FILE, per_query)
        return t.publish({**report, "per_query_url": str(per_query)})


def _bundle_reranker(cfg: ShopguideConfig, mlflow_run: str, local: dict[str, Any]) -> None:
    from pipelines.compression.export import export_reranker, reranker_parity_pairs
    from pipelines.data.dataset import Snapshot
    from pipelines.registry import mlflow_client as registry

    pairs = reranker_parity_pairs(Snapshot.open(local["snap"]["snapshot_dir"]), cfg.rerank.parity_pairs)
    exported = export_reranker(local["reranker"]["reranker_dir"], local["selected"]["bundle_dir"], pairs, cfg)
    registry.log_step(Paths.from_env(), mlflow_run, "rerank_export", exported)


def _evaluate(cfg: ShopguideConfig, mlflow_run: str, snapshot_dir: str, exported: dict[str, Any]) -> dict[str, Any]:
    from pipelines.evaluation.evaluate import evaluate_bundle
    from pipelines.evaluation.fusion import build_lexical_index
    from pipelines.registry import mlflow_client as registry
    from pipelines.runtime.bundle import ERRORS_FILE

    lexical = build_lexical_index(exported["bundle_dir"], snapshot_dir, cfg.search, cfg.evaluate)
    print(f"hybrid search: {lexical}")
    ood = _out_of_domain(cfg, exported["bundle_dir"], snapshot_dir)
    report = evaluate_bundle(
        exported["bundle_dir"],
        snapshot_dir,
        cfg.evaluate,
        parity_cosine_min=exported["parity_cosine_min"],
        extra={
            "variant": exported.get("variant"),
            "compression_reason": exported.get("reason"),
            "lexical_validation_ndcg_by_weight": lexical.get("validation_ndcg_by_weight"),
            **ood,
        },
        category=cfg.category,  # the abstention threshold is calibrated here and stored in the bundle
    )
    paths = Paths.from_env()
    registry.log_step(paths, mlflow_run, "evaluate", report)
    registry.client(paths).log_artifact(mlflow_run, str(Path(exported["bundle_dir"]) / ERRORS_FILE))
    return report


def _out_of_domain(cfg: ShopguideConfig, bundle_dir: str, snapshot_dir: str) -> dict[str, Any]:
    """The served bundle and the base model (PyTorch, as configured in train.base_model: what a shop starts from)
    on the held-out PriceRunner offers; {} when evaluate.out_of_domain_queries is 0."""
    import time

    from pipelines.evaluation.out_of_domain import out_of_domain_report
    from pipelines.training.finetune import load_encoder, unit_vectors

    if not cfg.evaluate.out_of_domain_queries:
        return {}
    started = time.perf_counter()
    base = unit_vectors(load_encoder(cfg.train.base_model, cfg.train.max_seq_length))
    ood = out_of_domain_report(bundle_dir, snapshot_dir, cfg.evaluate, base)
    ood["ood_seconds"] = round(time.perf_counter() - started, 1)
    print(
        f"out of domain ({ood['ood_queries']} held-out PriceRunner offers among {ood['ood_titles']} canonical titles): "
        f"nDCG@10 {ood['ood_ndcg_at_10']:.4f} (base model {ood['base_ood_ndcg_at_10']:.4f}), Recall@10 "
        f"{ood['ood_recall_at_10']:.4f} (base model {ood['base_ood_recall_at_10']:.4f}) in {ood['ood_seconds']} s"
    )
    return ood


def gate(params: dict[str, Any], snap: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """The candidate against the floors and against @champion re-evaluated here on the candidate's snapshot (same
    held-out terms and offers, same code): a paired bootstrap CI of the per-term nDCG@10 difference decides "no
    regression". The decision, every reason and the champion's figures go to MLflow.

    Fails closed: a registry that cannot be read raises (the task retries, then fails; nothing is decided), and a
    champion whose bundle is not the registered one or lacks files fails the gate with that reason, never "no
    champion yet".
    """
    import tempfile

    from pipelines.evaluation.evaluate import read_per_query
    from pipelines.evaluation.gate import decide
    from pipelines.evaluation.paired import PairedDifference, paired_bootstrap
    from pipelines.registry import mlflow_client as registry

    cfg = config_from_params(params)
    paths = Paths.from_env()
    run_id = snap["mlflow_run_id"]
    client = registry.client(paths)
    champion = registry.alias_version(paths, cfg.registry.model_name, registry.CHAMPION)
    champion_report: dict[str, Any] | UnreadableChampion | None = None
    paired: PairedDifference | None = None
    with task_folders(snap["run_key"], paths) as t:
        local = t.stage({"snap": snap, "per_query": report["per_query_url"]})
        if champion is not None:
            paths.scratch.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="champion-", dir=paths.scratch) as tmp:
                champion_report, per_query = _reevaluate_champion(
                    cfg, paths, champion, local["snap"]["snapshot_dir"], Path(tmp)
                )
            if per_query is not None:
                candidate = read_per_query(Path(local["per_query"]).parent)
                g = cfg.gate
                paired = paired_bootstrap(
                    candidate, per_query, "ndcg_at_10", g.confidence, g.bootstrap_resamples, g.bootstrap_seed
                )
    decision = decide(report, champion_report, cfg.gate, paired)
    client.set_tag(run_id, "gate_passed", str(decision.passed).lower())
    client.log_text(run_id, decision.summary(), "gate.txt")
    if isinstance(champion_report, dict):
        registry.log_step(paths, run_id, "champion", champion_report)  # champion.<metric>: the same data, same code
    if paired is not None:
        registry.log_step(
            paths,
            run_id,
            "gate",
            {
                "ndcg_at_10_difference": paired.mean_difference,
                "ndcg_at_10_difference_low": paired.low,
                "ndcg_at_10_difference_high": paired.high,
                "paired_terms": paired.queries,
            },
        )
    print(f"Gate vs champion {champion or '(none)'}: {decision.summary()}")
    figures = champion_report if isinstance(champion_report, dict) else {}
    return {
        **decision.to_dict(),
        "champion_version": champion,
        "paired": paired.to_dict() if paired else None,
        # the champion's figures on this snapshot, for the model card's comparison column
        "champion_report": {k: v for k, v in figures.items() if isinstance(v, int | float) and not isinstance(v, bool)},
    }


def _reevaluate_champion(
    cfg: ShopguideConfig, paths: Paths, version: str, snapshot_dir: str, work: Path
) -> tuple[dict[str, Any] | UnreadableChampion, dict[str, float] | None]:
    """(report, per-query nDCG@10) of @champion's bundle on this snapshot, or (UnreadableChampion, None) when its
    bundle is not the registered one (download_bundle checks every file against the manifest recorded at
    registration, and that the required ones are there). Registry errors raise."""
    from pipelines.evaluation.champion import reevaluate
    from pipelines.evaluation.gate import UnreadableChampion
    from pipelines.registry import mlflow_client as registry

    try:
        bundle = registry.download_bundle(paths, cfg.registry.model_name, version, work)
    except registry.BundleMismatch as err:
        return UnreadableChampion(version, str(err)), None
    report, per_query = reevaluate(bundle, snapshot_dir, cfg.evaluate, extra={"model_version": version})
    rebuilt = " (its index rebuilt over this catalog)" if report["reindexed_catalog"] else ""
    print(
        f"champion {version} on this snapshot{rebuilt}: nDCG@10 {report['ndcg_at_10']:.4f}, category accuracy "
        f"{report['category_accuracy']:.4f}"
    )
    return report, per_query


def register(
    params: dict[str, Any],
    snap: dict[str, Any],
    exported: dict[str, Any],
    report: dict[str, Any],
    decision: dict[str, Any],
    lineage: dict[str, str],
    run_key: str,
) -> dict[str, Any]:
    """Register the candidate (model card included) and point @challenger at it; never touches @champion."""
    from pipelines.registry import mlflow_client as registry

    cfg = config_from_params(params)
    paths = Paths.from_env()
    if not decision["passed"] and not cfg.registry.register_failed:
        return {"version": None, "registered": False}
    champion_report = decision.get("champion_report") or None  # the champion re-evaluated on this snapshot
    lineage = {**lineage, "mlflow_run_id": snap["mlflow_run_id"], "data_snapshot": snap["snapshot_hash"]}
    if snap.get("data_as_of"):  # where the next run's feedback window starts once this version is champion
        lineage[registry.DATA_AS_OF_TAG] = snap["data_as_of"]
    tags = {
        **lineage,
        "gate_passed": str(decision["passed"]).lower(),
        "gate_reasons": json.dumps(decision["reasons"])[:5000],
    }
    with task_folders(run_key, paths) as t:
        # the model card goes into the registered copy only (a staged one where the run store is remote)
        bundle = Path(t.stage(exported)["bundle_dir"])
        registry.write_model_card(bundle, report, champion_report, decision, lineage)
        version = registry.register_bundle(paths, snap["mlflow_run_id"], bundle, cfg.registry.model_name, run_key, tags)
    # @challenger is the newest candidate: a re-run of an older DAG run finds its version and must not pull it back
    challenger = registry.alias_version(paths, cfg.registry.model_name, registry.CHALLENGER)
    if challenger is None or int(challenger) < int(version):
        registry.set_alias(paths, cfg.registry.model_name, registry.CHALLENGER, version)
    return {"version": version, "registered": True}


PROMOTE, KEEP_CHAMPION = "promote", "keep_champion"  # the two branches after the gate (their DAG task ids)


def promotion_branch(params: dict[str, Any], decision: dict[str, Any], registered: dict[str, Any]) -> str:
    """The DAG's branch after the gate: PROMOTE when the gate passed, auto-promotion is on and a version was
    registered; KEEP_CHAMPION otherwise. A lost gate is an outcome, not an error: the run ends successfully."""
    cfg = config_from_params(params)
    return PROMOTE if _not_promoted_because(cfg, decision, registered) is None else KEEP_CHAMPION


def _not_promoted_because(cfg: ShopguideConfig, decision: dict[str, Any], registered: dict[str, Any]) -> str | None:
    if not decision["passed"]:
        return "gate failed"
    if not cfg.registry.auto_promote:
        return "auto-promotion is off: promote it with `shopguide promote VERSION`"
    if not registered.get("version"):
        return "nothing registered"
    return None


def _finish(paths: Paths, snap: dict[str, Any], outcome: dict[str, Any]) -> dict[str, Any]:
    """The run's outcome to the task log and the MLflow run (tag `outcome`), which ends FINISHED either way."""
    from pipelines.registry import mlflow_client as registry

    print(f"Promotion: {outcome['note']}")
    registry.client(paths).set_tag(
        snap["mlflow_run_id"], "outcome", "promoted" if outcome["promoted"] else "not promoted"
    )
    registry.end_run(paths, snap["mlflow_run_id"])
    return outcome


def promote(
    params: dict[str, Any],
    snap: dict[str, Any],
    registered: dict[str, Any],
    decision: dict[str, Any],
    lineage: dict[str, str],
    run_key: str,
) -> dict[str, Any]:
    """Move @champion to the candidate through registry.promote (artifact re-check + history); idempotent per run: a
    re-run never moves the alias a second time. Re-checks what the branch decided (a task run by hand, `airflow tasks
    test`, has no branch before it): otherwise it keeps the champion as keep_champion does."""
    from pipelines.registry import mlflow_client as registry

    cfg = config_from_params(params)
    paths = Paths.from_env()
    why_not = _not_promoted_because(cfg, decision, registered)
    if why_not is not None:
        return keep_champion(params, snap, registered, decision)
    model = cfg.registry.model_name
    current = registry.alias_version(paths, model, registry.CHAMPION)
    actor = f"airflow:{lineage.get('airflow_dag_id')}/{lineage.get('airflow_run_id')}"
    move = registry.promote(
        paths,
        model,
        registered["version"],
        f"gate passed in retrain run {run_key}",
        actor,
        run_key=run_key,
        # compare-and-set against the champion the gate compared with, not whatever is champion by now
        decided_against=decision.get("champion_version"),
    )
    outcome = {
        "champion": move.version,
        "previous_champion": current,
        "promoted": True,
        "moved": move.moved,
        "note": move.summary(),
    }
    return _finish(paths, snap, outcome)


def keep_champion(
    params: dict[str, Any], snap: dict[str, Any], registered: dict[str, Any], decision: dict[str, Any]
) -> dict[str, Any]:
    """The other branch: @champion stays where it is; the reasons go to the task log and `outcome` = "not promoted"
    to the MLflow run (a losing candidate stays registered as @challenger, for the record)."""
    from pipelines.registry import mlflow_client as registry

    cfg = config_from_params(params)
    paths = Paths.from_env()
    current = registry.alias_version(paths, cfg.registry.model_name, registry.CHAMPION)
    note = _not_promoted_because(cfg, decision, registered) or "not promoted"
    if not decision["passed"]:
        note += ":\n" + "\n".join(f"- {r}" for r in decision["reasons"])
    outcome = {"champion": current, "previous_champion": current, "promoted": False, "moved": False, "note": note}
    return _finish(paths, snap, outcome)


def conclude(decision: dict[str, Any], promoted: dict[str, Any] | None, kept: dict[str, Any] | None) -> dict[str, Any]:
    """The run's last word, whichever branch ran: the outcome and the champion it leaves. Only errors fail a run."""
    outcome = promoted or kept
    if outcome is None:
        raise ValueError("neither branch after the gate left an outcome")
    result = {
        "outcome": "promoted" if outcome["promoted"] else "not promoted",
        "gate_passed": decision["passed"],
        "champion": outcome.get("champion"),
        "moved": outcome.get("moved", False),
    }
    print(f"{result['outcome']}; champion {result['champion'] or 'none'}: {outcome.get('note', '')}")
    return result
