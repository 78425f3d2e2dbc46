"""The file names of a model bundle (one registered version): the one place every writer and reader takes them from."""

from __future__ import annotations

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
MODEL_CARD_FILE = "model_card.md"
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
