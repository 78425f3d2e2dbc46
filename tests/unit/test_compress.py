"""Compression suite on a tiny random BERT: students, vocabulary pruning, ONNX variants, evaluation and selection."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.config import CompressConfig, DataConfig, load_config
from pipelines.data.dataset import snapshot_data
from pipelines.runtime.bundle import LABELS_FILE
from pipelines.training.finetune import ENCODER_DIR, HEAD_FILE, load_finetuned
from tests.tiny_bert import save_tiny_bert

LAYERS = 3
DOMAIN = [
    "cordless drill with battery",
    "deck screws 3 inch",
    "white interior paint",
    "garden hose nozzle",
    "led light bulb 60w",
    "toilet flapper replacement",
    "vinyl plank flooring grey",
]


@pytest.fixture(scope="module")
def snapshot_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("snap")
    # 120 terms: variants are scored on the validation terms (1 in 16 training terms), 5 of them here
    snapshot_data(DataConfig(max_terms=120, max_offers=200, event_users=10), out, datetime(2026, 1, 1, tzinfo=UTC))
    return out


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, snapshot_dir):
    """A finetune_encoder-shaped folder: random 3-layer BERT, MiniLM's real tokenizer, a head over the real labels."""
    import torch
    from safetensors.torch import save_file
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    out = tmp_path_factory.mktemp("teacher")
    raw = out / "raw"
    save_tiny_bert(raw, layers=LAYERS, max_positions=64)
    modules = [Transformer(str(raw), max_seq_length=16), Pooling(32, "mean"), Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(out / ENCODER_DIR), create_model_card=False)
    labels = sorted(pd.read_parquet(snapshot_dir / "offers_train.parquet")["category_label"].astype(str).unique())
    head = torch.nn.Linear(32, len(labels))
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out / HEAD_FILE))
    (out / LABELS_FILE).write_text(json.dumps(labels))
    return out


def tiny_config(**compress):
    settings = {
        "distill_steps": 2,
        "distill_batch_size": 8,
        "distill_max_texts": 64,
        "timing_repeats": 1,
        "throughput_texts": 32,
        "measure_memory": False,
        "variants": ["teacher-fp32", "teacher-int8", "student2-int8", "student2-vocab-int8", "student2-ffn32-int8"],
        **compress,
    }
    return load_config(
        "tiny",
        {
            "train.max_seq_length": 16,
            "export.parity_texts": 16,
            "evaluate.latency_queries": 10,
            **{f"compress.{k}": v for k, v in settings.items()},
        },
    )


@pytest.fixture(scope="module")
def compressed(teacher_dir, snapshot_dir, tmp_path_factory):
    """Every stage once, as the DAG would call them."""
    from pipelines.compression import variants as compress

    cfg = tiny_config()
    out = tmp_path_factory.mktemp("compress")
    distilled = compress.distill_students(teacher_dir, snapshot_dir, out / "students", cfg)
    pruned = compress.prune_vocabulary(distilled["models"], snapshot_dir, out / "pruned", cfg)
    exported = compress.export_variants(pruned["models"], snapshot_dir, out / "bundles", cfg)
    evaluated = compress.evaluate_variants(exported, snapshot_dir, out / "evaluation", cfg)
    selected = compress.select_variant(evaluated, out, cfg)
    # every stage hands the next one small JSON values only
    for stage in (distilled, pruned, exported, evaluated, selected):
        json.dumps(stage)
    return {
        "cfg": cfg,
        "distilled": distilled,
        "pruned": pruned,
        "exported": exported,
        "evaluated": evaluated,
        "selected": selected,
    }


# --- distillation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("teacher", "student", "layers"),
    [
        (6, 3, [0, 2, 5]),
        (6, 2, [0, 5]),
        (6, 6, [0, 1, 2, 3, 4, 5]),
        (12, 4, [0, 4, 7, 11]),
        (4, 1, [3]),
    ],
)
def test_spread_layers(teacher, student, layers):
    from pipelines.compression.distill import spread_layers

    assert spread_layers(teacher, student) == layers


@pytest.mark.parametrize(
    ("variants", "after", "plan"),
    [
        # the full-width student of the pruned one's depth is trained first, served or not
        (["student3-ffn768-vocab-int8"], True, {"student3": (None, None), "student3-ffn768": (768, "student3")}),
        (
            ["student3-ffn768-int8", "student3-vocab-int8"],
            True,
            {"student3": (None, None), "student3-ffn768": (768, "student3")},
        ),
        (["student3-ffn768-int8", "student2-int8"], False, {"student3-ffn768": (768, None), "student2": (None, None)}),
        (["teacher-int8"], True, {}),
    ],
)
def test_student_plan_orders_ffn_pruning_after_distillation(variants, after, plan):
    from pipelines.compression.variants import student_plan

    cfg = load_config("tiny", {"compress.variants": variants, "compress.ffn_after_distill": after}).compress
    got = student_plan(cfg, teacher_layers=6, teacher_ffn=1536)
    assert {k: (v["ffn"], v["init"]) for k, v in got.items()} == plan
    assert list(got) == list(plan)


@pytest.mark.parametrize("student", [0, 7])
def test_spread_layers_rejects_impossible_students(student):
    from pipelines.compression.distill import spread_layers

    with pytest.raises(ValueError):
        spread_layers(6, student)


def test_student_copies_the_chosen_teacher_layers(teacher_dir):
    import torch

    from pipelines.compression.distill import student_from_teacher

    teacher, _, _ = load_finetuned(teacher_dir, 16)
    student = student_from_teacher(teacher, [0, 2])
    t, s = teacher[0].auto_model, student[0].auto_model
    assert len(t.encoder.layer) == LAYERS and len(s.encoder.layer) == 2 and s.config.num_hidden_layers == 2
    for new, old in ((0, 0), (1, 2)):
        for (name, a), (_, b) in zip(
            s.encoder.layer[new].state_dict().items(), t.encoder.layer[old].state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), name
    assert torch.equal(s.embeddings.word_embeddings.weight, t.embeddings.word_embeddings.weight)
    s.encoder.layer[0].output.dense.weight.data.zero_()  # a copy, not shared storage
    assert t.encoder.layer[0].output.dense.weight.abs().sum() > 0
    emb = student.encode(DOMAIN[:2], convert_to_numpy=True)
    assert emb.shape == (2, 32)


def test_ffn_pruning_keeps_the_most_important_neurons(teacher_dir):
    import torch

    from pipelines.compression.distill import prune_ffn_neurons, student_from_teacher

    teacher, _, _ = load_finetuned(teacher_dir, 16)
    full = student_from_teacher(teacher, [0, 1, 2])
    assert prune_ffn_neurons(full, 64, DOMAIN) == [list(range(64))] * LAYERS  # keeping all changes nothing
    np.testing.assert_allclose(full.encode(DOMAIN), teacher.encode(DOMAIN), atol=1e-6)

    narrow = student_from_teacher(teacher, [0, 2])
    kept = prune_ffn_neurons(narrow, 24, DOMAIN)
    bert = narrow[0].auto_model
    assert bert.config.intermediate_size == 24 and [len(k) for k in kept] == [24, 24]
    for layer, old, idx in zip(bert.encoder.layer, (0, 2), kept, strict=True):
        source = teacher[0].auto_model.encoder.layer[old]
        assert layer.intermediate.dense.weight.shape == (24, 32) and layer.output.dense.weight.shape == (32, 24)
        assert torch.equal(layer.intermediate.dense.weight, source.intermediate.dense.weight[idx])
        assert torch.equal(layer.output.dense.weight, source.output.dense.weight[:, idx])
    assert narrow.encode(DOMAIN).shape == (len(DOMAIN), 32)


def test_distilled_students_are_finetune_folders(compressed, teacher_dir):
    students = compressed["distilled"]["students"]
    assert set(students) == {"student2", "student2-ffn32"} and students["student2"]["layers"] == [0, 2]
    assert students["student2-ffn32"]["ffn"] == 32 and students["student2"]["ffn"] is None
    # two stages: the FFN-pruned student starts from the distilled full-width one
    assert students["student2-ffn32"]["initialised_from"] == students["student2"]["model_dir"]
    narrow, _, _ = load_finetuned(students["student2-ffn32"]["model_dir"], 16)
    assert narrow[0].auto_model.config.intermediate_size == 32
    assert np.isfinite(students["student2"]["final_loss"])
    model, head, labels = load_finetuned(students["student2"]["model_dir"], 16)
    assert model[0].auto_model.config.num_hidden_layers == 2
    assert labels == json.loads((teacher_dir / LABELS_FILE).read_text()) and head.out_features == len(labels)


# --- vocabulary pruning --------------------------------------------------------------------------------------------


def test_pruned_vocabulary_keeps_in_vocabulary_tokens_and_embeddings(teacher_dir, tmp_path):
    from pipelines.compression.prune import prune_vocabulary_dir

    info = prune_vocabulary_dir(teacher_dir, tmp_path, DOMAIN, 16, keep_ascii_chars=False)
    original, _, _ = load_finetuned(teacher_dir, 16)
    pruned, _, _ = load_finetuned(tmp_path, 16)
    assert info["vocab_size"] == pruned[0].auto_model.config.vocab_size < 200
    assert pruned[0].auto_model.embeddings.word_embeddings.weight.shape == (info["vocab_size"], 32)
    # only the positions the served tokenizer reaches (16 of the teacher's 64)
    assert pruned[0].auto_model.embeddings.position_embeddings.weight.shape == (16, 32)
    assert info["position_rows_removed"] == 64 - 16 and pruned.tokenizer.model_max_length == 16
    old_tok, new_tok = original.tokenizer, pruned.tokenizer
    assert new_tok.pad_token_id == 0 and len(new_tok.get_vocab()) == info["vocab_size"]
    for text in DOMAIN:
        assert new_tok.tokenize(text) == old_tok.tokenize(text)
    a = original.encode(DOMAIN, convert_to_numpy=True)
    b = pruned.encode(DOMAIN, convert_to_numpy=True)
    np.testing.assert_allclose(a, b, atol=1e-6)
    # a word the domain never used still encodes (as [UNK] here, no single characters were kept)
    assert new_tok.tokenize("xylophone") == ["[UNK]"]


def test_kept_ids_include_specials_and_single_characters():
    from collections import Counter

    from pipelines.compression.prune import kept_token_ids

    vocab = {"[PAD]": 0, "[UNK]": 1, "a": 2, "##a": 3, "drill": 4, "é": 5, "rare": 6}
    kept = kept_token_ids(Counter({4: 3, 6: 1}), vocab, [0, 1], min_count=2, keep_ascii_chars=True)
    assert kept == [0, 1, 2, 3, 4]


# --- ONNX variants -------------------------------------------------------------------------------------------------


def test_variant_bundles_keep_the_serving_contract(compressed):
    import onnx

    from pipelines.runtime.encoder import OnnxEncoder

    variants = compressed["exported"]["variants"]
    assert set(variants) == {
        "teacher-fp32",
        "teacher-int8",
        "student2-int8",
        "student2-vocab-int8",
        "student2-ffn32-int8",
    }
    for name, v in variants.items():
        graph = onnx.load(f"{v['bundle_dir']}/model.onnx").graph
        assert [o.name for o in graph.output] == ["embedding", "category_logits"], name
        assert [i.name for i in graph.input] == ["input_ids", "attention_mask"], name
        assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", "sequence"], name
        assert v["fused_ops"].get("Attention") == v["layers"], name  # the optimizer fused every attention block
        # a random tiny BERT is harder on INT8 than a trained one
        assert v["parity"]["cosine_min"] > (0.99999 if name.endswith("fp32") else 0.99), name
        encoder = OnnxEncoder.load(v["bundle_dir"])
        emb, logits = encoder.encode(DOMAIN, batch_size=3)
        assert emb.shape == (len(DOMAIN), 32) and logits.shape == (len(DOMAIN), len(encoder.labels))
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    assert variants["student2-vocab-int8"]["size_mb"] < variants["student2-int8"]["size_mb"] / 3


def test_pruned_bundle_ships_the_pruned_tokenizer(compressed):
    from tokenizers import Tokenizer

    v = compressed["exported"]["variants"]["student2-vocab-int8"]
    tok = Tokenizer.from_file(f"{v['bundle_dir']}/tokenizer.json")
    assert tok.get_vocab_size() == v["vocab_size"] == compressed["pruned"]["pruned"]["student2-vocab"]["vocab_size"]
    meta = json.loads(Path(v["bundle_dir"], "encoder.json").read_text())
    assert meta["vocab_size"] == v["vocab_size"] and meta["variant"] == "student2-vocab-int8"


# --- evaluation, report and selection ------------------------------------------------------------------------------


def test_every_variant_is_evaluated_with_ratios(compressed):
    rows = {r["variant"]: r for r in compressed["evaluated"]["rows"]}
    assert list(rows) == [
        "teacher-torch",
        "teacher-fp32",
        "teacher-int8",
        "student2-int8",
        "student2-vocab-int8",
        "student2-ffn32-int8",
    ]
    for name, r in rows.items():
        for key in (
            "ndcg_at_10",
            "category_accuracy",
            "size_mb",
            "latency_p50_ms",
            "latency_p99_ms",
            "products_per_s",
            "ndcg_retained",
            "latency_speedup",
            "throughput_gain",
            "size_reduction",
        ):
            assert r[key] is not None and np.isfinite(r[key]), (name, key)
    assert rows["teacher-torch"]["latency_speedup"] == 1.0 and not rows["teacher-torch"]["servable"]
    # fp32 ONNX computes what PyTorch computes: same retrieval quality
    assert rows["teacher-fp32"]["ndcg_at_10"] == pytest.approx(rows["teacher-torch"]["ndcg_at_10"], abs=1e-3)


def test_selection_returns_a_complete_bundle_and_a_report(compressed):
    from pipelines.runtime.index import ProductIndex

    selected = compressed["selected"]
    bundle = Path(selected["bundle_dir"])
    assert selected["variant"] in compressed["exported"]["variants"] and selected["reason"]
    for name in ("model.onnx", "tokenizer.json", "labels.json", "encoder.json"):
        assert (bundle / name).is_file()
    assert len(ProductIndex.load(bundle)) > 0  # evaluated with its own graph; the DAG may rebuild it
    report = Path(selected["report_dir"])
    assert (report / "pareto.png").stat().st_size > 1000
    table = (report / "compression.md").read_text()
    assert "**selected**" in table and "teacher-torch" in table


def test_peak_memory_is_measured_in_a_subprocess(compressed):
    from pipelines.compression.variants import measure_peak_memory

    bundle = compressed["exported"]["variants"]["student2-vocab-int8"]["bundle_dir"]
    mem = measure_peak_memory("onnx", bundle, bundle, 16, 1, DOMAIN)
    assert mem["peak_rss_mb"] >= mem["rss_before_mb"] > 0 and mem["model_peak_mb"] >= 0


def _row(name, ndcg, p50, mb, parity=0.99, pps=100.0, servable=True):
    return {
        "variant": name,
        "ndcg_at_10": ndcg,
        "latency_p50_ms": p50,
        "size_mb": mb,
        "parity_cosine_min": parity,
        "products_per_s": pps,
        "servable": servable,
    }


ROWS = [
    _row("teacher-torch", 0.400, 5.0, 91, parity=None, pps=140, servable=False),
    _row("teacher-fp32", 0.400, 2.2, 90, parity=1.0, pps=155),
    _row("teacher-int8", 0.396, 1.2, 23, pps=280),
    _row("student3-int8", 0.392, 0.8, 17, pps=450),
    _row("student2-int8", 0.380, 0.6, 15, pps=700),  # 95%: below the 97% floor
    _row("student3-vocab-int8", 0.390, 0.8, 9, parity=0.93, pps=450),  # fails parity
    _row("student2-vocab-int8", 0.389, 0.6, 8, pps=690),
]


@pytest.mark.parametrize(
    ("rows", "settings", "variant", "fallback"),
    [
        (ROWS, {}, "student2-vocab-int8", False),
        (ROWS, {"objective": "size"}, "student2-vocab-int8", False),
        (ROWS, {"min_ndcg_retained": 0.975}, "student3-int8", False),
        (ROWS, {"min_ndcg_retained": 0.975, "objective": "size"}, "student3-int8", False),
        (ROWS, {"min_parity_cosine": 0.995}, "teacher-fp32", False),
        (ROWS, {"objective": "throughput", "min_ndcg_retained": 0.94}, "student2-int8", False),
        (ROWS, {"max_size_mb": 20, "min_ndcg_retained": 0.975}, "student3-int8", False),
        (ROWS, {"max_size_mb": 1}, "teacher-int8", True),
        (ROWS, {"min_ndcg_retained": 1.01}, "teacher-int8", True),
        (ROWS, {"min_ndcg_retained": 1.01, "fallback": "fail"}, None, False),
        ([r for r in ROWS if r["variant"] != "teacher-int8"], {"min_ndcg_retained": 1.01}, None, False),
        (ROWS[:1], {}, None, False),  # only the (unservable) baseline
    ],
)
def test_selection_rule(rows, settings, variant, fallback):
    from pipelines.compression.variants import choose_variant

    selection = choose_variant(rows, CompressConfig(**settings))
    assert selection.variant == variant and selection.fallback is fallback
    assert selection.reason
    assert "teacher-torch" not in selection.qualified
    if variant is None or fallback:
        assert not selection.qualified


def test_selection_reasons_name_every_rejection():
    from pipelines.compression.variants import choose_variant

    selection = choose_variant(ROWS, CompressConfig())
    assert "nDCG@10" in selection.rejected["student2-int8"]
    assert "parity" in selection.rejected["student3-vocab-int8"]
    assert selection.qualified == ["teacher-fp32", "teacher-int8", "student3-int8", "student2-vocab-int8"]


def test_selection_needs_the_baseline():
    from pipelines.compression.variants import choose_variant

    with pytest.raises(ValueError, match="baseline"):
        choose_variant(ROWS[1:], CompressConfig())


def test_failed_selection_raises_after_writing_the_report(tmp_path):
    from pipelines.compression.variants import CompressionFailed, select_variant, with_ratios

    cfg = load_config("tiny", {"compress.fallback": "fail", "compress.min_ndcg_retained": 1.01})
    evaluated = {"rows": with_ratios(ROWS), "baseline": "teacher-torch"}
    with pytest.raises(CompressionFailed, match="no variant qualifies"):
        select_variant(evaluated, tmp_path, cfg)
    assert (tmp_path / "report" / "compression.md").is_file() and (tmp_path / "report" / "pareto.png").is_file()


def test_pareto_front_and_ratios():
    from pipelines.compression.variants import pareto_front, with_ratios

    assert pareto_front(ROWS) == ["student2-vocab-int8", "student3-int8", "teacher-int8", "teacher-fp32"]
    rows = {r["variant"]: r for r in with_ratios(ROWS)}
    assert rows["student2-vocab-int8"]["latency_speedup"] == pytest.approx(5.0 / 0.6)
    assert rows["student2-vocab-int8"]["size_reduction"] == pytest.approx(91 / 8)
    assert rows["student2-int8"]["throughput_gain"] == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("name", "weights", "layers", "ffn", "vocab", "graph"),
    [
        ("teacher-torch", "teacher", None, None, False, "torch"),
        ("teacher-vocab-int8", "teacher-vocab", None, None, True, "int8"),
        ("student3-fp32", "student3", 3, None, False, "fp32"),
        ("student3-ffn1024-vocab-int8", "student3-ffn1024-vocab", 3, 1024, True, "int8"),
    ],
)
def test_parse_variant(name, weights, layers, ffn, vocab, graph):
    from pipelines.compression.variants import parse_variant

    spec = parse_variant(name)
    assert (spec.weights, spec.layers, spec.ffn, spec.vocab, spec.graph) == (weights, layers, ffn, vocab, graph)


@pytest.mark.parametrize(
    "variants",
    [
        ["teacher-torch-int8"],
        ["student2-vocab-torch"],
        ["student0-int8"],
        ["x"],
        ["teacher-ffn128-int8"],
        ["student2-vocab-ffn64-int8"],
    ],
)
def test_config_rejects_unknown_variants(variants):
    with pytest.raises(ValueError, match="unknown variant"):
        CompressConfig(variants=variants)


def test_students_learn_from_the_teachers_own_ranking_sets(snapshot_dir, tmp_path):
    from pipelines.compression.distill import contrastive_sets
    from pipelines.config import TrainConfig
    from pipelines.data.dataset import Snapshot
    from pipelines.training.finetune import CATEGORY_SET, SETS_DIR, save_training_sets

    saved = {
        "mined": pd.DataFrame({"anchor": ["drill"], "positive": ["cordless drill"], "negative": ["drill bit"]}),
        CATEGORY_SET: pd.DataFrame({"text": ["iphone xr 64gb"], "label": [3]}),
    }
    save_training_sets(saved, tmp_path / SETS_DIR)
    sets = contrastive_sets(Snapshot.open(snapshot_dir), TrainConfig(), tmp_path)
    assert list(sets) == ["mined"]  # read back, not mined again; the category rows are no ranking pairs
    pd.testing.assert_frame_equal(sets["mined"], saved["mined"])
    rebuilt = contrastive_sets(
        Snapshot.open(snapshot_dir), TrainConfig(mined_negatives=False, category_offers=50), tmp_path / "no-sets"
    )  # a folder finetune_encoder did not write: built from the data
    assert "triplets" in rebuilt and CATEGORY_SET not in rebuilt
