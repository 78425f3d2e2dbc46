"""The reranker: a cross-encoder on (search term, product title) trained from the base model's weights on the
training terms' graded judgments with sentence-transformers' CrossEncoder trainer."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipelines.config import RerankConfig
from pipelines.data.dataset import Snapshot, is_training_term, normalize_term
from pipelines.training.finetune import mined_negatives, resolve_base_model
from pipelines.training.progress import MetricsSink, progress_callback

if TYPE_CHECKING:
    from sentence_transformers.cross_encoder import CrossEncoder

RERANKER_MODEL_DIR = "cross_encoder"


def graded_label(relevance: pd.Series) -> pd.Series:
    """Home Depot's 1-3 grade as a soft target in [0, 1] for binary cross-entropy: 1 irrelevant, 3 exact match."""
    return ((relevance.astype(float) - 1.0) / 2.0).clip(0.0, 1.0)


def reranker_pairs(
    judgments: pd.DataFrame,
    catalog: pd.DataFrame | None,
    cfg: RerankConfig,
    mined_ranks: tuple[int, int],
    seed: int,
) -> pd.DataFrame:
    """(query, title, label) rows: every judged pair of a training term (held-out and validation terms never enter,
    whatever the caller passes), plus with cfg.mined_negatives one never-judged title per term, mined by stemmed
    BM25 at `mined_ranks` (the encoder's miner), at label 0. Shuffled (seeded)."""
    train = judgments[judgments["search_term"].map(is_training_term).astype(bool)]
    rows = pd.DataFrame(
        {
            "query": train["search_term"].map(normalize_term),
            "title": train["product_title"].astype(str),
            "label": graded_label(train["relevance"]),
        }
    )
    if cfg.mined_negatives and catalog is not None and not train.empty:
        mined = mined_negatives(train, catalog, mined_ranks, seed)
        rows = pd.concat(
            [rows, pd.DataFrame({"query": mined["term"], "title": mined["negative"], "label": 0.0})],
            ignore_index=True,
        )
    rows = rows.drop_duplicates(["query", "title"]).astype({"label": "float32"})
    return rows.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def load_cross_encoder(name_or_path: str, max_seq_length: int) -> CrossEncoder:
    """A one-logit cross-encoder: the base model's BERT with a new scoring head (or a trained reranker folder)."""
    from sentence_transformers.cross_encoder import CrossEncoder

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the default must never reach for a hub
    return CrossEncoder(resolve_base_model(name_or_path), num_labels=1, max_length=max_seq_length, device="cpu")


def train_cross_encoder(
    model: CrossEncoder,
    pairs: pd.DataFrame,
    cfg: RerankConfig,
    out_dir: Path,
    seed: int,
    on_metrics: MetricsSink | None = None,
) -> list[dict]:
    """Binary cross-entropy on the graded labels (the MS MARCO rerankers' loss) with the CrossEncoder trainer;
    returns the log history."""
    if cfg.max_steps == 0 or pairs.empty:
        return []
    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    args = CrossEncoderTrainingArguments(
        output_dir=str(out_dir / "checkpoints"),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        seed=seed,
        data_seed=seed,
        logging_steps=max(1, min(25, cfg.max_steps // 4)),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = CrossEncoderTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_pandas(pairs[["query", "title", "label"]], preserve_index=False),
        loss=BinaryCrossEntropyLoss(model),
        callbacks=[progress_callback("rerank", on_metrics)],
    )
    trainer.train()
    return [{k: v for k, v in e.items() if isinstance(v, int | float)} for e in trainer.state.log_history]


def train_reranker(
    snapshot_dir: str | Path,
    out_dir: str | Path,
    cfg: RerankConfig,
    base_model: str,
    mined_ranks: tuple[int, int] = (10, 50),
    seed: int = 42,
    on_metrics: MetricsSink | None = None,
) -> dict[str, Any]:
    """Train the reranker on the snapshot's training judgments and save it to out_dir/cross_encoder (safetensors)."""
    import torch

    snap, out = Snapshot.open(snapshot_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    np.random.seed(seed)
    started = time.perf_counter()
    pairs = reranker_pairs(snap.table("judgments_train"), snap.table("catalog"), cfg, mined_ranks, seed)
    pairs_seconds = round(time.perf_counter() - started, 1)
    model = load_cross_encoder(base_model, cfg.max_seq_length)
    started = time.perf_counter()
    history = train_cross_encoder(model, pairs, cfg, out, seed, on_metrics)
    train_seconds = round(time.perf_counter() - started, 1)
    model.save(str(out / RERANKER_MODEL_DIR))
    losses = [{"step": e["step"], "loss": e["loss"]} for e in history if "loss" in e]
    result = {
        "reranker_dir": str(out / RERANKER_MODEL_DIR),
        "pairs": len(pairs),
        "pairs_terms": int(pairs["query"].nunique()),
        "pairs_negative": int((pairs["label"] == 0).sum()),
        "steps": int(max((e.get("step", 0) for e in history), default=0)),
        "final_loss": losses[-1]["loss"] if losses else None,
        "pairs_seconds": pairs_seconds,
        "train_seconds": train_seconds,
    }
    (out / "reranker_training.json").write_text(json.dumps({**result, "loss_history": losses}, indent=1))
    return result
