"""Students with fewer layers, initialised from the fine-tuned teacher's layers and trained to match its embeddings."""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipelines.config import CompressConfig, TrainConfig
from pipelines.data.dataset import Snapshot, is_validation_term
from pipelines.runtime.bundle import LABELS_FILE
from pipelines.training.finetune import (
    CATEGORY_SET,
    ENCODER_DIR,
    HEAD_FILE,
    load_finetuned,
    load_training_sets,
    training_sets,
)
from pipelines.training.progress import MetricsSink, progress_callback

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


def spread_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layers a student keeps: evenly spread, first and last included (6 -> 3: [0, 2, 5]; 6 -> 2: [0, 5]).

    The first layer holds most lexical mixing and the last one the space the teacher's pooling was trained on, the
    usual choice in sentence-transformers' layer-reduction distillation example.
    """
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(f"a student needs 1..{teacher_layers} layers, not {student_layers}")
    if student_layers == 1:
        return [teacher_layers - 1]
    return sorted({int(round(x)) for x in np.linspace(0, teacher_layers - 1, student_layers)})


def student_from_teacher(teacher: SentenceTransformer, layers: list[int]) -> SentenceTransformer:
    """A copy of the teacher (pooling, normalisation and tokenizer included) that keeps only the given layers."""
    import torch

    student = copy.deepcopy(teacher)
    bert = student[0].auto_model
    kept = [bert.encoder.layer[i] for i in layers]
    bert.encoder.layer = torch.nn.ModuleList(kept)
    bert.config.num_hidden_layers = len(kept)
    for new_idx, layer in enumerate(kept):  # transformers indexes attention caches by layer position
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    return student


def prune_ffn_neurons(student: SentenceTransformer, keep: int, texts: list[str]) -> list[list[int]]:
    """Structured pruning of every layer's feed-forward block to its `keep` most important intermediate neurons
    (in place; returns the kept indices per layer).

    Importance of neuron j: mean |GELU activation| over the tokens of `texts` times the L2 norm of its output
    weights, i.e. how much it adds to the residual stream on domain text. Whole rows/columns go, so the ONNX graph
    is simply narrower: smaller and faster on any runtime, unlike unstructured sparsity. Distillation recovers.
    """
    import torch

    bert = student[0].auto_model
    sums = [torch.zeros(layer.intermediate.dense.out_features) for layer in bert.encoder.layer]
    count = 0

    def hook(i):
        def record(_module, _inputs, output):
            sums[i] += output.detach().abs().reshape(-1, output.shape[-1]).sum(0)

        return record

    handles = [layer.intermediate.register_forward_hook(hook(i)) for i, layer in enumerate(bert.encoder.layer)]
    try:
        with torch.no_grad():
            for start in range(0, len(texts), 64):
                features = student.tokenize(texts[start : start + 64])
                bert(input_ids=features["input_ids"], attention_mask=features["attention_mask"])
                count += int(features["input_ids"].numel())  # padding rows are few: batches of similar texts
    finally:
        for handle in handles:
            handle.remove()
    kept_per_layer = []
    for layer, total in zip(bert.encoder.layer, sums, strict=True):
        up, down = layer.intermediate.dense, layer.output.dense
        score = total / max(count, 1) * down.weight.detach().norm(dim=0)
        kept = torch.topk(score, keep).indices.sort().values
        new_up, new_down = torch.nn.Linear(up.in_features, keep), torch.nn.Linear(keep, down.out_features)
        with torch.no_grad():
            new_up.weight.copy_(up.weight[kept])
            new_up.bias.copy_(up.bias[kept])
            new_down.weight.copy_(down.weight[:, kept])
            new_down.bias.copy_(down.bias)
        layer.intermediate.dense, layer.output.dense = new_up, new_down
        kept_per_layer.append(kept.tolist())
    bert.config.intermediate_size = keep
    return kept_per_layer


def distillation_texts(snapshot: Snapshot, max_texts: int, seed: int) -> list[str]:
    """In-domain texts the student learns to embed like the teacher: every training query (what serving embeds at
    request time), then catalog and PriceRunner training titles (what the index and the category head see).

    Held-out queries are never used; catalog titles are, as the index embeds the whole catalog anyway.
    """
    queries = snapshot.table("judgments_train")["search_term"].astype(str).str.strip()
    titles = pd.concat([snapshot.table("catalog")["product_title"], snapshot.table("offers_train")["offer_title"]])
    queries = queries[queries != ""].drop_duplicates()
    titles = titles.astype(str).drop_duplicates()
    titles = titles[~titles.isin(set(queries))]
    queries = queries.sample(n=min(len(queries), max_texts), random_state=seed)
    titles = titles.sample(n=min(len(titles), max_texts - len(queries)), random_state=seed)
    return queries.tolist() + titles.tolist()


def contrastive_sets(snapshot: Snapshot, train: TrainConfig, teacher_dir: str | Path) -> dict[str, pd.DataFrame]:
    """The teacher's own ranking sets (Home Depot positives, hard-negative triplets; validation terms left out),
    for the student to keep learning the task while it matches the teacher: read from the teacher's folder, or for a
    folder without them built as finetune_encoder does, negatives mined by BM25 (no base model at hand). The joint
    category set stays out: its (text, label) rows are no ranking pairs, and the student inherits the categories
    through the teacher's embedding."""
    sets = load_training_sets(teacher_dir)
    if sets is None:
        judgments = snapshot.table("judgments_train")
        judgments = judgments[~judgments["search_term"].map(is_validation_term).astype(bool)]
        sets = training_sets(judgments, snapshot.table("offers_train"), train, snapshot.table("catalog"))
    return {name: df for name, df in sets.items() if name != CATEGORY_SET}


def train_student(
    student: SentenceTransformer,
    texts: list[str],
    targets: np.ndarray,
    cfg: CompressConfig,
    out_dir: Path,
    task_sets: dict[str, pd.DataFrame] | None = None,
    progress: Any = None,
) -> list[dict]:
    """Embedding distillation with the sentence-transformers trainer on precomputed teacher embeddings: MSELoss (the
    recipe of its model_distillation example) or cosine distance; with `task_sets`, MultipleNegativesRankingLoss
    batches on the fine-tuning pairs are mixed in (multi-dataset training, batches drawn in proportion to size).

    Measured on the default profile (3-layer student, 400 steps): distillation alone keeps ~93% of the teacher's
    held-out nDCG@10, distillation + the task's pairs ~96% (see the compression report).
    Returns the trainer's log history.
    """
    if cfg.distill_steps == 0:
        return []
    from datasets import Dataset, DatasetDict
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import (
        EmbedDistillLoss,
        MSELoss,
        MultipleNegativesRankingLoss,
    )

    args = SentenceTransformerTrainingArguments(
        output_dir=str(out_dir / "checkpoints"),
        max_steps=cfg.distill_steps,
        per_device_train_batch_size=cfg.distill_batch_size,
        learning_rate=cfg.distill_learning_rate,
        warmup_steps=0.1,  # transformers 5: a float < 1 is a ratio of the total steps
        seed=cfg.seed,
        data_seed=cfg.seed,
        # duplicates in a batch would be false in-batch negatives for MNRL; harmless for the distillation batches
        batch_sampler=BatchSamplers.NO_DUPLICATES if task_sets else BatchSamplers.BATCH_SAMPLER,
        logging_steps=max(1, min(50, cfg.distill_steps // 4)),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
    )
    if cfg.distill_freeze_embeddings:
        student[0].auto_model.embeddings.word_embeddings.weight.requires_grad_(False)
    data = Dataset.from_dict({"text": texts, "label": targets.astype(np.float32).tolist()})
    # MSE on unit vectors is (2 - 2 cos) / dim, ~dim times smaller than an MNRL loss: mixed with MNRL batches under
    # one Adam state it would barely move the weights, hence cosine distance there
    loss = MSELoss(student) if cfg.distill_loss == "mse" else EmbedDistillLoss(student, distance_metric="cosine")
    if task_sets:
        mnrl = MultipleNegativesRankingLoss(student)
        train = DatasetDict(
            {"distill": data, **{name: Dataset.from_pandas(df, preserve_index=False) for name, df in task_sets.items()}}
        )
        trainer = SentenceTransformerTrainer(
            model=student,
            args=args,
            train_dataset=train,
            loss={"distill": loss, **{name: mnrl for name in task_sets}},
            callbacks=[progress] if progress else None,
        )
    else:
        trainer = SentenceTransformerTrainer(
            model=student, args=args, train_dataset=data, loss=loss, callbacks=[progress] if progress else None
        )
    trainer.train()
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    return [{k: v for k, v in e.items() if isinstance(v, int | float)} for e in trainer.state.log_history]


def distill_student(
    teacher: SentenceTransformer,
    teacher_dir: str | Path,
    out_dir: str | Path,
    layers: list[int],
    texts: list[str],
    targets: np.ndarray,
    cfg: CompressConfig,
    task_sets: dict[str, pd.DataFrame] | None = None,
    ffn: int | None = None,
    init_dir: str | Path | None = None,
    on_metrics: MetricsSink | None = None,
) -> dict[str, Any]:
    """Build, train and save one student as a finetune-shaped folder (encoder/, category head, labels).

    The student starts from the teacher's `layers`, or from the distilled student in `init_dir` (same layers); with
    `ffn`, its feed-forward blocks are pruned before training. The category head is the teacher's, unchanged: it
    reads the normalised embedding, so a student that reproduces the teacher's embedding reproduces its logits too.
    """
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if init_dir is None:
        student = student_from_teacher(teacher, layers)
    else:
        student = load_finetuned(init_dir, teacher.max_seq_length)[0]
        if student[0].auto_model.config.num_hidden_layers != len(layers):
            raise ValueError(
                f"{init_dir} has {student[0].auto_model.config.num_hidden_layers} layers, not {len(layers)}"
            )
    if ffn is not None:
        prune_ffn_neurons(student, ffn, texts[:512] + texts[-512:])  # queries and titles
    started = time.perf_counter()
    progress = progress_callback(f"distill.{out.name}", on_metrics)
    history = train_student(student, texts, targets, cfg, out, task_sets, progress)
    seconds = time.perf_counter() - started
    student.save(str(out / ENCODER_DIR), create_model_card=False)
    for name in (HEAD_FILE, LABELS_FILE):
        shutil.copyfile(Path(teacher_dir) / name, out / name)
    losses = [e["loss"] for e in history if "loss" in e]
    with torch.no_grad():
        check = student.encode(texts[:256], batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    cos = np.sum(check * targets[:256], axis=1)
    return {
        "model_dir": str(out),
        "layers": list(layers),
        "ffn": ffn,
        "initialised_from": str(init_dir) if init_dir else "teacher",
        "train_seconds": round(seconds, 1),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "train_cosine_to_teacher": float(cos.mean()),
    }
