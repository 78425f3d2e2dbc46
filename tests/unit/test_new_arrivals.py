"""The new-arrivals slice (data.new_arrivals): the rule on titles, what a launch and a later snapshot hold back, the
landable catalog file with the arrivals, and the scenario's profile (configs/arrivals.yaml, `extends: tiny`)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from pipelines.config import DataConfig, NewArrivalsConfig, load_config
from pipelines.data.catalog import land_catalog, landed_catalog, read_catalog
from pipelines.data.dataset import (
    catalog_from,
    hold_back_new_arrivals,
    is_new_arrival,
    new_arrival_ids,
    profile_judgments,
    snapshot_data,
    write_arrivals_catalog,
)

AS_OF = datetime(2026, 1, 1, tzinfo=UTC)
WORDS = ("saw", "drill")
SMALL = {"max_terms": 300, "max_offers": 200, "event_users": 10}


def test_a_new_arrival_is_a_title_with_one_of_the_words_as_a_whole_word() -> None:
    assert is_new_arrival("Makita 15-Amp 7-1/4 in. Circular Saw", WORDS)
    assert is_new_arrival("Bosch 1/4 in. Hammer DRILL Bit", WORDS)
    assert is_new_arrival("saw/drill combo", WORDS)  # split at anything but letters and digits
    assert not is_new_arrival("Milwaukee 12 Amp SAWZALL Reciprocating", WORDS)  # a word, not a prefix
    assert not is_new_arrival("Sawhorse", WORDS)
    assert not is_new_arrival("Circular Saw", ())  # no words: no slice
    assert not is_new_arrival(None, WORDS)  # type: ignore[arg-type]  (a missing title is validation's to report)


def test_title_words_are_plain_lower_case_words() -> None:
    assert NewArrivalsConfig(title_words=("saw", "saw", "2x4")).title_words == ("saw", "2x4")
    for bad in (("Saw",), ("circular saw",), ("",)):
        with pytest.raises(ValidationError, match="lower-case letters and digits"):
            NewArrivalsConfig(title_words=bad)
    assert DataConfig().new_arrivals.title_words == ()  # off by default


def _frames() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    train = pd.DataFrame({"search_term": ["a", "a", "b"], "product_uid": [1, 2, 3], "relevance": [3.0, 2.0, 1.0]})
    heldout = pd.DataFrame({"search_term": ["h", "h"], "product_uid": [2, 4], "relevance": [3.0, 3.0]})
    catalog = pd.DataFrame({"product_uid": [1, 2, 3, 4], "product_title": ["x", "circular saw", "y", "z"]})
    return train, heldout, catalog


def test_launch_holds_the_arrivals_back_everywhere_later_from_training_only() -> None:
    train, heldout, catalog = _frames()
    arrivals = new_arrival_ids(catalog, WORDS)
    assert arrivals == {2}
    t, h, c = hold_back_new_arrivals(train, heldout, catalog, arrivals, launch=True)
    assert list(t["product_uid"]) == [1, 3] and list(h["product_uid"]) == [4] and list(c["product_uid"]) == [1, 3, 4]
    t, h, c = hold_back_new_arrivals(train, heldout, catalog, arrivals, launch=False)
    assert list(t["product_uid"]) == [1, 3]  # nobody judged them: their training signal is the traffic's feedback
    assert list(h["product_uid"]) == [2, 4] and list(c["product_uid"]) == [1, 2, 3, 4]  # they arrived
    same = hold_back_new_arrivals(train, heldout, catalog, set(), launch=True)
    assert all(a is b for a, b in zip(same, (train, heldout, catalog), strict=True))


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("arrivals")
    cfg = DataConfig(**SMALL, new_arrivals=NewArrivalsConfig(title_words=WORDS))
    return {
        "plain": snapshot_data(DataConfig(**SMALL), root / "plain", AS_OF).path,
        "launch": snapshot_data(cfg, root / "launch", AS_OF).path,
        "later": snapshot_data(cfg, root / "later", AS_OF, launch=False).path,
    }


def test_snapshots_hold_the_arrivals_back_by_the_rule(snapshots: dict[str, Path]) -> None:
    read = lambda kind, table: pd.read_parquet(snapshots[kind] / f"{table}.parquet")  # noqa: E731
    full = read("plain", "catalog")
    arrivals = new_arrival_ids(full, WORDS)
    assert 20 < len(arrivals) < len(full) / 10  # a product line, not the shop
    launch, later = read("launch", "catalog"), read("later", "catalog")
    assert set(launch["product_uid"]) == set(full["product_uid"]) - arrivals
    assert set(later["product_uid"]) == set(full["product_uid"])
    for kind in ("launch", "later"):
        assert not set(read(kind, "judgments_train")["product_uid"]) & arrivals
    plain_train = read("plain", "judgments_train")
    assert len(read("launch", "judgments_train")) == (~plain_train["product_uid"].isin(arrivals)).sum()
    assert not set(read("launch", "judgments_heldout")["product_uid"]) & arrivals
    assert read("later", "judgments_heldout").equals(read("plain", "judgments_heldout"))
    assert not set(read("launch", "events")["product_id"]) & arrivals  # the simulated history knows none either
    import json

    manifest = json.loads((snapshots["launch"] / "manifest.json").read_text())
    assert manifest["new_arrivals"] == {
        "title_words": list(WORDS),
        "products": len(arrivals),
        "launch": True,
        "in_catalog": False,
    }
    assert json.loads((snapshots["plain"] / "manifest.json").read_text())["new_arrivals"] is None


def test_the_arrivals_catalog_file_is_the_whole_catalog_and_lands(tmp_path: Path) -> None:
    cfg = DataConfig(**SMALL, new_arrivals=NewArrivalsConfig(title_words=WORDS))
    counts = write_arrivals_catalog(cfg, tmp_path / "shop.csv")
    written = read_catalog(tmp_path / "shop.csv")
    expected = catalog_from(profile_judgments(cfg))
    assert counts == {"products": len(expected), "new_arrivals": len(new_arrival_ids(expected, WORDS))}
    assert written.sort_values("product_uid")["product_uid"].tolist() == expected["product_uid"].tolist()
    landing = tmp_path / "landing"
    landed = land_catalog(tmp_path / "shop.csv", landing, AS_OF)
    assert landed_catalog(landed.name, landing) == landed.resolve()


def test_a_profile_extends_another(tmp_path: Path) -> None:
    tiny, arrivals = load_config("tiny"), load_config("arrivals")
    assert arrivals.profile == "arrivals" and arrivals.data.new_arrivals.title_words
    assert arrivals.data.max_terms == tiny.data.max_terms and arrivals.train == tiny.train  # tiny's, unchanged
    assert arrivals.compress.variants == ("teacher-vocab-int8",)  # its own value wins (a list replaces)
    assert arrivals.compress.distill_steps == tiny.compress.distill_steps  # merged into the section, key by key
    child = tmp_path / "child.yaml"
    child.write_text("extends: arrivals\ntrain:\n  max_steps: 7\n")
    cfg = load_config(str(child), {"train.batch_size": 8})
    assert (cfg.profile, cfg.train.max_steps, cfg.train.batch_size) == ("child", 7, 8)
    assert cfg.data.new_arrivals == arrivals.data.new_arrivals  # two levels down
    child.write_text("extends: nowhere\n")
    with pytest.raises(FileNotFoundError, match="extends 'nowhere'"):
        load_config(str(child))
