"""One loaded model version (ONNX encoder + product index) and how the service finds it: registry alias, then cache.

A version's product index can change without a new version (the catalog DAG publishes one and names it in the
version's `catalog_index` tag): every poll reads that tag beside the alias, and a new index is downloaded, verified
against its recorded sha256 manifest, loaded beside the one serving (same encoder) and swapped in like a new version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from dataclasses import InitVar, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from pipelines.registry.mlflow_client import (
    BUNDLE_ARTIFACT,
    BundleMismatch,
    IndexRecord,
    alias_version,
    download_bundle,
    download_index,
    missing_files,
    version_index,
    version_manifest,
)
from pipelines.runtime import personalize
from pipelines.runtime.bundle import ENCODER_FILE, ONNX_FILE, bundle_manifest, manifest_mismatches
from pipelines.runtime.category import CategoryAnswer
from pipelines.runtime.encoder import OnnxEncoder, OrtOptimization
from pipelines.runtime.index import ProductIndex
from pipelines.runtime.lexical import LexicalIndex
from pipelines.runtime.rerank import CrossEncoderReranker, served_top_n
from pipelines.runtime.search import AnnOptions, CatalogSearch, ExactSearch, build_search, wants_ann
from serving.settings import Settings

log = logging.getLogger(__name__)

__all__ = [
    "Hit",
    "LoadOptions",
    "ModelUnavailable",
    "Predictor",
    "load_options",
    "registry_bounds",
    "resolve",
    "verify_cached",
]

# Beside <cache>/<version>/ (outside the folder MLflow downloads into): the sha256 manifest recorded on the version at
# registration, which download_bundle verified the bundle against. A cached bundle is loaded only if it still matches
# it: with the registry down there is nothing else to check it against.
MANIFEST_SUFFIX = ".manifest.json"
_MISMATCHES_SHOWN = 10


class ModelUnavailable(RuntimeError):
    """No servable version: the alias cannot be resolved or downloaded and the local cache holds no complete bundle."""


@contextlib.contextmanager
def registry_bounds(settings: Settings) -> Iterator[None]:
    """Bound every MLflow HTTP request made while the block runs: SHOPGUIDE_REGISTRY_TIMEOUT_SECONDS to connect and
    per read, and no retries (the model poll is the service's retry). Restores the previous values on exit.

    MLflow reads both variables on every request (mlflow.utils.rest_utils.http_request); its defaults, 7 retries
    with exponential backoff and a 120 s timeout, kept a start-up with the tracking server down busy for 265 s
    (connection refused) or over 5 min (a server that accepts and never answers) before it could say "not ready".
    """
    wanted = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(settings.registry_timeout_seconds),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    }
    previous = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass(frozen=True)
class Hit:
    product_id: int
    title: str
    score: float


@dataclass(frozen=True)
class LoadOptions:
    """How Predictor.load builds a version: ORT intra-op threads and graph optimization, the catalog search."""

    threads: int = 1
    optimization: OrtOptimization = "all"
    ann: AnnOptions = field(default_factory=lambda: AnnOptions(min_products=0))  # min_products 0: exact search
    ann_cache: Path | None = None  # where built HNSW graphs are kept (None: rebuilt on every load)
    rerank_top_n: int | None = None  # hybrid results the cross-encoder reranks; None = the version's own setting


@dataclass
class Predictor:
    """Query encoding, category and (personalised) top-k search over one model version's own product index."""

    encoder: OnnxEncoder
    index: ProductIndex
    version: str
    bundle_dir: Path
    source: str = "bundle_dir"
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    backend: InitVar[CatalogSearch | None] = None  # None = brute force
    variant: str | None = None  # encoder.json's quantization, e.g. int8-dynamic-per-channel
    lexical: LexicalIndex | None = None  # hybrid search (BM25 fused with the dense ranking); None = dense only
    index_version: str | None = None  # the catalog index served (its catalog hash); None = the bundle's own index
    reranker: CrossEncoderReranker | None = None  # the version's cross-encoder, loaded only when it reranks
    rerank_top_n: int = 0  # results of the hybrid ranking it reorders per search; 0 = no reranking
    search_backend: CatalogSearch = field(init=False)

    def __post_init__(self, backend: CatalogSearch | None) -> None:
        self.search_backend = backend if backend is not None else ExactSearch(self.index)

    @classmethod
    def load(
        cls,
        bundle_dir: str | Path,
        version: str | None = None,
        source: str = "bundle_dir",
        options: LoadOptions | None = None,
        build_ann: bool = True,
        index_dir: Path | None = None,
        index_version: str | None = None,
    ) -> Predictor:
        """Load, check and warm one bundle; raises on anything unservable (missing files, a graph ORT refuses,
        outputs that do not fit the index), so a hot swap never replaces a working model with a broken one.

        build_ann=False: an HNSW graph that is not cached yet is left for `upgrade_search` (start-up: serve at
        once with exact search rather than be unready for the tens of seconds a build takes). index_dir: a
        published catalog index (a folder holding index/) served instead of the bundle's own.
        """
        options = options or LoadOptions()
        bundle = Path(bundle_dir)
        missing = missing_files(bundle)
        if missing:
            raise ModelUnavailable(f"bundle {bundle} is incomplete, missing: {missing}")
        meta = json.loads((bundle / ENCODER_FILE).read_text())
        # Requests already run in parallel: workers that spin between ops would take the other requests' cores.
        encoder = OnnxEncoder.load(bundle, threads=options.threads, optimization=options.optimization, spinning=False)
        index_from = index_dir or bundle
        index = ProductIndex.load(index_from)
        predictor = cls(
            encoder,
            index,
            version or local_version(bundle),
            bundle,
            source,
            backend=build_search(index, options.ann, options.ann_cache, build_ann),
            variant=meta.get("quantization") or meta.get("variant"),
            lexical=LexicalIndex.load(index_from),
            index_version=index_version,
        )
        predictor.reranker, predictor.rerank_top_n = _reranking(bundle, options)
        return predictor._warmed(index_from)

    def _warmed(self, index_from: Path) -> Predictor:
        # ORT allocates on its first run: pay that here, not on the first request; and prove the graph fits.
        vec, _ = self.encode("warm up")
        if vec.shape != (self.index.embeddings.shape[1],) or not np.isfinite(vec).all():
            raise ModelUnavailable(
                f"{index_from}: the graph's embedding {vec.shape} does not fit the index {self.index.embeddings.shape}"
            )
        self.rank(vec, 10, query="warm up")
        return self

    def with_index(
        self, index_dir: Path, index_version: str | None, options: LoadOptions, build_ann: bool = True
    ) -> Predictor:
        """This version's encoder over another product index (a published catalog index, or index_dir = the bundle
        for its own): a new Predictor, loaded and warmed beside this one, which keeps serving until it is swapped."""
        index = ProductIndex.load(index_dir)
        predictor = Predictor(
            self.encoder,  # one ORT session for both: InferenceSession.run is thread-safe
            index,
            self.version,
            self.bundle_dir,
            self.source,
            backend=build_search(index, options.ann, options.ann_cache, build_ann),
            variant=self.variant,
            lexical=LexicalIndex.load(index_dir),
            index_version=index_version,
            reranker=self.reranker,  # the version's, like the encoder
            rerank_top_n=self.rerank_top_n,
        )
        return predictor._warmed(index_dir)

    @property
    def labels(self) -> list[str]:
        return self.encoder.labels

    def needs_ann(self, ann: AnnOptions) -> bool:
        return self.search_backend.kind == "exact" and wants_ann(self.index, ann)

    def upgrade_search(self, ann: AnnOptions, ann_cache: Path | None = None) -> None:
        """Build the HNSW graph and switch to it (one attribute assignment: requests in flight finish exact)."""
        self.search_backend = build_search(self.index, ann, ann_cache)

    @property
    def search_kind(self) -> str:
        return self.search_backend.kind

    def encode(self, query: str) -> tuple[np.ndarray, CategoryAnswer]:
        """(unit query vector, category answer): one ORT run gives both."""
        emb, logits = self.encoder.encode([query])
        return emb[0], self.categories(logits, emb)[0]

    @property
    def batch_invariant(self) -> bool:
        """Whether a text's outputs are the same alone and inside a batch.

        Not for dynamically quantized INT8 graphs: DynamicQuantizeLinear takes one scale per activation tensor,
        i.e. per batch, so a query's embedding depends on the texts beside it (measured on the 54,667-product
        bundle: cos(alone, in a batch of 8) median 0.991, top-10 overlap 0.91, the same top-10 order for 5% of
        queries). Such graphs encode one text per run, so answers never depend on concurrent traffic.
        """
        return not (self.variant or "").startswith("int8-dynamic")

    def encode_many(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(unit embeddings (n, d), category logits (n, labels)) in input order: one batched run per 64 texts
        (sorted by length) for batch-invariant graphs, one run per text otherwise."""
        if self.batch_invariant or len(texts) == 1:
            return self.encoder.encode(texts, batch_size=64)
        runs = [self.encoder.encode([t]) for t in texts]
        return np.concatenate([e for e, _ in runs]), np.concatenate([lg for _, lg in runs])

    def categories(self, logits: np.ndarray, embeddings: np.ndarray | None = None) -> list[CategoryAnswer]:
        """Per row, the top category and its softmax probability, or no category and why when the query is outside
        the taxonomy: the bundle's calibrated rule (pipelines.runtime.category, the function the evaluation
        measured); a bundle without one answers the top category, as before."""
        return self.encoder.categories(logits, embeddings)

    @property
    def taxonomy(self) -> str:
        return self.encoder.category.taxonomy

    def user_vector(self, product_ids: list[int], query_vec: np.ndarray | None = None) -> np.ndarray | None:
        """pipelines.runtime.personalize.user_vector of the user's recent products (most recent first) in this version's
        index: softmax(q.p_i / T)-weighted with a query, recency-weighted without.

        None when none of the products is in this version's index (a history from another catalog).
        """
        rows = self.index.rows_of(product_ids)
        if len(rows) == 0:
            return None
        return personalize.user_vector(self.index.embeddings[rows], query_vec)

    def rank(
        self,
        query_vec: np.ndarray,
        k: int,
        user_vector: np.ndarray | None = None,
        weight: float = 0.0,
        query: str | None = None,
    ) -> list[Hit]:
        """The answer's top k: `candidates`, then `rerank` when the version reranks (the service calls the two
        apart, to time each)."""
        if query is None:
            return self.candidates(query_vec, k, user_vector, weight)
        return self.rerank(query, self.candidates(query_vec, k, user_vector, weight, query), k)

    @property
    def reranks(self) -> bool:
        return self.reranker is not None and self.rerank_top_n > 0

    def rerank(self, query: str, hits: list[Hit], k: int) -> list[Hit]:
        """The first rerank_top_n hits reordered by the cross-encoder (scored sigmoid(logit), pipelines.runtime.rerank),
        the rest in their order: the top k. Without reranking, the first k hits as they are."""
        if not self.reranks or not hits:
            return hits[:k]
        assert self.reranker is not None
        rows, scores = self.reranker.rerank(
            query,
            np.arange(len(hits)),
            np.asarray([h.score for h in hits], np.float32),
            [h.title for h in hits],
            self.rerank_top_n,
        )
        return [Hit(hits[r].product_id, hits[r].title, float(s)) for r, s in zip(rows[:k], scores[:k], strict=True)]

    def candidates(
        self,
        query_vec: np.ndarray,
        k: int,
        user_vector: np.ndarray | None = None,
        weight: float = 0.0,
        query: str | None = None,
    ) -> list[Hit]:
        """Top k by cos(q, p) + weight * cos(u, p), fused with BM25 on the query text when the version has a
        lexical index (scores are then the fused ones, in [0, 1]); at least rerank_top_n deep when the version
        reranks a query's results.

        All vectors are unit length, so that sum is (q + weight * u) . p: one matmul over the catalog, not two.
        """
        if query is not None and self.reranks:
            k = max(k, self.rerank_top_n)
        vec = query_vec if user_vector is None or weight == 0 else query_vec + weight * user_vector
        if self.lexical is not None and query is not None:
            # the same candidate depth as evaluation: min-max normalisation, hence the ranking, depends on it
            dense = self.search_backend.top_k(vec, self.lexical.depth(k))
            rows, scores = self.lexical.hybrid([query], [dense], k)[0]
        else:
            rows, scores = self.search_backend.top_k(vec, k)
        return [
            Hit(int(self.index.product_ids[r]), str(self.index.titles[r]), float(s))
            for r, s in zip(rows, scores, strict=True)
        ]


def _reranking(bundle: Path, options: LoadOptions) -> tuple[CrossEncoderReranker | None, int]:
    """The version's reranker and depth: options.rerank_top_n (the service's setting) or the bundle's own, the
    cross-encoder loaded only when that depth is above 0 (a bundle without one serves the hybrid ranking)."""
    own = served_top_n(bundle)
    top_n = options.rerank_top_n if options.rerank_top_n is not None else (own or 0)
    if own is None or top_n == 0:
        if top_n:
            log.warning("%s has no reranker: serving without (rerank_top_n %d asked for)", bundle, top_n)
        return None, 0
    # one intra-op thread and no spinning, as the encoder: requests already run in parallel
    reranker = CrossEncoderReranker.load(bundle, options.threads, options.optimization, spinning=False)
    return reranker, top_n


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
    return cache / version / "model" / "artifacts" / BUNDLE_ARTIFACT  # mlflow_client.download_bundle's layout


def _pointer(cache: Path, alias: str) -> Path:
    return cache / f"{alias}.json"


def _import_mlflow_http_plugins(tracking_uri: str) -> None:
    """Before MLflow's first HTTP request: import Feast the service's way (without torch).

    That request loads MLflow's request-header plugins (entry points), and Feast registers one
    (feast.infra.data_sources.mlflow.auth), whose import pulls in the feast package and, through it, torch: 14-16 s
    and ~180 MB on a busy 2-core machine, on the start-up path, in a service that never uses torch. With Feast
    already imported, loading the plugin costs ~2 s and no torch.
    """
    if tracking_uri.startswith(("http://", "https://")) and "feast" not in sys.modules:
        from pipelines.features.store import import_feast

        import_feast()


def _manifest_file(cache: Path, version: str) -> Path:
    return cache / f"{version}{MANIFEST_SUFFIX}"


def _save_manifest(cache: Path, version: str, manifest: dict[str, str]) -> None:
    target = _manifest_file(cache, version)
    # a unique partial name: replicas sharing the cache volume may save the same version at once
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    partial.write_text(json.dumps(manifest, indent=0, sort_keys=True))
    os.replace(partial, target)


def verify_cached(cache: Path, version: str, bundle: Path) -> None:
    """Raise BundleMismatch unless the cached `bundle` of `version` matches, file by file (sha256), the manifest
    saved beside it when it was downloaded and verified. A bundle without a saved manifest (cached before manifests,
    or by a download that did not finish) is not trusted."""
    where = _manifest_file(cache, version)
    try:
        manifest = json.loads(where.read_text())
    except FileNotFoundError:
        raise BundleMismatch(f"cached version {version} has no verified manifest ({where}): not trusted") from None
    except (OSError, ValueError) as exc:
        raise BundleMismatch(f"cached version {version}: its manifest {where} is unreadable: {exc}") from exc
    if not isinstance(manifest, dict) or not manifest:
        raise BundleMismatch(f"cached version {version}: its manifest {where} lists no files")
    mismatches = manifest_mismatches(bundle, manifest)
    if mismatches:
        shown = ", ".join(mismatches[:_MISMATCHES_SHOWN])
        more = f" and {len(mismatches) - _MISMATCHES_SHOWN} more" if len(mismatches) > _MISMATCHES_SHOWN else ""
        raise BundleMismatch(f"cached version {version} differs from the manifest verified at download: {shown}{more}")


def _download_verified(settings: Settings, version: str) -> Path:
    """The version's bundle in the serving cache, verified by download_bundle against the manifest recorded at
    registration (a cached copy that differs is downloaded again), with that manifest saved beside it for start-ups
    with the registry down."""
    paths, cache = settings.paths, _cache_dir(settings)
    recorded = version_manifest(paths, settings.model_name, version)
    bundle = download_bundle(paths, settings.model_name, version, cache)
    # A version registered before manifests has no record (download_bundle logs it as unverified): save what the
    # registry served, so that a later change to the cached copy still shows.
    _save_manifest(cache, version, recorded if recorded is not None else bundle_manifest(bundle))
    return bundle


# Inside the version's cache folder, so that retention removes them with it: <cache>/<version>/catalog-index/<hash>/
INDEX_CACHE = "catalog-index"
# Beside the manifest: the index record the version served when it was last loaded from the registry (absent: the
# bundle's own index). A start-up from the cache serves that index, verified, or not this version at all: the
# bundle's own index could hold products the catalog has removed since.
INDEX_RECORD_SUFFIX = ".index.json"


def _index_verified(settings: Settings, version: str, record: IndexRecord) -> Path:
    """The record's catalog index in the version's cache folder, verified against its manifest; older index
    versions of that folder are removed (a loaded index lives in memory, nothing reads its files again)."""
    folder = _cache_dir(settings) / version / INDEX_CACHE
    index_dir = download_index(settings.paths, record, folder)
    for other in folder.iterdir():
        if other.is_dir() and other.name != record.version and not other.name.startswith("."):
            shutil.rmtree(other, ignore_errors=True)
    return index_dir


def _save_index_record(cache: Path, version: str, record: IndexRecord | None) -> None:
    target = cache / f"{version}{INDEX_RECORD_SUFFIX}"
    if record is None:
        target.unlink(missing_ok=True)
        return
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    partial.write_text(record.to_json())
    os.replace(partial, target)


def cached_index(cache: Path, version: str) -> tuple[Path | None, str | None]:
    """(index folder, index version) a cached version last served: (None, None) for its bundle's own index.
    Raises BundleMismatch when a recorded catalog index is missing or differs from its manifest."""
    where = cache / f"{version}{INDEX_RECORD_SUFFIX}"
    if not where.is_file():
        return None, None
    record = IndexRecord.from_json(where.read_text(), f"cached version {version}")
    index_dir = cache / version / INDEX_CACHE / record.version
    mismatches = manifest_mismatches(index_dir, record.manifest) if index_dir.is_dir() else ["missing: the folder"]
    if mismatches:
        raise BundleMismatch(f"cached version {version}: its catalog index {record.version}: {mismatches[:3]}")
    return index_dir, record.version


def _remember(cache: Path, alias: str, version: str) -> None:
    partial = _pointer(cache, alias).with_suffix(".json.tmp")
    partial.write_text(json.dumps({"version": version}))
    os.replace(partial, _pointer(cache, alias))  # atomic: a crash mid-write never leaves a torn pointer


def cached_bundles(settings: Settings, alias: str | None = None) -> list[tuple[str, Path]]:
    """Complete cached bundles, best first: the version this alias last resolved to, then the highest versions.

    The pointer comes first because "highest" is wrong after a rollback: the rolled-back version is still cached.
    """
    cache = _cache_dir(settings)
    if not cache.is_dir():
        return []
    candidates: list[str] = []
    with contextlib.suppress(OSError, ValueError, KeyError):  # no pointer yet
        candidates.append(str(json.loads(_pointer(cache, alias or settings.alias).read_text())["version"]))
    candidates += sorted((p.name for p in cache.iterdir() if p.is_dir() and p.name.isdigit()), key=int, reverse=True)
    found: list[tuple[str, Path]] = []
    for version in dict.fromkeys(candidates):
        bundle = _cached_bundle_path(cache, version)
        if bundle.is_dir() and not missing_files(bundle):
            found.append((version, bundle))
    return found


def load_options(settings: Settings) -> LoadOptions:
    """Predictor.load's tuning from the settings."""
    ann = AnnOptions(
        min_products=settings.ann_min_products,
        connectivity=settings.ann_connectivity,
        expansion_search=settings.ann_ef_search,
    )
    return LoadOptions(
        settings.ort_threads,
        settings.ort_optimization,
        ann,
        settings.paths.serving_cache / "ann",
        settings.rerank_top_n,
    )


@dataclass(frozen=True)
class Resolution:
    """What one resolve of an alias gave: the predictor to serve and, when it is not what the alias points to
    (registry unreachable, a version that fails to load), why."""

    predictor: Predictor
    problem: str | None = None
    outcome: str = "unchanged"  # unchanged | loaded | registry_unavailable | load_failed | cache


def resolve(
    settings: Settings, current: Predictor | None = None, alias: str | None = None, use_cache: bool = True
) -> Resolution:
    """The predictor for `alias` (default settings.alias); `current` itself when that version is already loaded.

    Order: a fixed SHOPGUIDE_BUNDLE_DIR; else alias -> version in MLflow, downloaded into the serving cache, loaded
    and warmed beside `current`; else (registry unreachable, alias missing, download or load failed) keep `current`
    or, at start-up (and with `use_cache`), load the cached bundle this alias last resolved to. Raises
    ModelUnavailable when none of these gives a servable bundle.
    """
    alias = alias or settings.alias
    # A swap builds a missing HNSW graph before it swaps (the old version serves meanwhile); a start-up does not.
    options, build_ann = load_options(settings), current is not None
    if settings.bundle_dir is not None:
        if current is not None:
            return Resolution(current)
        predictor = Predictor.load(settings.bundle_dir, source="bundle_dir", options=options, build_ann=build_ann)
        return Resolution(predictor, outcome="loaded")

    paths, cache = settings.paths, _cache_dir(settings)
    # "No such alias" (None) and "registry unreachable" (an error) both mean "use what we have".
    _import_mlflow_http_plugins(paths.mlflow_tracking_uri)
    record: IndexRecord | None = None
    try:
        version = alias_version(paths, settings.model_name, alias)
        # the catalog index the version serves now (None: its bundle's own); read on every poll, like the alias
        record = version_index(paths, settings.model_name, version) if version is not None else None
        unresolved = ""
    except Exception as exc:
        version, unresolved = None, f": {type(exc).__name__}: {exc}"[:300]
    wanted_index = record.version if record is not None else None
    if version is not None and current is not None and current.version == version:
        if current.index_version == wanted_index:
            return Resolution(current)
        try:  # the same encoder over the newly published index, loaded beside the serving one
            index_dir = _index_verified(settings, version, record) if record is not None else current.bundle_dir
            predictor = current.with_index(index_dir, wanted_index, options, build_ann)
        except Exception as exc:
            problem = f"{alias} -> version {version} catalog index {wanted_index} not loaded: {type(exc).__name__}: "
            log.warning("cannot load the catalog index %s of version %s: %s", wanted_index, version, exc)
            return Resolution(current, f"{problem}{exc}"[:400], "load_failed")
        _save_index_record(cache, version, record)
        log.info("version %s: catalog index %s -> %s", version, current.index_version, wanted_index)
        return Resolution(predictor, outcome="loaded")
    if version is not None:
        try:
            bundle = _download_verified(settings, version)
            overlay = _index_verified(settings, version, record) if record is not None else None
            predictor = Predictor.load(bundle, version, "registry", options, build_ann, overlay, wanted_index)
        except Exception as exc:  # a broken artifact store or bundle must not take the serving version down
            problem = f"{alias} -> version {version} not loaded: {type(exc).__name__}: {exc}"[:400]
            outcome = "load_failed"
            log.warning("cannot load %s version %s: %s", settings.model_name, version, exc)
        else:
            _save_index_record(cache, version, record)
            _remember(cache, alias, version)
            log.info("loaded %s@%s = version %s from the registry", settings.model_name, alias, version)
            return Resolution(predictor, outcome="loaded")
    else:
        problem = f"cannot resolve {settings.model_name}@{alias} in the registry{unresolved}"[:400]
        outcome = "registry_unavailable"
        log.warning(
            "cannot resolve %s@%s in the registry at %s%s",
            settings.model_name,
            alias,
            paths.mlflow_tracking_uri,
            unresolved,
        )
    if current is not None:
        return Resolution(current, problem, outcome)
    for cached_version, bundle in cached_bundles(settings, alias) if use_cache else []:
        if cached_version == version:
            continue  # it just failed to load
        try:
            verify_cached(cache, cached_version, bundle)
            cached_overlay, cached_index_version = cached_index(cache, cached_version)
        except BundleMismatch as exc:
            log.error("refusing cached %s version %s: %s", settings.model_name, cached_version, exc)
            problem = f"refused {exc}; {problem}"  # first: readiness details are cut at 400 characters
            continue
        try:
            predictor = Predictor.load(
                bundle, cached_version, "cache", options, build_ann, cached_overlay, cached_index_version
            )
        except Exception as exc:
            log.warning("cached %s version %s not loadable: %s", settings.model_name, cached_version, exc)
            continue
        log.warning("serving cached %s version %s (%s)", settings.model_name, cached_version, problem)
        return Resolution(predictor, problem, "cache")
    # why first: readiness details are cut at 400 characters
    raise ModelUnavailable(f"{settings.model_name}@{alias}: {problem}; and no loadable bundle in the cache {cache}")
