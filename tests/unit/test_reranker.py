"""The cross-encoder reranker on a tiny random BERT: its training pairs, training, ONNX INT8 export into a bundle,
and the runtime's reranking on a real ORT session."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.compression.export import build_product_index, export_bundle, export_reranker, reranker_parity_pairs
from pipelines.config import DataConfig, EvaluateConfig, RerankConfig, SearchConfig, ShopguideConfig, TrainConfig
from pipelines.data.dataset import Snapshot, is_heldout_term, is_training_term, is_validation_term, snapshot_data
from pipelines.evaluation.evaluate import evaluate_bundle, read_per_query
from pipelines.evaluation.fusion import build_lexical_index
from pipelines.registry.mlflow_client import write_model_card
from pipelines.runtime.bundle import ONNX_FILE, RERANKER_DIR, RERANKER_FILE
from pipelines.runtime.rerank import CrossEncoderReranker
from pipelines.training.reranker import graded_label, reranker_pairs, train_reranker
from tests.tiny_bert import save_tiny_bert, save_tiny_model


def _terms(rule, n: int) -> list[str]:
    found = [t for t in (f"product {i}" for i in range(400)) if rule(t)]
    return found[:n]


def test_pairs_are_the_training_terms_judgments_with_graded_labels() -> None:
    train, heldout, validation = _terms(is_training_term, 2), _terms(is_heldout_term, 1), _terms(is_validation_term, 1)
    judgments = pd.DataFrame(
        {
            "search_term": [train[0], train[0], train[1], heldout[0], validation[0]],
            "product_uid": [1, 2, 3, 4, 5],
            "product_title": ["a drill", "a hose", "a screw", "a lamp", "a saw"],
            "relevance": [3.0, 1.0, 2.0, 3.0, 3.0],
        }
    )
    pairs = reranker_pairs(judgments, None, RerankConfig(mined_negatives=False), (0, 5), seed=1)
    by_pair = {(q, t): label for q, t, label in pairs.itertuples(index=False)}
    assert by_pair == {(train[0], "a drill"): 1.0, (train[0], "a hose"): 0.0, (train[1], "a screw"): 0.5}
    assert graded_label(pd.Series([1.0, 2.33, 3.0])).round(3).tolist() == [0.0, 0.665, 1.0]


def test_mined_negatives_join_at_label_zero_and_were_never_judged_for_their_term() -> None:
    train = _terms(is_training_term, 2)
    judgments = pd.DataFrame(
        {
            "search_term": [train[0], train[1]],
            "product_uid": [1, 2],
            "product_title": ["cordless drill 20v", "garden hose 50 ft"],
            "relevance": [3.0, 3.0],
        }
    )
    catalog = pd.DataFrame(
        {
            "product_uid": [1, 2, 3, 4, 5],
            "product_title": ["cordless drill 20v", "garden hose 50 ft", "drill bit set", "hose reel", "lamp"],
        }
    )
    # the terms are "product N": rename them so BM25 has words to match
    judgments["search_term"] = ["cordless drill", "garden hose"]
    judged = judgments.assign(search_term=train)
    catalog_terms = catalog.assign(product_title=catalog["product_title"] + " product")
    pairs = reranker_pairs(judged, catalog_terms, RerankConfig(mined_negatives=True), (0, 5), seed=1)
    negatives = pairs[pairs["label"] == 0.0]
    assert len(negatives) == 2
    judged_titles = set(catalog_terms["product_title"].iloc[:2])
    for query, title, _ in negatives.itertuples(index=False):
        assert title not in judged_titles or (query, title) not in set(zip(train, judged_titles, strict=False))
    assert set(pairs["query"]) == set(train)


@pytest.fixture(scope="module")
def snapshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("snap")
    snapshot_data(DataConfig(max_terms=30, max_offers=200, event_users=10), out, datetime(2026, 1, 1, tzinfo=UTC))
    return out


@pytest.fixture(scope="module")
def bundle(snapshot_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """A tiny BERT trained as a cross-encoder for a few steps and exported into a bundle folder."""
    base = tmp_path_factory.mktemp("tiny")
    save_tiny_bert(base)
    cfg = ShopguideConfig.model_validate(
        {
            "rerank": {
                "enabled": True,
                "max_steps": 30,
                "batch_size": 16,
                "learning_rate": 3e-3,
                "max_seq_length": 24,
                "top_n": 5,
            },
            "search": {"rerank_top_n": 4},
        }
    )
    trained = train_reranker(snapshot_dir, tmp_path_factory.mktemp("rr"), cfg.rerank, str(base), seed=3)
    out = tmp_path_factory.mktemp("bundle")
    # a whole servable bundle around it: the tiny encoder, its product index and BM25 fused at a fixed weight
    encoder = save_tiny_model(tmp_path_factory.mktemp("encoder"), ["a", "b"])
    export_bundle(encoder, snapshot_dir, out, cfg.model_copy(update={"train": TrainConfig(max_seq_length=16)}))
    build_product_index(out, snapshot_dir)
    build_lexical_index(out, snapshot_dir, SearchConfig(lexical_weight=0.6), EvaluateConfig())
    pairs = reranker_parity_pairs(Snapshot.open(snapshot_dir), 8)
    exported = export_reranker(trained["reranker_dir"], out, pairs, cfg)
    report = evaluate_bundle(out, snapshot_dir, EvaluateConfig(max_category_offers=50, latency_queries=10))
    write_model_card(out, report, None, {"passed": True, "reasons": ["test"]}, {})  # servable: every file there
    return out, trained, exported


def test_training_takes_its_steps_on_the_snapshots_training_pairs(bundle: tuple[Path, dict, dict]) -> None:
    _, trained, _ = bundle
    assert trained["steps"] == 30 and trained["final_loss"] is not None
    assert trained["pairs"] > trained["pairs_negative"] > 0  # judged pairs plus one mined negative per term


def test_export_writes_an_int8_graph_with_token_types_and_parity(bundle: tuple[Path, dict, dict]) -> None:
    import onnx

    out, _, exported = bundle
    graph = onnx.load(str(out / RERANKER_DIR / ONNX_FILE)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in graph.output] == ["logits"]
    assert any(n.op_type in {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"} for n in graph.node)
    meta = json.loads((out / RERANKER_DIR / RERANKER_FILE).read_text())
    assert meta["top_n"] == 5 and meta["served_top_n"] == 4 and meta["max_seq_length"] == 24
    # a random tiny BERT is hard on INT8; the logits still follow PyTorch's
    assert exported["reranker_parity_correlation"] > 0.9, exported


def test_rerank_orders_the_head_by_the_sessions_scores_and_keeps_the_tail(bundle: tuple[Path, dict, dict]) -> None:
    out, _, _ = bundle
    reranker = CrossEncoderReranker.load(out)
    assert reranker is not None and reranker.top_n == 4 and reranker.measured_top_n == 5
    query = "cordless drill"
    titles = ["dewalt 20v cordless drill", "garden hose 50 ft", "led bulb", "3 in deck screws", "white paint", "saw"]
    logits = reranker.scores(query, titles[:4])
    assert len(set(np.round(logits, 6))) == 4  # distinct scores, so the order below is decided by them
    # feed the head worst first (by the session's own scores): reranking must reverse it
    head = np.argsort(logits, kind="stable")
    rows = np.concatenate([head, [4, 5]]).astype(np.int64)
    fused = np.linspace(1.0, 0.5, 6).astype(np.float32)
    listed = [titles[r] for r in rows]
    new_rows, new_scores = reranker.rerank(query, rows, fused, listed, top_n=4)
    np.testing.assert_array_equal(new_rows[:4], head[::-1])
    np.testing.assert_array_equal(new_rows[4:], [4, 5])  # below the top n: the fused order kept
    expected = 1 / (1 + np.exp(-np.sort(logits)[::-1]))
    np.testing.assert_allclose(new_scores[:4], expected, rtol=1e-5)
    np.testing.assert_allclose(new_scores[4:], np.minimum(fused[4:], expected[-1]), rtol=1e-5)
    assert list(new_scores) == sorted(new_scores, reverse=True)


def test_a_bundle_without_a_reranker_loads_none(tmp_path: Path) -> None:
    assert CrossEncoderReranker.load(tmp_path) is None


def _serve_top_n(bundle_dir: Path, top_n: int) -> None:
    path = bundle_dir / RERANKER_DIR / RERANKER_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), "served_top_n": top_n}))


@pytest.mark.parametrize("served", [0, 5])
def test_evaluation_reports_without_and_with_and_scores_what_is_served(
    bundle: tuple[Path, dict, dict], snapshot_dir: Path, served: int
) -> None:
    out, _, _ = bundle
    _serve_top_n(out, served)
    cfg = EvaluateConfig(max_category_offers=50, latency_queries=10, out_of_domain_queries=0)
    report = evaluate_bundle(out, snapshot_dir, cfg, calibrate=False)
    assert report["rerank_top_n"] == 5 and report["rerank_served_top_n"] == served
    assert report["unreranked_ndcg_at_10"] > 0  # BM25 finds judged products: the figures below are not all zeros
    for metric in ("ndcg_at_10", "mrr_at_10", "judged_at_10", "condensed_ndcg_at_10"):
        assert 0 <= report[f"reranked_{metric}"] <= 1
        # the version's own figures are those of the ranking it serves: reranked at 5, or the hybrid one
        assert report[metric] == pytest.approx(report[f"{'reranked' if served else 'unreranked'}_{metric}"])
    # reordering inside the top 5 cannot change which products are in the top 10
    assert report["reranked_judged_at_10"] == pytest.approx(report["unreranked_judged_at_10"])
    per_query = read_per_query(out)
    assert np.mean(list(per_query.values())) == pytest.approx(report["ndcg_at_10"])
    assert report["rerank_latency_p50_ms"] > 0


@pytest.mark.parametrize("top_n", [None, 0, 4])
def test_the_service_reranks_the_hybrid_top_n_by_the_cross_encoder(
    bundle: tuple[Path, dict, dict], tmp_path: Path, top_n: int | None
) -> None:
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.predictor import LoadOptions, Predictor
    from serving.settings import Settings

    out, _, _ = bundle
    _serve_top_n(out, 3)  # the version's own depth, which SHOPGUIDE_RERANK_TOP_N (top_n) overrides unless unset
    depth = 3 if top_n is None else top_n
    query = "deck screws"
    hybrid = Predictor.load(out, options=LoadOptions(rerank_top_n=0))
    assert not hybrid.reranks
    vec, _ = hybrid.encode(query)
    candidates = hybrid.candidates(vec, 6, query=query)
    reranker = CrossEncoderReranker.load(out)
    assert reranker is not None
    head = candidates[:depth]
    logits = reranker.scores(query, [h.title for h in head])
    expected = [head[i].product_id for i in np.argsort(-logits, kind="stable")] + [
        h.product_id for h in candidates[depth:]
    ]
    settings = Settings(
        home=tmp_path, bundle_dir=out, model_poll_seconds=0, rerank_top_n=top_n, request_log_enabled=False
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/model").json()["rerank_top_n"] == depth
        answer = client.post("/v1/search", json={"query": query, "k": 5}).json()
        metrics = client.get("/metrics").text
    assert [h["product_id"] for h in answer["results"]] == expected[:5]
    scores = [h["score"] for h in answer["results"]]
    assert scores == sorted(scores, reverse=True)
    assert ('stage="rerank"' in metrics) == (depth > 0)
    if depth:  # the test means something only if reranking moved a product
        assert expected[:depth] != [h.product_id for h in head]
