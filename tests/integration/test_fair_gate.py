"""The champion re-evaluated for the gate: a registered version's bundle from the real registry, measured by the
evaluation's own code on another snapshot, as it is served (fusion weight and category threshold kept)."""

from __future__ import annotations

import json

from pipelines.config import DataConfig, EvaluateConfig
from pipelines.data.dataset import Snapshot, snapshot_data
from pipelines.evaluation.champion import reevaluate, same_catalog
from pipelines.evaluation.evaluate import heldout_qrels
from pipelines.registry import mlflow_client as registry
from pipelines.runtime.bundle import CATEGORY_FILE, REPORT_FILE
from pipelines.runtime.index import ProductIndex
from pipelines.runtime.lexical import LexicalIndex

EVALUATION = EvaluateConfig(max_category_offers=100, latency_queries=10)


def test_the_champion_is_measured_on_the_candidates_snapshot(champion, tmp_path) -> None:
    bundle = registry.download_bundle(champion.paths, champion.model_name, champion.version, tmp_path / "dl")
    registered = json.loads((bundle / REPORT_FILE).read_text())
    category = (bundle / CATEGORY_FILE).read_bytes() if (bundle / CATEGORY_FILE).is_file() else None
    weight = LexicalIndex.load(bundle).weight

    # its own snapshot: nothing to rebuild, and the same code gives the registered figures again
    again, _ = reevaluate(bundle, champion.snapshot_dir, EVALUATION)
    assert not again["reindexed_catalog"]
    assert again["ndcg_at_10"] == registered["ndcg_at_10"]

    # a candidate's snapshot with more terms, hence more products: the champion ranks that catalog, with its own graph
    data = DataConfig(max_terms=160, max_offers=1000, event_users=30)
    snapshot = snapshot_data(data, tmp_path / "snap", champion.as_of)
    assert not same_catalog(ProductIndex.load(bundle), snapshot)
    report, per_query = reevaluate(bundle, snapshot.path, EVALUATION, extra={"model_version": champion.version})
    assert report["reindexed_catalog"] and report["model_version"] == champion.version
    assert report["snapshot_hash"] == snapshot.hash and report["catalog_products"] == len(snapshot.table("catalog"))
    assert same_catalog(ProductIndex.load(bundle), Snapshot.open(snapshot.path))
    assert set(per_query) == set(heldout_qrels(snapshot.table("judgments_heldout")))
    assert abs(sum(per_query.values()) / len(per_query) - report["ndcg_at_10"]) < 1e-9
    # as served: the fusion weight it was registered with, its category threshold not recalibrated
    assert report["lexical_weight"] == weight and LexicalIndex.load(bundle).size == report["catalog_products"]
    assert category is None or (bundle / CATEGORY_FILE).read_bytes() == category
