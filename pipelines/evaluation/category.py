"""The category answer's evaluation: accuracy, the abstention threshold calibrated per model version on validation
data, and what that threshold does on held-out data.

Calibration data (never the held-out splits): in the taxonomy, offers of the validation clusters of PriceRunner's
training side (`is_validation_cluster`, kept out of the head's training); outside it, the validation Home Depot
search terms (`is_validation_term`). The threshold of each candidate score rejects `target_ood_rejection` of those
terms; the score that keeps the most validation offers there is chosen. Held-out figures: coverage and accuracy on
the held-out PriceRunner clusters, the abstention rate on the held-out Home Depot terms, and a few probe queries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.config import CategoryConfig
from pipelines.data.dataset import Snapshot, is_validation_cluster, is_validation_term, normalize_term
from pipelines.runtime.category import CategoryPolicy, ScoreKind, in_taxonomy_scores, taxonomy_description
from pipelines.runtime.encoder import OnnxEncoder

# Queries shown in every report: appliances the taxonomy covers against tools, paint and lumber it does not.
PROBES_IN = ("dishwasher", "refrigerator", "washing machine", "microwave", "tv")
PROBES_OUT = ("cordless drill", "paint roller", "2x4 lumber", "wood screws")


def _sample(df: pd.DataFrame, limit: int | None) -> pd.DataFrame:
    return df.sample(n=limit, random_state=0) if limit is not None and len(df) > limit else df


def _accuracy(encoder: OnnxEncoder, offers: pd.DataFrame, logits: np.ndarray) -> dict[str, Any]:
    from sklearn.metrics import f1_score

    predicted = np.asarray(encoder.labels)[logits.argmax(1)]
    truth = offers["category_label"].astype(str).to_numpy()
    return {
        "category_accuracy": float((predicted == truth).mean()),
        "category_macro_f1": float(f1_score(truth, predicted, average="macro")),
        "category_offers": len(offers),
    }


def category_accuracy(encoder: OnnxEncoder, offers: pd.DataFrame, limit: int | None, batch_size: int) -> dict:
    """Top-category accuracy and macro F1 on (a seeded sample of) offers, abstention not applied."""
    offers = _sample(offers, limit)
    _, logits = encoder.encode(offers["offer_title"].astype(str).tolist(), batch_size=batch_size)
    return _accuracy(encoder, offers, logits)


def distinct_terms(judgments: pd.DataFrame) -> list[str]:
    terms = judgments["search_term"].map(normalize_term)
    return sorted(t for t in terms.unique() if t)


def threshold_at_rejection(ood_scores: np.ndarray, target: float) -> float:
    """The lowest threshold (accept score >= threshold) that rejects at least `target` of these scores."""
    s = np.sort(np.asarray(ood_scores, np.float64))
    k = int(np.ceil(target * len(s)))
    return float(np.nextafter(s[k - 1], np.inf)) if k > 0 else float(s[0])


def encode_queries(encoder: OnnxEncoder, texts: list[str], one_per_run: bool, batch_size: int):
    """(embeddings, logits) of search terms as the service computes them: one text per ORT run for graphs whose
    outputs depend on the batch (dynamic INT8; serving.predictor.Predictor.batch_invariant), batched otherwise."""
    if not one_per_run:
        return encoder.encode(texts, batch_size=batch_size)
    runs = [encoder.encode([t]) for t in texts]
    if not runs:
        return encoder.encode([])
    return np.concatenate([e for e, _ in runs]), np.concatenate([lg for _, lg in runs])


def centroids(encoder: OnnxEncoder, offers: pd.DataFrame, batch_size: int) -> np.ndarray:
    """Unit mean embedding of each label's offers, rows in the encoder's label order."""
    emb, _ = encoder.encode(offers["offer_title"].astype(str).tolist(), batch_size=batch_size)
    truth = offers["category_label"].astype(str).to_numpy()
    dim = emb.shape[1]
    rows = [emb[truth == label].mean(axis=0) if (truth == label).any() else np.zeros(dim) for label in encoder.labels]
    c = np.asarray(rows, np.float64)
    return (c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def calibrate(
    encoder: OnnxEncoder, snap: Snapshot, cfg: CategoryConfig, batch_size: int, one_per_run: bool = False
) -> CategoryPolicy:
    """The bundle's category policy, chosen on validation data: for every candidate score, the threshold rejecting
    cfg.target_ood_rejection of the validation Home Depot terms and the share of validation PriceRunner offers it
    keeps (coverage); the score with the highest coverage (then AUROC) wins. The figures ride along in
    `calibration`."""
    from sklearn.metrics import roc_auc_score

    offers_train = snap.table("offers_train")
    is_val = offers_train["cluster_id"].map(is_validation_cluster).astype(bool)
    val_offers = _sample(offers_train[is_val], cfg.max_validation_offers)
    judgments = snap.table("judgments_train")
    val_terms = distinct_terms(judgments[judgments["search_term"].map(is_validation_term).astype(bool)])
    taxonomy = taxonomy_description(encoder.labels)
    base: dict[str, Any] = {
        "target_ood_rejection": cfg.target_ood_rejection,
        "validation_offers": len(val_offers),
        "validation_terms": len(val_terms),
    }
    if val_offers.empty or not val_terms:
        return CategoryPolicy(
            tuple(encoder.labels), taxonomy, note="not calibrated: no validation offers or terms", calibration=base
        )
    in_emb, in_logits = encoder.encode(val_offers["offer_title"].astype(str).tolist(), batch_size=batch_size)
    ood_emb, ood_logits = encode_queries(encoder, val_terms, one_per_run, batch_size)
    centres = None
    if "centroid_cosine" in cfg.scores:
        centres = centroids(encoder, _sample(offers_train[~is_val], cfg.centroid_offers), batch_size)
    correct = np.asarray(encoder.labels)[in_logits.argmax(1)] == val_offers["category_label"].astype(str).to_numpy()
    by_score: dict[str, dict[str, float]] = {}
    for kind in cfg.scores:
        s_in = in_taxonomy_scores(kind, in_logits, in_emb, centres)
        s_ood = in_taxonomy_scores(kind, ood_logits, ood_emb, centres)
        t = threshold_at_rejection(s_ood, cfg.target_ood_rejection)
        kept = s_in >= t
        by_score[kind] = {
            "threshold": t,
            "coverage": float(kept.mean()),
            "ood_rejection": float((s_ood < t).mean()),
            "accuracy_at_coverage": float(correct[kept].mean()) if kept.any() else float("nan"),
            "auroc": float(roc_auc_score(np.r_[np.ones(len(s_in)), np.zeros(len(s_ood))], np.r_[s_in, s_ood])),
        }
    best: ScoreKind = max(cfg.scores, key=lambda k: (by_score[k]["coverage"], by_score[k]["auroc"]))
    calibration = {**base, "validation_accuracy": float(correct.mean()), "chosen": best, "by_score": by_score}
    if not cfg.abstain:
        return CategoryPolicy(
            tuple(encoder.labels),
            taxonomy,
            note="abstention turned off (category.abstain: false)",
            calibration=calibration,
        )
    return CategoryPolicy(
        tuple(encoder.labels),
        taxonomy,
        score=best,
        threshold=by_score[best]["threshold"],
        centroids=centres if best == "centroid_cosine" else None,
        calibration=calibration,
    )


def heldout_category(
    encoder: OnnxEncoder,
    snap: Snapshot,
    limit: int | None,
    batch_size: int,
    one_per_run: bool = False,
) -> dict[str, Any]:
    """Held-out figures of the encoder's category rule (encoder.categories, the served function): accuracy,
    coverage and accuracy on the answered share of the held-out PriceRunner offers, the abstention rate on the
    held-out Home Depot terms, and the probe queries' answers."""
    offers = _sample(snap.table("offers_test"), limit)
    emb, logits = encoder.encode(offers["offer_title"].astype(str).tolist(), batch_size=batch_size)
    report = _accuracy(encoder, offers, logits)
    answered = np.asarray([a.category is not None for a in encoder.categories(logits, emb)])
    correct = np.asarray(encoder.labels)[logits.argmax(1)] == offers["category_label"].astype(str).to_numpy()
    terms = distinct_terms(snap.table("judgments_heldout"))
    t_emb, t_logits = encode_queries(encoder, terms, one_per_run, batch_size)
    term_answers = encoder.categories(t_logits, t_emb)
    kept = [(t, a) for t, a in zip(terms, term_answers, strict=True) if a.category is not None]
    probes = list(PROBES_IN + PROBES_OUT)
    p_emb, p_logits = encode_queries(encoder, probes, one_per_run, batch_size)
    policy = encoder.category
    report.update(
        {
            "category_score": policy.score,
            "category_threshold": policy.threshold,
            "category_coverage": float(answered.mean()),
            "category_accuracy_at_coverage": float(correct[answered].mean()) if answered.any() else None,
            "category_heldout_terms": len(terms),
            "category_heldout_term_abstention": float(1 - len(kept) / len(terms)) if terms else None,
            # the held-out Home Depot terms it does answer, most confident first: the appliances it should answer,
            # or the leaks of the threshold
            "category_heldout_terms_answered": [
                f"{t} -> {a.category}" for t, a in sorted(kept, key=lambda ta: -(ta[1].score or 0.0))[:20]
            ],
            "category_probes": [
                {
                    "query": q,
                    "expected": "answer" if q in PROBES_IN else "abstain",
                    "category": a.category,
                    "top_category": a.top_category,
                    "probability": round(a.probability, 4),
                    "score": None if a.score is None else round(a.score, 4),
                }
                for q, a in zip(probes, encoder.categories(p_logits, p_emb), strict=True)
            ],
        }
    )
    for kind, figures in policy.calibration.get("by_score", {}).items():  # the validation figures behind the choice
        report.update({f"category_val_{kind}_{name}": value for name, value in figures.items()})
    return report


def calibrate_bundle(
    bundle_dir: str | Path,
    encoder: OnnxEncoder,
    snap: Snapshot,
    cfg: CategoryConfig,
    batch_size: int,
    one_per_run: bool = False,
) -> CategoryPolicy:
    """Calibrate, write category.json into the bundle and read it back into the encoder, so every figure after this
    is measured with the stored rule, as served."""
    calibrate(encoder, snap, cfg, batch_size, one_per_run).save(bundle_dir)
    encoder.category_policy = CategoryPolicy.load(bundle_dir, encoder.labels)
    return encoder.category
