"""Query augmentation: each kind on hand-built terms, seeded determinism, held-out terms never touched."""

from __future__ import annotations

import random

import pandas as pd
import pytest

from pipelines.config import AugmentConfig, TrainConfig
from pipelines.data.dataset import is_heldout_term, is_training_term, is_validation_term
from pipelines.training.augment import KEY_NEIGHBOURS, augment_rows, drop, plural, typo, unit, variant
from pipelines.training.finetune import augmented_sets

EVERY = AugmentConfig(enabled=True, share=1.0)


@pytest.mark.parametrize(
    ("term", "expected"),
    [
        ("1/2 in. pvc pipe", {"half inch pvc pipe", "1/2 inch pvc pipe"}),
        ("half inch drywall", {"1/2 in. drywall", "half in. drywall"}),
        ("4 ft. x 8 ft. plywood", {"4 foot x 8 foot plywood", "4 ft. by 8 ft. plywood"}),
        ("20 foot ladder", {"20 ft. ladder"}),
        ("4ft light", {"4 foot light"}),
        ("24 inch vanity", {"24 in. vanity"}),
        ("5 gal buckets", {"5 gallon buckets"}),
        ("2x4x8", {"2 by 4 by 8"}),
        ("2 by 4", {"2x4"}),
    ],
)
def test_unit_rewrites_a_unit_or_number_spelling(term, expected):
    seen = {unit(term, random.Random(seed)) for seed in range(20)}
    assert seen <= expected and seen  # every variant is one of the listed spellings
    assert unit("cordless drill", random.Random(0)) is None  # nothing to rewrite


def test_typo_swaps_one_letter_for_a_keyboard_neighbour():
    for seed in range(20):
        noisy = typo("cordless drill", random.Random(seed))
        assert noisy is not None and len(noisy) == len("cordless drill")
        diff = [(a, b) for a, b in zip("cordless drill", noisy, strict=True) if a != b]
        assert len(diff) == 1 and diff[0][1] in KEY_NEIGHBOURS[diff[0][0]]
        assert noisy[0] == "c" and noisy.split()[1][0] == "d"  # first letters stay
    assert typo("2x4 led", random.Random(0)) is None  # no word of 4+ letters


def test_drop_leaves_one_token_out_of_three_or_more():
    assert drop("deck screws", random.Random(0)) is None
    for seed in range(10):
        noisy = drop("dewalt cordless drill", random.Random(seed))
        assert noisy in {"cordless drill", "dewalt drill", "dewalt cordless"}


def test_plural_flips_the_last_word():
    rng = random.Random(0)
    assert plural("deck screws", rng) == "deck screw"
    assert plural("cordless drill", rng) == "cordless drills"
    assert plural("ceiling fan with light 52", rng) == "ceiling fan with lights 52"
    assert plural("bathroom vanities", rng) == "bathroom vanity"
    assert plural("wood battery", rng) == "wood batteries"
    assert plural("paint brushes", rng) == "paint brush"
    assert plural("2x4", rng) is None


def test_variants_are_deterministic_per_seed_and_share():
    terms = [t for t in (f"dewalt cordless drill {i}" for i in range(300)) if is_training_term(t)]
    cfg = AugmentConfig(enabled=True, share=0.3, seed=5)
    first = [variant(t, cfg) for t in terms]
    assert first == [variant(t, cfg) for t in terms]  # same seed, same variants
    assert first != [variant(t, cfg.model_copy(update={"seed": 6})) for t in terms]
    assert 0.2 < sum(v is not None for v in first) / len(terms) < 0.4  # about `share` of the terms
    only = AugmentConfig(enabled=True, share=1.0, kinds=("typo",))
    assert {variant(t, only)[0] for t in terms} == {"typo"}  # type: ignore[index]


def test_heldout_and_validation_terms_are_never_augmented():
    terms = [f"dewalt cordless drill {i}" for i in range(200)]
    kept = [t for t in terms if is_heldout_term(t) or is_validation_term(t)]
    assert kept and all(variant(t, EVERY) is None for t in kept)
    rows = pd.DataFrame({"anchor": terms, "positive": [f"product {i}" for i in range(200)]})
    noisy, _ = augment_rows(rows, EVERY)
    assert len(noisy) == len(terms) - len(kept)


def test_each_variant_keeps_its_original_products():
    rows = pd.DataFrame(
        {
            "anchor": ["dewalt cordless drill", "dewalt cordless drill", "1/2 in. pvc pipe"],
            "positive": ["dewalt 20v drill", "dewalt drill kit", "pvc pipe 1/2 in. x 10 ft."],
            "negative": ["garden hose", "garden hose", "led bulb"],
        }
    )
    rows = rows[rows["anchor"].map(is_training_term)]
    noisy, counts = augment_rows(rows, EVERY)
    assert len(noisy) == len(rows) and sum(counts.values()) == rows["anchor"].nunique()
    for (_, original), (_, aug) in zip(rows.iterrows(), noisy.iterrows(), strict=True):
        assert aug["anchor"] != original["anchor"]
        assert (aug["positive"], aug["negative"]) == (original["positive"], original["negative"])
    # one variant per term: both rows of a term carry the same noisy query
    assert noisy.groupby(rows["anchor"].to_numpy())["anchor"].nunique().max() == 1


def test_augmented_sets_touch_search_term_sets_only():
    sets = {
        "pairs": pd.DataFrame({"anchor": ["dewalt cordless drill"] * 2, "positive": ["a", "b"]}),
        "offers": pd.DataFrame({"anchor": ["samsung galaxy s10 128gb"], "positive": ["Samsung Galaxy S10"]}),
    }
    off, counts = augmented_sets(sets, AugmentConfig(), seed=0)
    assert off is sets and counts == {}  # disabled by default
    assert TrainConfig().augment.enabled is False
    on, counts = augmented_sets(sets, EVERY, seed=0)
    expected = 4 if is_training_term("dewalt cordless drill") else 2
    assert len(on["pairs"]) == expected and on["offers"].equals(sets["offers"])
    assert counts["augmented_pairs_rows"] == expected - 2
