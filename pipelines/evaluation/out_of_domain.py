"""The out-of-domain check: held-out PriceRunner offer titles -> their canonical titles, an unseen shop's task."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.config import EvaluateConfig
from pipelines.data.dataset import Snapshot
from pipelines.evaluation.category import encode_queries
from pipelines.evaluation.evaluate import queries_one_per_run, ranking_from_scores
from pipelines.runtime.encoder import OnnxEncoder

Encode = Callable[[list[str]], np.ndarray]  # texts -> L2-normalised embeddings, one row per text
K = 10


@dataclass(frozen=True)
class OutOfDomainTask:
    """Queries (offer id -> offer title), the corpus (distinct canonical titles; a title's doc id is its position)
    and the qrels (offer id -> {the doc id of its own canonical title: 1})."""

    queries: dict[str, str]
    corpus: list[str]
    qrels: dict[str, dict[str, int]]


def out_of_domain_task(
    snap: Snapshot, n_queries: int, distractors: int | None = None, seed: int = 0
) -> OutOfDomainTask:
    """A seeded sample of `n_queries` offers of the held-out PriceRunner clusters (offers_test) as queries, ranked
    among the distinct canonical titles (cluster_label) of the snapshot's offers, both splits: all of them, or with
    `distractors`, the queries' own titles plus that many others (seeded).

    Only offers_test is sampled: training may see offers_train (the category head always; the encoder with
    train.category_offers or train.pricerunner_pairs), never a held-out cluster. Canonical titles are deduplicated
    (12,849 distinct labels for 13,233 clusters in the full data): no encoder can tell two identical texts apart,
    so a query whose label another cluster shares would score on a coin toss instead of on the model.
    """
    test = snap.table("offers_test")
    sample = test.sample(n=n_queries, random_state=seed) if len(test) > n_queries else test
    sample = sample.sort_values("product_id")
    own = set(sample["cluster_label"].astype(str))
    others = pd.Series(sorted(set(pd.concat([snap.table("offers_train"), test])["cluster_label"].astype(str)) - own))
    if distractors is not None and len(others) > distractors:
        others = others.sample(n=distractors, random_state=seed)
    corpus = sorted(own | set(others))
    doc_id = {title: str(i) for i, title in enumerate(corpus)}
    ids = sample["product_id"].astype(str).tolist()
    return OutOfDomainTask(
        queries=dict(zip(ids, sample["offer_title"].astype(str), strict=True)),
        corpus=corpus,
        qrels={q: {doc_id[label]: 1} for q, label in zip(ids, sample["cluster_label"].astype(str), strict=True)},
    )


def score_out_of_domain(task: OutOfDomainTask, encode: Encode, encode_query: Encode | None = None) -> dict[str, float]:
    """nDCG@10 and Recall@10 (ir-measures) of an encoder on the task: `encode` embeds the corpus, `encode_query`
    (default: `encode`) the queries. With one relevant title per query, Recall@10 is the share found in the top 10."""
    import ir_measures
    from ir_measures import R, nDCG

    docs = encode(task.corpus)
    queries = (encode_query or encode)(list(task.queries.values()))
    ids, doc_ids = list(task.queries), np.asarray([str(i) for i in range(len(task.corpus))])
    run: dict[str, dict[str, float]] = {}
    for start in range(0, len(ids), 256):  # bounded memory: 256 x corpus scores at a time
        run.update(ranking_from_scores(ids[start : start + 256], doc_ids, queries[start : start + 256] @ docs.T, K))
    agg = ir_measures.calc_aggregate([nDCG @ K, R @ K], task.qrels, run)
    return {"ndcg_at_10": float(agg[nDCG @ K]), "recall_at_10": float(agg[R @ K])}


def bundle_encoders(bundle_dir: str | Path, batch_size: int) -> tuple[Encode, Encode]:
    """(corpus encode, query encode) of a served bundle: titles batched as the product index embeds them, queries
    as the service does (one per run for a batch-dependent graph)."""
    encoder = OnnxEncoder.load(bundle_dir)
    one_per_run = queries_one_per_run(bundle_dir)
    return (
        lambda texts: encoder.encode(texts, batch_size=batch_size)[0],
        lambda texts: encode_queries(encoder, texts, one_per_run, batch_size)[0],
    )


def out_of_domain_report(
    bundle_dir: str | Path, snapshot_dir: str | Path, cfg: EvaluateConfig, base: Encode | None
) -> dict[str, Any]:
    """The served bundle's figures on the task (`ood_*`) and the base model's on the same queries and titles
    (`base_ood_*`, from `base`, the untuned encoder; None leaves them out): what gate.max_out_of_domain_drop compares.
    """
    task = out_of_domain_task(Snapshot.open(snapshot_dir), cfg.out_of_domain_queries, cfg.out_of_domain_distractors)
    report: dict[str, Any] = {"ood_queries": len(task.queries), "ood_titles": len(task.corpus)}
    report.update(
        {f"ood_{k}": v for k, v in score_out_of_domain(task, *bundle_encoders(bundle_dir, cfg.batch_size)).items()}
    )
    if base is not None:
        report.update({f"base_ood_{k}": v for k, v in score_out_of_domain(task, base).items()})
    return report
