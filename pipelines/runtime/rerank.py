"""The served reranker: a cross-encoder (query, title) -> relevance logit, ONNX Runtime over the bundle's reranker/."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipelines.runtime.bundle import ONNX_FILE, RERANKER_DIR, RERANKER_FILE, TOKENIZER_FILE
from pipelines.runtime.encoder import OrtOptimization, load_tokenizer, ort_session, per_query_latency_ms

if TYPE_CHECKING:
    import onnxruntime as ort
    from tokenizers import Tokenizer

RERANKER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
RERANKER_OUTPUT = "logits"


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def served_top_n(bundle_dir: str | Path) -> int | None:
    """The depth a bundle's reranker is served at by default (0 = not served); None: the bundle has no reranker."""
    path = Path(bundle_dir) / RERANKER_DIR / RERANKER_FILE
    return int(json.loads(path.read_text()).get("served_top_n", 0)) if path.is_file() else None


@dataclass
class CrossEncoderReranker:
    """Scores (query, title) pairs with the bundle's cross-encoder graph and reorders a ranked list's head by them."""

    session: ort.InferenceSession
    tokenizer: Tokenizer
    max_seq_length: int
    top_n: int  # the version's served depth (search.rerank_top_n when it was trained); 0 = not served by default
    measured_top_n: int  # the depth its with-reranker figures were measured at (rerank.top_n)

    @classmethod
    def load(
        cls,
        bundle_dir: str | Path,
        threads: int = 0,
        optimization: OrtOptimization = "all",
        spinning: bool = True,
    ) -> CrossEncoderReranker | None:
        """The bundle's reranker, or None for a bundle without one."""
        folder = Path(bundle_dir) / RERANKER_DIR
        if not (folder / RERANKER_FILE).is_file():
            return None
        meta = json.loads((folder / RERANKER_FILE).read_text())
        tokenizer = load_tokenizer(folder / TOKENIZER_FILE, meta["max_seq_length"])
        return cls(
            session=ort_session(folder / ONNX_FILE, threads, optimization, spinning),
            tokenizer=tokenizer,
            max_seq_length=int(meta["max_seq_length"]),
            top_n=int(meta.get("served_top_n", 0)),
            measured_top_n=int(meta.get("top_n", 0)),
        )

    def scores(self, query: str, titles: list[str]) -> np.ndarray:
        """Relevance logits of (query, title) for every title, in one ORT run.

        One run per query on purpose: a dynamically quantized graph's activation scale is taken over the batch, so a
        pair's score depends on the pairs beside it; the service and the evaluation both batch a query's candidates
        alone, so what is measured is what is served and no answer depends on concurrent traffic.
        """
        if not titles:
            return np.zeros(0, np.float32)
        encs = self.tokenizer.encode_batch([(query, t) for t in titles])
        feeds = {
            "input_ids": np.asarray([e.ids for e in encs], dtype=np.int64),
            "attention_mask": np.asarray([e.attention_mask for e in encs], dtype=np.int64),
            "token_type_ids": np.asarray([e.type_ids for e in encs], dtype=np.int64),
        }
        (logits,) = self.session.run([RERANKER_OUTPUT], feeds)
        return np.asarray(logits, np.float32).reshape(-1)

    def rerank(
        self, query: str, rows: np.ndarray, scores: np.ndarray, titles: list[str], top_n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """A ranked list (rows, scores, the rows' titles) with its first top_n reordered by the cross-encoder, best
        first, scored sigmoid(logit) in [0, 1]; the rest keeps its order, its scores capped at the head's lowest so
        the list's scores still fall. Ties keep the list's order."""
        n = min(top_n, len(rows))
        if n == 0:
            return rows, scores
        logits = self.scores(query, titles[:n])
        order = np.argsort(-logits, kind="stable")
        head = sigmoid(logits[order]).astype(np.float32)
        return (
            np.concatenate([np.asarray(rows)[:n][order], np.asarray(rows)[n:]]),
            np.concatenate([head, np.minimum(np.asarray(scores, np.float32)[n:], head[-1])]),
        )

    def latency_ms(self, queries: list[str], titles: list[list[str]], top_n: int) -> dict[str, float]:
        """p50/p99 of scoring one query's top_n candidates (tokenise + one ORT run): what reranking adds."""
        by_query = dict(zip(queries, titles, strict=True))
        return per_query_latency_ms(lambda q: self.scores(q, by_query[q][:top_n]), queries, "rerank_latency")
