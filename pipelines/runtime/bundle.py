"""The file names of a model bundle (one registered version): the one place every writer and reader takes them from."""

from __future__ import annotations

import hashlib
from pathlib import Path

ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
LABELS_FILE = "labels.json"  # also the fine-tuned teacher folder's list of category labels
ENCODER_FILE = "encoder.json"
INDEX_DIR = "index"
EMBEDDINGS_FILE = "embeddings.npy"
PRODUCTS_FILE = "products.parquet"
LEXICAL_DIR = f"{INDEX_DIR}/bm25"
FUSION_FILE = "fusion.json"
REPORT_FILE = "evaluation.json"
ERRORS_FILE = "error_sample.json"
# nDCG@10 of every held-out term in the evaluation report's run: what the gate pairs with the champion's
PER_QUERY_FILE = "per_query.json"
MODEL_CARD_FILE = "model_card.md"
# The calibrated category-abstention rule (runtime/category.py). Optional: a bundle without it never abstains.
CATEGORY_FILE = "category.json"
# The optional cross-encoder reranker (runtime/rerank.py): its own graph, tokenizer and reranker.json in this folder.
RERANKER_DIR = "reranker"
RERANKER_FILE = "reranker.json"
# A version is servable only if its bundle holds all of these.
REQUIRED_FILES = (
    ONNX_FILE,
    TOKENIZER_FILE,
    LABELS_FILE,
    ENCODER_FILE,
    REPORT_FILE,
    MODEL_CARD_FILE,
    f"{INDEX_DIR}/{EMBEDDINGS_FILE}",
    f"{INDEX_DIR}/{PRODUCTS_FILE}",
)


def bundle_manifest(bundle_dir: Path) -> dict[str, str]:
    """sha256 of every file in the bundle, by its path relative to the bundle (what a registered version records)."""
    out = {}
    for path in sorted(p for p in bundle_dir.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        out[path.relative_to(bundle_dir).as_posix()] = digest.hexdigest()
    return out


def manifest_mismatches(bundle_dir: Path, manifest: dict[str, str]) -> list[str]:
    """What differs from the recorded manifest: altered, missing and unexpected files (empty = verified)."""
    found = bundle_manifest(bundle_dir)
    altered = [f"altered: {f}" for f in manifest if f in found and found[f] != manifest[f]]
    missing = [f"missing: {f}" for f in manifest if f not in found]
    extra = [f"unexpected: {f}" for f in found if f not in manifest]
    return altered + missing + extra
