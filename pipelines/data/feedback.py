"""Feedback pairs for retraining: the logged search answers joined with the events that followed them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.data.dataset import is_heldout_term, is_training_term, is_validation_term, normalize_term

FEEDBACK_TABLE = "feedback_pairs"
# The snapshot's table of what shoppers searched since @champion's snapshot, clicked or not: the served vocabulary
# covers it after the next retrain (pipelines.compression.variants.vocabulary_texts)
SEARCHED_TABLE = "searched_terms"
SEARCHED_COLUMNS = {"search_term": "string", "answers": "int64"}
POSITIVE_EVENTS = ("click", "add_to_cart", "purchase")
LABELS = ("positive", "negative")
# (column, dtype) of the table; the counts say how much traffic stands behind each pair
COLUMNS = {
    "search_term": "string",  # normalised (normalize_term), as the split rules read it
    "product_uid": "int64",
    "product_title": "string",
    "label": "string",  # positive | negative
    "answers": "int64",  # answers that gave the pair its label
    "clicks": "int64",
    "add_to_carts": "int64",
    "purchases": "int64",
    "skips": "int64",  # answers where it was shown above the lowest interacted product and not interacted with
}


# The service refuses longer queries (SHOPGUIDE_MAX_QUERY_CHARS, 256) and the snapshot's validation rejects longer
# terms: one odd query (lower-casing can lengthen it) must not fail every retrain while it is in the window.
MAX_TERM_CHARS = 256


@dataclass(frozen=True)
class FeedbackSource:
    """Where a snapshot reads its feedback: the answers and events of [since, the run's as-of time) in the service's
    log folders (request_log_dir, event_log_dir) unless others are named; since None = from the beginning."""

    since: datetime | None
    request_log: Path | None = None
    event_log: Path | None = None


@dataclass(frozen=True)
class FeedbackStats:
    """How much logged traffic a feedback table holds, and what was left out of it and why."""

    answers: int  # search answers in the window with a query (of at most MAX_TERM_CHARS, normalised)
    answers_with_events: int
    events: int  # feedback events in the window (click, add_to_cart, purchase)
    events_unmatched: int  # naming no search answer of the window (outside it, or a recommendation)
    pairs: int
    positives: int
    negatives: int
    heldout_answers: int  # answers to held-out terms: the fixed test set never enters training
    dropped_heldout: int  # (term, product) pairs of those answers
    dropped_validation: int  # pairs of validation terms (they score the model during training)
    dropped_unknown_product: int  # pairs whose product is not in the snapshot's catalog (no title to train on)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def empty_pairs() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in COLUMNS.items()})


def _interactions(answers: pd.DataFrame, events: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """(request_id, search_term, product_uid, kind) rows: one per distinct event on an answer and one 'skip' per
    skipped-above product, plus the number of events that name no answer in `answers`."""
    events = events[events["event_type"].isin(POSITIVE_EVENTS)]
    events = events[["request_id", "product_id", "event_type"]].drop_duplicates()
    matched = events.merge(answers[["request_id", "search_term"]], on="request_id")
    unmatched = len(events) - len(matched)
    acted = matched.rename(columns={"product_id": "product_uid", "event_type": "kind"})
    shown = answers[["request_id", "search_term", "product_ids"]].explode("product_ids").dropna(subset="product_ids")
    shown = shown.rename(columns={"product_ids": "product_uid"}).astype({"product_uid": "int64"})
    shown["position"] = shown.groupby("request_id").cumcount()
    # a product listed twice in one answer keeps its best position
    shown = shown.drop_duplicates(["request_id", "product_uid"])
    touched = acted[["request_id", "product_uid"]].drop_duplicates().assign(touched=True)
    shown = shown.merge(touched, on=["request_id", "product_uid"], how="left")
    shown["touched"] = shown["touched"].astype("boolean").fillna(False).astype(bool)
    lowest = shown[shown["touched"]].groupby("request_id", as_index=False)["position"].max()
    # an answer without an interaction on a shown product says nothing of what was skipped
    shown = shown.merge(lowest.rename(columns={"position": "lowest"}), on="request_id")
    skipped = shown[~shown["touched"] & (shown["position"] < shown["lowest"])]
    keys = ["request_id", "search_term", "product_uid", "kind"]
    rows = pd.concat([acted[keys], skipped.assign(kind="skip")[keys]], ignore_index=True)
    return rows, unmatched


def feedback_pairs(
    answers: pd.DataFrame, events: pd.DataFrame, catalog: pd.DataFrame
) -> tuple[pd.DataFrame, FeedbackStats]:
    """The (search term, product) pairs the logged traffic labels, with their titles from `catalog`.

    `answers` are request-log rows (request_id, endpoint, query, product_ids best first), `events` event-log rows
    (request_id, product_id, event_type) naming them. Only search answers with a query (of at most MAX_TERM_CHARS)
    count; an event counts on the answer whose request_id it names (one per (answer, product, type)).

    The rule, per answer: every product with a click, add_to_cart or purchase is a positive for the answer's
    (normalised) query, shown or not (a purchase may follow from the product page). Every product shown above the
    lowest-ranked shown product the shopper interacted with, and not interacted with itself, is a negative ("skip
    above", Joachims 2002): the shopper looked past it to reach a lower result, so it is the likely examined and
    rejected one, while products below the last interaction may never have been looked at and say nothing. An
    answer with no interaction on a shown product gives no negatives. Over the window a (term, product) pair is
    positive when any answer gave it an event, else negative (a skip is weaker evidence than an event).

    Dropped, and counted in the stats: answers to held-out terms (is_heldout_term: the fixed test set never enters
    training, whatever the traffic), pairs of validation terms (is_validation_term: they score the model during
    training), pairs whose product has no title in `catalog`.
    """
    searches = answers[(answers["endpoint"] == "search") & answers["query"].notna()]
    searches = searches.assign(search_term=searches["query"].map(normalize_term))
    searches = searches[(searches["search_term"] != "") & (searches["search_term"].str.len() <= MAX_TERM_CHARS)]
    heldout = searches["search_term"].map(is_heldout_term).astype(bool)
    rows, unmatched = _interactions(searches, events)
    counted = (
        rows.assign(n=1)
        .pivot_table(index=["search_term", "product_uid"], columns="kind", values="n", aggfunc="sum", fill_value=0)
        .reindex(columns=[*POSITIVE_EVENTS, "skip"], fill_value=0)
        .rename(columns={"click": "clicks", "add_to_cart": "add_to_carts", "purchase": "purchases", "skip": "skips"})
        .reset_index()
        if not rows.empty
        else empty_pairs().drop(columns=["product_title", "label", "answers"])
    )
    positive = counted[["clicks", "add_to_carts", "purchases"]].sum(axis=1) > 0
    counted["label"] = positive.map({True: "positive", False: "negative"})
    acted = rows[rows["kind"] != "skip"]
    support = pd.concat(
        [
            acted.drop_duplicates(["request_id", "search_term", "product_uid"]).assign(label="positive"),
            rows[rows["kind"] == "skip"].assign(label="negative"),
        ]
    )
    answer_counts = support.groupby(["search_term", "product_uid", "label"]).size().rename("answers").reset_index()
    counted = counted.merge(answer_counts, on=["search_term", "product_uid", "label"], how="left")
    is_heldout = counted["search_term"].map(is_heldout_term).astype(bool)
    is_validation = counted["search_term"].map(is_validation_term).astype(bool)
    titles = catalog[["product_uid", "product_title"]].drop_duplicates("product_uid")
    kept = counted[~is_heldout & ~is_validation].merge(titles, on="product_uid")
    pairs = (
        kept[list(COLUMNS)]
        .astype(COLUMNS)
        .sort_values(["search_term", "product_uid"], kind="stable")
        .reset_index(drop=True)
    )
    stats = FeedbackStats(
        answers=len(searches),
        answers_with_events=int(rows.loc[rows["kind"] != "skip", "request_id"].nunique()),
        events=int((rows["kind"] != "skip").sum()) + unmatched,
        events_unmatched=unmatched,
        pairs=len(pairs),
        positives=int((pairs["label"] == "positive").sum()),
        negatives=int((pairs["label"] == "negative").sum()),
        heldout_answers=int(heldout.sum()),
        dropped_heldout=int(is_heldout.sum()),
        dropped_validation=int((is_validation & ~is_heldout).sum()),
        dropped_unknown_product=int((~is_heldout & ~is_validation).sum()) - len(pairs),
    )
    return pairs, stats


def read_feedback(source: FeedbackSource, until: datetime, catalog: pd.DataFrame) -> tuple[pd.DataFrame, FeedbackStats]:
    """feedback_pairs over the answers logged in [source.since, until) and the events accepted in the same window.
    An event accepted after `until` for an answer before it is in no window: the next one starts at `until` once
    this run's model is champion (a few seconds of traffic at a window's edge)."""
    from pipelines.data.event_log import read_event_log
    from pipelines.data.request_log import read_request_log

    since = source.since if source.since is None or source.since <= until else until  # a re-run of an older run
    columns = ["request_id", "endpoint", "query", "product_ids"]
    answers = read_request_log(since, until, source.request_log).select(columns).to_pandas()
    events = read_event_log(since, until, source.event_log).select(["request_id", "product_id", "event_type"])
    return feedback_pairs(answers, events.to_pandas(), catalog)


def empty_searched() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in SEARCHED_COLUMNS.items()})


def searched_terms(answers: pd.DataFrame) -> pd.DataFrame:
    """The distinct (normalised) search terms of request-log rows (endpoint, query) with how many answers each got,
    most searched first; held-out terms left out (the fixed test set's words stay a fair test of the pruned
    vocabulary, as in the feedback pairs) and so are terms longer than MAX_TERM_CHARS.

    Every term counts, with or without a click: a new brand the served model splits into pieces answers badly and
    gets few clicks, so its words would never reach the vocabulary through the feedback pairs alone."""
    searches = answers[(answers["endpoint"] == "search") & answers["query"].notna()]
    terms = searches["query"].map(normalize_term)
    terms = terms[(terms != "") & (terms.str.len() <= MAX_TERM_CHARS)]
    terms = terms[~terms.map(is_heldout_term).astype(bool)]
    if terms.empty:
        return empty_searched()
    counted = terms.value_counts().rename_axis("search_term").reset_index(name="answers")
    counted = counted.sort_values(["answers", "search_term"], ascending=[False, True], kind="stable")
    return counted.astype(SEARCHED_COLUMNS).reset_index(drop=True)


def read_searched_terms(source: FeedbackSource, until: datetime) -> pd.DataFrame:
    """searched_terms over the answers logged in [source.since, until): the same window as read_feedback's."""
    from pipelines.data.request_log import read_request_log

    since = source.since if source.since is None or source.since <= until else until
    answers = read_request_log(since, until, source.request_log).select(["endpoint", "query"]).to_pandas()
    return searched_terms(answers)


def count_new_feedback(source: FeedbackSource, until: datetime) -> int:
    """Search answers in [source.since, until) on training terms (is_training_term, of at most MAX_TERM_CHARS) that got
    a click, add_to_cart or purchase in the same window: the answers read_feedback would learn from, counted from
    two columns of each log instead of building the pairs (seconds, where a snapshot takes minutes). Whether the
    products are in the catalog is not checked: that needs the catalog."""
    from pipelines.data.event_log import read_event_log
    from pipelines.data.request_log import read_request_log

    since = source.since if source.since is None or source.since <= until else until
    events = read_event_log(since, until, source.event_log).select(["request_id", "event_type"]).to_pandas()
    acted = set(events.loc[events["event_type"].isin(POSITIVE_EVENTS), "request_id"])
    if not acted:
        return 0
    answers = read_request_log(since, until, source.request_log).select(["request_id", "endpoint", "query"]).to_pandas()
    searches = answers[(answers["endpoint"] == "search") & answers["request_id"].isin(acted) & answers["query"].notna()]
    terms = searches["query"].map(normalize_term)
    learnable = terms.map(is_training_term).astype(bool) & (terms.str.len() <= MAX_TERM_CHARS)
    return int(searches.loc[learnable, "request_id"].nunique())


def window(source: FeedbackSource, until: datetime, stats: FeedbackStats) -> dict[str, Any]:
    """What a snapshot's manifest records of its feedback."""
    since = source.since.isoformat() if source.since else None
    return {"since": since, "until": until.isoformat(), **stats.to_dict()}
