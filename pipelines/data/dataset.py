"""Load the shipped real data, split it deterministically, simulate the user event log, snapshot a run's inputs."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipelines.config import DATA_DIR, DataConfig, Paths

if TYPE_CHECKING:
    from pipelines.data.feedback import FeedbackSource

HOMEDEPOT_FILE = DATA_DIR / "homedepot_train.csv.zip"
PRICERUNNER_FILE = DATA_DIR / "pricerunner_aggregate.csv.gz"
PRICERUNNER_COLUMNS = [
    "product_id",
    "offer_title",
    "merchant_id",
    "cluster_id",
    "cluster_label",
    "category_id",
    "category_label",
]
EVENT_TYPES = ("view", "click", "add_to_cart", "purchase")
SNAPSHOT_TABLES = (
    "judgments_train",
    "judgments_heldout",
    "catalog",
    "offers_train",
    "offers_test",
    "events",
    "feedback_pairs",  # pipelines.data.feedback.FEEDBACK_TABLE
    "searched_terms",  # pipelines.data.feedback.SEARCHED_TABLE
)


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def normalize_term(term: str) -> str:
    """Lower-cased, stripped; a missing term becomes "" so that validation, not a crash, reports it."""
    return term.strip().lower() if isinstance(term, str) else ""


def is_heldout_term(term: str) -> bool:
    """The project-wide held-out rule: md5 of the normalised term ends in 0 or 1 (1,499 of 11,795 terms)."""
    return _md5(normalize_term(term))[-1] in "01"


def is_validation_term(term: str) -> bool:
    """1/16 of the training terms (md5 digit 2; held-out terms are 0 and 1) score the model during training."""
    return _md5(normalize_term(term))[-1] == "2"


def is_training_term(term: str) -> bool:
    """A term the model may learn from: neither held-out nor validation, and not empty."""
    return bool(normalize_term(term)) and not is_heldout_term(term) and not is_validation_term(term)


def is_judged_at_launch(term: str, share: float) -> bool:
    """Whether a training term's judgments are among the `share` the first model trains on ('judged at launch').

    sha256 of "judged_at_launch:" + the normalised term, read as a fraction in [0, 1), below `share`: independent of
    the md5 split rules above (held-out and validation use md5's last digit), and nested, so every term judged at
    share 0.3 is judged at 0.5 too. share 1.0 judges every term, 0.0 none.
    """
    if share >= 1.0:
        return True
    digest = hashlib.sha256(f"judged_at_launch:{normalize_term(term)}".encode()).hexdigest()
    return int(digest[:13], 16) / 16**13 < share


def split_judged_at_launch(train: pd.DataFrame, share: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(judged at launch, click-only) training judgments by term (is_judged_at_launch), never by row."""
    judged = train["search_term"].map(lambda t: is_judged_at_launch(t, share)).astype(bool)
    return train[judged].reset_index(drop=True), train[~judged].reset_index(drop=True)


def is_test_cluster(cluster_id: int) -> bool:
    """PriceRunner split by product cluster, same md5 rule, so no product leaks across splits."""
    return _md5(str(int(cluster_id)))[-1] in "01"


def is_validation_cluster(cluster_id: int) -> bool:
    """1/16 of the training clusters (md5 digit 2; test clusters are 0 and 1): kept out of the category head's
    training so the category abstention threshold is calibrated on products it never saw."""
    return _md5(str(int(cluster_id)))[-1] == "2"


def validation_judgments(judgments_train: pd.DataFrame) -> pd.DataFrame:
    """The validation terms' rows of the training judgments: what model choices (compression variant, fusion weight)
    are scored on, never the held-out terms the gate reads."""
    return judgments_train[judgments_train["search_term"].map(is_validation_term).astype(bool)]


def validation_offers(offers_train: pd.DataFrame) -> pd.DataFrame:
    """The validation clusters' offers of the training offers (kept out of the category head's training)."""
    return offers_train[offers_train["cluster_id"].map(is_validation_cluster).astype(bool)]


class LandingPathError(ValueError):
    """A landed file's path that is not a regular file inside the landing folder; the message says which rule failed."""


class JudgmentsPathError(LandingPathError):
    """A judgments_path that is not a regular file inside the landing folder."""


def landed_judgments(path: str | Path, landing: Path) -> Path:
    """The real path of the judgments file `path` names, which must lie in the `landing` folder (landed_file)."""
    return landed_file(path, landing, "judgments_path", JudgmentsPathError)


def landed_file(path: str | Path, landing: Path, what: str, error: type[LandingPathError] = LandingPathError) -> Path:
    """The real path of the file `path` names, which must lie in the `landing` folder.

    A relative path is taken under `landing`, an absolute one as is; no `..` component is accepted (even one that
    would stay inside), and after every symlink is resolved the file must still be inside the (resolved) landing
    folder and be a regular file. The caller reads the returned path, not `path`, so a checked name is what is
    read. Raises `error` naming `what` (the Param or option), the landing folder and the rule.
    """
    text = str(path)
    where = f"the landing folder {landing} (SHOPGUIDE_LANDING)"
    if not text.strip():
        raise error(f"{what} is empty; give a file in {where}")
    shown = text if len(text) <= 200 else f"{text[:197]}..."  # a path is user input: never echoed whole
    given = Path(text)
    if ".." in given.parts:
        raise error(f"{what} {shown!r} contains '..'; give a file in {where}")
    root = landing.resolve()
    candidate = given if given.is_absolute() else root / given
    try:
        real = candidate.resolve(strict=True)
    except (OSError, RuntimeError) as err:  # missing, a dangling or looping symlink, unreadable folder
        raise error(f"{what} {shown!r}: no such file in {where} ({type(err).__name__})") from None
    if not real.is_relative_to(root):
        raise error(f"{what} {shown!r} resolves outside {where}; only files that landed there are read")
    if not real.is_file():
        raise error(f"{what} {shown!r} is not a regular file in {where}")
    return real


def load_judgments(path: Path = HOMEDEPOT_FILE) -> pd.DataFrame:
    """Home Depot relevance judgments: id, product_uid, product_title, search_term, relevance (1.0-3.0)."""
    df = pd.read_csv(path, encoding="latin-1")
    # cast only what is there: a missing column is the validation step's to report, readably
    types = {
        "id": "int64",
        "product_uid": "int64",
        "product_title": "string",
        "search_term": "string",
        "relevance": "float64",
    }
    return df.astype({c: t for c, t in types.items() if c in df.columns})


def load_offers(path: Path = PRICERUNNER_FILE) -> pd.DataFrame:
    """PriceRunner offers: offer title, its canonical product (cluster) and one of 10 categories."""
    df = pd.read_csv(path, header=None, names=PRICERUNNER_COLUMNS)
    return df.astype(
        {
            "product_id": "int64",
            "offer_title": "string",
            "merchant_id": "int64",
            "cluster_id": "int64",
            "cluster_label": "string",
            "category_id": "int64",
            "category_label": "string",
        }
    )


def select_terms(judgments: pd.DataFrame, max_terms: int | None) -> pd.DataFrame:
    """A deterministic subset of search terms (by md5 order), keeping the held-out share; None keeps all.

    Rows without a usable term are always kept, so that validation reports them instead of a silent drop.
    """
    if max_terms is None:
        return judgments
    norm = judgments["search_term"].map(normalize_term)
    terms = sorted(t for t in norm.unique() if t)
    keep = set(sorted(terms, key=_md5)[:max_terms])
    return judgments[norm.isin(keep) | (norm == "")].reset_index(drop=True)


def split_judgments(judgments: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, heldout) by search term, never by row."""
    held = judgments["search_term"].map(is_heldout_term).astype(bool)
    return judgments[~held].reset_index(drop=True), judgments[held].reset_index(drop=True)


def split_offers(offers: pd.DataFrame, max_offers: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, test) by cluster; an optional deterministic subsample first."""
    if max_offers is not None and len(offers) > max_offers:
        offers = offers.sample(n=max_offers, random_state=0).sort_index()
    test = offers["cluster_id"].map(is_test_cluster).astype(bool)
    return offers[~test].reset_index(drop=True), offers[test].reset_index(drop=True)


def catalog_from(judgments: pd.DataFrame) -> pd.DataFrame:
    """Distinct products (product_uid, product_title); with all judgments this is the whole 54,667-title catalog."""
    cat = judgments[["product_uid", "product_title"]].drop_duplicates("product_uid")
    return cat.sort_values("product_uid").reset_index(drop=True)


def title_words(title: str) -> set[str]:
    """A title's words for the new-arrivals rule: lower-cased, split at anything but ASCII letters and digits."""
    return set(re.findall(r"[a-z0-9]+", title.lower())) if isinstance(title, str) else set()


def is_new_arrival(title: str, words: Collection[str]) -> bool:
    """The new-arrivals rule (data.new_arrivals): the product's title holds one of `words` as a whole word."""
    return bool(words) and not title_words(title).isdisjoint(words)


def new_arrival_ids(catalog: pd.DataFrame, words: Collection[str]) -> set[int]:
    """The product ids of `catalog` (product_uid, product_title) that are new arrivals; empty without `words`."""
    if not words:
        return set()
    hit = catalog["product_title"].map(lambda t: is_new_arrival(t, words)).astype(bool)
    return {int(p) for p in catalog.loc[hit, "product_uid"]}


def hold_back_new_arrivals(
    train: pd.DataFrame, heldout: pd.DataFrame, catalog: pd.DataFrame, arrivals: set[int], launch: bool
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(train, heldout, catalog) without what a snapshot may not see of the new arrivals (NewArrivalsConfig): their
    training judgments always; at launch also their held-out judgments and their catalog rows."""
    if not arrivals:
        return train, heldout, catalog

    def drop(frame: pd.DataFrame, column: str) -> pd.DataFrame:
        return frame[~frame[column].isin(arrivals)].reset_index(drop=True)

    train = drop(train, "product_uid")
    if launch:
        return train, drop(heldout, "product_uid"), drop(catalog, "product_uid")
    return train, heldout, catalog


def profile_judgments(cfg: DataConfig, landing: Path | None = None) -> pd.DataFrame:
    """The judgments a profile's snapshot starts from: the landed judgments_path or the shipped data, `max_terms`."""
    if not cfg.judgments_path:  # None or "" (an emptied form field): the shipped data
        source = HOMEDEPOT_FILE
    else:
        source = landed_judgments(cfg.judgments_path, landing or Paths.from_env().landing)
    return select_terms(load_judgments(source), cfg.max_terms)


def write_arrivals_catalog(cfg: DataConfig, path: Path, landing: Path | None = None) -> dict[str, int]:
    """The shop's catalog once the new arrivals came, as a landable catalog file (pipelines/data/catalog.py: CSV,
    product_uid and product_title, the WHOLE catalog): the profile's catalog with its new arrivals, which the launch
    snapshot held back. Returns its product count and how many of them are new arrivals."""
    catalog = catalog_from(profile_judgments(cfg, landing))
    path.parent.mkdir(parents=True, exist_ok=True)
    catalog.to_csv(path, index=False)
    return {"products": len(catalog), "new_arrivals": len(new_arrival_ids(catalog, cfg.new_arrivals.title_words))}


def related_terms(judgments: pd.DataFrame) -> dict[str, list[str]]:
    """Normalised term -> the other terms judged on at least one same product (sorted): the simulated missions' links.

    Terms that share a judged product are what one shopping mission looks like in this data ("rain shower head" and
    "shower only faucet", "honda mower" and "briggs and stratton lawn mower"); 7,801 of the 10,296 training terms
    have at least one.
    """
    pairs = pd.DataFrame(
        {"term": judgments["search_term"].map(normalize_term), "product": judgments["product_uid"]}
    ).drop_duplicates()
    pairs = pairs[pairs["term"] != ""]
    linked = pairs.merge(pairs, on="product")
    linked = linked[linked["term_x"] != linked["term_y"]].drop_duplicates(["term_x", "term_y"])
    return {t: sorted(g) for t, g in linked.groupby("term_x", sort=True)["term_y"]}


def simulate_events(
    judgments: pd.DataFrame, n_users: int, end: datetime, days: int = 28, seed: int = 7
) -> pd.DataFrame:
    """SIMULATED user event log (the real data has no users), deterministic for (judgments, n_users, end, days, seed).

    Each simulated user has 1-3 shopping missions. A mission starts from a real search term and adds 0-2 related
    terms (terms judged on a shared product, `related_terms`), each searched in its own session, 6 h to 3 days
    apart. In a session the user views the term's judged products and clicks / adds to cart / purchases with
    probabilities that rise with the product's graded relevance. Missions are what make a user's history say
    something about their next query; with independent intents no personalisation can beat the plain ranking.
    """
    rng = np.random.default_rng(seed)
    by_term = {t: g for t, g in judgments.groupby(judgments["search_term"].map(normalize_term), sort=True) if t}
    terms = list(by_term)
    related = related_terms(judgments)
    end = end.astimezone(UTC)
    span = timedelta(days=days).total_seconds()
    day = timedelta(days=1).total_seconds()
    rows: list[tuple[int, int, str, float, str]] = []
    for user in range(1, n_users + 1):
        for term_idx in rng.choice(len(terms), size=min(int(rng.integers(1, 4)), len(terms)), replace=False):
            mission = [terms[term_idx]]
            for _ in range(int(rng.integers(0, 3))):
                options = sorted({t for m in mission for t in related.get(m, ())} - set(mission))
                if not options:
                    break
                mission.append(options[int(rng.integers(len(options)))])
            gaps = rng.uniform(0.25 * day, 3 * day, size=len(mission) - 1)
            if gaps.sum() > span:  # a short simulated period squeezes the mission, never cuts it
                gaps *= span / gaps.sum()
            first = rng.uniform(0, span - gaps.sum())
            for term, session in zip(mission, first + np.concatenate([[0.0], np.cumsum(gaps)]), strict=True):
                judged = zip(by_term[term]["product_uid"], by_term[term]["relevance"], strict=True)
                for offset, (pid, rel) in enumerate(judged):
                    grade = (float(rel) - 1.0) / 2.0  # 0 (irrelevant) .. 1 (exact)
                    at = session + 20.0 * offset
                    rows.append((user, int(pid), "view", at, term))
                    if rng.random() < 0.05 + 0.55 * grade:
                        rows.append((user, int(pid), "click", at + 5, term))
                        if rng.random() < 0.5 * grade:
                            rows.append((user, int(pid), "add_to_cart", at + 10, term))
                            if rng.random() < 0.6:
                                rows.append((user, int(pid), "purchase", at + 15, term))
    df = pd.DataFrame(rows, columns=["user_id", "product_id", "event_type", "seconds", "query"])
    start = pd.Timestamp(end) - pd.Timedelta(seconds=span)
    df["event_timestamp"] = start + pd.to_timedelta(df.pop("seconds").clip(upper=span), unit="s")
    df["event_timestamp"] = df["event_timestamp"].dt.floor("ms")
    df = df.astype({"user_id": "int64", "product_id": "int64", "event_type": "string", "query": "string"})
    return df.sort_values(["event_timestamp", "user_id", "product_id"], kind="stable").reset_index(drop=True)


@dataclass(frozen=True)
class Snapshot:
    """A run's frozen inputs: parquet tables in one folder, identified by a content hash."""

    path: Path
    hash: str

    def table(self, name: str) -> pd.DataFrame:
        return pd.read_parquet(self.path / f"{name}.parquet")

    @classmethod
    def open(cls, path: str | Path) -> Snapshot:
        path = Path(path)
        return cls(path, json.loads((path / "manifest.json").read_text())["hash"])


def _frame_hash(df: pd.DataFrame) -> str:
    return hashlib.sha256(pd.util.hash_pandas_object(df, index=False).values.tobytes()).hexdigest()


def launch_judgments(train: pd.DataFrame, share: float) -> pd.DataFrame:
    """The training judgments a run may train on: every row of a training term judged at launch
    (is_judged_at_launch), and every row of a validation term (they score models, they are never trained on); the
    other training terms' relevance reaches a model only through the feedback of the logged traffic."""
    if share >= 1.0:
        return train
    terms = train["search_term"]
    keep = terms.map(lambda t: not is_training_term(t) or is_judged_at_launch(t, share)).astype(bool)
    return train[keep].reset_index(drop=True)


def snapshot_data(
    cfg: DataConfig,
    out_dir: Path,
    as_of: datetime,
    landing: Path | None = None,
    feedback: FeedbackSource | None = None,
    launch: bool = True,
) -> Snapshot:
    """Load, split and simulate once per run; later steps read only this snapshot (idempotent for a run).

    A configured judgments_path must name a file in the landing folder (`landing`, default Paths.landing): checked
    by landed_judgments before anything is read or written. `data.judged_at_launch` < 1 keeps only that share of the
    training terms' judgments (judged_at_launch); the held-out ones and the catalog are the same at any share.
    `data.new_arrivals` holds its products back (hold_back_new_arrivals): from the catalog and every judgment when
    `launch` (the first model, no @champion yet), from the training judgments only afterwards.

    With `feedback`, the logged traffic of [feedback.since, as_of) becomes the `feedback_pairs` table
    (pipelines.data.feedback.read_feedback; the retrain step reads it since the champion's as-of time) and the
    `searched_terms` table (every term searched in it, clicked or not: read_searched_terms), and the manifest's
    `feedback` says how much and what was dropped; without, both tables are empty and `feedback` null, so a bench
    or a test never picks up whatever traffic the local log holds.
    """
    from pipelines.data.feedback import (
        FEEDBACK_TABLE,
        SEARCHED_TABLE,
        empty_pairs,
        empty_searched,
        read_feedback,
        read_searched_terms,
        window,
    )

    judgments = profile_judgments(cfg, landing)  # a judgments_path is checked before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    train, heldout = split_judgments(judgments)
    offers_train, offers_test = split_offers(load_offers(), cfg.max_offers)
    catalog = catalog_from(judgments)
    arrivals = new_arrival_ids(catalog, cfg.new_arrivals.title_words)
    train, heldout, catalog = hold_back_new_arrivals(train, heldout, catalog, arrivals, launch)
    pairs, stats = read_feedback(feedback, as_of, catalog) if feedback is not None else (empty_pairs(), None)
    searched = read_searched_terms(feedback, as_of) if feedback is not None else empty_searched()
    tables = {
        "judgments_train": launch_judgments(train, cfg.judged_at_launch),
        "judgments_heldout": heldout,
        "catalog": catalog,
        "offers_train": offers_train,
        "offers_test": offers_test,
        # the simulated shoppers of the features pipeline click on every training term, judged at launch or not
        "events": simulate_events(train, cfg.event_users, as_of, cfg.event_days, cfg.event_seed),
        FEEDBACK_TABLE: pairs,
        SEARCHED_TABLE: searched,
    }
    hashes = {}
    for name, df in tables.items():
        df.to_parquet(out_dir / f"{name}.parquet", index=False)
        hashes[name] = _frame_hash(df)
    digest = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16]
    terms = train["search_term"][train["search_term"].map(is_training_term).astype(bool)].map(normalize_term)
    judged = terms.map(lambda t: is_judged_at_launch(t, cfg.judged_at_launch)).astype(bool)
    manifest = {
        "hash": digest,
        "tables": {n: {"rows": len(t), "sha256": hashes[n]} for n, t in tables.items()},
        "as_of": as_of.isoformat(),
        "config": cfg.model_dump(),
        "simulated": ["events"],
        "judged_at_launch": {
            "share": cfg.judged_at_launch,
            "judged_terms": int(terms[judged].nunique()),
            "click_only_terms": int(terms[~judged].nunique()),
        },
        "feedback": {**window(feedback, as_of, stats), "searched_terms": len(searched)}
        if feedback is not None and stats is not None
        else None,
        "new_arrivals": {
            "title_words": list(cfg.new_arrivals.title_words),
            "products": len(arrivals),
            "launch": launch,
            "in_catalog": not launch,
        }
        if arrivals
        else None,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return Snapshot(out_dir, digest)
