"""LoRA fine-tuning (train.method: lora) on a tiny random BERT: trains few weights, merges into a plain BERT."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipelines.compression.export import export_weights
from pipelines.config import LoraSettings, ShopguideConfig, TrainConfig
from pipelines.runtime.bundle import LABELS_FILE
from pipelines.runtime.encoder import OnnxEncoder
from pipelines.training.finetune import (
    ENCODER_DIR,
    HEAD_FILE,
    add_lora,
    load_encoder,
    merge_lora,
    parameter_counts,
    train_contrastive,
)
from tests.tiny_bert import save_tiny_bert

TEXTS = ["cordless drill", "deck screws 3 in.", "white interior paint", "garden hose 50 ft."]
PAIRS = pd.DataFrame(
    {
        "anchor": [f"{t} {i}" for i in range(8) for t in ("drill", "screws", "paint", "hose")],
        "positive": [f"{t} product {i}" for i in range(8) for t in ("dewalt drill", "deck screw", "paint", "hose")],
    }
)
LORA = TrainConfig(
    method="lora",
    max_steps=4,
    batch_size=8,
    max_seq_length=16,
    lora=LoraSettings(r=4, alpha=8, dropout=0.0, learning_rate=1e-2),
)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-bert")
    save_tiny_bert(out)
    return out


@pytest.fixture(scope="module")
def merged(tiny_bert, tmp_path_factory):
    """(base weights, LoRA parameter counts, the merged model's finetune_encoder-shaped folder)."""
    import torch
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("lora")
    model = load_encoder(str(tiny_bert), LORA.max_seq_length)
    base = {k: v.clone() for k, v in model[0].auto_model.state_dict().items()}
    full = parameter_counts(model)
    add_lora(model, LORA.lora)
    counts = parameter_counts(model)
    train_contrastive(model, {"pairs": PAIRS}, LORA, out)
    merge_lora(model)
    model.save(str(out / ENCODER_DIR))
    head = torch.nn.Linear(32, 2)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out / HEAD_FILE))
    (out / LABELS_FILE).write_text(json.dumps(["a", "b"]))
    return base, full, counts, out


def test_lora_trains_a_small_share_of_the_weights(merged):
    _, full, lora, _ = merged
    assert full["trainable_parameters"] == full["total_parameters"]  # a full fine-tune trains everything
    # adapters on query/key/value/dense at r=4: ~2% of a 2-layer, 32-wide BERT whose 30,522-token embedding dominates
    assert 0 < lora["trainable_parameters"] < 0.05 * lora["total_parameters"]


def test_merged_lora_is_a_plain_bert_with_moved_weights(merged):
    from safetensors import safe_open

    base, _, _, out = merged
    with safe_open(str(out / ENCODER_DIR / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert keys == set(base)  # the base model's tensors, no lora_A / lora_B / base_layer left
        moved = [k for k in keys if not np.allclose(f.get_tensor(k).numpy(), base[k].numpy())]
    assert any("attention.self.query" in k for k in moved)  # the adapters were merged into the targets
    assert not any("embeddings" in k for k in moved)  # and nothing else trained
    config = json.loads((out / ENCODER_DIR / "config.json").read_text())
    assert config["architectures"] == ["BertModel"]
    assert not (out / ENCODER_DIR / "adapter_config.json").exists()


def test_merged_lora_reloads_and_exports_like_a_full_fine_tune(merged, tmp_path):
    _, _, _, out = merged
    reloaded = load_encoder(str(out / ENCODER_DIR), LORA.max_seq_length)
    assert type(reloaded[0].auto_model).__name__ == "BertModel"
    reference = reloaded.encode(TEXTS, normalize_embeddings=True)
    cfg = ShopguideConfig.model_validate({"train": {"max_seq_length": 16}, "export": {"parity_texts": 4}})
    report = export_weights(out, {"teacher-fp32": tmp_path / "fp32"}, TEXTS, cfg)["teacher-fp32"]
    assert report["parity"]["cosine_min"] > 0.9999
    emb, _ = OnnxEncoder.load(tmp_path / "fp32").encode(TEXTS, batch_size=4)
    np.testing.assert_allclose(emb, reference, atol=1e-4)


def test_lora_keeps_the_best_adapter_when_scoring_during_training(tiny_bert, tmp_path):
    """With eval_steps the trainer cannot reload an adapter checkpoint itself: the best adapter is set back."""
    from sentence_transformers.sentence_transformer.evaluation import SentenceEvaluator

    class FirstIsBest(SentenceEvaluator):
        """Scores each evaluation lower than the one before, recording the embeddings it scored."""

        def __init__(self) -> None:
            super().__init__()
            self.seen: list[np.ndarray] = []
            self.primary_metric = "val_cosine_ndcg@10"

        def __call__(self, model, output_path=None, epoch=-1, steps=-1):
            self.seen.append(model.encode(TEXTS, normalize_embeddings=True))
            return {"val_cosine_ndcg@10": 1.0 / len(self.seen)}

    evaluator = FirstIsBest()
    cfg = LORA.model_copy(update={"eval_steps": 2})
    model = load_encoder(str(tiny_bert), cfg.max_seq_length)
    add_lora(model, cfg.lora)
    train_contrastive(model, {"pairs": PAIRS}, cfg, tmp_path, evaluator)
    assert len(evaluator.seen) == 2 and not np.allclose(evaluator.seen[0], evaluator.seen[1], atol=1e-4)
    merge_lora(model)
    np.testing.assert_allclose(model.encode(TEXTS, normalize_embeddings=True), evaluator.seen[0], atol=1e-5)


def test_lora_settings_are_validated():
    with pytest.raises(ValueError):
        TrainConfig.model_validate({"method": "adapters"})
    with pytest.raises(ValueError):
        TrainConfig.model_validate({"lora": {"r": 0}})
    with pytest.raises(ValueError):
        TrainConfig.model_validate({"lora": {"target_modules": []}})
    assert TrainConfig().method == "full"  # the default recipe is unchanged
