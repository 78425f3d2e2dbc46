"""ONNX export with two outputs, graph optimization, INT8 per-channel quantization, and a parity check vs PyTorch."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import ShopguideConfig
from pipelines.data.dataset import Snapshot
from pipelines.runtime.bundle import (
    ENCODER_FILE,
    LABELS_FILE,
    ONNX_FILE,
    RERANKER_DIR,
    RERANKER_FILE,
    TOKENIZER_FILE,
)
from pipelines.runtime.encoder import OnnxEncoder
from pipelines.runtime.index import ProductIndex
from pipelines.runtime.rerank import RERANKER_INPUTS, RERANKER_OUTPUT, CrossEncoderReranker
from pipelines.training.finetune import load_finetuned


def _pooled_encoder(bert, head):
    """BERT -> masked mean pooling -> L2 normalisation -> (embedding, category_logits): the served contract."""
    import torch

    class PooledEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert, self.head = bert, head

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            embedding = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
            return embedding, self.head(embedding)

    return PooledEncoder().eval()


ENCODER_INPUTS = ("input_ids", "attention_mask")
ENCODER_OUTPUTS = ("embedding", "category_logits")


def export_to_onnx(
    module,
    path: Path,
    opset: int,
    inputs: tuple[str, ...] = ENCODER_INPUTS,
    outputs: tuple[str, ...] = ENCODER_OUTPUTS,
) -> None:
    """A module taking (batch, sequence) int64 token tensors named `inputs`, with batch-first `outputs`."""
    import torch

    ids = torch.ones((2, 8), dtype=torch.int64)
    dynamic = {0: "batch", 1: "sequence"}
    # The legacy (TorchScript) exporter fuses cleanly at opset 17; the dynamo one leaves GELU unfused and slower.
    torch.onnx.export(
        module,
        tuple(ids if name == "input_ids" else torch.ones_like(ids) for name in inputs),
        str(path),
        input_names=list(inputs),
        output_names=list(outputs),
        dynamic_axes={**dict.fromkeys(inputs, dynamic), **{name: {0: "batch"} for name in outputs}},
        opset_version=opset,
        dynamo=False,
    )


def quantize_int8(src: Path, dst: Path, per_channel: bool, *, optimized: bool = False) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # the transformer optimizer's contrib ops (Attention, SkipLayerNormalization, ...) carry no type information the
    # quantizer can infer, so it has to be told that untyped tensors are float
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT} if optimized else None
    # per-tensor INT8 loses too much (min cosine ~0.91 on MiniLM); per-channel keeps ~0.98
    quantize_dynamic(str(src), str(dst), per_channel=per_channel, weight_type=QuantType.QInt8, extra_options=extra)


def optimize_onnx(src: Path, dst: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """onnxruntime's transformer optimizer (model_type bert): fuses embeddings+LayerNorm, attention, skip-LayerNorm
    and bias-GELU into contrib ops. Returns the fused-op counts. On MiniLM: faster at batch 1, ~10% slower at 32."""
    from onnxruntime.transformers.optimizer import optimize_model

    # opt_level 0: python fusions only, so the saved graph stays portable across ORT builds and CPU types
    model = optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=0)
    model.save_model_to_file(str(dst))
    return {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}


def write_bundle_files(
    out: Path, tokenizer, labels: list[str], dim: int, max_seq_length: int, quantization: str, **meta: Any
) -> None:
    """Everything of a bundle except the graph: tokenizer.json (a `tokenizers.Tokenizer`), labels, encoder.json."""
    tokenizer.save(str(out / TOKENIZER_FILE))
    (out / LABELS_FILE).write_text(json.dumps(labels))
    (out / ENCODER_FILE).write_text(
        json.dumps(
            {
                "max_seq_length": max_seq_length,
                "dim": dim,
                "pooling": "mean",
                "normalized": True,
                "quantization": quantization,
                "outputs": ["embedding", "category_logits"],
                **meta,
            }
        )
    )


def parity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Row-wise cosine and max abs difference between two sets of normalised embeddings."""
    cos = np.sum(reference * candidate, axis=1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1) + 1e-12
    )
    return {
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "max_abs_diff": float(np.abs(reference - candidate).max()),
    }


def parity_texts(snapshot: Snapshot, n: int) -> list[str]:
    """Real queries and titles, half each, fixed order: the same texts every run of a snapshot."""
    queries = snapshot.table("judgments_heldout")["search_term"].astype(str).drop_duplicates()
    titles = snapshot.table("catalog")["product_title"].astype(str)
    return queries.head(n // 2).tolist() + titles.head(n - n // 2).tolist()


def _quantization_label(graph: str, per_channel: bool) -> str:
    if graph == "fp32":
        return "none"
    return "int8-dynamic-per-channel" if per_channel else "int8-dynamic-per-tensor"


def export_weights(
    model_dir: str | Path, bundles: dict[str, Path], texts: list[str], cfg: ShopguideConfig
) -> dict[str, dict[str, Any]]:
    """One PyTorch -> ONNX export of a weight set, optionally optimized, written as an fp32 and/or INT8 bundle per
    requested variant, each with its parity against the PyTorch model of the same weights."""
    import tempfile

    import torch

    model, head, labels = load_finetuned(model_dir, cfg.train.max_seq_length)
    config = model[0].auto_model.config
    with torch.no_grad():
        reference = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        classes = head(torch.from_numpy(reference)).argmax(1).numpy()
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="shopguide-export-") as tmp:
        plain, graph_file = Path(tmp) / "plain.onnx", Path(tmp) / "plain.onnx"
        bert = model[0].auto_model
        if cfg.compress.optimize:
            # SDPA exports as a pattern the optimizer does not recognise; eager attention (same numbers) lets it fuse
            # embeddings + LayerNorm and every self-attention block into single contrib ops
            bert.set_attn_implementation("eager")
        export_to_onnx(_pooled_encoder(bert, head), plain, cfg.export.opset)
        fused: dict[str, int] = {}
        if cfg.compress.optimize:
            graph_file = Path(tmp) / "optimized.onnx"
            fused = optimize_onnx(plain, graph_file, config.num_attention_heads, config.hidden_size)
        for name, bundle in bundles.items():
            graph = name.rpartition("-")[2]  # variant names end in their graph: <weights>-<fp32|int8>
            if graph not in ("fp32", "int8"):
                raise ValueError(f"not an ONNX variant name: {name!r}")
            bundle.mkdir(parents=True, exist_ok=True)
            if graph == "int8":
                quantize_int8(graph_file, bundle / ONNX_FILE, cfg.export.per_channel, optimized=cfg.compress.optimize)
            else:
                shutil.copyfile(graph_file, bundle / ONNX_FILE)
            write_bundle_files(
                bundle,
                model.tokenizer.backend_tokenizer,
                labels,
                model.get_embedding_dimension(),
                cfg.train.max_seq_length,
                _quantization_label(graph, cfg.export.per_channel),
                variant=name,
                layers=int(config.num_hidden_layers),
                vocab_size=int(config.vocab_size),
                optimized=cfg.compress.optimize,
            )
            emb, logits = OnnxEncoder.load(bundle, threads=cfg.compress.threads).encode(texts)
            agreement = float((logits.argmax(1) == classes).mean())
            out[name] = {
                "bundle_dir": str(bundle),
                "model_dir": str(model_dir),
                "parity": {**parity(reference, emb), "category_agreement": agreement},
                "size_mb": (bundle / ONNX_FILE).stat().st_size / 1e6,
                "fused_ops": fused,
                "layers": int(config.num_hidden_layers),
                "vocab_size": int(config.vocab_size),
            }
    return out


def export_bundle(
    model_dir: str | Path,
    snapshot_dir: str | Path,
    out_dir: str | Path,
    cfg: ShopguideConfig,
    variant: str = "teacher-int8",
) -> dict[str, Any]:
    """One servable bundle of a fine-tuned folder through the DAG's own export path (export_weights), parity
    measured on the snapshot's texts: what the tests and benches build when they need a bundle without the suite."""
    texts = parity_texts(Snapshot.open(snapshot_dir), cfg.export.parity_texts)
    return export_weights(model_dir, {variant: Path(out_dir)}, texts, cfg)[variant]


def build_product_index(bundle_dir: str | Path, snapshot_dir: str | Path, batch_size: int = 64) -> dict[str, Any]:
    """Embed the snapshot's whole catalog with the bundle's served graph and store the index in the bundle."""
    catalog = Snapshot.open(snapshot_dir).table("catalog")
    encoder = OnnxEncoder.load(bundle_dir)
    t0 = time.perf_counter()
    emb, _ = encoder.encode(catalog["product_title"].astype(str).tolist(), batch_size=batch_size)
    seconds = time.perf_counter() - t0
    index = ProductIndex(catalog["product_uid"].to_numpy(np.int64), catalog["product_title"].to_numpy(object), emb)
    index.save(bundle_dir)
    return {
        "products": len(index),
        "index_seconds": round(seconds, 2),
        "products_per_s": round(len(index) / max(seconds, 1e-9), 1),
    }


def _scoring_head(classifier):
    """BertForSequenceClassification -> its logit, with the token types as an input: the served reranker graph."""
    import torch

    class ScoringHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.classifier = classifier

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.classifier(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.logits

    return ScoringHead().eval()


def reranker_parity_pairs(snapshot: Snapshot, n: int) -> list[tuple[str, str]]:
    """Held-out terms with judged titles of theirs, fixed order (the parity texts' rule for pairs)."""
    judged = snapshot.table("judgments_heldout").drop_duplicates("search_term").head(n)
    return list(zip(judged["search_term"].astype(str), judged["product_title"].astype(str), strict=True))


def export_reranker(
    reranker_dir: str | Path,
    bundle_dir: str | Path,
    pairs: list[tuple[str, str]],
    cfg: ShopguideConfig,
) -> dict[str, Any]:
    """The trained cross-encoder into bundle/reranker/ through the encoder's own chain (ONNX export, transformer
    optimizer, dynamic INT8 per channel), with its tokenizer and reranker.json, and its parity with PyTorch: the
    logits of `pairs` scored one query's pairs per run, as the service scores them."""
    import tempfile

    import torch

    from pipelines.training.reranker import load_cross_encoder

    model = load_cross_encoder(str(reranker_dir), cfg.rerank.max_seq_length)
    classifier = model[0].auto_model
    config = classifier.config
    with torch.no_grad():
        reference = np.asarray(model.predict(pairs, activation_fn=torch.nn.Identity(), batch_size=64), np.float32)
    out = Path(bundle_dir) / RERANKER_DIR
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="shopguide-export-reranker-") as tmp:
        graph_file = Path(tmp) / "plain.onnx"
        if cfg.compress.optimize:
            classifier.set_attn_implementation("eager")  # as for the encoder: fusable attention
        export_to_onnx(_scoring_head(classifier), graph_file, cfg.export.opset, RERANKER_INPUTS, (RERANKER_OUTPUT,))
        fused: dict[str, int] = {}
        if cfg.compress.optimize:
            fused = optimize_onnx(
                graph_file, Path(tmp) / "optimized.onnx", config.num_attention_heads, config.hidden_size
            )
            graph_file = Path(tmp) / "optimized.onnx"
        quantize_int8(graph_file, out / ONNX_FILE, cfg.export.per_channel, optimized=cfg.compress.optimize)
    model.tokenizer.backend_tokenizer.save(str(out / TOKENIZER_FILE))
    meta = {
        "max_seq_length": cfg.rerank.max_seq_length,
        "top_n": cfg.rerank.top_n,
        "served_top_n": cfg.search.rerank_top_n,
        "quantization": _quantization_label("int8", cfg.export.per_channel),
        "inputs": list(RERANKER_INPUTS),
        "outputs": [RERANKER_OUTPUT],
        "layers": int(config.num_hidden_layers),
        "optimized": cfg.compress.optimize,
    }
    (out / RERANKER_FILE).write_text(json.dumps(meta))
    served = CrossEncoderReranker.load(bundle_dir, threads=cfg.export.threads)
    assert served is not None
    by_query: dict[str, list[int]] = {}
    for i, (query, _) in enumerate(pairs):
        by_query.setdefault(query, []).append(i)
    scored = np.zeros(len(pairs), np.float32)
    for query, rows in by_query.items():
        scored[rows] = served.scores(query, [pairs[i][1] for i in rows])
    agree = np.corrcoef(reference, scored)[0, 1] if len(pairs) > 1 and reference.std() > 0 else 1.0
    result = {
        "reranker_size_mb": (out / ONNX_FILE).stat().st_size / 1e6,
        "reranker_parity_max_abs_diff": float(np.abs(reference - scored).max()) if len(pairs) else 0.0,
        "reranker_parity_correlation": float(agree),
        "reranker_fused_ops": fused,
    }
    (out / RERANKER_FILE).write_text(
        json.dumps({**meta, **{k: v for k, v in result.items() if k != "reranker_fused_ops"}})
    )
    return result
