"""The served encoder: `tokenizers` + ONNX Runtime over a model bundle; no torch; shared by eval and serving."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from pipelines.runtime.bundle import ENCODER_FILE, LABELS_FILE, ONNX_FILE, TOKENIZER_FILE
from pipelines.runtime.category import LEGACY_NOTE, CategoryAnswer, CategoryPolicy, taxonomy_description

if TYPE_CHECKING:
    import onnxruntime as ort
    from tokenizers import Tokenizer


OrtOptimization = Literal["disabled", "basic", "extended", "all"]


def per_query_latency_ms(run_one: Callable[[str], object], queries: list[str], prefix: str) -> dict[str, float]:
    """{prefix}_p50_ms / {prefix}_p99_ms of run_one(query) over the queries, after a five-query warm-up."""
    for q in queries[:5]:
        run_one(q)
    times = []
    for q in queries:
        t0 = time.perf_counter()
        run_one(q)
        times.append((time.perf_counter() - t0) * 1000)
    return {f"{prefix}_p50_ms": float(np.percentile(times, 50)), f"{prefix}_p99_ms": float(np.percentile(times, 99))}


def ort_session(
    model_path: str | Path, threads: int = 0, optimization: OrtOptimization = "all", spinning: bool = True
) -> ort.InferenceSession:
    """The one way an ONNX graph is opened: a CPU session with `threads` intra-op threads (0 = one per physical
    core), one inter-op thread, and graph optimization at `optimization`.

    spinning=False: idle intra-op workers sleep instead of spinning for the next op. The service wants that: with
    requests already running in parallel on two shared cores, a spinning worker steals its core from the other
    requests (measured: 8-client throughput drops ~30%). Offline runs (one caller at a time) keep ORT's default.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])


def load_tokenizer(path: str | Path, max_length: int) -> Tokenizer:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")  # pads each batch to its longest text
    return tok


@dataclass
class OnnxEncoder:
    """Encodes texts to (L2-normalised embedding, category logits) with the bundle's ONNX graph."""

    session: ort.InferenceSession
    tokenizer: Tokenizer
    labels: list[str]
    max_seq_length: int
    category_policy: CategoryPolicy | None = None  # load() reads the bundle's; None = never abstain

    @classmethod
    def load(
        cls,
        bundle_dir: str | Path,
        onnx_file: str = ONNX_FILE,
        threads: int = 0,
        optimization: OrtOptimization = "all",
        spinning: bool = True,
    ) -> OnnxEncoder:
        """A bundle's graph (ort_session's options), tokenizer and labels."""
        bundle = Path(bundle_dir)
        meta = json.loads((bundle / ENCODER_FILE).read_text())
        labels = json.loads((bundle / LABELS_FILE).read_text())
        return cls(
            session=ort_session(bundle / onnx_file, threads, optimization, spinning),
            tokenizer=load_tokenizer(bundle / TOKENIZER_FILE, meta["max_seq_length"]),
            labels=labels,
            max_seq_length=meta["max_seq_length"],
            category_policy=CategoryPolicy.load(bundle, labels),
        )

    @property
    def category(self) -> CategoryPolicy:
        """The bundle's category rule (category.json); an encoder without one answers the top category, always."""
        if self.category_policy is None:
            return CategoryPolicy(tuple(self.labels), taxonomy_description(self.labels), note=LEGACY_NOTE)
        return self.category_policy

    def categories(self, logits: np.ndarray, embeddings: np.ndarray | None = None) -> list[CategoryAnswer]:
        """Category answers (top category or abstention) for encode()'s outputs: the served rule."""
        return self.category.decide(logits, embeddings)

    def _run(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encs = self.tokenizer.encode_batch(texts)
        ids = np.asarray([e.ids for e in encs], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in encs], dtype=np.int64)
        emb, logits = self.session.run(["embedding", "category_logits"], {"input_ids": ids, "attention_mask": mask})
        return emb, logits

    def encode(self, texts: list[str], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Batches sorted by length so padding stays small; results come back in input order."""
        if not texts:
            return np.zeros((0, 0), np.float32), np.zeros((0, len(self.labels)), np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        embs, logits = [], []
        for start in range(0, len(texts), batch_size):
            e, lg = self._run([texts[i] for i in order[start : start + batch_size]])
            embs.append(e)
            logits.append(lg)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return np.concatenate(embs)[inverse], np.concatenate(logits)[inverse]

    def query_latency_ms(self, queries: list[str]) -> dict[str, float]:
        """Batch-1 latency, tokenisation included, after a short warm-up."""
        return per_query_latency_ms(lambda q: self._run([q]), queries, "latency")
