"""Compression suite: build variants (students, pruned vocabularies, ONNX fp32/INT8), evaluate all, select one."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import BASELINE_VARIANT, VARIANT_PATTERN, CompressConfig, ShopguideConfig
from pipelines.data.dataset import Snapshot
from pipelines.runtime.bundle import TOKENIZER_FILE
from pipelines.runtime.encoder import OnnxEncoder, load_tokenizer
from pipelines.training.progress import MetricsSink

TEACHER = "teacher"
FALLBACK_VARIANT = "teacher-int8"
REPORT_DIR = "report"
REPORT_JSON = "compression.json"
REPORT_MD = "compression.md"
PARETO_PNG = "pareto.png"
THROUGHPUT_BATCH = 32


class CompressionFailed(RuntimeError):
    """No variant met the selection rule and the configured fallback is to fail."""


# ---------------------------------------------------------------------------------------------------------------------
# variant names


@dataclass(frozen=True)
class VariantSpec:
    name: str
    weights: str  # the weight folder this variant is built from: teacher, student3, student2-vocab, ...
    layers: int | None  # kept layers of a student; None = the teacher's
    ffn: int | None  # kept feed-forward neurons per layer of a student; None = all
    vocab: bool
    graph: str  # torch | fp32 | int8


def parse_variant(name: str) -> VariantSpec:
    match = VARIANT_PATTERN.match(name)
    if not match:
        raise ValueError(f"not a variant name: {name!r}")
    weights = match["weights"] + ("-vocab" if match["vocab"] else "")
    return VariantSpec(
        name,
        weights,
        int(match["layers"]) if match["layers"] else None,
        int(match["ffn"]) if match["ffn"] else None,
        bool(match["vocab"]),
        match["graph"],
    )


def planned_variants(cfg: CompressConfig) -> list[VariantSpec]:
    """The baseline first, then the configured variants in their order."""
    return [parse_variant(BASELINE_VARIANT)] + [parse_variant(v) for v in cfg.variants]


def student_plan(cfg: CompressConfig, teacher_layers: int, teacher_ffn: int) -> dict[str, dict[str, Any]]:
    """Each planned student's teacher layers (configured per layer count, or spread evenly), kept FFN width and the
    student it starts from (None: the teacher's layers), in training order.

    With `ffn_after_distill`, an FFN-pruned student is pruned from the distilled full-width student of its depth,
    which is then planned (and trained) before it even when no variant serves it.
    """
    from pipelines.compression.distill import spread_layers

    out: dict[str, dict[str, Any]] = {}
    for spec in planned_variants(cfg):
        if spec.layers is None:
            continue
        key = spec.weights.removesuffix("-vocab")
        layers = list(cfg.student_layers.get(f"student{spec.layers}") or spread_layers(teacher_layers, spec.layers))
        if len(set(layers)) != spec.layers or not all(0 <= i < teacher_layers for i in layers):
            raise ValueError(
                f"{key} needs {spec.layers} distinct teacher layers in 0..{teacher_layers - 1}, got {layers}"
            )
        if spec.ffn is not None and spec.ffn >= teacher_ffn:
            raise ValueError(f"{key} keeps {spec.ffn} feed-forward neurons; the teacher has {teacher_ffn}")
        init = None
        if spec.ffn is not None and cfg.ffn_after_distill:
            init = f"student{spec.layers}"
            out.setdefault(init, {"layers": layers, "ffn": None, "init": None})
        out[key] = {"layers": layers, "ffn": spec.ffn, "init": init}
    return out


# ---------------------------------------------------------------------------------------------------------------------
# stage 1: distillation


def distill_students(
    model_dir: str | Path,
    snapshot_dir: str | Path,
    out_dir: str | Path,
    cfg: ShopguideConfig,
    on_metrics: MetricsSink | None = None,
) -> dict[str, Any]:
    """Train every planned student against the fine-tuned teacher; returns {"models": weights name -> folder, ...}.

    The teacher embeds the distillation texts once; every student learns the same targets.
    """
    import torch

    from pipelines.compression.distill import contrastive_sets, distill_student, distillation_texts
    from pipelines.training.finetune import load_finetuned, unit_vectors

    started = time.perf_counter()
    out, ccfg = Path(out_dir), cfg.compress
    models: dict[str, str] = {TEACHER: str(model_dir)}
    teacher, _, _ = load_finetuned(model_dir, cfg.train.max_seq_length)
    config = teacher[0].auto_model.config
    plan = student_plan(ccfg, config.num_hidden_layers, config.intermediate_size)
    result: dict[str, Any] = {"models": models, "students": {}}
    if not plan:
        return {**result, "seconds": round(time.perf_counter() - started, 1)}
    torch.set_num_threads(ccfg.threads)
    snap = Snapshot.open(snapshot_dir)
    texts = distillation_texts(snap, ccfg.distill_max_texts, ccfg.seed)
    task_sets = contrastive_sets(snap, cfg.train, model_dir) if ccfg.distill_task_pairs else None
    t0 = time.perf_counter()
    with torch.no_grad():
        targets = unit_vectors(teacher)(texts)
    result["teacher_encode_seconds"] = round(time.perf_counter() - t0, 1)
    result["distill_texts"] = len(texts)
    result["task_pairs"] = {name: len(df) for name, df in (task_sets or {}).items()}
    for name, student in plan.items():
        init = models[student["init"]] if student["init"] else None
        info = distill_student(
            teacher,
            model_dir,
            out / name,
            student["layers"],
            texts,
            targets,
            ccfg,
            task_sets,
            ffn=student["ffn"],
            init_dir=init,
            on_metrics=on_metrics,
        )
        models[name] = info["model_dir"]
        result["students"][name] = info
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# stage 2: vocabulary pruning


def vocabulary_texts(snapshot: Snapshot, min_count: int = 1) -> list[str]:
    """The domain's texts: training queries (judged, and the training terms of the feedback pairs), everything
    shoppers searched since @champion's snapshot (clicked or not: a new brand or product line the served model
    splits into pieces enters the vocabulary with the next retrain, the drift-triggered one included), the whole
    catalog (it is indexed) and the PriceRunner training titles; never the held-out queries, so their unseen words
    are a fair test of the pruned tokenizer (the feedback and searched tables hold none: pipelines/data/feedback.py
    drops them).

    Each distinct text appears once, except a searched term, which appears as often as it was searched, up to
    `min_count` (the pruning's count threshold, compress.vocab_min_count): a word many shoppers typed in one query
    is kept like a word of `min_count` distinct texts, and the cap keeps every token's verdict (count >= min_count)
    exactly what the uncapped traffic would give, without tokenizing a busy log query by query."""
    import pandas as pd

    from pipelines.data.feedback import FEEDBACK_TABLE, SEARCHED_TABLE

    texts = [
        snapshot.table("judgments_train")["search_term"],
        snapshot.table("catalog")["product_title"],
        snapshot.table("offers_train")["offer_title"],
    ]
    # snapshots frozen before feedback (or the searched terms) existed have no such table
    if (snapshot.path / f"{FEEDBACK_TABLE}.parquet").is_file():
        texts.append(snapshot.table(FEEDBACK_TABLE)["search_term"])
    searched = (
        snapshot.table(SEARCHED_TABLE)
        if (snapshot.path / f"{SEARCHED_TABLE}.parquet").is_file()
        else pd.DataFrame({"search_term": [], "answers": []})
    )
    texts.append(searched["search_term"])
    domain = pd.concat(texts).astype(str).drop_duplicates().tolist()
    repeats = searched.set_index(searched["search_term"].astype(str))["answers"].clip(upper=min_count) - 1
    return domain + [term for term, extra in repeats.items() if extra > 0 for _ in range(int(extra))]


def prune_vocabulary(
    models: dict[str, str], snapshot_dir: str | Path, out_dir: str | Path, cfg: ShopguideConfig
) -> dict[str, Any]:
    """Prune the vocabulary of every weight set a "-vocab" variant needs; returns all models plus the pruned ones."""
    from pipelines.compression.prune import prune_vocabulary_dir

    started = time.perf_counter()
    needed = list(dict.fromkeys(s.weights for s in planned_variants(cfg.compress) if s.vocab))
    models = dict(models)
    pruned: dict[str, Any] = {}
    if needed:
        texts = vocabulary_texts(Snapshot.open(snapshot_dir), cfg.compress.vocab_min_count)
        for key in needed:
            source = key.removesuffix("-vocab")
            if source not in models:
                raise ValueError(f"{key} needs the {source} weights, which no earlier stage produced")
            pruned[key] = prune_vocabulary_dir(
                models[source],
                Path(out_dir) / key,
                texts,
                cfg.train.max_seq_length,
                cfg.compress.vocab_min_count,
                cfg.compress.vocab_keep_ascii_chars,
            )
            models[key] = pruned[key]["model_dir"]
    return {"models": models, "pruned": pruned, "seconds": round(time.perf_counter() - started, 1)}


# ---------------------------------------------------------------------------------------------------------------------
# stage 3: ONNX export, optimization, INT8, parity


def export_variants(
    models: dict[str, str], snapshot_dir: str | Path, out_dir: str | Path, cfg: ShopguideConfig
) -> dict[str, Any]:
    """A servable bundle per planned ONNX variant (the index comes with the evaluation).
    Returns {"variants": name -> {bundle_dir, parity, size_mb, ...}, "models": ...}."""
    from pipelines.compression.export import export_weights, parity_texts

    started = time.perf_counter()
    texts = parity_texts(Snapshot.open(snapshot_dir), cfg.export.parity_texts)
    by_weights: dict[str, dict[str, Path]] = {}
    for spec in planned_variants(cfg.compress)[1:]:
        if spec.weights not in models:
            raise ValueError(f"variant {spec.name} needs the {spec.weights} weights, which no earlier stage produced")
        by_weights.setdefault(spec.weights, {})[spec.name] = Path(out_dir) / spec.name
    variants: dict[str, Any] = {}
    for weights, bundles in by_weights.items():
        variants.update(export_weights(models[weights], bundles, texts, cfg))
    return {
        "variants": variants,
        "models": models,
        "parity_texts": len(texts),
        "seconds": round(time.perf_counter() - started, 1),
    }


# ---------------------------------------------------------------------------------------------------------------------
# stage 4: one evaluation of every variant


@dataclass
class TorchEncoder(OnnxEncoder):
    """The PyTorch fp32 baseline behind the served encoder's interface: same tokenizer, pooling and two outputs, so
    quality and latency are measured by the same code as every ONNX variant."""

    @classmethod
    def load_torch(cls, model_dir: str | Path, work_dir: str | Path, max_seq_length: int, threads: int) -> TorchEncoder:
        import torch

        from pipelines.compression.export import _pooled_encoder
        from pipelines.training.finetune import load_finetuned

        torch.set_num_threads(threads)
        model, head, labels = load_finetuned(model_dir, max_seq_length)
        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
        model.tokenizer.backend_tokenizer.save(str(work / TOKENIZER_FILE))
        return cls(
            session=_pooled_encoder(model[0].auto_model, head),
            tokenizer=load_tokenizer(work / TOKENIZER_FILE, max_seq_length),
            labels=labels,
            max_seq_length=max_seq_length,
        )

    def _run(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        import torch

        encs = self.tokenizer.encode_batch(texts)
        ids = torch.from_numpy(np.asarray([e.ids for e in encs], dtype=np.int64))
        mask = torch.from_numpy(np.asarray([e.attention_mask for e in encs], dtype=np.int64))
        with torch.inference_mode():
            emb, logits = self.session(ids, mask)
        return emb.numpy(), logits.numpy()


def weights_size_mb(model_dir: str | Path) -> float:
    """What the PyTorch baseline ships: its safetensors files (encoder and head)."""
    return sum(p.stat().st_size for p in Path(model_dir).rglob("*.safetensors")) / 1e6


def _load_encoder(kind: str, path: str, work_dir: str, max_seq_length: int, threads: int) -> OnnxEncoder:
    if kind == "torch":
        return TorchEncoder.load_torch(path, work_dir, max_seq_length, threads)
    return OnnxEncoder.load(path, threads=threads)


def _peak_rss_bytes() -> int:
    """Peak RSS of this process. Linux keeps ru_maxrss across exec (a child would report its parent's peak), so the
    per-address-space high-water mark VmHWM is read when available."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _peak_memory_child(args_json: str) -> None:
    """Runs in a fresh interpreter: RSS after importing the runtime, then peak RSS while loading the variant and
    encoding a few batches; prints JSON."""
    import psutil

    args = json.loads(args_json)
    # the runtime's own footprint is measured before the model's, so that only the latter is attributed to it
    import tokenizers  # noqa: F401

    if args["kind"] == "torch":
        import sentence_transformers  # noqa: F401
        import torch  # noqa: F401
    else:
        import onnxruntime  # noqa: F401

    before = psutil.Process().memory_info().rss
    encoder = _load_encoder(args["kind"], args["path"], args["work_dir"], args["max_seq_length"], args["threads"])
    encoder.encode(args["texts"], batch_size=THROUGHPUT_BATCH)
    peak = _peak_rss_bytes()
    print(
        json.dumps(
            {"rss_before_mb": before / 1e6, "peak_rss_mb": peak / 1e6, "model_peak_mb": max(peak - before, 0) / 1e6}
        )
    )


def measure_peak_memory(
    kind: str, path: str, work_dir: str, max_seq_length: int, threads: int, texts: list[str]
) -> dict[str, float]:
    """Peak memory of one variant in a fresh subprocess, so that variants measured earlier cannot hide it."""
    args = json.dumps(
        {
            "kind": kind,
            "path": path,
            "work_dir": work_dir,
            "max_seq_length": max_seq_length,
            "threads": threads,
            "texts": texts,
        }
    )
    code = "import sys; from pipelines.compression.variants import _peak_memory_child; _peak_memory_child(sys.argv[1])"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])
        ),
    }
    done = subprocess.run(
        [sys.executable, "-c", code, args], capture_output=True, text=True, env=env, timeout=900, check=False
    )
    if done.returncode != 0:
        return {"peak_memory_error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _timings(
    encoders: dict[str, OnnxEncoder], queries: list[str], titles: list[str], repeats: int
) -> dict[str, dict[str, float]]:
    """Batch-1 query latency (tokenisation included) and batch-32 products/s, medians over `repeats` passes that
    go round-robin over the variants, so that a noisy neighbour slows every variant alike."""
    samples: dict[str, dict[str, list[float]]] = {n: {"p50": [], "p99": [], "pps": []} for n in encoders}
    for _ in range(repeats):
        for name, encoder in encoders.items():
            lat = encoder.query_latency_ms(queries)
            samples[name]["p50"].append(lat["latency_p50_ms"])
            samples[name]["p99"].append(lat["latency_p99_ms"])
            encoder.encode(titles[:THROUGHPUT_BATCH], batch_size=THROUGHPUT_BATCH)  # warm-up
            t0 = time.perf_counter()
            encoder.encode(titles, batch_size=THROUGHPUT_BATCH)
            samples[name]["pps"].append(len(titles) / (time.perf_counter() - t0))
    return {
        n: {
            "latency_p50_ms": float(np.median(s["p50"])),
            "latency_p99_ms": float(np.median(s["p99"])),
            "products_per_s": float(np.median(s["pps"])),
        }
        for n, s in samples.items()
    }


def evaluate_variants(
    exported: dict[str, Any], snapshot_dir: str | Path, out_dir: str | Path, cfg: ShopguideConfig
) -> dict[str, Any]:
    """Every variant in one run: validation nDCG@10 (MRR@10, R@100) over the whole catalog, validation category
    accuracy, file size, p50/p99 query latency at batch 1, products/s at batch 32, peak memory, parity, and ratios to
    the PyTorch fp32 teacher. Quality is measured on the validation terms and offers (the training side's, never the
    held-out ones): the variant is chosen on them, and the held-out figures are the evaluate step's, of the chosen
    variant only, so that what the gate reads was not used to choose. Each ONNX bundle gets the product index it was
    evaluated with (its own graph), so the selected bundle is complete; rows are also written to
    out_dir/variants.json."""
    from pipelines.data.dataset import validation_judgments, validation_offers
    from pipelines.evaluation.evaluate import category_accuracy, heldout_qrels, ir_metrics, retrieval_run
    from pipelines.runtime.index import ProductIndex

    started = time.perf_counter()
    ccfg, ecfg, out = cfg.compress, cfg.evaluate, Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    snap = Snapshot.open(snapshot_dir)
    # graded qrels of the validation terms, by the held-out rule (>= 2 judged products, >= 1 relevant)
    qrels = heldout_qrels(validation_judgments(snap.table("judgments_train")))
    terms = sorted(qrels)
    if not terms:
        raise ValueError("the snapshot has no validation terms with graded judgments: no variant can be scored")
    catalog, offers_val = snap.table("catalog"), validation_offers(snap.table("offers_train"))
    titles = catalog["product_title"].astype(str).tolist()
    bench_titles = (
        catalog["product_title"]
        .astype(str)
        .sample(n=min(ccfg.throughput_texts, len(catalog)), random_state=ccfg.seed)
        .tolist()
    )
    variants = exported["variants"]
    # (kind, path) per variant, baseline first
    sources = {BASELINE_VARIANT: ("torch", exported["models"][TEACHER])}
    sources.update({name: ("onnx", v["bundle_dir"]) for name, v in variants.items()})

    rows: dict[str, dict[str, Any]] = {}
    encoders: dict[str, OnnxEncoder] = {}
    for name, (kind, path) in sources.items():
        spec = parse_variant(name)
        work = str(out / name)
        encoder = _load_encoder(kind, path, work, cfg.train.max_seq_length, ccfg.threads)
        t0 = time.perf_counter()
        emb, _ = encoder.encode(titles, batch_size=ecfg.batch_size)
        index_seconds = time.perf_counter() - t0
        index = ProductIndex(catalog["product_uid"].to_numpy(np.int64), catalog["product_title"].to_numpy(object), emb)
        if kind == "onnx":
            index.save(path)
        row: dict[str, Any] = {
            "variant": name,
            "weights": spec.weights,
            "graph": spec.graph,
            "servable": kind == "onnx",
            "bundle_dir": path if kind == "onnx" else None,
        }
        row.update(ir_metrics(qrels, retrieval_run(encoder, index, terms, ecfg.retrieve_k, ecfg.batch_size)))
        row.update(category_accuracy(encoder, offers_val, ecfg.max_category_offers, ecfg.batch_size))
        row["index_seconds"] = round(index_seconds, 2)
        if kind == "torch":
            row.update(size_mb=weights_size_mb(path), parity_cosine_min=None, parity_cosine_mean=None)
        else:
            v = variants[name]
            row.update(
                size_mb=v["size_mb"],
                parity_cosine_min=v["parity"]["cosine_min"],
                parity_cosine_mean=v["parity"]["cosine_mean"],
                parity_category_agreement=v["parity"].get("category_agreement"),
                layers=v["layers"],
                vocab_size=v["vocab_size"],
            )
        rows[name] = row
        encoders[name] = encoder
        del emb, index
    for name, timing in _timings(encoders, terms[: ecfg.latency_queries], bench_titles, ccfg.timing_repeats).items():
        rows[name].update(timing)
    encoders.clear()
    gc.collect()
    if ccfg.measure_memory:
        for name, (kind, path) in sources.items():
            rows[name].update(
                measure_peak_memory(
                    kind, path, str(out / name), cfg.train.max_seq_length, ccfg.threads, bench_titles[:256]
                )
            )
    result = {
        "rows": with_ratios(list(rows.values())),
        "baseline": BASELINE_VARIANT,
        "split": "validation",
        "validation_terms": len(terms),
        "validation_offers": min(len(offers_val), ecfg.max_category_offers or len(offers_val)),
        "catalog_products": len(catalog),
        "threads": ccfg.threads,
        "snapshot_hash": snap.hash,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "variants.json").write_text(json.dumps(result, indent=2))
    return result


def with_ratios(rows: list[dict[str, Any]], baseline: str = BASELINE_VARIANT) -> list[dict[str, Any]]:
    """Each row plus its ratios to the baseline row: >1 is better for every ratio."""
    base = next((r for r in rows if r["variant"] == baseline), None)
    if base is None:
        return rows

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    return [
        {
            **r,
            "ndcg_retained": ratio(r.get("ndcg_at_10"), base.get("ndcg_at_10")),
            "category_retained": ratio(r.get("category_accuracy"), base.get("category_accuracy")),
            "size_reduction": ratio(base.get("size_mb"), r.get("size_mb")),
            "latency_speedup": ratio(base.get("latency_p50_ms"), r.get("latency_p50_ms")),
            "throughput_gain": ratio(r.get("products_per_s"), base.get("products_per_s")),
        }
        for r in rows
    ]


# ---------------------------------------------------------------------------------------------------------------------
# stage 5: selection


@dataclass(frozen=True)
class Selection:
    variant: str | None  # None: nothing to serve, the step fails
    reason: str
    fallback: bool = False
    qualified: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # variant -> why it did not qualify

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_OBJECTIVES = {
    "latency": (lambda r: (r["latency_p50_ms"], r["size_mb"]), "fastest (p50 query latency)"),
    "size": (lambda r: (r["size_mb"], r["latency_p50_ms"]), "smallest file"),
    "throughput": (lambda r: (-r["products_per_s"], r["latency_p50_ms"]), "highest batch-32 throughput"),
}


def choose_variant(rows: list[dict[str, Any]], cfg: CompressConfig, baseline: str = BASELINE_VARIANT) -> Selection:
    """The pure rule: among servable variants that keep >= cfg.min_ndcg_retained of the baseline teacher's validation
    nDCG@10, pass parity (min cosine >= cfg.min_parity_cosine) and fit cfg.max_size_mb, take the best by
    cfg.objective. If none qualifies: the teacher INT8 (whatever its figures) or no variant, as cfg.fallback says."""
    base = next((r for r in rows if r["variant"] == baseline), None)
    if base is None or base.get("ndcg_at_10") is None:
        raise ValueError(f"the baseline {baseline!r} must be evaluated: the quality floor is relative to it")
    floor = cfg.min_ndcg_retained * base["ndcg_at_10"]
    qualified: list[dict[str, Any]] = []
    rejected: dict[str, str] = {}
    for r in rows:
        if not r.get("servable"):
            continue
        why = []
        if r.get("ndcg_at_10") is None or r["ndcg_at_10"] < floor:
            why.append(
                f"nDCG@10 {r.get('ndcg_at_10') or 0:.4f} < {cfg.min_ndcg_retained:.0%} of the teacher's "
                f"{base['ndcg_at_10']:.4f}"
            )
        if r.get("parity_cosine_min") is None or r["parity_cosine_min"] < cfg.min_parity_cosine:
            why.append(f"parity min cosine {r.get('parity_cosine_min') or 0:.4f} < {cfg.min_parity_cosine}")
        if cfg.max_size_mb is not None and r["size_mb"] > cfg.max_size_mb:
            why.append(f"size {r['size_mb']:.1f} MB > {cfg.max_size_mb} MB")
        if why:
            rejected[r["variant"]] = "; ".join(why)
        else:
            qualified.append(r)
    names = [r["variant"] for r in qualified]
    if qualified:
        key, what = _OBJECTIVES[cfg.objective]
        best = min(qualified, key=key)
        # a teacher at 0 (a handful of validation terms, an untrained model) leaves no share to quote
        share = f"{best['ndcg_at_10'] / base['ndcg_at_10']:.1%}" if base["ndcg_at_10"] > 0 else "n/a"
        reason = (
            f"{best['variant']}: the {what} of {len(qualified)} qualifying variant(s) "
            f"(p50 {best['latency_p50_ms']:.2f} ms, {best['products_per_s']:.0f} products/s, "
            f"{best['size_mb']:.1f} MB, nDCG@10 {best['ndcg_at_10']:.4f} = "
            f"{share} of the teacher's, parity min cosine {best['parity_cosine_min']:.4f})"
        )
        return Selection(best["variant"], reason, False, names, rejected)
    summary = "no variant qualifies: " + "; ".join(f"{k}: {v}" for k, v in rejected.items())
    if not rejected:
        summary = "no servable variant was evaluated"
    available = {r["variant"] for r in rows if r.get("servable")}
    if cfg.fallback == "teacher-int8" and FALLBACK_VARIANT in available:
        return Selection(
            FALLBACK_VARIANT, f"{summary}. Falling back to {FALLBACK_VARIANT} as configured", True, names, rejected
        )
    tail = "fallback is 'fail'" if cfg.fallback == "fail" else f"fallback {FALLBACK_VARIANT} was not built"
    return Selection(None, f"{summary}. Nothing selected: {tail}", False, names, rejected)


def select_variant(evaluated: dict[str, Any], out_dir: str | Path, cfg: ShopguideConfig) -> dict[str, Any]:
    """Apply the rule, write the compression report (markdown table, Pareto plot, JSON) to out_dir/report, and
    return {"bundle_dir", "variant", "reason", "fallback", "report_dir", "metrics"}. Raises CompressionFailed (after
    writing the report) when nothing may be served."""
    selection = choose_variant(evaluated["rows"], cfg.compress)
    report_dir = write_report(evaluated, selection, Path(out_dir) / REPORT_DIR, cfg.compress)
    print((report_dir / REPORT_MD).read_text())  # the task log shows the table and the choice
    if selection.variant is None:
        raise CompressionFailed(selection.reason)
    chosen = next(r for r in evaluated["rows"] if r["variant"] == selection.variant)
    metric_keys = (
        "ndcg_at_10",
        "category_accuracy",
        "size_mb",
        "latency_p50_ms",
        "latency_p99_ms",
        "products_per_s",
        "parity_cosine_min",
        "ndcg_retained",
        "size_reduction",
        "latency_speedup",
        "throughput_gain",
    )
    return {
        "bundle_dir": chosen["bundle_dir"],
        "variant": selection.variant,
        "reason": selection.reason,
        "fallback": selection.fallback,
        "report_dir": str(report_dir),
        "parity_cosine_min": chosen["parity_cosine_min"],
        "metrics": {k: chosen.get(k) for k in metric_keys},
    }


# ---------------------------------------------------------------------------------------------------------------------
# stage 6: report


TABLE_COLUMNS = (
    ("variant", "variant", "{}"),
    ("nDCG@10", "ndcg_at_10", "{:.4f}"),
    ("of teacher", "ndcg_retained", "{:.1%}"),
    ("category acc", "category_accuracy", "{:.4f}"),
    ("MB", "size_mb", "{:.1f}"),
    ("x smaller", "size_reduction", "{:.1f}"),
    ("p50 ms", "latency_p50_ms", "{:.2f}"),
    ("p99 ms", "latency_p99_ms", "{:.2f}"),
    ("x faster", "latency_speedup", "{:.1f}"),
    ("products/s", "products_per_s", "{:.0f}"),
    ("x throughput", "throughput_gain", "{:.1f}"),
    ("peak MB", "model_peak_mb", "{:.0f}"),
    ("parity cos min", "parity_cosine_min", "{:.4f}"),
)


def markdown_table(rows: list[dict[str, Any]], selection: Selection | None = None) -> str:
    """One line per variant; the last column says selected / why not."""
    head = [c[0] for c in TABLE_COLUMNS] + ["selection"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [("-" if r.get(key) is None else fmt.format(r[key])) for _, key, fmt in TABLE_COLUMNS]
        note = "baseline" if not r.get("servable") else ""
        if selection is not None and r.get("servable"):
            note = (
                "**selected**" + (" (fallback)" if selection.fallback else "")
                if r["variant"] == selection.variant
                else selection.rejected.get(r["variant"], "qualifies")
            )
        lines.append("| " + " | ".join(cells + [note]) + " |")
    return "\n".join(lines)


def pareto_front(rows: list[dict[str, Any]]) -> list[str]:
    """Variants no other variant beats on both latency (lower) and nDCG@10 (higher), fastest first."""
    front, best = [], -np.inf
    for r in sorted(rows, key=lambda r: (r["latency_p50_ms"], -r["ndcg_at_10"])):
        if r["ndcg_at_10"] > best:
            front.append(r["variant"])
            best = r["ndcg_at_10"]
    return front


def pareto_plot(rows: list[dict[str, Any]], selection: Selection | None, floor: float | None, path: Path) -> None:
    """Quality (validation nDCG@10) vs p50 query latency, log x, file size annotated, Pareto front and floor drawn."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5), dpi=120)
    ax = fig.add_subplot()
    front = pareto_front(rows)
    for rank, r in enumerate(sorted(rows, key=lambda r: r["latency_p50_ms"])):
        chosen = selection is not None and r["variant"] == selection.variant
        color = "tab:red" if chosen else ("tab:blue" if r.get("servable") else "tab:gray")
        ax.scatter(
            r["latency_p50_ms"],
            r["ndcg_at_10"],
            s=250 if chosen else 25 + 3 * r["size_mb"],
            alpha=0.75,
            marker="*" if chosen else "o",
            color=color,
            edgecolors="black",
            linewidths=0.5,
            zorder=3,
        )
        # neighbours in latency alternate above / below their point so that labels overlap less
        ax.annotate(
            f"{r['variant']}\n{r['size_mb']:.1f} MB",
            (r["latency_p50_ms"], r["ndcg_at_10"]),
            textcoords="offset points",
            xytext=(6, 6 if rank % 2 else -18),
            fontsize=7,
        )
    pts = sorted((r["latency_p50_ms"], r["ndcg_at_10"]) for r in rows if r["variant"] in front)
    if pts:
        ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color="tab:green", lw=1, label="Pareto front")
    if floor is not None:
        ax.axhline(floor, color="tab:orange", ls="--", lw=1, label="selection floor (share of teacher nDCG@10)")
    ax.set_xscale("log")
    ax.set_xlabel("query latency p50 at batch 1, ms (log; tokenisation included)")
    ax.set_ylabel("validation nDCG@10")
    ax.set_title("Compression variants: quality vs latency (marker area ~ file size)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def write_report(evaluated: dict[str, Any], selection: Selection | None, report_dir: Path, cfg: CompressConfig) -> Path:
    """compression.md (table + choice), pareto.png and compression.json in one folder, for MLflow to log."""
    report_dir.mkdir(parents=True, exist_ok=True)
    rows = evaluated["rows"]
    base = next((r for r in rows if r["variant"] == evaluated.get("baseline", BASELINE_VARIANT)), None)
    floor = cfg.min_ndcg_retained * base["ndcg_at_10"] if base else None
    pareto_plot(rows, selection, floor, report_dir / PARETO_PNG)
    md = [
        f"# Compression report ({evaluated.get('validation_terms')} validation terms x "
        f"{evaluated.get('catalog_products')} products, {evaluated.get('threads')} threads)",
        "",
        markdown_table(rows, selection),
        "",
        f"Selection ({cfg.objective}, >= {cfg.min_ndcg_retained:.0%} of the teacher's nDCG@10, parity >= "
        f"{cfg.min_parity_cosine}): {selection.reason if selection else 'not run'}",
        "",
        f"Pareto front (latency vs nDCG@10): {', '.join(pareto_front(rows))}",
        "",
        f"![pareto]({PARETO_PNG})",
    ]
    (report_dir / REPORT_MD).write_text("\n".join(md) + "\n")
    (report_dir / REPORT_JSON).write_text(
        json.dumps({**evaluated, "selection": selection.to_dict() if selection else None}, indent=2, default=str)
    )
    return report_dir


# ---------------------------------------------------------------------------------------------------------------------
# all stages


def compress_model(
    model_dir: str | Path, snapshot_dir: str | Path, out_dir: str | Path, cfg: ShopguideConfig
) -> dict[str, Any]:
    """distill -> prune -> export -> evaluate -> select in one call (bench and tests; the DAG calls the stages)."""
    out = Path(out_dir)
    seconds: dict[str, float] = {}

    def timed(stage: str, fn, *args):
        t0 = time.perf_counter()
        result = fn(*args)
        seconds[stage] = round(time.perf_counter() - t0, 1)
        return result

    distilled = timed("distill", distill_students, model_dir, snapshot_dir, out / "students", cfg)
    pruned = timed("prune", prune_vocabulary, distilled["models"], snapshot_dir, out / "pruned", cfg)
    exported = timed("export", export_variants, pruned["models"], snapshot_dir, out / "bundles", cfg)
    evaluated = timed("evaluate", evaluate_variants, exported, snapshot_dir, out / "evaluation", cfg)
    try:
        selected = timed("select", select_variant, evaluated, out, cfg)
    except CompressionFailed as err:
        selected = {"bundle_dir": None, "variant": None, "reason": str(err), "report_dir": str(out / REPORT_DIR)}
    return {
        "selected": selected,
        "rows": evaluated["rows"],
        "students": distilled["students"],
        "pruned": pruned["pruned"],
        "exported": {k: {kk: vv for kk, vv in v.items() if kk != "model_dir"} for k, v in exported["variants"].items()},
        "stage_seconds": seconds,
        "validation_terms": evaluated["validation_terms"],
        "catalog_products": evaluated["catalog_products"],
    }
