"""The query-category answer: the head's top category inside its taxonomy, or an abstention (category None, with the
reason) when an out-of-taxonomy score falls below the bundle's calibrated threshold.

One function, `CategoryPolicy.decide`, turns logits into answers for the service, the pyfunc and the offline
evaluation, so the figures in evaluation.json are those of the served rule. The threshold is chosen per model
version on validation data (pipelines/evaluation/category.py) and stored in the bundle's category.json; a bundle
without that file (built before abstention existed) keeps the old behaviour: the top category, always.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipelines.runtime.bundle import CATEGORY_FILE

ScoreKind = Literal["max_softmax", "energy", "centroid_cosine"]
SCORE_KINDS: tuple[ScoreKind, ...] = ("max_softmax", "energy", "centroid_cosine")
SCORE_MEANING: dict[ScoreKind, str] = {
    "max_softmax": "softmax probability of the top category",
    "energy": "logsumexp of the category logits (negative energy)",
    "centroid_cosine": "cosine of the query embedding to the nearest category centroid",
}
LEGACY_NOTE = (
    "this bundle has no calibrated category threshold (built before abstention): the top category is always answered"
)


def taxonomy_description(labels: list[str], name: str = "pricerunner") -> str:
    """What the head predicts, for the response: e.g. "pricerunner-10: the 10 PriceRunner categories (CPUs, ...)"."""
    n = len(labels)
    return f"{name}-{n}: the {n} PriceRunner appliance and electronics categories ({', '.join(labels)})"


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def in_taxonomy_scores(
    kind: ScoreKind, logits: np.ndarray, embeddings: np.ndarray | None = None, centroids: np.ndarray | None = None
) -> np.ndarray:
    """Per row, higher = more like the taxonomy's products: max softmax, logsumexp of the logits (Liu et al. 2020's
    negative energy), or the max cosine of the (unit) embedding to the (unit) category centroids."""
    logits = np.asarray(logits, np.float64)
    if kind == "max_softmax":
        return softmax(logits).max(axis=1)
    if kind == "energy":
        top = logits.max(axis=1)
        return top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    if kind == "centroid_cosine":
        if embeddings is None or centroids is None:
            raise ValueError("centroid_cosine needs the embeddings and the category centroids")
        return (np.asarray(embeddings, np.float64) @ np.asarray(centroids, np.float64).T).max(axis=1)
    raise ValueError(f"unknown score {kind!r}; expected one of {SCORE_KINDS}")


@dataclass(frozen=True)
class CategoryAnswer:
    """One query's answer. `category` is None when abstained; `top_category` is the head's best either way."""

    category: str | None
    top_category: str
    probability: float  # softmax probability of top_category
    score: float | None  # the abstention score, None when the bundle has no rule
    abstained_reason: str | None


@dataclass(frozen=True)
class CategoryPolicy:
    """A bundle's category rule: its labels and taxonomy, and (when calibrated) which score and threshold abstain."""

    labels: tuple[str, ...]
    taxonomy: str
    score: ScoreKind | None = None  # None: never abstain (an older bundle, or abstention turned off)
    threshold: float | None = None
    centroids: np.ndarray | None = field(default=None, repr=False)  # (labels, dim) unit rows, for centroid_cosine
    note: str | None = None  # why the policy never abstains, if it does not
    calibration: dict[str, Any] = field(default_factory=dict, repr=False)  # validation figures behind the threshold

    @property
    def abstains(self) -> bool:
        return self.score is not None and self.threshold is not None

    def describe(self) -> str:
        """One line for logs and /v1/model: the rule in force."""
        if self.score is None or self.threshold is None:
            return f"never abstains: {self.note or 'no threshold'}"
        return f"abstains when {self.score} < {self.threshold:.4g} ({SCORE_MEANING[self.score]})"

    def decide(self, logits: np.ndarray, embeddings: np.ndarray | None = None) -> list[CategoryAnswer]:
        """The answer for each row of (logits, embeddings): the top category, or None and why when its score is
        below the threshold. The one place logits become category answers."""
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.shape[1] != len(self.labels):
            raise ValueError(f"logits of shape {logits.shape} do not fit {len(self.labels)} labels")
        probs = softmax(logits.astype(np.float64))
        top = probs.argmax(axis=1)
        kind, threshold = self.score, self.threshold
        scores = None
        if kind is not None and threshold is not None:
            scores = in_taxonomy_scores(kind, logits, embeddings, self.centroids)
        answers = []
        for i, label_index in enumerate(top):
            label = self.labels[int(label_index)]
            score = None if scores is None else float(scores[i])
            reason = None
            if score is not None and threshold is not None and score < threshold:
                reason = f"outside the taxonomy: {kind} {score:.4g} < threshold {threshold:.4g} (best guess {label})"
            answers.append(
                CategoryAnswer(
                    category=None if reason else label,
                    top_category=label,
                    probability=float(probs[i, label_index]),
                    score=score,
                    abstained_reason=reason,
                )
            )
        return answers

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "labels": list(self.labels),
            "taxonomy": self.taxonomy,
            "score": self.score,
            "threshold": self.threshold,
            "note": self.note,
            "calibration": self.calibration,
        }
        if self.centroids is not None:
            out["centroids"] = np.asarray(self.centroids, np.float32).round(6).tolist()
        return out

    def save(self, bundle_dir: str | Path) -> Path:
        path = Path(bundle_dir) / CATEGORY_FILE
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def load(cls, bundle_dir: str | Path, labels: list[str]) -> CategoryPolicy:
        """The bundle's rule from category.json; without the file, the old behaviour (never abstain) with a note.
        Raises when the file does not fit the bundle's labels, so a mixed-up bundle never serves."""
        path = Path(bundle_dir) / CATEGORY_FILE
        if not path.is_file():
            return cls(tuple(labels), taxonomy_description(labels), note=LEGACY_NOTE)
        meta = json.loads(path.read_text())
        if list(meta["labels"]) != list(labels):
            raise ValueError(f"{path}: labels {meta['labels']} differ from the bundle's {labels}")
        score = meta.get("score")
        if score is not None and score not in SCORE_KINDS:
            raise ValueError(f"{path}: unknown score {score!r}")
        centroids = np.asarray(meta["centroids"], np.float32) if meta.get("centroids") is not None else None
        if score == "centroid_cosine" and (centroids is None or centroids.shape[0] != len(labels)):
            raise ValueError(f"{path}: centroid_cosine needs one centroid per label")
        threshold = meta.get("threshold")
        return cls(
            tuple(labels),
            meta.get("taxonomy") or taxonomy_description(labels),
            score,
            None if threshold is None else float(threshold),
            centroids,
            meta.get("note"),
            meta.get("calibration") or {},
        )
