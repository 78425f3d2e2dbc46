"""MLflow pyfunc over a shopguide bundle, logged as models-from-code so loading never unpickles anything."""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class ShopguideEncoder(PythonModel):
    """predict(DataFrame[query]) -> category and top-k products, the same ONNX graph and index that serving uses."""

    def load_context(self, context) -> None:
        from pipelines.runtime.encoder import OnnxEncoder
        from pipelines.runtime.index import ProductIndex
        from pipelines.runtime.lexical import LexicalIndex

        bundle = context.artifacts["bundle"]
        self.encoder = OnnxEncoder.load(bundle)
        self.index = ProductIndex.load(bundle)
        self.lexical = LexicalIndex.load(bundle)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        k = int((params or {}).get("k", 10))
        queries = model_input["query"].astype(str).tolist()
        emb, logits = self.encoder.encode(queries)
        if self.lexical is None:
            rows, scores = self.index.search(emb, k)
        else:  # the hybrid ranking the service returns
            dense_rows, dense_scores = self.index.search(emb, self.lexical.depth(k))
            fused = self.lexical.hybrid(queries, list(zip(dense_rows, dense_scores, strict=True)), k)
            rows, scores = [r for r, _ in fused], [s for _, s in fused]
        return pd.DataFrame(
            {
                "query": queries,
                # the served rule: the top category, or None outside the taxonomy (the bundle's threshold)
                "category": [a.category for a in self.encoder.categories(logits, emb)],
                "product_ids": [self.index.product_ids[r].tolist() for r in rows],
                "scores": [s.round(6).tolist() for s in scores],
            }
        )


mlflow.models.set_model(ShopguideEncoder())
