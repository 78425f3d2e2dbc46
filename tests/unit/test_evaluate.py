"""Retrieval metric plumbing on a hand-built ranking whose nDCG, MRR, recall and coverage are worked out below."""

from __future__ import annotations

import math

import pytest

from pipelines.evaluation.evaluate import ir_metrics, judgment_coverage, rerank_ndcg

# gains x12 as heldout_qrels writes them: a = relevance 3 (gain 2), b = relevance 2 (gain 1), c = irrelevant
QRELS = {"q1": {"a": 24, "b": 12, "c": 0}, "q2": {"d": 12, "e": 12}}
RUN = {"q1": {"x": 0.9, "b": 0.8, "a": 0.7}, "q2": {"e": 0.5}}  # x was never judged for q1
LOG3 = math.log2(3)
# q1: DCG = 0 + 12/log2(3) + 24/log2(4), ideal = 24 + 12/log2(3); q2: DCG = 12, ideal = 12 + 12/log2(3)
NDCG_Q1 = (12 / LOG3 + 12) / (24 + 12 / LOG3)
NDCG_Q2 = 12 / (12 + 12 / LOG3)
# q1 without the unjudged x: b then a
CONDENSED_Q1 = (12 + 24 / LOG3) / (24 + 12 / LOG3)


def test_ir_metrics_on_a_toy_ranking() -> None:
    metrics = ir_metrics(QRELS, RUN)
    assert metrics["ndcg_at_10"] == pytest.approx((NDCG_Q1 + NDCG_Q2) / 2)
    assert metrics["mrr_at_10"] == pytest.approx((1 / 2 + 1) / 2)  # first relevant at rank 2, then rank 1
    assert metrics["recall_at_100"] == pytest.approx((2 / 2 + 1 / 2) / 2)  # gain 0 is not relevant


def test_reranking_only_the_judged_products() -> None:
    # q1's judged products by the run's scores (c unscored, last): b, a, c; q2: e then the unretrieved d, ideal
    assert rerank_ndcg(QRELS, RUN) == pytest.approx((CONDENSED_Q1 + 1.0) / 2)


def test_judgment_coverage_of_a_toy_ranking() -> None:
    coverage = judgment_coverage(QRELS, RUN)
    assert coverage["judged_at_10"] == pytest.approx((2 / 3 + 1) / 2)  # of the retrieved, as trec_eval counts
    assert coverage["condensed_ndcg_at_10"] == pytest.approx((CONDENSED_Q1 + NDCG_Q2) / 2)
    # a term with no hit at all (a BM25 query of stopwords) scores 0 on both, not a division by zero
    empty = judgment_coverage({**QRELS, "q3": {"f": 12}}, {**RUN, "q3": {}})
    assert empty["judged_at_10"] == pytest.approx((2 / 3 + 1) / 3)
