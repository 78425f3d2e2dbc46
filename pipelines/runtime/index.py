"""Product embedding index: built once per model version with the served ONNX graph, stored inside the bundle."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.runtime.bundle import EMBEDDINGS_FILE, INDEX_DIR, PRODUCTS_FILE
from pipelines.runtime.topk import top_k


@dataclass
class ProductIndex:
    """Brute-force cosine search over unit vectors: one matmul + top_k is ~ms for ~50k x 384 on 2 cores."""

    product_ids: np.ndarray  # int64, row order of embeddings
    titles: np.ndarray  # object (str)
    embeddings: np.ndarray  # float32, L2-normalised rows

    def __len__(self) -> int:
        return len(self.product_ids)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (rows, scores) for one (dim,) or many (n, dim) queries, always (n, k)."""
        scores = np.atleast_2d(query).astype(np.float32) @ self.embeddings.T
        return top_k(scores, k)

    def rows_of(self, product_ids: list[int]) -> np.ndarray:
        """Row numbers of the given product ids that are in the index (unknown ids are dropped)."""
        lookup = getattr(self, "_lookup", None)
        if lookup is None:
            lookup = self._lookup = {int(p): i for i, p in enumerate(self.product_ids)}
        return np.asarray([lookup[p] for p in map(int, product_ids) if p in lookup], dtype=np.int64)

    def save(self, bundle_dir: str | Path) -> Path:
        out = Path(bundle_dir) / INDEX_DIR
        out.mkdir(parents=True, exist_ok=True)
        # float16 halves the stored version (54,667 x 384 -> 42 MB); search runs in float32
        np.save(out / EMBEDDINGS_FILE, self.embeddings.astype(np.float16), allow_pickle=False)
        pd.DataFrame({"product_id": self.product_ids, "title": self.titles}).to_parquet(out / PRODUCTS_FILE)
        return out

    @classmethod
    def load(cls, bundle_dir: str | Path) -> ProductIndex:
        path = Path(bundle_dir) / INDEX_DIR
        products = pd.read_parquet(path / PRODUCTS_FILE)
        emb = np.load(path / EMBEDDINGS_FILE, allow_pickle=False).astype(np.float32)
        return cls(products["product_id"].to_numpy(np.int64), products["title"].to_numpy(object), emb)
