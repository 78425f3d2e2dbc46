"""Evaluation of a bundle: held-out retrieval over the whole catalog, category accuracy, latency and size."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.config import EvaluateConfig
from pipelines.data import Snapshot, normalize_term
from pipelines.encoder import ONNX_FILE, OnnxEncoder
from pipelines.index import ProductIndex

REPORT_FILE = "evaluation.json"
# Home Depot grades are means of 3 (sometimes 4) raters; x12 makes every gain an integer, as trec_eval needs.
# nDCG with linear gains is scale-invariant, so this equals nDCG with gains = relevance - 1.
GAIN_SCALE = 12


def heldout_qrels(heldout: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Graded qrels for held-out terms with >= 2 judged products and >= 1 relevant one (1,326 terms in full)."""
    df = heldout.assign(term=heldout["search_term"].map(normalize_term),
                        gain=((heldout["relevance"] - 1.0) * GAIN_SCALE).round().astype(int))
    stats = df.groupby("term").agg(n=("gain", "size"), best=("gain", "max"))
    keep = stats[(stats["n"] >= 2) & (stats["best"] > 0)].index
    qrels: dict[str, dict[str, int]] = {}
    for term, pid, gain in df[df["term"].isin(keep)][["term", "product_uid", "gain"]].itertuples(index=False):
        qrels.setdefault(term, {})[str(pid)] = int(gain)
    return qrels


def ir_metrics(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, float]:
    """nDCG@10, MRR@10 and Recall@100 with ir-measures (trec_eval semantics), not by hand."""
    import ir_measures
    from ir_measures import RR, R, nDCG

    # Recall and RR count a document as relevant at gain >= 1 (here: any grade above "irrelevant")
    agg = ir_measures.calc_aggregate([nDCG @ 10, RR @ 10, R @ 100], qrels, run)
    return {"ndcg_at_10": float(agg[nDCG @ 10]), "mrr_at_10": float(agg[RR @ 10]),
            "recall_at_100": float(agg[R @ 100])}


def retrieval_run(
    encoder: OnnxEncoder, index: ProductIndex, terms: list[str], k: int, batch_size: int
) -> dict[str, dict[str, float]]:
    emb, _ = encoder.encode(terms, batch_size=batch_size)
    run: dict[str, dict[str, float]] = {}
    for start in range(0, len(terms), 256):  # bounded memory: 256 x catalog scores at a time
        rows, scores = index.search(emb[start : start + 256], k)
        for term, r, s in zip(terms[start : start + 256], rows, scores, strict=True):
            run[term] = {str(index.product_ids[i]): float(v) for i, v in zip(r, s, strict=True)}
    return run


def category_accuracy(encoder: OnnxEncoder, offers: pd.DataFrame, limit: int | None, batch_size: int) -> dict:
    if limit is not None and len(offers) > limit:
        offers = offers.sample(n=limit, random_state=0)
    _, logits = encoder.encode(offers["offer_title"].astype(str).tolist(), batch_size=batch_size)
    predicted = np.asarray(encoder.labels)[logits.argmax(1)]
    truth = offers["category_label"].astype(str).to_numpy()
    return {"category_accuracy": float((predicted == truth).mean()), "category_offers": len(offers)}


def evaluate_bundle(
    bundle_dir: str | Path, snapshot_dir: str | Path, cfg: EvaluateConfig, parity_cosine_min: float | None = None
) -> dict[str, Any]:
    """Every figure the gate reads, measured on the served graph; written to the bundle as evaluation.json."""
    bundle, snap = Path(bundle_dir), Snapshot.open(snapshot_dir)
    encoder, index = OnnxEncoder.load(bundle), ProductIndex.load(bundle)
    qrels = heldout_qrels(snap.table("judgments_heldout"))
    terms = sorted(qrels)
    report: dict[str, Any] = {"heldout_terms": len(terms), "catalog_products": len(index)}
    report.update(ir_metrics(qrels, retrieval_run(encoder, index, terms, cfg.retrieve_k, cfg.batch_size)))
    report.update(category_accuracy(encoder, snap.table("offers_test"), cfg.max_category_offers, cfg.batch_size))
    report.update(encoder.query_latency_ms(terms[: cfg.latency_queries]))
    report["size_mb"] = (bundle / ONNX_FILE).stat().st_size / 1e6
    report["parity_cosine_min"] = parity_cosine_min
    report["snapshot_hash"] = snap.hash
    (bundle / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report
