"""The only MLflow client user: tracking runs, registering bundles, moving the champion/challenger aliases."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.config import REPO_ROOT, Paths
from pipelines.runtime.bundle import (
    ENCODER_FILE,
    INDEX_DIR,
    MODEL_CARD_FILE,
    REPORT_FILE,
    REQUIRED_FILES,
    bundle_manifest,
    manifest_mismatches,
)

if TYPE_CHECKING:
    from pipelines.registry.locks import FolderLock, PostgresAdvisoryLock

log = logging.getLogger(__name__)

EXPERIMENT = "shopguide"
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
BUNDLE_ARTIFACT = "bundle"
CHAMPION, CHALLENGER = "champion", "challenger"
# A registered version's sha256 manifest of its bundle ({relative path: hex digest}, compact JSON). Registry tag values
# are VARCHAR(5000) in MLflow's SQL stores: a manifest that does not fit (a bundle of ~50+ files) goes to a run
# artifact outside the bundle, and the tag then holds "sha256:<digest of that JSON>" with its URI in a second tag.
MANIFEST_TAG = "bundle_sha256"
# The as-of time of the snapshot a run froze (ISO 8601): on its MLflow run and on the version it registers.
DATA_AS_OF_TAG = "data_as_of"
MANIFEST_URI_TAG = "bundle_manifest_uri"
_TAG_MAX = 5000
_MISMATCHES_SHOWN = 5


class BundleMismatch(RuntimeError):
    """A bundle differs from the sha256 manifest recorded when its version was registered (or that record is bad)."""


class ReportUnreadable(ValueError):
    """A version's stored evaluation report exists but is not a JSON object."""


def is_absent(err: BaseException) -> bool:
    """MLflow confirmed that the thing does not exist. Only this may read as "none": a refused connection, a 5xx, a
    locked or corrupt store are errors, and reading them as "no champion" would let the gate pass on floors alone."""
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and err.error_code == "RESOURCE_DOES_NOT_EXIST"


def filter_literal(value: str) -> str:
    """`value` as a string literal of MLflow's search filter syntax, matching it exactly; ValueError if impossible.

    MLflow strips the outer quotes and unescapes nothing ('it''s' and 'it\\'s' are compared as typed), so the only
    exact quoting is the quote character the value does not contain. A value holding both quote characters cannot be
    written at all, and a backslash can escape the closing quote in MLflow's tokenizer (sqlparse): such values (never
    an Airflow run id) are refused rather than allowed to change the filter.
    """
    if "\\" in value or any(ord(ch) < 32 for ch in value) or ("'" in value and '"' in value):
        raise ValueError(
            f"{value[:60]!r}{'...' if len(value) > 60 else ''} cannot be matched exactly in an MLflow search filter "
            "(it holds both quote characters, a backslash or a control character)"
        )
    return f'"{value}"' if "'" in value else f"'{value}'"


def client(paths: Paths):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(paths.mlflow_tracking_uri)
    mlflow.set_registry_uri(paths.mlflow_tracking_uri)
    return MlflowClient(paths.mlflow_tracking_uri, paths.mlflow_tracking_uri)


def experiment_id(paths: Paths, name: str = EXPERIMENT) -> str:
    """The shopguide experiment (or another of this project's: `name`), with artifacts under SHOPGUIDE_HOME (not
    ./mlruns of whatever cwd)."""
    c = client(paths)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    paths.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
    location = paths.mlflow_artifacts if name == EXPERIMENT else paths.mlflow_artifacts / name
    return c.create_experiment(name, artifact_location=location.as_uri())


def start_run(paths: Paths, run_key: str, tags: dict[str, str], experiment: str = EXPERIMENT) -> str:
    """One MLflow run per pipeline run, found again by its key so a re-run of the same DAG run reuses it."""
    c = client(paths)
    exp = experiment_id(paths, experiment)
    # filter_literal refuses a key it cannot quote exactly, so such a key never creates a run
    found = c.search_runs([exp], filter_string=f"tags.shopguide_run_key = {filter_literal(run_key)}", max_results=1)
    if found:
        return found[0].info.run_id
    run = c.create_run(exp, run_name=run_key, tags={"shopguide_run_key": run_key, **tags})
    c.set_terminated(run.info.run_id, status="RUNNING")
    return run.info.run_id


def log_step(
    paths: Paths,
    run_id: str,
    step: str,
    metrics: dict[str, Any],
    params: dict[str, Any] | None = None,
) -> None:
    """Numeric metrics as `<step>.<name>` and params once (curves come through metrics_sink while a step runs)."""
    import time

    from mlflow.entities import Metric, Param

    c = client(paths)
    now = int(time.time() * 1000)
    flat = [
        Metric(f"{step}.{k}", float(v), now, 0)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    existing = c.get_run(run_id).data.params
    new_params = [
        Param(f"{step}.{k}", str(v)[:6000]) for k, v in (params or {}).items() if f"{step}.{k}" not in existing
    ]  # params are immutable in MLflow: a retried task skips them
    c.log_batch(run_id, metrics=flat, params=new_params)
    c.log_dict(run_id, metrics, f"steps/{step}.json")


def metrics_sink(paths: Paths, run_id: str) -> Callable[[dict[str, float], int], None]:
    """metrics, step -> logged on the run now: training curves fill in while the task runs."""
    import time

    from mlflow.entities import Metric

    c = client(paths)

    def log(metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        c.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    return log


def end_run(paths: Paths, run_id: str, status: str = "FINISHED") -> None:
    client(paths).set_terminated(run_id, status=status)


def log_file(paths: Paths, run_id: str, path: Path, artifact_path: str | None = None) -> None:
    """One file as an artifact of the run (a report); logging it again replaces it."""
    client(paths).log_artifact(run_id, str(path), artifact_path)


def set_run_tags(paths: Paths, run_id: str, tags: dict[str, str]) -> None:
    c = client(paths)
    for key, value in tags.items():
        c.set_tag(run_id, key, value[:_TAG_MAX])


def write_model_card(
    bundle_dir: Path,
    report: dict[str, Any],
    champion: dict[str, Any] | None,
    decision: dict[str, Any],
    lineage: dict[str, str],
) -> None:
    rows = "\n".join(
        f"| {k} | {report[k]:.4f} | {champion.get(k, float('nan')) if champion else float('nan'):.4f} |"
        for k in (
            "ndcg_at_10",
            "dense_ndcg_at_10",
            "bm25_ndcg_at_10",
            "mrr_at_10",
            "recall_at_100",
            "category_accuracy",
            "latency_p99_ms",
            "lexical_latency_p99_ms",
            "size_mb",
        )
        if isinstance(report.get(k), int | float)
    )
    encoder = json.loads((bundle_dir / ENCODER_FILE).read_text())
    reasons = "\n".join(f"- {r}" for r in decision.get("reasons", []))
    search = (
        f"Hybrid: BM25 over the titles fused with the dense ranking, lexical weight {report['lexical_weight']} "
        "(chosen on validation terms); ndcg_at_10 is the fused ranking, dense_ndcg_at_10 the encoder alone."
        if report.get("lexical_weight") is not None
        else "Dense only."
    )
    card = f"""# shopguide-encoder

Sentence encoder (mean pooling, L2-normalised) with a category head, served as ONNX ({encoder.get("quantization")}).
Fine-tuned from all-MiniLM-L6-v2 on Home Depot search relevance (real), category head on PriceRunner (real).

## Data snapshot
`{report.get("snapshot_hash")}`; held-out search terms: {report.get("heldout_terms")};
catalog: {report.get("catalog_products")} products

## Metrics (candidate vs champion at evaluation time)
| metric | candidate | champion |
| --- | --- | --- |
{rows}

## Search
{search}

## Compression
Served variant: `{report.get("variant") or "teacher-int8"}`. {report.get("compression_reason") or ""}

## Gate: {"passed" if decision.get("passed") else "failed"}
{reasons}

## Lineage
{chr(10).join(f"- {k}: {v}" for k, v in lineage.items())}
"""
    (bundle_dir / MODEL_CARD_FILE).write_text(card)


def missing_files(bundle_dir: Path) -> list[str]:
    return [f for f in REQUIRED_FILES if not (bundle_dir / f).is_file()]


def find_version(paths: Paths, model_name: str, run_key: str):
    """The version a previous attempt of this pipeline run registered, if any (idempotent re-runs).

    A search over a registered model that does not exist yet is empty, not an error; any error raises, because
    "not found" after a registry hiccup would register the same run a second time.
    """
    query = f"name = {filter_literal(model_name)} and tags.shopguide_run_key = {filter_literal(run_key)}"
    versions = client(paths).search_model_versions(query)
    return versions[0] if versions else None


# Distributions the pyfunc's loader imports (pyfunc_model.py -> pipelines.runtime: onnxruntime, tokenizers, bm25s,
# Stemmer, scipy through bm25s) or MLflow loads it with. tests/integration/test_pyfunc_requirements.py compares this
# with what a real load + predict imports in a fresh interpreter.
PYFUNC_DISTRIBUTIONS = (
    "mlflow",
    "onnxruntime",
    "tokenizers",
    "numpy",
    "pandas",
    "pyarrow",
    "bm25s",
    "PyStemmer",
    "scipy",
)


def pyfunc_requirements() -> list[str]:
    """PYFUNC_DISTRIBUTIONS pinned to the versions installed here: the ones the bundle was built and evaluated with
    (each inside pyproject.toml's range, which is what installed them). Not inferred by MLflow: that would load the
    model in a subprocess for nothing."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in PYFUNC_DISTRIBUTIONS:
        try:
            out.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:  # cannot happen where the bundle was built; keep the name rather than drop it
            out.append(dist)
    return out


def _manifest_tags(paths: Paths, run_id: str, manifest: dict[str, str]) -> dict[str, str]:
    """The version tags that record `manifest` (MANIFEST_TAG, and MANIFEST_URI_TAG when it is too big for a tag)."""
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    if len(text) <= _TAG_MAX:
        return {MANIFEST_TAG: text}
    digest = hashlib.sha256(text.encode()).hexdigest()
    c = client(paths)
    artifact = f"bundle_manifests/{digest}.json"  # content-addressed, beside (not inside) the logged model
    c.log_text(run_id, text, artifact)
    return {MANIFEST_TAG: f"sha256:{digest}", MANIFEST_URI_TAG: f"{c.get_run(run_id).info.artifact_uri}/{artifact}"}


def _manifest_from_tags(tags: dict[str, str], what: str) -> dict[str, str] | None:
    """The manifest a version's tags record; None when it has none (registered before manifests were recorded)."""
    import mlflow

    value = tags.get(MANIFEST_TAG)
    if value is None:
        return None
    if value.startswith("sha256:"):
        uri = tags.get(MANIFEST_URI_TAG)
        if not uri:
            raise BundleMismatch(f"{what}: {MANIFEST_TAG} names a manifest artifact but {MANIFEST_URI_TAG} is unset")
        text = mlflow.artifacts.load_text(uri)
        if hashlib.sha256(text.encode()).hexdigest() != value.removeprefix("sha256:"):
            raise BundleMismatch(f"{what}: the manifest at {uri} does not match the sha256 recorded on the version")
    else:
        text = value
    try:
        manifest = json.loads(text)
    except ValueError as err:
        raise BundleMismatch(f"{what}: its recorded manifest is not JSON: {err}") from err
    if not isinstance(manifest, dict) or not manifest or not all(isinstance(v, str) for v in manifest.values()):
        raise BundleMismatch(f"{what}: its recorded manifest is not a non-empty {{path: sha256}} object")
    return manifest


def version_tags(paths: Paths, model_name: str, version: str) -> dict[str, str]:
    """A registered version's tags (lineage: run key, data snapshot, gate result)."""
    return dict(client(paths).get_model_version(model_name, str(version)).tags)


def data_as_of(paths: Paths, model_name: str, version: str) -> datetime | None:
    """The as-of time of the snapshot `version` was trained on: its DATA_AS_OF_TAG, else its source run's, else that
    run's start time (versions registered before the tag existed: the snapshot step opens the run right after it
    froze the data, so the start is seconds after the as-of time); None for a version without a source run.
    Registry errors raise."""
    c = client(paths)
    mv = c.get_model_version(model_name, str(version))
    tagged = mv.tags.get(DATA_AS_OF_TAG)
    if not tagged and mv.run_id:
        run = c.get_run(mv.run_id)
        tagged = run.data.tags.get(DATA_AS_OF_TAG)
        if not tagged:
            return datetime.fromtimestamp(run.info.start_time / 1000, UTC)
    if not tagged:
        return None
    at = datetime.fromisoformat(tagged)
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def version_manifest(paths: Paths, model_name: str, version: str) -> dict[str, str] | None:
    """The sha256 of every file of a version's bundle, as recorded at registration ({path relative to the bundle:
    hex digest}); None for a version registered without one. Raises when the version does not exist or the registry
    cannot be read, and BundleMismatch when the record itself is inconsistent."""
    mv = client(paths).get_model_version(model_name, str(version))
    return _manifest_from_tags(mv.tags, f"{model_name} version {version}")


def register_bundle(
    paths: Paths, run_id: str, bundle_dir: str | Path, model_name: str, run_key: str, tags: dict[str, str]
) -> str:
    """Log the bundle as a pyfunc (models-from-code over ONNX Runtime) and register it; returns the version."""
    import tempfile

    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    bundle = Path(bundle_dir)
    missing = missing_files(bundle)
    if missing:
        raise FileNotFoundError(f"bundle {bundle} is incomplete, missing: {missing}")
    existing = find_version(paths, model_name, run_key)
    if existing is not None:
        return str(existing.version)
    client(paths)
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "query")]),
        outputs=Schema([ColSpec("string", "query"), ColSpec("string", "category")]),
        params=ParamSchema([ParamSpec("k", "long", 10)]),
    )
    with tempfile.TemporaryDirectory(prefix="shopguide-register-") as tmp, mlflow.start_run(run_id=run_id):
        if bundle.name != BUNDLE_ARTIFACT:
            # MLflow stores a directory artifact under its own basename, and every reader expects artifacts/bundle
            bundle = Path(shutil.copytree(bundle, Path(tmp) / BUNDLE_ARTIFACT))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_FILE),
            artifacts={BUNDLE_ARTIFACT: str(bundle)},
            code_paths=[str(REPO_ROOT / "pipelines")],
            signature=signature,
            input_example=pd.DataFrame({"query": ["cordless drill"]}),
            pip_requirements=pyfunc_requirements(),
        )
        # the files exactly as logged (the copy above, model card included): what every download is checked against
        manifest = _manifest_tags(paths, run_id, bundle_manifest(bundle))
    version = mlflow.register_model(info.model_uri, model_name, tags={"shopguide_run_key": run_key, **tags, **manifest})
    return str(version.version)


def set_alias(paths: Paths, model_name: str, alias: str, version: str, tags: dict[str, str] | None = None) -> None:
    """The alias move is the one atomic step; who/why goes onto the version as tags."""
    c = client(paths)
    c.set_registered_model_alias(model_name, alias, str(version))
    for k, v in (tags or {}).items():
        c.set_model_version_tag(model_name, str(version), k, v)


def alias_version(paths: Paths, model_name: str, alias: str) -> str | None:
    """The version `alias` points to; None only when MLflow confirms there is no such model or alias.

    Read from the registered model's alias map rather than get_model_version_by_alias: a missing alias is
    INVALID_PARAMETER_VALUE there (MLflow 3's SQL and file stores), which cannot be told from a real bad request.
    """
    try:
        model = client(paths).get_registered_model(model_name)
    except Exception as err:
        if is_absent(err):
            return None
        raise
    version = model.aliases.get(alias)
    return None if version is None else str(version)


def _bundle_in(model_dir: Path) -> Path:
    return model_dir / "model" / "artifacts" / BUNDLE_ARTIFACT


def _mismatches(bundle: Path, manifest: dict[str, str] | None) -> list[str]:
    """Why `bundle` is not the registered one: required files missing, then sha256 differences (empty = good)."""
    if not bundle.is_dir():
        return ["missing: the whole bundle"]
    missing = [f"missing: {f}" for f in missing_files(bundle)]
    return missing or ([] if manifest is None else manifest_mismatches(bundle, manifest))


def _describe(mismatches: list[str]) -> str:
    more = len(mismatches) - _MISMATCHES_SHOWN
    return ", ".join(mismatches[:_MISMATCHES_SHOWN]) + (f" and {more} more" if more > 0 else "")


def _discard(folder: Path) -> None:
    """Remove a folder another process may be renaming or reading: first out of the way under a unique name."""
    trash = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.discard")
    try:
        os.rename(folder, trash)
    except FileNotFoundError:  # another process discarded it first
        return
    shutil.rmtree(trash, ignore_errors=True)


def download_bundle(paths: Paths, model_name: str, version: str, dst: str | Path) -> Path:
    """Fetch a version's bundle into dst/<version>/ and verify it; returns dst/<version>/model/artifacts/bundle.

    The files are checked against the sha256 manifest recorded at registration (version_manifest) after every
    download, and a copy already in dst/<version> is checked before it is reused; a mismatch raises BundleMismatch
    naming the files, and the bad download is deleted (it never sits at dst/<version>). Versions registered before
    manifests were recorded are only checked for the required files (logged as unverified).

    Safe for several processes sharing `dst` (replicas on one volume): each downloads into its own mkdtemp folder and
    renames it into place; whoever renames second keeps the first one's verified copy and deletes its own.
    """
    import tempfile

    import mlflow

    client(paths)
    version = str(version)
    what = f"{model_name} version {version}"
    manifest = version_manifest(paths, model_name, version)
    if manifest is None:
        log.warning("%s has no recorded sha256 manifest (registered before them): its files are not verified", what)
    parent = Path(dst)
    parent.mkdir(parents=True, exist_ok=True)
    target = parent / version
    if target.exists():
        if not _mismatches(_bundle_in(target), manifest):
            return _bundle_in(target)
        log.warning("%s: the copy in %s is not the registered one, downloading again", what, target)
        _discard(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".partial", dir=parent))
    try:
        (tmp / "model").mkdir()
        mlflow.artifacts.download_artifacts(f"models:/{model_name}/{version}", dst_path=str(tmp / "model"))
        bad = _mismatches(_bundle_in(tmp), manifest)
        if bad:
            raise BundleMismatch(f"{what}: the downloaded bundle differs from its recorded manifest: {_describe(bad)}")
        for _ in range(3):
            try:
                os.rename(tmp, target)  # atomic; fails when another process put a (non-empty) copy there first
                return _bundle_in(target)
            except OSError:
                if not target.exists():
                    continue
                if not _mismatches(_bundle_in(target), manifest):
                    return _bundle_in(target)  # theirs is verified: ours is deleted below
                _discard(target)
        raise BundleMismatch(f"{what}: could not put a verified copy at {target} (other processes kept replacing it)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def version_report(paths: Paths, model_name: str, version: str) -> dict[str, Any] | None:
    """The evaluation report stored with a version (what the gate compares a candidate with).

    None only when MLflow confirms the version or its report file does not exist; ReportUnreadable when it exists but
    is not a JSON object; any other error (registry or artifact store unreachable) raises as it is.
    """
    import mlflow

    client(paths)
    uri = f"models:/{model_name}/{version}/artifacts/{BUNDLE_ARTIFACT}/{REPORT_FILE}"
    try:
        text = mlflow.artifacts.load_text(uri)
    except Exception as err:
        if is_absent(err):
            return None
        raise
    try:
        report = json.loads(text)
    except ValueError as err:
        raise ReportUnreadable(f"{REPORT_FILE} of {model_name} version {version} is not JSON: {err}") from err
    if not isinstance(report, dict):
        raise ReportUnreadable(f"{REPORT_FILE} of {model_name} version {version} is not a JSON object")
    return report


# --- catalog indexes ------------------------------------------------------------------------------------------------
# A version's product index can be replaced without a new version (the catalog DAG: products arrive and leave). The
# new index folder (index/embeddings.npy, index/products.parquet, index/bm25/) is logged under the version's own run
# as `catalog_index/<index version>/`, and ONE version tag, INDEX_TAG, records it as compact JSON: {version, uri,
# sha256 manifest of its files, products, catalog_hash, published_at, run_key}. One tag, so that a reader never sees
# the new version beside the old URI: setting it is the atomic step the service watches. INDEX_VERSION_TAG repeats
# the index version for people (the registry UI); nothing reads it.
INDEX_TAG = "catalog_index"
INDEX_VERSION_TAG = "index_version"
INDEX_ARTIFACT = "catalog_index"


@dataclass(frozen=True)
class IndexRecord:
    """The catalog index a version serves instead of its bundle's own (what INDEX_TAG holds)."""

    version: str  # the catalog's content hash (pipelines.data.catalog.catalog_hash)
    uri: str  # artifact URI of the folder holding index/
    manifest: dict[str, str]  # sha256 of every file, relative to that folder
    products: int
    published_at: str
    run_key: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, what: str) -> IndexRecord:
        try:
            raw = json.loads(text)
            record = cls(**raw)
        except (ValueError, TypeError) as err:
            raise BundleMismatch(f"{what}: its {INDEX_TAG} tag is not an index record: {err}") from err
        if not record.manifest or not all(isinstance(v, str) for v in record.manifest.values()):
            raise BundleMismatch(f"{what}: its {INDEX_TAG} tag lists no files")
        return record


def version_index(paths: Paths, model_name: str, version: str) -> IndexRecord | None:
    """The catalog index `version` serves; None when it serves its bundle's own. Registry errors raise."""
    mv = client(paths).get_model_version(model_name, str(version))
    text = mv.tags.get(INDEX_TAG)
    return None if not text else IndexRecord.from_json(text, f"{model_name} version {version}")


def publish_index(
    paths: Paths,
    model_name: str,
    version: str,
    index_dir: str | Path,
    index_version: str,
    products: int,
    run_key: str,
) -> IndexRecord:
    """Log `index_dir` (holding index/) under the version's run and point the version's INDEX_TAG at it: from the
    next poll the service answers from this index with the same encoder. Neither an alias nor a version is created.
    Publishing the index version the tag already names changes nothing (a re-run of the same DAG run)."""
    c = client(paths)
    folder = Path(index_dir)
    current = version_index(paths, model_name, version)
    if current is not None and current.version == index_version:
        return current
    mv = c.get_model_version(model_name, str(version))
    if not mv.run_id:
        raise ValueError(f"{model_name} version {version} has no source run to log an index under")
    manifest = bundle_manifest(folder)
    if not any(f.startswith(f"{INDEX_DIR}/") for f in manifest):
        raise FileNotFoundError(f"{folder} holds no {INDEX_DIR}/ folder")
    artifact = f"{INDEX_ARTIFACT}/{index_version}"
    c.log_artifacts(mv.run_id, str(folder), artifact)
    record = IndexRecord(
        version=index_version,
        uri=f"{c.get_run(mv.run_id).info.artifact_uri}/{artifact}",
        manifest=manifest,
        products=products,
        published_at=datetime.now(UTC).isoformat(),
        run_key=run_key,
    )
    text = record.to_json()
    if len(text) > _TAG_MAX:
        raise ValueError(f"the index record of {folder} does not fit a registry tag ({len(text)} characters)")
    c.set_model_version_tag(model_name, str(version), INDEX_TAG, text)  # the one step readers act on
    c.set_model_version_tag(model_name, str(version), INDEX_VERSION_TAG, index_version)
    return record


def download_index(paths: Paths, record: IndexRecord, dst: str | Path) -> Path:
    """The record's index folder in dst/<index version>/, verified file by file against its manifest (a copy there
    already is checked first and reused); safe for processes sharing `dst` (download_bundle's rename dance)."""
    import tempfile

    import mlflow

    client(paths)  # the tracking URI an mlflow-artifacts: URI is resolved against
    parent = Path(dst)
    parent.mkdir(parents=True, exist_ok=True)
    target = parent / record.version
    what = f"catalog index {record.version}"
    if target.is_dir():
        if not manifest_mismatches(target, record.manifest):
            return target
        log.warning("%s: the copy in %s differs from its record, downloading again", what, target)
        _discard(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{record.version}.", suffix=".partial", dir=parent))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=record.uri, dst_path=str(tmp)))
        bad = manifest_mismatches(local, record.manifest)
        if bad:
            raise BundleMismatch(f"{what}: the download differs from its recorded manifest: {_describe(bad)}")
        try:
            os.rename(local, target)
        except OSError:
            if not target.is_dir() or manifest_mismatches(target, record.manifest):
                raise
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- promotion and rollback -----------------------------------------------------------------------------------------
# Every move of @champion made here is recorded as one registered-model tag `champion_history.<UTC timestamp>` whose
# value is a JSON object {action, version, previous, reason, actor, at, forced, run_key}. One tag per move (not one
# growing JSON list) because registry tag values are VARCHAR(5000) in the SQL stores and appending never rewrites
# older entries. The promoted version also gets `promoted_*` tags (and `forced` / `force_reason` when forced).
HISTORY_TAG_PREFIX = "champion_history."
PROMOTE, ROLLBACK = "promote", "rollback"
_REASON_MAX = 1000


class PromotionError(RuntimeError):
    """A promotion or rollback was refused; nothing moved. The message says why and what would make it pass."""


class PromotionRefused(PromotionError):
    """Refused for what the request or the registry says (no such version, gate failed, nothing to roll back to...):
    trying again gives the same answer, so a DAG task fails at once (pipelines.steps.bounds.PERMANENT_ERRORS). The
    plain PromotionError stays for what may pass later: the lock held by another move, artifacts not downloadable."""


@dataclass(frozen=True)
class AliasMove:
    """The outcome of promote()/rollback(): where @champion was and is, and why; moved=False for a no-op."""

    action: str
    model_name: str
    version: str
    previous: str | None
    moved: bool
    reason: str
    actor: str
    forced: bool = False
    at: str = ""
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        if not self.moved:
            return f"{self.action}: {self.model_name}@{CHAMPION} stays at version {self.version} ({self.note})"
        forced = "; FORCED past a failed gate" if self.forced else ""
        return (
            f"{self.action}: {self.model_name}@{CHAMPION} {self.previous or '(none)'} -> {self.version} "
            f"(reason: {self.reason}; by {self.actor}{forced})"
        )


def champion_history(paths: Paths, model_name: str) -> list[dict[str, Any]]:
    """Every recorded move of @champion, oldest first (empty when the model does not exist yet; errors raise)."""
    try:
        tags = client(paths).get_registered_model(model_name).tags
    except Exception as err:
        if is_absent(err):
            return []
        raise
    return [json.loads(tags[k]) for k in sorted(k for k in tags if k.startswith(HISTORY_TAG_PREFIX))]


def champion_lineage(history: list[dict[str, Any]]) -> list[str]:
    """The stack of champions the history implies, oldest first; its top is the current champion.

    A promotion pushes (after the champion it replaced, if that was set outside these functions); a rollback pops
    back to the version it restored. So rollback after rollback walks further back, never forward again.
    """
    stack: list[str] = []
    for entry in history:
        if entry["action"] == PROMOTE:
            if entry.get("previous") and (not stack or stack[-1] != entry["previous"]):
                stack.append(entry["previous"])
            if not stack or stack[-1] != entry["version"]:
                stack.append(entry["version"])
        else:
            while stack and stack[-1] != entry["version"]:
                stack.pop()
            if not stack:
                stack.append(entry["version"])
    return stack


def check_version(paths: Paths, model_name: str, version: str, force: bool) -> bool:
    """Re-check a version before it becomes champion; returns whether it needed `force`.

    Never passes with force: the version does not exist or is not READY, its bundle misses a required file or differs
    from the sha256 manifest recorded at registration (downloaded and hashed). Needs force: it did not pass its gate
    (tag `gate_passed`), or it has no recorded manifest (registered before manifests), so it cannot be verified.
    Raises PromotionError for a refusal; a registry that cannot be read raises its own error (nothing is decided).
    """
    import tempfile

    c = client(paths)
    try:
        mv = c.get_model_version(model_name, str(version))
    except Exception as err:
        if is_absent(err):
            raise PromotionRefused(f"{model_name} version {version} does not exist in the registry") from err
        raise
    if mv.status != "READY":
        raise PromotionRefused(f"{model_name} version {version} is {mv.status}, not READY")
    try:
        manifest = _manifest_from_tags(mv.tags, f"{model_name} version {version}")
        with tempfile.TemporaryDirectory(prefix="shopguide-check-") as tmp:
            download_bundle(paths, model_name, str(version), tmp)
    except BundleMismatch as err:
        raise PromotionRefused(f"not servable (force does not override this): {err}") from err
    except Exception as err:
        raise PromotionError(f"{model_name} version {version}: cannot download its artifacts: {err}") from err
    needs_force = []
    gate = mv.tags.get("gate_passed")
    if gate != "true":
        reasons = mv.tags.get("gate_reasons", "")
        failed = [r for r in json.loads(reasons) if not r.startswith("ok")] if reasons.startswith("[") else []
        needs_force.append(
            f"it did not pass its gate (gate_passed={gate or 'missing'})" + (": " + "; ".join(failed) if failed else "")
        )
    if manifest is None:
        needs_force.append(f"it has no recorded sha256 manifest ({MANIFEST_TAG}), so its files cannot be verified")
    if needs_force and not force:
        raise PromotionRefused(
            f"{model_name} version {version}: " + "; and ".join(needs_force) + "; promoting it anyway needs force "
            "with a reason"
        )
    return bool(needs_force)


# --- the compare-and-set around @champion ---------------------------------------------------------------------------
# MLflow has no conditional alias update, so every move of @champion happens inside one lock: re-read the alias, check
# it still is what the decision saw, move it, record it. pipelines/registry/locks.py: a file lock under
# SHOPGUIDE_HOME/locks (one host), or with SHOPGUIDE_LOCK_URL a PostgreSQL advisory lock that every promoter on every
# host reaches (the production profile points it at Airflow's metadata database). The MLflow backend's own database
# would be the natural home, but it is behind the HTTP tracking server, which offers no lock.
LOCK_TIMEOUT_S = 60.0


def champion_lock(paths: Paths, model_name: str) -> PostgresAdvisoryLock | FolderLock:
    """The lock every move of @champion of `model_name` holds (see above for its reach)."""
    from pipelines.registry.locks import named_lock

    return named_lock(paths, f"champion.{model_name}", LOCK_TIMEOUT_S)


def _move(
    paths: Paths,
    model_name: str,
    action: str,
    version: str,
    previous: str | None,
    reason: str,
    actor: str,
    forced: bool,
    run_key: str | None,
    note: str = "",
) -> AliasMove:
    """Compare-and-set: inside champion_lock, move @champion to `version` only if it still is `previous` (what the
    decision saw), then record who/why. Raises PromotionError, nothing moved, when another move came in between.

    A crash between the alias call and the record leaves a move unrecorded, which rollback detects: the champion is
    then not the top of the recorded lineage."""
    from pipelines.registry.locks import LockTimeout

    lock = champion_lock(paths, model_name)
    try:
        with lock:
            return _move_locked(paths, model_name, action, version, previous, reason, actor, forced, run_key, note)
    except LockTimeout as err:
        raise PromotionError(
            f"another move of {model_name}@{CHAMPION} has held {lock.where} for over {LOCK_TIMEOUT_S:.0f} s; "
            "nothing moved, try again"
        ) from err


def _move_locked(
    paths: Paths,
    model_name: str,
    action: str,
    version: str,
    previous: str | None,
    reason: str,
    actor: str,
    forced: bool,
    run_key: str | None,
    note: str,
) -> AliasMove:
    from datetime import UTC, datetime

    c = client(paths)
    now_at = alias_version(paths, model_name, CHAMPION)
    if run_key is not None:  # the same pipeline run racing itself (a task retried while its first try still runs)
        done = [e for e in champion_history(paths, model_name) if e.get("run_key") == run_key and e["action"] == action]
        if done:
            return AliasMove(
                action,
                model_name,
                now_at or done[-1]["version"],
                now_at,
                False,
                reason,
                actor,
                note=f"run {run_key} already promoted version {done[-1]['version']} at {done[-1]['at']}",
            )
    if now_at != previous:
        raise PromotionError(
            f"{model_name}@{CHAMPION} moved from {previous or '(none)'} to {now_at or '(none)'} since the decision to "
            f"{action} version {version} was made (another promotion or rollback came first); nothing moved: "
            "look at `shopguide history` and decide again"
        )
    now = datetime.now(UTC)
    reason, at = reason[:_REASON_MAX], now.isoformat(timespec="seconds")
    c.set_registered_model_alias(model_name, CHAMPION, str(version))
    entry = {
        "action": action,
        "version": str(version),
        "previous": previous,
        "reason": reason,
        "actor": actor,
        "at": at,
        "forced": forced,
        "run_key": run_key,
    }
    c.set_registered_model_tag(model_name, f"{HISTORY_TAG_PREFIX}{now:%Y%m%dT%H%M%S.%fZ}", json.dumps(entry))
    version_tags = {
        "promoted_at": at,
        "promoted_by": actor,
        "promotion_reason": reason,
        "promoted_from": previous or "none",
        "promotion_action": action,
    }
    if forced:
        version_tags.update(forced="true", force_reason=reason)
    for k, v in version_tags.items():
        c.set_model_version_tag(model_name, str(version), k, v)
    return AliasMove(action, model_name, str(version), previous, True, reason, actor, forced, at, note)


_NOW: Any = object()  # promote(decided_against=...) not given: the champion promote() reads when it starts


def _require_reason(reason: str, action: str) -> str:
    if not reason or not reason.strip():
        raise PromotionRefused(f"{action} needs a non-empty reason (it is recorded with the alias move)")
    return reason.strip()


def promote(
    paths: Paths,
    model_name: str,
    version: str | int,
    reason: str,
    actor: str,
    force: bool = False,
    run_key: str | None = None,
    decided_against: Any = _NOW,
) -> AliasMove:
    """Move @champion to `version` after re-checking it (check_version); records the move in the history.

    Compare-and-set: the move happens only if @champion still is the version the decision saw, else PromotionError.
    That is `decided_against` when given (the champion a gate compared the candidate with, None for "no champion"),
    else the champion when this call starts.

    Idempotent: promoting the current champion, or promoting again from the same pipeline run (`run_key`, e.g. a
    re-run of a retrain DAG run after a later rollback), moves nothing and says so.
    """
    reason = _require_reason(reason, PROMOTE)
    version = str(version)
    current = alias_version(paths, model_name, CHAMPION)
    if run_key is not None:
        history = champion_history(paths, model_name)
        done = [e for e in history if e.get("run_key") == run_key and e["action"] == PROMOTE]
        if done:
            return AliasMove(
                PROMOTE,
                model_name,
                current or done[-1]["version"],
                current,
                False,
                reason,
                actor,
                note=f"run {run_key} already promoted version {done[-1]['version']} at {done[-1]['at']}",
            )
    if decided_against is not _NOW and current != decided_against:
        raise PromotionRefused(
            f"{model_name}@{CHAMPION} moved from {decided_against or '(none)'} to {current or '(none)'} since the "
            f"decision to promote version {version} was made against it; nothing moved: decide again"
        )
    if current == version:
        return AliasMove(
            PROMOTE,
            model_name,
            version,
            current,
            False,
            reason,
            actor,
            note=f"version {version} already is the champion",
        )
    forced = check_version(paths, model_name, version, force)
    return _move(paths, model_name, PROMOTE, version, current, reason, actor, forced, run_key)


def rollback(paths: Paths, model_name: str, reason: str, actor: str, force: bool = False) -> AliasMove:
    """Move @champion back to the version it held before the current champion was promoted.

    Walks the recorded lineage (champion_lineage): a second rollback goes one further back; with no earlier champion
    recorded, or when @champion was moved outside promote()/rollback() since the last recorded move, it refuses.
    The target is re-checked like a promotion (artifacts, gate tag unless forced).
    """
    reason = _require_reason(reason, ROLLBACK)
    current = alias_version(paths, model_name, CHAMPION)
    if current is None:
        raise PromotionRefused(f"{model_name} has no @{CHAMPION}: nothing to roll back")
    lineage = champion_lineage(champion_history(paths, model_name))
    if not lineage or lineage[-1] != current:
        raise PromotionRefused(
            f"{model_name}@{CHAMPION} is version {current}, but the last recorded move left version "
            f"{lineage[-1] if lineage else '(none)'}: the alias was moved outside shopguide promote/rollback, so "
            "the version it held before is unknown; promote the version you want explicitly"
        )
    if len(lineage) < 2:
        raise PromotionRefused(
            f"{model_name}@{CHAMPION} is version {current} and no earlier champion is recorded: nothing to roll back to"
        )
    target = lineage[-2]
    forced = check_version(paths, model_name, target, force)
    return _move(
        paths,
        model_name,
        ROLLBACK,
        target,
        current,
        reason,
        actor,
        forced,
        None,
        note=f"back to the champion before version {current}",
    )
