"""Query augmentation: seeded noisy variants of training search terms (typos, dropped tokens, units, plurals)."""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable

import pandas as pd

from pipelines.config import AugmentConfig
from pipelines.data.dataset import is_training_term, normalize_term

# QWERTY neighbours (same row and the rows above/below): the slips real search logs show ("lumder", "preature")
_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
KEY_NEIGHBOURS: dict[str, str] = {}
for _r, _row in enumerate(_ROWS):
    for _c, _key in enumerate(_row):
        near = {_row[i] for i in (_c - 1, _c + 1) if 0 <= i < len(_row)}
        for other in (_r - 1, _r + 1):
            if 0 <= other < len(_ROWS):
                near |= {_ROWS[other][i] for i in (_c - 1, _c, _c + 1) if 0 <= i < len(_ROWS[other])}
        KEY_NEIGHBOURS[_key] = "".join(sorted(near))

_END = r"(?![\w.])"  # a unit ends the token: "in." is not "inch" and "ft" is not "ftp"
_START = r"(?:\b|(?<=\d))"  # a unit starts a word or follows its number: "4ft", "5gallon"
_INCH = rf'(?:in\.|in{_END}|inch(?:es)?{_END}|")'
_FRACTIONS = {"1/2": "half", "1/4": "quarter", "3/4": "three quarter"}
# (pattern, replacement): each rule rewrites one spelling into another a shopper types for the same thing
UNIT_RULES: tuple[tuple[str, str], ...] = (
    *((rf"(?<!\d )(?<![\d/]){re.escape(f)}\s*{_INCH}", f"{w} inch") for f, w in _FRACTIONS.items()),
    *((rf"\b{w} inch(?:es)?{_END}", f"{f} in.") for f, w in _FRACTIONS.items()),
    (rf"(?<=\d)\s*in\.|(?<=\d)\s*in{_END}|(?<=\d)\"", " inch"),
    (rf"{_START}inch(?:es)?{_END}", " in."),
    (rf"{_START}ft\.|{_START}ft{_END}", " foot"),
    (rf"{_START}(?:foot|feet){_END}", " ft."),
    (rf"{_START}gal\.|{_START}gal{_END}", " gallon"),
    (rf"{_START}gallons?{_END}", " gal."),
    (rf"{_START}lbs?\.|{_START}lbs?{_END}", " pound"),
    (rf"{_START}pounds?{_END}", " lb."),
    (r"(?<=\d)\s*x\s*(?=\d)", " by "),  # replacements pad with spaces: the result's whitespace is collapsed
    (r"(?<=\d) by (?=\d)", "x"),
)


def _tokens(term: str) -> list[str]:
    return term.split()


def typo(term: str, rng: random.Random) -> str | None:
    """One letter of a word of 4+ letters replaced by a keyboard neighbour; never the word's first letter."""
    words = [(i, w) for i, w in enumerate(_tokens(term)) if len(w) >= 4 and w.isalpha()]
    if not words:
        return None
    i, word = words[rng.randrange(len(words))]
    pos = rng.randrange(1, len(word))
    near = KEY_NEIGHBOURS.get(word[pos].lower())
    if not near:
        return None
    tokens = _tokens(term)
    tokens[i] = word[:pos] + rng.choice(near) + word[pos + 1 :]
    return " ".join(tokens)


def drop(term: str, rng: random.Random) -> str | None:
    """One token of a term of 3+ tokens left out: two-word terms would lose half their meaning."""
    tokens = _tokens(term)
    if len(tokens) < 3:
        return None
    del tokens[rng.randrange(len(tokens))]
    return " ".join(tokens)


def unit(term: str, rng: random.Random) -> str | None:
    """One unit or number spelling rewritten everywhere in the term (1/2 in. <-> half inch, 4 ft. <-> 4 foot)."""
    rules = [(p, r) for p, r in UNIT_RULES if re.search(p, term, flags=re.IGNORECASE)]
    if not rules:
        return None
    pattern, replacement = rules[rng.randrange(len(rules))]
    return " ".join(re.sub(pattern, replacement, term, flags=re.IGNORECASE).split())


def _flip_number(word: str) -> str:
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "sses", "xes", "zes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    return word + "s"


def plural(term: str, rng: random.Random) -> str | None:
    """The last word of 3+ letters (the head noun of most search terms) flipped between singular and plural."""
    tokens = _tokens(term)
    last = [i for i, w in enumerate(tokens) if len(w) >= 3 and w.isalpha()]
    if not last:
        return None
    tokens[last[-1]] = _flip_number(tokens[last[-1]])
    return " ".join(tokens)


KINDS: dict[str, Callable[[str, random.Random], str | None]] = {
    "typo": typo,
    "drop": drop,
    "unit": unit,
    "plural": plural,
}


def _unit_interval(*parts: object) -> float:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def variant(term: str, cfg: AugmentConfig) -> tuple[str, str] | None:
    """(kind, noisy term) for a chosen training term, else None: a pure function of the term and the config.

    A term is chosen when sha256(seed, term) falls below `share`, so the choice does not depend on row order or on
    which other terms are present; the kinds are tried in a per-term seeded order and the first that changes it wins.
    Held-out and validation terms are never chosen.
    """
    if not is_training_term(term) or _unit_interval(cfg.seed, "choose", normalize_term(term)) >= cfg.share:
        return None
    rng = random.Random(f"{cfg.seed}:{normalize_term(term)}")
    kinds = list(dict.fromkeys(cfg.kinds))
    rng.shuffle(kinds)
    if "unit" in kinds:  # the rarest kind (1 term in 12 has a unit): where it applies it goes first
        kinds.insert(0, kinds.pop(kinds.index("unit")))
    for kind in kinds:
        noisy = KINDS[kind](term, rng)
        if noisy and normalize_term(noisy) != normalize_term(term):
            return kind, noisy
    return None


def augment_rows(rows: pd.DataFrame, cfg: AugmentConfig, column: str = "anchor") -> tuple[pd.DataFrame, dict[str, int]]:
    """The noisy copies of `rows` (their other columns, e.g. positive and negative, kept) and their count per kind.

    Every row of a chosen term gets the same variant: one noisy query with all of the original's products.
    """
    if rows.empty:
        return rows.iloc[0:0], {}
    chosen = {t: variant(t, cfg) for t in rows[column].astype(str).unique()}
    noisy = rows[rows[column].astype(str).map(lambda t: chosen[t] is not None)]
    out = noisy.assign(**{column: noisy[column].astype(str).map(lambda t: chosen[t][1])})  # type: ignore[index]
    counts: dict[str, int] = {}
    for found in chosen.values():
        if found is not None:
            counts[found[0]] = counts.get(found[0], 0) + 1
    return out.reset_index(drop=True), counts
