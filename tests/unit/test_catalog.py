"""A landed catalog: where it may come from, how it is read and validated (real GX), what changed, and the index
rebuilt over it (vectors of kept products reused exactly, new ones taken from the embedding step, BM25 rebuilt)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.catalog.index import EMBEDDED_FILE, EMBEDDED_PRODUCTS, CatalogIndexError, build_catalog_index
from pipelines.data.catalog import (
    CatalogPathError,
    catalog_hash,
    diff_catalog,
    land_catalog,
    landed_catalog,
    read_catalog,
)
from pipelines.data.validate import DataValidationError, validate_catalog
from pipelines.runtime.index import ProductIndex
from pipelines.runtime.lexical import LexicalIndex
from pipelines.steps.bounds import is_permanent

NOW = datetime(2026, 12, 4, 9, 30, tzinfo=UTC)


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_catalog_lands_under_a_name_of_its_own_and_only_landed_files_are_read(tmp_path: Path) -> None:
    landing = tmp_path / "landing"
    source = _csv(tmp_path / "shop.csv", "product_uid,product_title\n1,drill\n")
    first = land_catalog(source, landing, NOW)
    second = land_catalog(source, landing, NOW.replace(second=31))
    assert first != second and first.read_text() == second.read_text() == source.read_text()
    assert landed_catalog(first.name, landing) == first
    with pytest.raises(CatalogPathError, match="resolves outside") as refused:
        landed_catalog(str(source), landing)
    assert is_permanent(refused.value)  # a retry would read the same path
    with pytest.raises(CatalogPathError, match="neither"):
        land_catalog(_csv(tmp_path / "shop.txt", "x"), landing, NOW)


def test_duplicates_and_empty_titles_fail_validation_with_a_readable_report(tmp_path: Path) -> None:
    bad = _csv(
        tmp_path / "bad.csv",
        "product_uid,product_title,brand\n1,cordless drill,acme\n2,,acme\n2,garden hose,\n3,   ,x\nabc,paint,\n",
    )
    catalog = read_catalog(bad)
    assert catalog["product_uid"].isna().sum() == 1 and "brand" not in catalog  # other columns are ignored
    with pytest.raises(DataValidationError) as failed:
        validate_catalog(catalog)
    report = failed.value.report
    assert "product_uid: expect_column_values_to_be_unique" in report and "e.g. [2]" in report
    assert "product_uid: expect_column_values_to_not_be_null" in report
    assert "product_title: expect_column_value_lengths_to_be_between" in report  # the empty cell
    assert "product_title: expect_column_values_to_match_regex" in report and "'   '" in report  # blanks
    assert is_permanent(failed.value)

    good = read_catalog(_csv(tmp_path / "good.csv", "product_uid,product_title\n2,garden hose\n1,cordless drill\n"))
    assert validate_catalog(good)["rows"] == 2
    parquet = tmp_path / "good.parquet"
    good.to_parquet(parquet)
    assert read_catalog(parquet).equals(good)


def test_the_diff_and_the_hash_go_by_product_id() -> None:
    diff = diff_catalog(
        np.array([1, 2, 3]), np.array(["a", "b", "c"], object), np.array([3, 2, 4]), np.array(["c", "B", "d"], object)
    )
    assert (diff.added, diff.removed, diff.changed, diff.kept) == ([4], [1], [2], 1)
    assert diff.to_embed == [2, 4]
    ids, titles = np.array([2, 1]), np.array(["b", "a"], object)
    assert catalog_hash(ids, titles) == catalog_hash(ids[::-1], titles[::-1])
    assert catalog_hash(ids, titles) != catalog_hash(ids, np.array(["b", "A"], object))


def _unit(rng: np.random.Generator, n: int, dim: int = 8) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_the_rebuilt_index_reuses_kept_vectors_takes_new_ones_and_drops_removed_products(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    served_dir = tmp_path / "served"
    titles = ["cordless drill", "garden hose", "paint roller", "door knob"]
    served = ProductIndex(np.array([10, 20, 30, 40]), np.array(titles, object), _unit(rng, 4))
    served.save(served_dir)
    LexicalIndex.build(titles, 0.6, 50, "bm25+", 0.9, 0.5).save(served_dir)
    served = ProductIndex.load(served_dir)  # as stored (float16)

    # 20 leaves, 50 arrives, 30 is re-titled
    catalog = pd.DataFrame(
        {"product_uid": [50, 40, 30, 10], "product_title": ["copper pipe", "door knob", "paint tray", "cordless drill"]}
    )
    embedded = tmp_path / "embedded"
    embedded.mkdir()
    fresh = _unit(rng, 2)
    np.save(embedded / EMBEDDED_FILE, fresh)
    pd.DataFrame({"product_uid": [30, 50], "product_title": ["paint tray", "copper pipe"]}).to_parquet(
        embedded / EMBEDDED_PRODUCTS
    )
    stats = build_catalog_index(served_dir, catalog, embedded, tmp_path / "out")
    assert stats == {**stats, "products": 4, "reused": 2, "embedded": 2, "lexical": True}

    index = ProductIndex.load(tmp_path / "out")
    assert index.product_ids.tolist() == [10, 30, 40, 50]
    assert index.titles.tolist() == ["cordless drill", "paint tray", "door knob", "copper pipe"]
    np.testing.assert_array_equal(index.embeddings[[0, 2]], served.embeddings[[0, 3]])  # reused as served
    np.testing.assert_allclose(index.embeddings[[1, 3]], fresh, atol=1e-3)  # float16 storage
    lexical = LexicalIndex.load(tmp_path / "out")
    assert lexical is not None and lexical.weight == 0.6 and lexical.candidates == 50 and lexical.size == 4
    assert lexical.retriever.method == "bm25+" and lexical.retriever.k1 == 0.9
    (rows, _), (hose_rows, _) = lexical.top_k(["copper pipe", "garden hose"])
    # BM25+ gives every product a floor score once a query word is known; the removed title's words are not
    assert index.product_ids[rows[0]] == 50 and len(hose_rows) == 0

    # a product that was neither embedded now nor served under that title has no vector: refused
    catalog.loc[1, "product_title"] = "door handle"
    with pytest.raises(CatalogIndexError, match=r"1 products have no vector.*\[40\]") as refused:
        build_catalog_index(served_dir, catalog, embedded, tmp_path / "out2")
    assert is_permanent(refused.value)


def test_a_start_up_from_the_cache_serves_the_last_catalog_index_verified_or_not_that_version(tmp_path: Path) -> None:
    """The service's cache fallback (registry down): the catalog index a version last served, checked against its
    record; a tampered or missing one refuses the version instead of reviving the bundle's older catalog."""
    from pipelines.registry.mlflow_client import BundleMismatch, IndexRecord
    from pipelines.runtime.bundle import bundle_manifest
    from serving.predictor import INDEX_CACHE, _save_index_record, cached_index

    cache = tmp_path / "cache"
    assert cached_index(cache, "3") == (None, None)  # never served a catalog index: the bundle's own
    folder = cache / "3" / INDEX_CACHE / "abc123"
    ProductIndex(np.array([1, 2]), np.array(["a", "b"], object), _unit(np.random.default_rng(1), 2)).save(folder)
    record = IndexRecord("abc123", "file:///nowhere", bundle_manifest(folder), 2, NOW.isoformat(), "run")
    _save_index_record(cache, "3", record)
    assert cached_index(cache, "3") == (folder, "abc123")
    (folder / "index" / "products.parquet").write_bytes(b"tampered")
    with pytest.raises(BundleMismatch, match="catalog index abc123"):
        cached_index(cache, "3")
    _save_index_record(cache, "3", None)  # loaded again with the bundle's own index
    assert cached_index(cache, "3") == (None, None)
