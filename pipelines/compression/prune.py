"""Embedding pruning: keep the rows of the tokens the domain uses (with a consistent WordPiece tokenizer) and of the
positions the served tokenizer can reach."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.runtime.bundle import LABELS_FILE
from pipelines.training.finetune import ENCODER_DIR, HEAD_FILE, load_finetuned

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer


def token_counts(tokenizer: Tokenizer, texts: list[str], max_seq_length: int) -> Counter[int]:
    """How often each token id occurs in the texts, truncated as the served encoder truncates them."""
    tok = _clone(tokenizer)
    tok.no_padding()
    tok.enable_truncation(max_length=max_seq_length)
    counts: Counter[int] = Counter()
    for start in range(0, len(texts), 4096):
        for enc in tok.encode_batch(texts[start : start + 4096]):
            counts.update(enc.ids)
    return counts


def kept_token_ids(
    counts: Counter[int], vocab: dict[str, int], special_ids: list[int], min_count: int, keep_ascii_chars: bool
) -> list[int]:
    """Old ids to keep, ascending: special tokens, tokens seen >= min_count times and, optionally, every single ASCII
    character with and without "##", so that a word the domain never used still splits into pieces instead of [UNK].

    Ascending order keeps [PAD] at id 0, which the served tokenizer pads with.
    """
    keep = set(special_ids) | {i for i, n in counts.items() if n >= min_count}
    if keep_ascii_chars:
        keep |= {i for t, i in vocab.items() if len(t.removeprefix("##")) == 1 and t.removeprefix("##").isascii()}
    return sorted(keep)


def _clone(tokenizer: Tokenizer) -> Tokenizer:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer.to_str())


def pruned_tokenizer(original, kept_ids: list[int]):
    """A BERT WordPiece tokenizer (transformers) whose vocabulary is the kept tokens in new id order.

    WordPiece is greedy longest-match-first, so with a subset of the vocabulary a text whose original pieces are all
    kept splits into exactly the same pieces: the new ids are the old ones renumbered. Normalisation settings are
    copied from the original tokenizer.
    """
    from transformers import BertTokenizer

    spec = json.loads(original.backend_tokenizer.to_str())
    if spec["model"]["type"] != "WordPiece":
        raise ValueError(f"vocabulary pruning supports WordPiece tokenizers, not {spec['model']['type']}")
    norm = spec.get("normalizer") or {}
    by_id = {i: t for t, i in original.get_vocab().items()}
    return BertTokenizer(
        vocab={by_id[old]: new for new, old in enumerate(kept_ids)},
        do_lower_case=bool(norm.get("lowercase", True)),
        strip_accents=norm.get("strip_accents"),
        tokenize_chinese_chars=bool(norm.get("handle_chinese_chars", True)),
        unk_token=spec["model"].get("unk_token", "[UNK]"),
        model_max_length=original.model_max_length,
    )


def prune_model_vocabulary(model: SentenceTransformer, kept_ids: list[int]) -> SentenceTransformer:
    """Slice the word-embedding matrix to the kept rows and swap in the matching tokenizer (in place)."""
    import torch

    bert = model[0].auto_model
    old = bert.embeddings.word_embeddings
    rows = old.weight.detach()[torch.as_tensor(kept_ids)].clone()
    pad = kept_ids.index(old.padding_idx) if old.padding_idx in kept_ids else None
    bert.embeddings.word_embeddings = torch.nn.Embedding.from_pretrained(rows, freeze=False, padding_idx=pad)
    bert.config.vocab_size = len(kept_ids)
    max_seq_length = model.max_seq_length
    model[0].processor = pruned_tokenizer(model.tokenizer, kept_ids)
    model.max_seq_length = max_seq_length
    return model


def truncate_positions(model: SentenceTransformer, max_positions: int) -> int:
    """Keep the first `max_positions` position embeddings (in place); returns the rows removed.

    The served tokenizer truncates every text to max_seq_length tokens, so later positions are never looked up: for
    MiniLM at 32 tokens, 480 of 512 rows are dead weight in every file.
    """
    import torch

    bert = model[0].auto_model
    emb = bert.embeddings
    removed = emb.position_embeddings.num_embeddings - max_positions
    if removed <= 0:
        return 0
    rows = emb.position_embeddings.weight.detach()[:max_positions].clone()
    emb.position_embeddings = torch.nn.Embedding.from_pretrained(rows, freeze=False)
    # the non-persistent index buffers sized by max_position_embeddings; rebuilt from the config when reloaded
    emb.position_ids = emb.position_ids[:, :max_positions].clone()
    emb.token_type_ids = emb.token_type_ids[:, :max_positions].clone()
    bert.config.max_position_embeddings = max_positions
    # and the saved tokenizer says so, so that no caller can ask for a position that is gone
    model.tokenizer.model_max_length = max_positions
    return removed


def check_same_tokens(
    original: Tokenizer, pruned: Tokenizer, kept_ids: list[int], texts: list[str], max_seq_length: int
) -> dict[str, int]:
    """Texts whose (truncated) original pieces are all kept, and how many of them the pruned tokenizer splits
    differently, which must be none."""
    old_ids = np.asarray(kept_ids)
    kept = set(kept_ids)
    a, b = _clone(original), _clone(pruned)
    for tok in (a, b):
        tok.no_padding()
        tok.enable_truncation(max_length=max_seq_length)
    checked = changed = 0
    for x, y in zip(a.encode_batch(texts), b.encode_batch(texts), strict=True):
        if kept.issuperset(x.ids):
            checked += 1
            changed += x.ids != old_ids[y.ids].tolist()
    return {"in_vocabulary_texts": checked, "changed": changed}


def prune_vocabulary_dir(
    model_dir: str | Path,
    out_dir: str | Path,
    texts: list[str],
    max_seq_length: int,
    min_count: int = 1,
    keep_ascii_chars: bool = True,
) -> dict[str, Any]:
    """Prune a finetune-shaped folder (encoder/, category head, labels) to the domain's tokens and the served
    positions (max_seq_length) into another one.

    Raises if any domain text splits differently after pruning: the rewrite must be invisible to in-domain text.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, _, _ = load_finetuned(model_dir, max_seq_length)
    original = _clone(model.tokenizer.backend_tokenizer)
    counts = token_counts(original, texts, max_seq_length)
    kept = kept_token_ids(
        counts, model.tokenizer.get_vocab(), list(model.tokenizer.all_special_ids), min_count, keep_ascii_chars
    )
    old_vocab = model[0].auto_model.config.vocab_size
    prune_model_vocabulary(model, kept)
    positions_removed = truncate_positions(model, max_seq_length)
    check = check_same_tokens(original, model.tokenizer.backend_tokenizer, kept, texts[:5000], max_seq_length)
    if check["changed"]:
        raise RuntimeError(
            f"the pruned tokenizer splits {check['changed']} of {check['in_vocabulary_texts']} "
            "in-vocabulary texts differently from the original"
        )
    model.save(str(out / ENCODER_DIR), create_model_card=False)
    for name in (HEAD_FILE, LABELS_FILE):
        shutil.copyfile(Path(model_dir) / name, out / name)
    dim = model.get_embedding_dimension()
    return {
        "model_dir": str(out),
        "vocab_size": len(kept),
        "original_vocab_size": old_vocab,
        "embedding_params_removed": (old_vocab - len(kept) + positions_removed) * dim,
        "position_rows_removed": positions_removed,
        "domain_texts": len(texts),
        "min_count": min_count,
        "tokens_checked_texts": check["in_vocabulary_texts"],
    }
