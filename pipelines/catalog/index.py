"""A served version's product index rebuilt over a new catalog: only new and re-titled products are embedded (with
the version's own ONNX graph, runtime.encoder), every other vector is the served index's; BM25 is rebuilt over the
new titles with the version's own parameters and fusion weight.

The rebuilt index has the catalog's rows in product id order (the snapshot catalog's order), so removed products
are simply not in it: neither the dense search, the BM25 half nor recommendations can return them. One caveat of
dynamically quantized (INT8) graphs: a text's embedding depends slightly on the batch it is encoded in (see
serving.predictor's batch_invariant), so a product embedded now is within ~0.99 cosine of the vector a full rebuild
would give it; the products already served keep their exact vectors.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.data.catalog import ID_COLUMN, TITLE_COLUMN, CatalogDiff, diff_catalog
from pipelines.runtime.encoder import OnnxEncoder
from pipelines.runtime.index import ProductIndex
from pipelines.runtime.lexical import LexicalIndex

EMBEDDED_FILE = "embeddings.npy"
EMBEDDED_PRODUCTS = "products.parquet"


class CatalogIndexError(RuntimeError):
    """The served index and the new catalog cannot be combined (no champion, a vector missing, a dimension that
    does not fit): a retry would give the same answer."""


def catalog_diff(served_dir: str | Path, catalog: pd.DataFrame) -> CatalogDiff:
    """What `catalog` changes against the index in `served_dir` (a bundle, or a published catalog index folder)."""
    served = ProductIndex.load(served_dir)
    return diff_catalog(
        served.product_ids, served.titles, catalog[ID_COLUMN].to_numpy(np.int64), catalog[TITLE_COLUMN].to_numpy(object)
    )


def embed_products(
    bundle_dir: str | Path, catalog: pd.DataFrame, product_ids: list[int], out_dir: str | Path, batch_size: int = 64
) -> dict[str, Any]:
    """Embed the titles of `product_ids` (rows of `catalog`) with the bundle's served graph into out_dir
    (embeddings.npy float32 + products.parquet in the same row order)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = catalog[catalog[ID_COLUMN].isin(product_ids)].sort_values(ID_COLUMN)
    titles = rows[TITLE_COLUMN].astype(str).tolist()
    started = time.perf_counter()
    if titles:
        emb, _ = OnnxEncoder.load(bundle_dir).encode(titles, batch_size=batch_size)
    else:
        emb = np.zeros((0, 0), np.float32)
    seconds = time.perf_counter() - started
    np.save(out / EMBEDDED_FILE, emb.astype(np.float32), allow_pickle=False)
    pd.DataFrame({ID_COLUMN: rows[ID_COLUMN].to_numpy(np.int64), TITLE_COLUMN: titles}).to_parquet(
        out / EMBEDDED_PRODUCTS, index=False
    )
    return {"embedded": len(titles), "embed_seconds": round(seconds, 3)}


def build_catalog_index(
    served_dir: str | Path, catalog: pd.DataFrame, embedded_dir: str | Path, out_dir: str | Path
) -> dict[str, Any]:
    """The index of `catalog` in out_dir/index/: each product's vector from `embedded_dir` when it was embedded
    now, else from the served index (same id, same title); BM25 rebuilt over the titles when the served version has
    it. Raises CatalogIndexError when a product has no vector or the dimensions differ."""
    started = time.perf_counter()
    served = ProductIndex.load(served_dir)
    new = pd.read_parquet(Path(embedded_dir) / EMBEDDED_PRODUCTS)
    new_emb = np.load(Path(embedded_dir) / EMBEDDED_FILE, allow_pickle=False)
    dim = served.embeddings.shape[1]
    if len(new) and new_emb.shape[1] != dim:
        raise CatalogIndexError(f"new products embed to {new_emb.shape[1]} dimensions, the served index has {dim}")
    catalog = catalog.sort_values(ID_COLUMN).reset_index(drop=True)
    ids = catalog[ID_COLUMN].to_numpy(np.int64)
    titles = catalog[TITLE_COLUMN].astype(str).to_numpy(object)
    vectors = np.empty((len(catalog), dim), np.float32)
    fresh = {int(p): i for i, p in enumerate(new[ID_COLUMN])}
    served_rows = {int(p): i for i, p in enumerate(served.product_ids)}
    missing, embedded = [], 0
    for row, (pid, title) in enumerate(zip(ids, titles, strict=True)):
        if int(pid) in fresh:
            vectors[row] = new_emb[fresh[int(pid)]]
            embedded += 1
        elif int(pid) in served_rows and str(served.titles[served_rows[int(pid)]]) == title:
            vectors[row] = served.embeddings[served_rows[int(pid)]]
        else:
            missing.append(int(pid))
    if missing:
        raise CatalogIndexError(
            f"{len(missing)} products have no vector (neither embedded now nor served), e.g. {missing[:5]}"
        )
    ProductIndex(ids, titles, vectors).save(out_dir)
    lexical = LexicalIndex.load(served_dir)
    if lexical is not None:
        lexical.rebuild(titles.tolist()).save(out_dir)
    return {
        "products": len(catalog),
        "reused": len(catalog) - embedded,
        "embedded": embedded,
        "lexical": lexical is not None,
        "index_seconds": round(time.perf_counter() - started, 3),
    }
