"""The catalog DAG's steps: validate a landed catalog (GX), embed its new products with @champion's own encoder,
rebuild the dense + BM25 index over the whole new catalog, publish it as that same version's index.

Nothing is trained and no alias moves: the published index is an artifact of @champion's version (its run's
`catalog_index/<catalog hash>/`) named by the version tag `catalog_index` (mlflow_client.publish_index), which the
service polls and hot-swaps in (serving.predictor.resolve). A bad catalog fails `validate`, before anything is
embedded or published, so what is served does not change. Folders pass between tasks through the run store
(pipelines/registry/handoff.py); registry downloads go to a scratch folder of the task's own.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.config import Paths, load_config
from pipelines.registry.handoff import task_folders


@contextlib.contextmanager
def _workdir(paths: Paths) -> Iterator[Path]:
    paths.scratch.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="catalog-", dir=paths.scratch))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def validate(profile: str, run_key: str, catalog_path: str) -> dict[str, Any]:
    """Read the landed file (it must be in <landing>/catalog/), validate it with the catalog suite (duplicate or
    missing ids, empty titles fail the run with GX's report, not retried) and hand it on as parquet in id order."""
    from pipelines.data.catalog import ID_COLUMN, TITLE_COLUMN, catalog_hash, landed_catalog, read_catalog
    from pipelines.data.validate import validate_catalog

    cfg = load_config(profile)
    paths = Paths.from_env()
    source = landed_catalog(catalog_path, paths.landing)
    catalog = read_catalog(source)
    with task_folders(run_key) as t:
        out = t.output("catalog")
        report = validate_catalog(catalog, out / "validation")
        catalog = catalog[[ID_COLUMN, TITLE_COLUMN]].sort_values(ID_COLUMN).reset_index(drop=True)
        catalog.to_parquet(out / "catalog.parquet", index=False)
        digest = catalog_hash(catalog[ID_COLUMN].to_numpy(), catalog[TITLE_COLUMN].to_numpy(object))
        print(f"catalog {source.name}: {len(catalog)} products, valid, catalog hash {digest}")
        return t.publish(
            {
                "run_key": run_key,
                "model_name": cfg.registry.model_name,
                "source": str(source),
                "catalog": str(out / "catalog.parquet"),
                "catalog_hash": digest,
                "products": len(catalog),
                "data_docs": report["data_docs"],
            }
        )


def _served_index(paths: Paths, model_name: str, version: str, base: str | None, work: Path) -> tuple[Path, Path]:
    """(the version's bundle, the folder of the index it serves: `base`, an IndexRecord's JSON, or the bundle's own),
    both downloaded and verified against the registry's manifests."""
    from pipelines.registry.mlflow_client import IndexRecord, download_bundle, download_index

    bundle = download_bundle(paths, model_name, version, work / "bundle")
    if base is None:
        return bundle, bundle
    record = IndexRecord.from_json(base, f"{model_name} version {version}")
    return bundle, download_index(paths, record, work / "index")


def embed(validated: dict[str, Any]) -> dict[str, Any]:
    """Diff the catalog against the index @champion serves now; embed the new and re-titled products with that
    version's own ONNX graph. Keyed to the version and index seen here: the next tasks use the same ones."""
    import pandas as pd

    from pipelines.catalog.index import CatalogIndexError, catalog_diff, embed_products
    from pipelines.registry.mlflow_client import CHAMPION, alias_version, version_index

    paths = Paths.from_env()
    model_name = validated["model_name"]
    version = alias_version(paths, model_name, CHAMPION)
    if version is None:
        raise CatalogIndexError(
            f"{model_name} has no @champion: nothing serves a catalog yet (the first retrain indexes its snapshot's)"
        )
    record = version_index(paths, model_name, version)
    base = record.to_json() if record is not None else None
    with task_folders(validated["run_key"]) as t, _workdir(paths) as work:
        catalog = pd.read_parquet(t.stage(validated)["catalog"])
        bundle, served = _served_index(paths, model_name, version, base, work)
        diff = catalog_diff(served, catalog)
        serving = f"catalog index {record.version}" if record is not None else "its bundle's index"
        print(f"@champion = version {version}, serving {serving}; the new catalog: {diff.summary()}")
        out = t.output("embedded")
        stats = embed_products(bundle, catalog, diff.to_embed, out)
        print(f"embedded {stats['embedded']} products in {stats['embed_seconds']} s")
        return t.publish({"version": version, "base": base, "diff": diff.summary(), "embedded_dir": str(out), **stats})


def build_index(validated: dict[str, Any], embedded: dict[str, Any]) -> dict[str, Any]:
    """The dense + BM25 index over the whole new catalog (added products in, removed ones out), in the run store."""
    import pandas as pd

    from pipelines.catalog.index import build_catalog_index

    paths = Paths.from_env()
    with task_folders(validated["run_key"]) as t, _workdir(paths) as work:
        staged = t.stage({"catalog": validated["catalog"], "embedded": embedded["embedded_dir"]})
        _, served = _served_index(paths, validated["model_name"], embedded["version"], embedded["base"], work)
        out = t.output("index")
        stats = build_catalog_index(served, pd.read_parquet(staged["catalog"]), staged["embedded"], out)
        print(
            f"index over {stats['products']} products ({stats['embedded']} embedded now) in {stats['index_seconds']} s"
        )
        return t.publish({"index_dir": str(out), "index_version": validated["catalog_hash"], **stats})


def publish(validated: dict[str, Any], embedded: dict[str, Any], built: dict[str, Any]) -> dict[str, Any]:
    """Log the index under the version's run and point its `catalog_index` tag at it (what the service polls);
    nothing when the catalog is the one already served. Never moves an alias nor registers a version."""
    from pipelines.registry.mlflow_client import CHAMPION, alias_version, publish_index

    paths = Paths.from_env()
    model_name, version = validated["model_name"], embedded["version"]
    diff = embedded["diff"]
    if not (diff["added"] or diff["removed"] or diff["changed"]):
        print(f"version {version} already serves this catalog: nothing published")
        return {"published": False, "version": version, "reason": "the catalog is the one served"}
    with task_folders(validated["run_key"]) as t:
        index_dir = t.stage(built)["index_dir"]
        record = publish_index(
            paths, model_name, version, index_dir, built["index_version"], built["products"], validated["run_key"]
        )
    now = alias_version(paths, model_name, CHAMPION)
    if now != version:  # the index fits the encoder it was embedded with, so it still goes to that version
        print(f"WARNING: @champion moved to {now} meanwhile; it serves its own catalog until this file lands again")
    print(f"published catalog index {record.version} ({record.products} products) for version {version}: {record.uri}")
    return {
        "published": True,
        "version": version,
        "index_version": record.version,
        "products": record.products,
        "uri": record.uri,
        "published_at": record.published_at,
        "champion_now": now,
    }
