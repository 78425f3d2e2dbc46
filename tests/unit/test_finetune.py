"""Fine-tuning's training sets and the joint category loss, on the real packaged MiniLM (a few steps)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipelines.config import Paths, TrainConfig
from pipelines.registry import mlflow_client as registry
from pipelines.training.finetune import (
    CATEGORY_SET,
    category_labels,
    load_encoder,
    load_training_sets,
    mined_negatives,
    save_training_sets,
    train_contrastive,
    training_sets,
    validation_evaluator,
)

OFFERS = pd.DataFrame(
    {
        "offer_title": [
            "samsung galaxy s10 128gb black",
            "iphone xr 64gb red",
            "lg 55 inch 4k oled tv",
            "sony bravia 65in smart tv",
            "bosch serie 4 dishwasher",
            "beko freestanding dishwasher 60cm",
            "intel core i7 9700k cpu",
            "amd ryzen 5 3600 processor",
        ]
        * 4,
        "cluster_label": [f"product {i}" for i in range(32)],
        "category_label": ["Mobile Phones", "Mobile Phones", "TVs", "TVs", "Dishwashers", "Dishwashers", "CPUs", "CPUs"]
        * 4,
    }
)
JUDGMENTS = pd.DataFrame(
    {
        "search_term": ["cordless drill", "cordless drill", "deck screws", "deck screws", "paint"],
        "product_title": ["dewalt 20v cordless drill", "garden hose", "3 in deck screws", "led bulb", "white paint"],
        "relevance": [3.0, 1.0, 2.67, 1.33, 2.5],
    }
)


def test_training_sets_name_their_columns_and_index_categories() -> None:
    sets = training_sets(JUDGMENTS, OFFERS, TrainConfig(category_offers=20, pricerunner_pairs=5))
    assert set(sets["triplets"].columns) == {"anchor", "positive", "negative"}
    assert set(sets["triplets"]["negative"]) == {"garden hose", "led bulb"}  # the low-graded products of the query
    assert sets["pairs"]["anchor"].tolist() == ["paint"]
    assert len(sets["offers"]) == 5 and len(sets[CATEGORY_SET]) == 20
    labels = category_labels(OFFERS)
    by_title = dict(zip(OFFERS["offer_title"], OFFERS["category_label"], strict=False))
    for title, label in zip(sets[CATEGORY_SET]["text"], sets[CATEGORY_SET]["label"], strict=True):
        assert labels[label] == by_title[title]
    assert CATEGORY_SET not in training_sets(JUDGMENTS, OFFERS, TrainConfig())  # off by default


CATALOG = pd.DataFrame(
    {
        "product_uid": [1, 2, 3, 4, 5, 6, 7, 8],
        "product_title": [
            "white paint",
            "exterior paint gallon",
            "paint roller",
            "dewalt 20v cordless drill",
            "garden hose",
            "3 in deck screws",
            "led bulb",
            "cordless drill battery",
        ],
    }
)
UIDS = dict(zip(CATALOG["product_title"], CATALOG["product_uid"], strict=True))


def test_mined_negatives_are_unjudged_bm25_hits_in_the_rank_window() -> None:
    judgments = JUDGMENTS.assign(product_uid=JUDGMENTS["product_title"].map(UIDS))
    mined = mined_negatives(judgments, CATALOG, (0, 10), seed=0).set_index("term")["negative"]
    assert mined["paint"] in {"exterior paint gallon", "paint roller"}  # matches "paint", was never judged for it
    assert mined["cordless drill"] == "cordless drill battery"  # the judged drill ranks higher but is never mined
    assert "deck screws" not in mined  # its only BM25 hit is judged
    assert len(mined_negatives(judgments, CATALOG, (3, 10), seed=0).query("term == 'paint'")) == 0  # all 3 skipped
    sets = training_sets(judgments, OFFERS, TrainConfig(mined_negative_ranks=(0, 10)), CATALOG)
    assert sets["mined"]["anchor"].tolist() == ["paint"] and "pairs" not in sets  # the triplets' terms keep theirs
    assert "mined" not in training_sets(judgments, OFFERS, TrainConfig(mined_negatives=False), CATALOG)


def test_model_mined_negatives_are_the_encoders_nearest_unjudged_titles(tmp_path) -> None:
    model = load_encoder(TrainConfig().base_model, 16)
    judgments = JUDGMENTS.assign(product_uid=JUDGMENTS["product_title"].map(UIDS))
    mined = mined_negatives(judgments, CATALOG, (0, 2), seed=0, model=model).set_index("term")["negative"]
    assert set(mined.index) == {"cordless drill", "deck screws", "paint"}
    assert mined["paint"] in {"exterior paint gallon", "paint roller"}  # "white paint" is nearer but judged
    titles = CATALOG["product_title"].tolist()
    product_embeddings = model.encode(titles, normalize_embeddings=True)
    for term, negative in mined.items():
        judged = set(judgments.loc[judgments["search_term"] == term, "product_title"])
        order = np.argsort(-(product_embeddings @ model.encode([term], normalize_embeddings=True)[0]))
        assert negative in [titles[i] for i in order if titles[i] not in judged][:2]  # ranks count unjudged titles
        assert negative not in judged
    again = mined_negatives(judgments, CATALOG, (0, 2), seed=0, model=model).set_index("term")["negative"]
    assert again.equals(mined)  # seeded
    # the sets go with the model, in the trainer's order, for the students' task loss
    sets = training_sets(judgments, OFFERS, TrainConfig(mined_negative_ranks=(0, 3), category_offers=8), CATALOG, model)
    save_training_sets(sets, tmp_path / "training_sets")
    loaded = load_training_sets(tmp_path)
    assert list(loaded) == list(sets)
    for name, df in sets.items():
        pd.testing.assert_frame_equal(loaded[name], df)
    assert load_training_sets(tmp_path / "elsewhere") is None


def test_category_loss_trains_through_the_trainer(tmp_path) -> None:
    cfg = TrainConfig(max_steps=12, batch_size=8, category_offers=len(OFFERS), warmup_ratio=0.0)
    model = load_encoder(cfg.base_model, 16)
    before = model.encode(["bosch serie 4 dishwasher"], normalize_embeddings=True)
    sets = {CATEGORY_SET: training_sets(JUDGMENTS.iloc[:0], OFFERS, cfg)[CATEGORY_SET]}
    losses = [e["loss"] for e in train_contrastive(model, sets, cfg, tmp_path) if "loss" in e]
    assert len(losses) >= 3
    assert losses[-1] < 0.5 * losses[0]  # the head's own learning rate: ten steps separate four categories
    after = model.encode(["bosch serie 4 dishwasher"], normalize_embeddings=True)
    assert abs(before - after).max() > 1e-4  # the gradient reaches the encoder, not only the head


def _in_batch_loss(model, pairs: pd.DataFrame, batch: int) -> float:
    """MultipleNegativesRankingLoss as the trainer computes it (cosine x 20, the positive among the batch's)."""
    anchors = model.encode(pairs["anchor"].tolist(), normalize_embeddings=True)
    positives = model.encode(pairs["positive"].tolist(), normalize_embeddings=True)
    losses = []
    for start in range(0, len(pairs), batch):
        scores = 20.0 * anchors[start : start + batch] @ positives[start : start + batch].T
        log_softmax = scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))
        losses.append(-np.diag(log_softmax).mean())
    return float(np.mean(losses))


def test_a_tiny_contrastive_run_moves_the_ranking_loss_down(tmp_path) -> None:
    from pipelines.data.dataset import load_judgments

    cfg = TrainConfig(max_steps=16, batch_size=16, learning_rate=1e-4, warmup_ratio=0.0)
    # 64 real Home Depot positives, one per search term (no false in-batch negatives)
    judgments = load_judgments().drop_duplicates("search_term").head(4000)
    pairs = training_sets(judgments, OFFERS, cfg)["pairs"].head(64)
    model = load_encoder(cfg.base_model, 16)
    before = _in_batch_loss(model, pairs, cfg.batch_size)
    # the curve goes to a real MLflow run while the trainer runs: each point is readable back before the next step
    paths = Paths.from_env()
    run_id = registry.start_run(paths, "test_tiny_contrastive_run", {})
    sink, seen = registry.metrics_sink(paths, run_id), []

    def logged(metrics: dict[str, float], step: int) -> None:
        sink(metrics, step)
        seen.append([m.step for m in registry.client(paths).get_metric_history(run_id, "finetune.loss")])

    history = train_contrastive(model, {"pairs": pairs}, cfg, tmp_path, on_metrics=logged)
    registry.end_run(paths, run_id)
    assert [e["step"] for e in history if "loss" in e] == [4, 8, 12, 16]  # a logged point every max_steps // 4
    assert seen[:4] == [[4], [4, 8], [4, 8, 12], [4, 8, 12, 16]]
    assert _in_batch_loss(model, pairs, cfg.batch_size) < 0.8 * before


def test_the_validation_score_ranks_the_judged_products_among_the_configured_distractors() -> None:
    catalog = pd.DataFrame({"product_uid": range(100, 140), "product_title": [f"title {i}" for i in range(40)]})
    judged = JUDGMENTS.assign(product_uid=[1, 2, 3, 4, 5])
    evaluator = validation_evaluator(judged, catalog, 2.5, seed=0, distractors=10)
    assert len(evaluator.corpus) == 15 and {"1", "3", "5"} <= set(evaluator.corpus_ids)
    assert dict(zip(evaluator.queries_ids, evaluator.queries, strict=True)).keys() == {
        "cordless drill",
        "deck screws",
        "paint",
    }
    assert len(validation_evaluator(judged, catalog, 2.5, seed=0).corpus) == 45  # the default 2,000 > the catalog
