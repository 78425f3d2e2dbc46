"""How much of the queries the served vocabulary holds: words it has as one token, and [UNK] tokens."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer


@dataclass(frozen=True)
class VocabularyStats:
    """Word and token counts of some texts under one tokenizer; the ratios are None without any word or token."""

    words: int
    missed_words: int
    tokens: int
    unk_tokens: int
    top_missed: list[tuple[str, int]] = field(default_factory=list)

    @property
    def miss_ratio(self) -> float | None:
        return self.missed_words / self.words if self.words else None

    @property
    def unk_ratio(self) -> float | None:
        return self.unk_tokens / self.tokens if self.tokens else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "words": self.words,
            "missed_words": self.missed_words,
            "miss_ratio": self.miss_ratio,
            "tokens": self.tokens,
            "unk_tokens": self.unk_tokens,
            "unk_ratio": self.unk_ratio,
            "top_missed": [list(x) for x in self.top_missed],
        }


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A bundle's tokenizer.json as it is, without the encoder's truncation or padding (every token counts)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_truncation()
    tok.no_padding()
    return tok


def vocabulary_stats(tokenizer: Tokenizer, texts: Iterable[str], top: int = 20) -> VocabularyStats:
    """Words are what the tokenizer's own normalizer and pre-tokenizer make of each text (lower-cased, split at
    spaces and punctuation for the MiniLM tokenizer). A word is a miss when the vocabulary does not hold it as one
    token: a pruned vocabulary keeps single characters, so a new brand is never [UNK], only split into pieces the
    model saw in other words. `unk_tokens` counts the tokens the vocabulary cannot spell at all."""
    vocab = tokenizer.get_vocab()
    unk = getattr(tokenizer.model, "unk_token", None)
    missed: Counter[str] = Counter()
    words = tokens = unk_tokens = 0
    for text in texts:
        normalized = tokenizer.normalizer.normalize_str(text) if tokenizer.normalizer is not None else text
        pieces = (
            [w for w, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalized)]
            if tokenizer.pre_tokenizer is not None
            else normalized.split()
        )
        words += len(pieces)
        missed.update(w for w in pieces if w not in vocab)
        encoded = tokenizer.encode(text, add_special_tokens=False).tokens
        tokens += len(encoded)
        unk_tokens += sum(t == unk for t in encoded)
    return VocabularyStats(words, sum(missed.values()), tokens, unk_tokens, missed.most_common(top))
