"""A registered version re-evaluated on a candidate's snapshot: the same held-out data and code as the candidate's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import EvaluateConfig
from pipelines.data.dataset import Snapshot
from pipelines.evaluation.evaluate import evaluate_bundle, read_per_query
from pipelines.runtime.encoder import OnnxEncoder
from pipelines.runtime.index import ProductIndex
from pipelines.runtime.lexical import LexicalIndex


def same_catalog(index: ProductIndex, snapshot: Snapshot) -> bool:
    """True when the index holds exactly the snapshot's catalog (ids and titles, in order)."""
    catalog = snapshot.table("catalog")
    return (
        len(index) == len(catalog)
        and np.array_equal(index.product_ids, catalog["product_uid"].to_numpy(np.int64))
        and [str(t) for t in index.titles] == catalog["product_title"].astype(str).tolist()
    )


def reindex(bundle_dir: str | Path, snapshot: Snapshot, batch_size: int) -> None:
    """The bundle's dense index (and BM25 index, same weight and depth) rebuilt over the snapshot's catalog with its
    own graph, so that the version ranks the products the candidate ranks."""
    catalog = snapshot.table("catalog")
    titles = catalog["product_title"].astype(str).tolist()
    emb, _ = OnnxEncoder.load(bundle_dir).encode(titles, batch_size=batch_size)
    ProductIndex(catalog["product_uid"].to_numpy(np.int64), catalog["product_title"].to_numpy(object), emb).save(
        bundle_dir
    )
    lexical = LexicalIndex.load(bundle_dir)
    if lexical is not None:
        bm25 = lexical.retriever
        LexicalIndex.build(titles, lexical.weight, lexical.candidates, bm25.method, bm25.k1, bm25.b).save(bundle_dir)


def reevaluate(
    bundle_dir: str | Path, snapshot_dir: str | Path, cfg: EvaluateConfig, extra: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, float]]:
    """(report, per-query nDCG@10) of a version's bundle (a downloaded copy: its files are rewritten) measured by
    evaluate_bundle on `snapshot_dir`, as the version is served: its fusion weight and category threshold are kept,
    nothing is recalibrated. When the snapshot's catalog is not the one the version's index holds, the index is
    rebuilt over it first (reindex) and the report says `reindexed_catalog`."""
    snapshot = Snapshot.open(snapshot_dir)
    reindexed = not same_catalog(ProductIndex.load(bundle_dir), snapshot)
    if reindexed:
        reindex(bundle_dir, snapshot, cfg.batch_size)
    report = evaluate_bundle(
        bundle_dir, snapshot_dir, cfg, extra={**(extra or {}), "reindexed_catalog": reindexed}, calibrate=False
    )
    return report, read_per_query(bundle_dir)
