"""The category answer: scores, the abstention rule, its file in the bundle (and older bundles without it), and the
threshold's calibration on validation data with a real (tiny, random) ONNX encoder."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import logsumexp

from pipelines.config import CategoryConfig, DataConfig, ShopguideConfig
from pipelines.data.dataset import (
    Snapshot,
    is_heldout_term,
    is_test_cluster,
    is_validation_cluster,
    is_validation_term,
    snapshot_data,
)
from pipelines.evaluation.category import calibrate_bundle, heldout_category, threshold_at_rejection
from pipelines.runtime.bundle import CATEGORY_FILE
from pipelines.runtime.category import LEGACY_NOTE, CategoryPolicy, in_taxonomy_scores, taxonomy_description
from pipelines.runtime.encoder import OnnxEncoder
from pipelines.training.finetune import fit_offers
from tests.tiny_bert import save_tiny_model

LABELS = ("Dishwashers", "Fridges", "TVs")


def _policy(score="max_softmax", threshold=0.6, centroids=None) -> CategoryPolicy:
    return CategoryPolicy(LABELS, taxonomy_description(list(LABELS)), score, threshold, centroids)


def test_confident_rows_get_the_category_and_uncertain_ones_abstain_with_the_reason() -> None:
    logits = np.array([[4.0, 0.0, 0.0], [0.2, 0.0, 0.1]], np.float32)  # top softmax 0.96, then 0.37
    confident, unsure = _policy().decide(logits)
    assert confident.category == confident.top_category == "Dishwashers" and confident.abstained_reason is None
    assert confident.probability == pytest.approx(np.exp(4) / (np.exp(4) + 2))
    assert unsure.category is None and unsure.top_category == "Dishwashers"
    assert unsure.score == pytest.approx(unsure.probability) and unsure.score < 0.6
    assert "outside the taxonomy" in unsure.abstained_reason and "max_softmax" in unsure.abstained_reason
    # at exactly the threshold the query is answered (accept score >= threshold)
    at = _policy(threshold=float(in_taxonomy_scores("max_softmax", logits[1:])[0])).decide(logits[1:])[0]
    assert at.category == "Dishwashers"


def test_scores_are_max_softmax_logsumexp_and_nearest_centroid_cosine() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 3)) * 3
    emb = rng.normal(size=(5, 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    centres = rng.normal(size=(3, 8))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    soft = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(in_taxonomy_scores("max_softmax", logits), soft.max(1))
    np.testing.assert_allclose(in_taxonomy_scores("energy", logits), logsumexp(logits, axis=1))
    np.testing.assert_allclose(in_taxonomy_scores("centroid_cosine", logits, emb, centres), (emb @ centres.T).max(1))
    with pytest.raises(ValueError, match="centroids"):
        in_taxonomy_scores("centroid_cosine", logits)
    # the centroid rule abstains on the embedding, not on the logits: a confident head does not save an odd query
    far = _policy("centroid_cosine", 0.9, centres.astype(np.float32)).decide(np.array([[9.0, 0, 0]]), -centres[:1])
    assert far[0].category is None and far[0].probability > 0.99


def test_threshold_rejects_at_least_the_target_share() -> None:
    scores = np.array([0.1, 0.2, 0.2, 0.3, 0.9])
    for target in (0.2, 0.5, 0.6, 0.8, 0.95):
        t = threshold_at_rejection(scores, target)
        assert (scores < t).mean() >= target
        assert t <= np.sort(scores)[int(np.ceil(target * len(scores))) - 1] + 1e-9  # and no more than needed
    assert (scores < threshold_at_rejection(scores, 0.5)).sum() == 3  # the tie at 0.2 goes with its neighbour


def test_the_rule_round_trips_through_the_bundle_and_older_bundles_never_abstain(tmp_path: Path) -> None:
    centres = np.eye(3, 4, dtype=np.float32)
    policy = CategoryPolicy(
        LABELS, "pricerunner-3: test", "centroid_cosine", 0.5, centres, calibration={"chosen": "centroid_cosine"}
    )
    policy.save(tmp_path)
    back = CategoryPolicy.load(tmp_path, list(LABELS))
    assert (back.score, back.threshold, back.taxonomy, back.calibration) == (
        "centroid_cosine",
        0.5,
        "pricerunner-3: test",
        {"chosen": "centroid_cosine"},
    )
    np.testing.assert_allclose(back.centroids, centres)
    emb = np.array([[1.0, 0, 0, 0], [0, 0, 0, 1.0]], np.float32)
    assert [a.category for a in back.decide(np.zeros((2, 3)), emb)] == ["Dishwashers", None]

    with pytest.raises(ValueError, match="labels"):  # a category.json from another head never serves
        CategoryPolicy.load(tmp_path, ["a", "b", "c"])

    (tmp_path / CATEGORY_FILE).unlink()
    legacy = CategoryPolicy.load(tmp_path, list(LABELS))
    assert not legacy.abstains and legacy.note == LEGACY_NOTE and "never abstains" in legacy.describe()
    answers = legacy.decide(np.array([[0.1, 0.0, 0.0]]))
    assert answers[0].category == "Dishwashers" and answers[0].score is None  # the old behaviour: top category
    assert legacy.taxonomy.startswith("pricerunner-3: ")


def test_validation_clusters_are_a_training_side_split_the_head_never_sees() -> None:
    ids = pd.Series(range(2000))
    val, test = ids.map(is_validation_cluster), ids.map(is_test_cluster)
    assert not (val & test).any() and 0.04 < val.mean() < 0.09  # 1/16 of the clusters, none held out
    offers = pd.DataFrame({"cluster_id": ids, "category_label": "TVs", "offer_title": "x"})
    assert not fit_offers(offers)["cluster_id"].map(is_validation_cluster).any()
    assert len(fit_offers(offers)) == (~val).sum()
    terms = pd.Series([f"term {i}" for i in range(2000)])
    assert not (terms.map(is_validation_term) & terms.map(is_heldout_term)).any()


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> tuple[Path, Path]:
    """A real ONNX bundle of a random 2-layer BERT (MiniLM's tokenizer) with PriceRunner's labels, and a snapshot."""

    from pipelines.compression.export import export_bundle

    root = tmp_path_factory.mktemp("category")
    snap = snapshot_data(
        DataConfig(max_terms=400, max_offers=5000, event_users=10), root / "snap", datetime(2026, 1, 1, tzinfo=UTC)
    )
    labels = sorted(pd.read_parquet(snap.path / "offers_train.parquet")["category_label"].astype(str).unique())
    model = save_tiny_model(root / "model", labels)
    cfg = ShopguideConfig.model_validate({"train": {"max_seq_length": 16}, "export": {"parity_texts": 8}})
    export_bundle(model, snap.path, root / "bundle", cfg, variant="teacher-fp32")
    return root / "bundle", snap.path


def test_calibration_stores_the_rule_the_encoder_then_applies(tiny_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    source, snap_dir = tiny_bundle
    bundle = tmp_path / "bundle"
    shutil.copytree(source, bundle)
    snap = Snapshot.open(snap_dir)
    encoder = OnnxEncoder.load(bundle)
    assert not encoder.category.abstains  # no category.json yet: the old behaviour
    cfg = CategoryConfig(target_ood_rejection=0.8, max_validation_offers=200, centroid_offers=300)
    policy = calibrate_bundle(bundle, encoder, snap, cfg, batch_size=32, one_per_run=False)

    stored = json.loads((bundle / CATEGORY_FILE).read_text())
    figures = stored["calibration"]["by_score"]
    assert set(figures) == {"max_softmax", "energy", "centroid_cosine"}
    assert all(f["ood_rejection"] >= 0.8 for f in figures.values())  # every candidate meets the target...
    chosen = stored["calibration"]["chosen"]  # ...and the one keeping most validation offers there is used
    assert chosen == policy.score and figures[chosen]["coverage"] == max(f["coverage"] for f in figures.values())
    assert policy.threshold == figures[chosen]["threshold"]
    assert stored["calibration"]["validation_offers"] == 200 and stored["calibration"]["validation_terms"] > 10

    # a fresh load (the service's) applies exactly the stored rule: the same answers as the evaluation's encoder
    served = OnnxEncoder.load(bundle)
    texts = ["cordless drill", "samsung fridge freezer 178cm", "dishwasher", "2x4 lumber"]
    emb, logits = served.encode(texts)
    assert served.categories(logits, emb) == encoder.categories(logits, emb)
    scores = in_taxonomy_scores(policy.score, logits, emb, policy.centroids)
    assert [a.category is None for a in served.categories(logits, emb)] == list(scores < policy.threshold)

    report = heldout_category(served, snap, limit=300, batch_size=32)
    assert report["category_score"] == policy.score and report["category_threshold"] == policy.threshold
    assert 0 <= report["category_coverage"] <= 1 and 0 <= report["category_heldout_term_abstention"] <= 1
    assert [p["query"] for p in report["category_probes"]][:2] == ["dishwasher", "refrigerator"]
    assert report[f"category_val_{chosen}_coverage"] == figures[chosen]["coverage"]

    off = calibrate_bundle(bundle, served, snap, cfg.model_copy(update={"abstain": False}), 32)
    assert not off.abstains and "abstain: false" in off.note and off.calibration["by_score"]  # figures still there
