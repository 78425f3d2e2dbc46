"""Hybrid search's fusion weight for one model version: BM25 over its catalog, the weight swept on validation terms."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipelines.config import EvaluateConfig, SearchConfig
from pipelines.data.dataset import Snapshot, validation_judgments
from pipelines.evaluation.evaluate import candidate_lists, fused_runs, heldout_qrels, ir_metrics
from pipelines.runtime.encoder import OnnxEncoder
from pipelines.runtime.index import ProductIndex
from pipelines.runtime.lexical import LexicalIndex


def build_lexical_index(
    bundle_dir: str | Path, snapshot_dir: str | Path, cfg: SearchConfig, eval_cfg: EvaluateConfig
) -> dict[str, Any]:
    """BM25 over the bundle's catalog (the product index's rows) with the fusion weight for this model version:
    cfg.lexical_weight, or the grid weight with the best nDCG@10 on the validation terms (training terms the
    encoder was scored on, never the held-out ones; ties go to the smaller weight). Saved into the bundle."""
    if not cfg.lexical:
        return {"lexical": False}
    started = time.perf_counter()
    index = ProductIndex.load(bundle_dir)
    lexical = LexicalIndex.build(
        [str(t) for t in index.titles],
        cfg.lexical_weight or 0.0,
        cfg.candidates,
        cfg.bm25_method,
        cfg.bm25_k1,
        cfg.bm25_b,
    )
    sweep: dict[float, float] = {}
    terms: list[str] = []
    if cfg.lexical_weight is None:
        qrels = heldout_qrels(validation_judgments(Snapshot.open(snapshot_dir).table("judgments_train")))
        terms = sorted(qrels)
        if terms:
            k = eval_cfg.retrieve_k
            dense, lex = candidate_lists(OnnxEncoder.load(bundle_dir), index, terms, k, eval_cfg.batch_size, lexical)
            runs = fused_runs(index, terms, dense, lex, list(cfg.weight_grid), k)
            sweep = {w: ir_metrics(qrels, run)["ndcg_at_10"] for w, run in runs.items()}
            lexical.weight = max(sweep, key=lambda w: (round(sweep[w], 4), -w))
    lexical.save(bundle_dir)
    return {
        "lexical": True,
        "lexical_weight": lexical.weight,
        "validation_terms": len(terms),
        "validation_ndcg_by_weight": {str(w): v for w, v in sweep.items()},
        "lexical_seconds": round(time.perf_counter() - started, 1),
    }
