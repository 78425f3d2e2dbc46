"""Evaluation of a bundle: held-out retrieval over the whole catalog, category accuracy, latency and size."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.config import CategoryConfig, EvaluateConfig
from pipelines.data.dataset import Snapshot, normalize_term
from pipelines.evaluation.category import calibrate_bundle, heldout_category
from pipelines.evaluation.category import category_accuracy as category_accuracy  # compression.variants' import
from pipelines.runtime.bundle import ENCODER_FILE, ERRORS_FILE, ONNX_FILE, PER_QUERY_FILE, REPORT_FILE
from pipelines.runtime.encoder import OnnxEncoder
from pipelines.runtime.index import ProductIndex
from pipelines.runtime.lexical import LexicalIndex, min_max
from pipelines.runtime.rerank import CrossEncoderReranker

# Home Depot grades are means of 3 (sometimes 4) raters; x12 makes every gain an integer, as trec_eval needs.
# nDCG with linear gains is scale-invariant, so this equals nDCG with gains = relevance - 1.
GAIN_SCALE = 12


def heldout_qrels(heldout: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Graded qrels for held-out terms with >= 2 judged products and >= 1 relevant one (1,326 terms in full)."""
    df = heldout.assign(
        term=heldout["search_term"].map(normalize_term),
        gain=((heldout["relevance"] - 1.0) * GAIN_SCALE).round().astype(int),
    )
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
    return {"ndcg_at_10": float(agg[nDCG @ 10]), "mrr_at_10": float(agg[RR @ 10]), "recall_at_100": float(agg[R @ 100])}


def per_query_ndcg(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, float]:
    """nDCG@10 of every term in qrels (ir-measures; a term the run has no list for scores 0): the per-query values
    whose mean is ir_metrics' ndcg_at_10, what a paired comparison of two models resamples."""
    import ir_measures
    from ir_measures import nDCG

    values = {m.query_id: float(m.value) for m in ir_measures.iter_calc([nDCG @ 10], qrels, run)}
    return {term: values.get(term, 0.0) for term in qrels}


def read_per_query(bundle_dir: str | Path, metric: str = "ndcg_at_10") -> dict[str, float]:
    """The per-query figures evaluate_bundle stored with a bundle (term -> value)."""
    return {str(t): float(v) for t, v in json.loads((Path(bundle_dir) / PER_QUERY_FILE).read_text())[metric].items()}


def judgment_coverage(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, float]:
    """How far the judgments see a run: Judged@10 (share of the top 10 that was judged for the term, in any grade) and
    nDCG'@10 (nDCG@10 of the condensed list, unjudged products dropped; Sakai 2007). The whole-catalog nDCG@10 counts
    an unjudged product as a miss, so a model that finds products the Home Depot pool never showed is charged for it.
    """
    import ir_measures
    from ir_measures import Judged, nDCG

    judged, condensed = Judged @ 10, nDCG(judged_only=True) @ 10
    totals = {judged: 0.0, condensed: 0.0}
    # ir-measures' Judged divides by the list's length: a term with no hit at all (BM25 can have none) counts as 0
    for m in ir_measures.iter_calc([judged, condensed], qrels, {t: r for t, r in run.items() if r}):
        totals[m.measure] += m.value
    return {"judged_at_10": totals[judged] / len(qrels), "condensed_ndcg_at_10": totals[condensed] / len(qrels)}


def candidate_lists(
    encoder: OnnxEncoder,
    index: ProductIndex,
    terms: list[str],
    k: int,
    batch_size: int,
    lexical: LexicalIndex | None = None,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple[np.ndarray, np.ndarray]] | None]:
    """Per term, the dense (rows, scores) deep enough for a top k (serving's depth) and, with a lexical index, its
    BM25 candidates."""
    depth = k if lexical is None else lexical.depth(k)
    emb, _ = encoder.encode(terms, batch_size=batch_size)
    dense: list[tuple[np.ndarray, np.ndarray]] = []
    for start in range(0, len(terms), 256):  # bounded memory: 256 x catalog scores at a time
        rows, scores = index.search(emb[start : start + 256], depth)
        dense.extend(zip(rows, scores, strict=True))
    return dense, (lexical.top_k(terms) if lexical is not None else None)


def run_from_lists(
    index: ProductIndex,
    terms: list[str],
    dense: list[tuple[np.ndarray, np.ndarray]],
    lexical: list[tuple[np.ndarray, np.ndarray]] | None,
    weight: float,
    k: int,
) -> dict[str, dict[str, float]]:
    """A run (term -> {product id: score}): the dense lists alone, or fused with the lexical ones as serving does."""
    if lexical is not None:
        return fused_runs(index, terms, dense, lexical, [weight], k)[weight]
    return {
        term: {str(index.product_ids[r]): float(v) for r, v in zip(rows[:k], scores[:k], strict=True)}
        for term, (rows, scores) in zip(terms, dense, strict=True)
    }


_NO_HIT = "-"  # ranx fuses runs over the same queries only: a term without BM25 candidates holds this stand-in


def _ranx_run(index: ProductIndex, terms: list[str], lists: list[tuple[np.ndarray, np.ndarray]]) -> Any:
    """Candidate lists as a ranx Run of min-max-normalised scores, the normalisation serving applies."""
    from ranx import Run

    q_ids, doc_ids, scores = [], [], []
    for term, (rows, values) in zip(terms, lists, strict=True):
        if len(rows) == 0:
            rows, values = np.asarray([-1]), np.zeros(1, np.float32)
        q_ids.extend([term] * len(rows))
        doc_ids.extend(_NO_HIT if r < 0 else str(index.product_ids[r]) for r in rows)
        scores.extend(min_max(np.asarray(values, np.float32)).astype(np.float64))
    frame = pd.DataFrame({"q_id": q_ids, "doc_id": doc_ids, "score": scores})
    return Run.from_df(frame, q_id_col="q_id", doc_id_col="doc_id", score_col="score")


def fused_runs(
    index: ProductIndex,
    terms: list[str],
    dense: list[tuple[np.ndarray, np.ndarray]],
    lexical: list[tuple[np.ndarray, np.ndarray]],
    weights: list[float],
    k: int,
) -> dict[float, dict[str, dict[str, float]]]:
    """{lexical weight: run} of the dense and BM25 lists fused by ranx (weighted sum of min-max scores), top k.

    Offline only: serving fuses with runtime.lexical.fuse, the same rule written for one query (0.15 ms a query
    against ranx's 5.1 ms with its Run construction, 2026-12-02); tests/unit/test_lexical.py checks they agree.
    """
    from ranx import fuse as ranx_fuse

    runs = [_ranx_run(index, terms, dense), _ranx_run(index, terms, lexical)]
    out: dict[float, dict[str, dict[str, float]]] = {}
    for w in weights:
        fused = ranx_fuse(runs, norm=None, method="wsum", params={"weights": [1 - w, w]}).to_dict()
        out[w] = {
            term: dict(sorted(((d, s) for d, s in docs.items() if d != _NO_HIT), key=lambda ds: -ds[1])[:k])
            for term, docs in fused.items()
        }
    return out


def retrieval_run(
    encoder: OnnxEncoder, index: ProductIndex, terms: list[str], k: int, batch_size: int
) -> dict[str, dict[str, float]]:
    """The encoder's own top k of every term (what the compression suite compares variants on)."""
    dense, _ = candidate_lists(encoder, index, terms, k, batch_size)
    return run_from_lists(index, terms, dense, None, 0.0, k)


def error_sample(
    qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]], titles: dict[str, str], n: int = 25
) -> list[dict[str, Any]]:
    """The n held-out terms with the lowest nDCG@10: what was retrieved vs what the judges liked best."""
    per_query = per_query_ndcg(qrels, run)
    worst = sorted(per_query, key=lambda t: (per_query[t], t))[:n]
    out = []
    for term in worst:
        top = sorted(run.get(term, {}).items(), key=lambda kv: -kv[1])[:3]
        best = sorted(qrels[term].items(), key=lambda kv: -kv[1])[:3]
        out.append(
            {
                "query": term,
                "ndcg_at_10": round(per_query[term], 4),
                "retrieved": [titles.get(d, d) for d, _ in top],
                "relevant": [f"{titles.get(d, d)} (gain {g / GAIN_SCALE:.2f})" for d, g in best],
            }
        )
    return out


def titles_by_id(index: ProductIndex) -> dict[str, str]:
    """The index's titles keyed by product id as a run names them (str)."""
    return dict(zip(map(str, index.product_ids), map(str, index.titles), strict=True))


def reranked_run(
    reranker: CrossEncoderReranker, titles: dict[str, str], run: dict[str, dict[str, float]], top_n: int
) -> dict[str, dict[str, float]]:
    """Each term's ranked list (a run's dicts are best first) with its first top_n reordered by the reranker, one
    ORT run per term as the service does; `titles`: titles_by_id of the run's index. Scores are the new ranks (list
    length down to 1): the reranked head and the fused tail are on different scales, and ir-measures ranks by
    score."""
    out: dict[str, dict[str, float]] = {}
    for term, docs in run.items():
        ids = list(docs)
        rows, _ = reranker.rerank(
            term, np.arange(len(ids)), np.asarray(list(docs.values()), np.float32), [titles[d] for d in ids], top_n
        )
        out[term] = {ids[r]: float(len(ids) - i) for i, r in enumerate(rows)}
    return out


def rerank_report(
    reranker: CrossEncoderReranker,
    titles: dict[str, str],
    qrels: dict[str, dict[str, int]],
    run: dict[str, dict[str, float]],
    latency_queries: int,
) -> dict[str, Any]:
    """The held-out figures without and with the bundle's reranker at the depth it was measured for (its top_n),
    on the same hybrid run: nDCG@10, MRR@10, Judged@10 and nDCG'@10, and the latency of scoring one term's top_n."""
    top_n = reranker.measured_top_n
    reranked = reranked_run(reranker, titles, qrels_terms_run(qrels, run), top_n)
    out: dict[str, Any] = {"rerank_top_n": top_n, "rerank_served_top_n": reranker.top_n}
    for name, r in (("unreranked", run), ("reranked", reranked)):
        figures = {**ir_metrics(qrels, r), **judgment_coverage(qrels, r)}
        out |= {f"{name}_{k}": v for k, v in figures.items() if k != "recall_at_100"}
    terms = [t for t in sorted(run) if run[t]][:latency_queries]
    out |= reranker.latency_ms(terms, [[titles[d] for d in run[t]] for t in terms], top_n)
    return out


def qrels_terms_run(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The run's lists of the judged terms only (what the metrics read): the reranker scores nothing else."""
    return {t: run[t] for t in qrels if t in run}


def queries_one_per_run(bundle_dir: str | Path) -> bool:
    """Whether search terms are encoded one per ORT run, as the service does for a graph whose outputs depend on the
    batch (dynamic INT8: its activation scales are taken over the whole batch)."""
    quantization = str(json.loads((Path(bundle_dir) / ENCODER_FILE).read_text()).get("quantization") or "")
    return quantization.startswith("int8-dynamic")


def evaluate_bundle(
    bundle_dir: str | Path,
    snapshot_dir: str | Path,
    cfg: EvaluateConfig,
    parity_cosine_min: float | None = None,
    extra: dict[str, Any] | None = None,
    category: CategoryConfig | None = None,
    calibrate: bool = True,
) -> dict[str, Any]:
    """Every figure the gate reads, measured on the served graph, plus `extra` facts (variant, compression reason);
    written to the bundle as evaluation.json, each held-out term's nDCG@10 as per_query.json. The bundle's category
    abstention threshold is calibrated here too (category.json, `category` config; default CategoryConfig()) unless
    `calibrate` is False (a registered version re-evaluated as it is served)."""
    bundle, snap = Path(bundle_dir), Snapshot.open(snapshot_dir)
    encoder, index = OnnxEncoder.load(bundle), ProductIndex.load(bundle)
    qrels = heldout_qrels(snap.table("judgments_heldout"))
    terms = sorted(qrels)
    report: dict[str, Any] = {"heldout_terms": len(terms), "catalog_products": len(index)}
    lexical = LexicalIndex.load(bundle)
    dense, lex = candidate_lists(encoder, index, terms, cfg.retrieve_k, cfg.batch_size, lexical)
    run = run_from_lists(index, terms, dense, lex, lexical.weight if lexical else 0.0, cfg.retrieve_k)
    reranker = CrossEncoderReranker.load(bundle)
    if reranker is not None:  # with and without, same run; the figures below are of what the version serves
        titles = titles_by_id(index)  # once: the catalog's titles, for both reranked runs and the latency
        report.update(rerank_report(reranker, titles, qrels, run, cfg.latency_queries))
        if reranker.top_n:
            run = reranked_run(reranker, titles, run, reranker.top_n)
    report.update(ir_metrics(qrels, run))
    report.update(judgment_coverage(qrels, run))
    if lexical is not None:  # what the fusion adds over the dense ranking alone, same graph, same run
        dense_run = run_from_lists(index, terms, dense, None, 0.0, cfg.retrieve_k)
        report["dense_ndcg_at_10"] = ir_metrics(qrels, dense_run)["ndcg_at_10"]
        report["lexical_weight"] = lexical.weight
        report.update(lexical.latency_ms(terms[: cfg.latency_queries]))
    # the lexical baseline on the same split, same run: a candidate must be worth its compute
    report["bm25_ndcg_at_10"] = ir_metrics(qrels, bm25_run(snap.table("catalog"), terms, cfg.retrieve_k))["ndcg_at_10"]
    one_per_run = queries_one_per_run(bundle)
    if calibrate:
        calibrate_bundle(bundle, encoder, snap, category or CategoryConfig(), cfg.batch_size, one_per_run)
    report.update(heldout_category(encoder, snap, cfg.max_category_offers, cfg.batch_size, one_per_run))
    report.update(encoder.query_latency_ms(terms[: cfg.latency_queries]))
    report["size_mb"] = (bundle / ONNX_FILE).stat().st_size / 1e6
    report["parity_cosine_min"] = parity_cosine_min
    report["snapshot_hash"] = snap.hash
    report.update(extra or {})
    (bundle / REPORT_FILE).write_text(json.dumps(report, indent=2))
    (bundle / PER_QUERY_FILE).write_text(json.dumps({"ndcg_at_10": per_query_ndcg(qrels, run)}, indent=0))
    (bundle / ERRORS_FILE).write_text(json.dumps(error_sample(qrels, run, titles_by_id(index)), indent=2))
    return report


def ranking_from_scores(
    terms: list[str], product_ids: np.ndarray, scores: np.ndarray, k: int
) -> dict[str, dict[str, float]]:
    """A run (term -> {product id: score}) from a dense (terms x products) score matrix: top-k per term, best first
    (as BM25's runs are), so a caller can read ranks off the dict's order."""
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable"), axis=1)
    return {t: {str(product_ids[i]): float(scores[r, i]) for i in top[r]} for r, t in enumerate(terms)}


def embedding_run(
    encode, catalog: pd.DataFrame, terms: list[str], k: int
) -> tuple[dict[str, dict[str, float]], np.ndarray, np.ndarray]:
    """Retrieval run of any encoder (texts -> unit vectors) over the whole catalog; also returns both embeddings."""
    products = encode(catalog["product_title"].astype(str).tolist())
    queries = encode(terms)
    run: dict[str, dict[str, float]] = {}
    ids = catalog["product_uid"].to_numpy()
    for start in range(0, len(terms), 256):
        run.update(ranking_from_scores(terms[start : start + 256], ids, queries[start : start + 256] @ products.T, k))
    return run, queries, products


def bm25_run(catalog: pd.DataFrame, terms: list[str], k: int, stem: bool = True) -> dict[str, dict[str, float]]:
    """The lexical baseline: bm25s over the catalog titles, English stopwords, optional Porter/Snowball stemming."""
    import bm25s

    stemmer = None
    if stem:
        import Stemmer

        stemmer = Stemmer.Stemmer("english")
    corpus = bm25s.tokenize(
        catalog["product_title"].astype(str).tolist(), stopwords="en", stemmer=stemmer, show_progress=False
    )
    retriever = bm25s.BM25()
    retriever.index(corpus, show_progress=False)
    queries = bm25s.tokenize(terms, stopwords="en", stemmer=stemmer, show_progress=False)
    docs, scores = retriever.retrieve(queries, k=min(k, len(catalog)), show_progress=False)
    ids = catalog["product_uid"].to_numpy()
    return {
        t: {str(ids[d]): float(s) for d, s in zip(dr, sr, strict=True) if s > 0}
        for t, dr, sr in zip(terms, docs, scores, strict=True)
    }


def rerank_ndcg(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> float:
    """nDCG@10 when only each term's judged products are ranked (the Kaggle task's setting)."""
    import ir_measures
    from ir_measures import nDCG

    judged = {t: {d: run.get(t, {}).get(d, -1e9) for d in docs} for t, docs in qrels.items()}
    return float(ir_measures.calc_aggregate([nDCG @ 10], qrels, judged)[nDCG @ 10])


def category_baseline(offers_train: pd.DataFrame, offers_test: pd.DataFrame) -> dict[str, float]:
    """TF-IDF (word 1-2 grams + char 3-5 grams) + logistic regression, trained on the same split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline, make_union

    features = make_union(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True, min_df=2),
    )
    model = make_pipeline(features, LogisticRegression(max_iter=2000, C=10.0))
    model.fit(offers_train["offer_title"].astype(str), offers_train["category_label"].astype(str))
    predicted = model.predict(offers_test["offer_title"].astype(str))
    truth = offers_test["category_label"].astype(str)
    return {
        "category_accuracy": float(accuracy_score(truth, predicted)),
        "category_macro_f1": float(f1_score(truth, predicted, average="macro")),
    }
