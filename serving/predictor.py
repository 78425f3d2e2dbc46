"""One loaded model version (ONNX encoder + product index) and how the service finds it: registry alias, then cache."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from pipelines.encoder import ONNX_FILE, OnnxEncoder
from pipelines.index import ProductIndex
from pipelines.registry import BUNDLE_ARTIFACT, alias_version, download_bundle, missing_files
from serving.settings import Settings

log = logging.getLogger(__name__)

# Cosines of related products differ by a few tenths; at temperature 1 a softmax over them is almost the plain mean.
# 0.1 lets the products closest to the query dominate the user vector while the rest still contribute.
ATTENTION_TEMPERATURE = 0.1


class ModelUnavailable(RuntimeError):
    """No servable version: the alias cannot be resolved or downloaded and the local cache holds no complete bundle."""


@dataclass(frozen=True)
class Hit:
    product_id: int
    title: str
    score: float


@dataclass
class Predictor:
    """Query encoding, category and (personalised) top-k search over one model version's own product index."""

    encoder: OnnxEncoder
    index: ProductIndex
    version: str
    bundle_dir: Path
    source: str = "bundle_dir"
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @classmethod
    def load(cls, bundle_dir: str | Path, version: str | None = None, threads: int = 0,
             source: str = "bundle_dir") -> Predictor:
        bundle = Path(bundle_dir)
        missing = missing_files(bundle)
        if missing:
            raise ModelUnavailable(f"bundle {bundle} is incomplete, missing: {missing}")
        predictor = cls(OnnxEncoder.load(bundle, threads=threads), ProductIndex.load(bundle),
                        version or local_version(bundle), bundle, source)
        predictor.encode("warm up")  # ORT allocates on its first run; pay that here, not on the first request
        return predictor

    @property
    def labels(self) -> list[str]:
        return self.encoder.labels

    def encode(self, query: str) -> tuple[np.ndarray, str]:
        """(unit query vector, predicted category): one ORT run gives both."""
        emb, logits = self.encoder.encode([query])
        return emb[0], self.encoder.labels[int(logits[0].argmax())]

    def classify(self, query: str) -> str:
        return self.encode(query)[1]

    def user_vector(self, product_ids: list[int], query_vec: np.ndarray | None = None) -> np.ndarray | None:
        """Unit vector of the user's recent products: softmax(q.p_i / T)-weighted, or their mean without a query.

        None when none of the products is in this version's index (a history from another catalog).
        """
        rows = self.index.rows_of(product_ids)
        if len(rows) == 0:
            return None
        products = self.index.embeddings[rows]
        if query_vec is None:
            weights = np.full(len(rows), 1.0 / len(rows), dtype=np.float32)
        else:
            logits = products @ query_vec / ATTENTION_TEMPERATURE
            weights = np.exp(logits - logits.max())
            weights /= weights.sum()
        pooled = weights @ products
        norm = float(np.linalg.norm(pooled))
        return pooled / norm if norm > 1e-6 else None

    def rank(self, query_vec: np.ndarray, k: int, user_vector: np.ndarray | None = None,
             weight: float = 0.0) -> list[Hit]:
        """Top k by cos(q, p) + weight * cos(u, p).

        All vectors are unit length, so that sum is (q + weight * u) . p: one matmul over the catalog, not two.
        """
        vec = query_vec if user_vector is None or weight == 0 else query_vec + weight * user_vector
        rows, scores = self.index.search(vec, k)
        return [Hit(int(self.index.product_ids[r]), str(self.index.titles[r]), float(s))
                for r, s in zip(rows[0], scores[0], strict=True)]

    def search(self, query: str, k: int, user_vector: np.ndarray | None = None, weight: float = 0.0) -> list[Hit]:
        return self.rank(self.encode(query)[0], k, user_vector, weight)


def local_version(bundle_dir: Path) -> str:
    """A fixed bundle has no registry version; the graph's content hash still makes every answer traceable."""
    digest = hashlib.sha256()
    with (bundle_dir / ONNX_FILE).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"local-{digest.hexdigest()[:12]}"


def _cache_dir(settings: Settings) -> Path:
    return settings.paths.serving_cache / settings.model_name


def _cached_bundle_path(cache: Path, version: str) -> Path:
    return cache / version / "model" / "artifacts" / BUNDLE_ARTIFACT  # pipelines.registry.download_bundle's layout


def _pointer(cache: Path, alias: str) -> Path:
    return cache / f"{alias}.json"


def _remember(cache: Path, alias: str, version: str) -> None:
    partial = _pointer(cache, alias).with_suffix(".json.tmp")
    partial.write_text(json.dumps({"version": version}))
    os.replace(partial, _pointer(cache, alias))  # atomic: a crash mid-write never leaves a torn pointer


def cached_bundle(settings: Settings) -> tuple[str, Path] | None:
    """The version this alias last resolved to if its bundle is complete, else the highest complete cached version.

    The pointer comes first because "highest" is wrong after a rollback: the rolled-back version is still cached.
    """
    cache = _cache_dir(settings)
    if not cache.is_dir():
        return None
    candidates: list[str] = []
    with contextlib.suppress(OSError, ValueError, KeyError):  # no pointer yet
        candidates.append(str(json.loads(_pointer(cache, settings.alias).read_text())["version"]))
    candidates += sorted((p.name for p in cache.iterdir() if p.is_dir() and p.name.isdigit()), key=int, reverse=True)
    for version in candidates:
        bundle = _cached_bundle_path(cache, version)
        if bundle.is_dir() and not missing_files(bundle):
            return version, bundle
    return None


def load_champion(settings: Settings, current: Predictor | None = None) -> Predictor:
    """The predictor for settings.alias; returns `current` itself when that version is already loaded.

    Order: a fixed SHOPGUIDE_BUNDLE_DIR; else alias -> version in MLflow, downloaded into the serving cache; else
    (registry unreachable, alias missing, download failed) keep `current` or, at start-up, load the cached bundle
    this alias last resolved to. Raises ModelUnavailable when none of these gives a complete bundle.
    """
    if settings.bundle_dir is not None:
        if current is not None:
            return current
        return Predictor.load(settings.bundle_dir, threads=settings.ort_threads, source="bundle_dir")

    paths, cache = settings.paths, _cache_dir(settings)
    # alias_version folds "registry unreachable" and "no such alias" into None; both mean "use what we have".
    version = alias_version(paths, settings.model_name, settings.alias)
    if version is not None and current is not None and current.version == version:
        return current
    if version is not None:
        try:
            bundle = download_bundle(paths, settings.model_name, version, cache)
            predictor = Predictor.load(bundle, version, settings.ort_threads, source="registry")
        except Exception as exc:  # a broken artifact store or bundle must not take the serving version down
            log.warning("cannot load %s version %s: %s", settings.model_name, version, exc)
        else:
            _remember(cache, settings.alias, version)
            log.info("loaded %s@%s = version %s from the registry", settings.model_name, settings.alias, version)
            return predictor
    else:
        log.warning("cannot resolve %s@%s in the registry at %s", settings.model_name, settings.alias,
                    paths.mlflow_tracking_uri)
    if current is not None:
        return current
    cached = cached_bundle(settings)
    if cached is None:
        raise ModelUnavailable(f"{settings.model_name}@{settings.alias} cannot be resolved or downloaded and "
                               f"{cache} holds no complete bundle")
    version, bundle = cached
    log.warning("serving cached %s version %s (registry unavailable)", settings.model_name, version)
    return Predictor.load(bundle, version, settings.ort_threads, source="cache")
