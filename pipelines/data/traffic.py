"""SIMULATED shoppers: which training term a user searches, and which shown products they click, add to cart and buy.

A pure, deterministic model (numpy Generators in, decisions out; no I/O) that pipelines/data/replay.py plays against a
running service. Every number below is a documented assumption, set in the config's `simulate` section:

- Queries: only training terms (is_training_term: never held-out, never validation), drawn with probability
  proportional to the term's frequency in the Home Depot training judgments, i.e. its number of judgment rows (judged
  products), raised to `term_frequency_power`. The data has no query counts; a term's judgment count is the only
  popularity signal it carries (1 to 16 rows, median 7, over the 9,573 training terms of the shipped data). A session
  may go on with a related training term (one judged on a shared product, as in simulate_events) with chance
  `related_search`, up to `max_searches_per_session` searches.
- Examination (position bias): the product at rank r (1-based) of an answer is looked at with chance 1 / r^eta
  (`examination_eta`; Joachims et al. 2017, "Unbiased Learning-to-Rank with Biased Feedback"), whatever it is.
- Click, given looked at: from the graded relevance of the (term, product) judgment, g = (relevance - 1) / 2 in
  [0, 1]: c1 + (c3 - c1) * g^exponent (`click_at_relevance_1`, `click_at_relevance_3`, `click_relevance_exponent`;
  defaults 0.02 .. 0.9, squared: 1.0 -> 0.02, 2.0 -> 0.24, 2.5 -> 0.51, 3.0 -> 0.9). A product never judged for the
  term gets `unjudged_click` (0.05): low, because nothing says it is relevant; by hand many unjudged hits are
  (bench/README.md), so this understates their clicks rather than inventing relevance.
- Add to cart, given a click: `cart_at_relevance_3` * g^exponent (unjudged: `unjudged_cart`); purchase, given a
  cart: `purchase_given_cart`.

Each decision draws a fixed number of uniforms per shown product, so one outcome never shifts the stream of the next.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from pipelines.config import SimulateConfig
from pipelines.data.dataset import is_judged_at_launch, is_training_term, normalize_term, related_terms

InteractionType = Literal["click", "add_to_cart", "purchase"]


@dataclass(frozen=True, slots=True)
class Interaction:
    """One simulated feedback event on a shown product: its 1-based rank in the answer and the event type."""

    product_id: int
    rank: int
    type: InteractionType


def training_judgments(judgments: pd.DataFrame) -> pd.DataFrame:
    """The rows of training terms only (is_training_term): what the simulator may ever search or read relevance of."""
    keep = judgments["search_term"].map(is_training_term).astype(bool)
    return judgments[keep].reset_index(drop=True)


def term_frequency(judgments: pd.DataFrame) -> pd.Series:
    """Normalised training term -> its number of judgment rows in `judgments`, sorted by term (the query weights)."""
    train = training_judgments(judgments)
    counts = train["search_term"].map(normalize_term).value_counts()
    return counts.sort_index().astype("int64")


def draw_users(rng: np.random.Generator, population: int, n: int) -> list[int]:
    """`n` distinct user ids of the simulated event log's population 1..`population` (users with a history and online
    features); beyond it, new shoppers population+1, ... without one."""
    known = rng.choice(np.arange(1, population + 1), size=min(n, population), replace=False)
    return sorted(int(u) for u in known) + list(range(population + 1, population + 1 + max(0, n - population)))


def user_rng(seed: int, user_id: int, stream: int = 0) -> np.random.Generator:
    """One user's own generator: the same (seed, user) decides the same, whoever else runs and in whatever order."""
    return np.random.default_rng([seed, user_id, stream])


class ShopperModel:
    """Queries, position bias and graded-relevance clicks of SIMULATED shoppers over the training judgments."""

    def __init__(self, judgments: pd.DataFrame, cfg: SimulateConfig, judged_at_launch: float = 1.0) -> None:
        self.cfg = cfg
        train = training_judgments(judgments)  # whatever the caller passed: held-out and validation terms never enter
        freq = term_frequency(train)
        if freq.empty:
            raise ValueError("no training terms in the judgments: nothing to simulate")
        self.terms: tuple[str, ...] = tuple(freq.index)
        weights = freq.to_numpy(dtype="float64") ** cfg.term_frequency_power
        self.probabilities = weights / weights.sum()
        pairs = pd.DataFrame(
            {"term": train["search_term"].map(normalize_term), "product": train["product_uid"].astype("int64")}
        ).assign(relevance=train["relevance"].astype("float64"))
        # the same (term, product) judged under two spellings of the term: their mean grade
        graded = pairs.groupby(["term", "product"], sort=True)["relevance"].mean()
        self.relevance: dict[str, dict[int, float]] = {}
        for (term, product), rel in graded.items():
            self.relevance.setdefault(str(term), {})[int(product)] = float(rel)
        self.related = related_terms(train)
        self.click_only = frozenset(t for t in self.terms if not is_judged_at_launch(t, judged_at_launch))

    def session(self, rng: np.random.Generator) -> list[str]:
        """One session's searches: a term by frequency, then related terms while the shopper goes on."""
        terms = [self.terms[int(rng.choice(len(self.terms), p=self.probabilities))]]
        while len(terms) < self.cfg.max_searches_per_session and rng.random() < self.cfg.related_search:
            options = sorted({t for s in terms for t in self.related.get(s, ())} - set(terms))
            if not options:
                break
            terms.append(options[int(rng.integers(len(options)))])
        return terms

    def examination(self, ranks: np.ndarray) -> np.ndarray:
        """Chance that the product at each 1-based rank is looked at: 1 / rank^eta."""
        return 1.0 / np.power(ranks.astype("float64"), self.cfg.examination_eta)

    def _grade(self, term: str, product_id: int) -> float | None:
        rel = self.relevance.get(term, {}).get(product_id)
        return None if rel is None else min(max((rel - 1.0) / 2.0, 0.0), 1.0)

    def click_probability(self, term: str, product_id: int) -> float:
        """Click chance of a looked-at product: from its graded judgment for the term, else `unjudged_click`."""
        grade = self._grade(term, product_id)
        if grade is None:
            return self.cfg.unjudged_click
        low, high = self.cfg.click_at_relevance_1, self.cfg.click_at_relevance_3
        return low + (high - low) * grade**self.cfg.click_relevance_exponent

    def cart_probability(self, term: str, product_id: int) -> float:
        """Add-to-cart chance of a clicked product."""
        grade = self._grade(term, product_id)
        if grade is None:
            return self.cfg.unjudged_cart
        return self.cfg.cart_at_relevance_3 * grade**self.cfg.click_relevance_exponent

    def feedback(self, rng: np.random.Generator, term: str, ranked: Sequence[int]) -> list[Interaction]:
        """The shopper's events on one answer (`ranked`: product ids, best first) to a search for `term`."""
        if not ranked:
            return []
        term = normalize_term(term)
        u = rng.random((len(ranked), 4))  # examine, click, cart, purchase: drawn for every product
        looked = u[:, 0] < self.examination(np.arange(1, len(ranked) + 1))
        events: list[Interaction] = []
        for i, product in enumerate(ranked):
            pid = int(product)
            if not looked[i] or u[i, 1] >= self.click_probability(term, pid):
                continue
            events.append(Interaction(pid, i + 1, "click"))
            if u[i, 2] < self.cart_probability(term, pid):
                events.append(Interaction(pid, i + 1, "add_to_cart"))
                if u[i, 3] < self.cfg.purchase_given_cart:
                    events.append(Interaction(pid, i + 1, "purchase"))
        return events
