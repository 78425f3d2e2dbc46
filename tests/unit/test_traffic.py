"""The SIMULATED shoppers' model (pipelines/data/traffic.py) and its replay driver (pipelines/data/replay.py) against
a stand-in service (httpx.MockTransport): deterministic with a seed, training terms only, relevance and position
signal in the clicks, the judged-at-launch split."""

from __future__ import annotations

import copy
import json
from collections import Counter

import httpx
import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from pipelines.config import DataConfig, SimulateConfig, load_config
from pipelines.data.dataset import (
    is_heldout_term,
    is_judged_at_launch,
    is_training_term,
    is_validation_term,
    load_judgments,
    normalize_term,
    split_judged_at_launch,
    split_judgments,
)
from pipelines.data.replay import replay
from pipelines.data.traffic import ShopperModel, draw_users, term_frequency, training_judgments, user_rng

CFG = SimulateConfig()


@pytest.fixture(scope="module")
def judgments() -> pd.DataFrame:
    return load_judgments()


@pytest.fixture(scope="module")
def model(judgments: pd.DataFrame) -> ShopperModel:
    return ShopperModel(judgments, CFG)  # every term: the model must drop held-out and validation terms itself


def _terms(n: int) -> list[str]:
    """n synthetic training terms (the split rules decide which names are training terms)."""
    names = (f"synthetic term {i}" for i in range(10_000))
    return [t for t in names if is_training_term(t)][:n]


def _judged(rows: list[tuple[str, int, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["search_term", "product_uid", "relevance"]).assign(product_title="t")


def test_only_training_terms_are_ever_searched(judgments: pd.DataFrame, model: ShopperModel) -> None:
    train, heldout = split_judgments(judgments)
    training = {normalize_term(t) for t in train["search_term"] if not is_validation_term(t)} - {""}
    assert set(model.terms) == training and len(training) > 9000
    assert not set(model.terms) & {normalize_term(t) for t in heldout["search_term"]}
    assert not any(is_heldout_term(t) or is_validation_term(t) for t in model.terms)
    assert set(model.relevance) == training  # no relevance of another term is even kept
    assert all(set(linked) <= training for linked in model.related.values())  # follow-up searches too
    rng = np.random.default_rng(0)
    searched = Counter(t for _ in range(3000) for t in model.session(rng))
    assert set(searched) <= training and sum(searched.values()) > 3000  # some sessions went on to related terms


def test_queries_follow_the_training_terms_frequency(judgments: pd.DataFrame, model: ShopperModel) -> None:
    freq = term_frequency(judgments)
    assert list(freq.index) == list(model.terms)
    assert freq.sum() == len(training_judgments(judgments))
    assert model.probabilities == pytest.approx(freq.to_numpy() / freq.sum())
    terms = _terms(2)
    rows = [(terms[0], p, 2.0) for p in range(8)] + [(terms[1], 100, 2.0)]
    rng = np.random.default_rng(1)
    frequent = ShopperModel(_judged(rows), CFG.model_copy(update={"related_search": 0.0}))
    drawn = Counter(frequent.session(rng)[0] for _ in range(4000))
    assert drawn[terms[0]] / drawn[terms[1]] == pytest.approx(8, rel=0.15)
    uniform = ShopperModel(_judged(rows), CFG.model_copy(update={"related_search": 0.0, "term_frequency_power": 0}))
    drawn = Counter(uniform.session(rng)[0] for _ in range(4000))
    assert drawn[terms[0]] / drawn[terms[1]] == pytest.approx(1, rel=0.15)


def test_the_same_seed_decides_the_same(model: ShopperModel) -> None:
    def play(seed: int, user: int) -> list[tuple[str, list[tuple[int, int, str]]]]:
        rng = user_rng(seed, user)
        out = []
        for _ in range(20):
            for term in model.session(rng):
                ranked = sorted(model.relevance[term])[:10]
                out.append((term, [(i.product_id, i.rank, i.type) for i in model.feedback(rng, term, ranked)]))
        return out

    assert play(5, 17) == play(5, 17)
    assert play(5, 17) != play(6, 17) and play(5, 17) != play(5, 18)
    assert draw_users(np.random.default_rng(3), 2000, 20) == draw_users(np.random.default_rng(3), 2000, 20)


def _click_rate(model: ShopperModel, term: str, ranked: list[int], n: int = 20_000, seed: int = 0) -> np.ndarray:
    """Clicks per rank (0-based index) over n answers of the same ranking."""
    rng = np.random.default_rng(seed)
    clicks = np.zeros(len(ranked))
    for _ in range(n):
        for i in model.feedback(rng, term, ranked):
            if i.type == "click":
                clicks[i.rank - 1] += 1
    return clicks / n


def test_clicks_carry_the_graded_relevance() -> None:
    term = _terms(1)[0]
    grades = {1: 3.0, 2: 2.67, 3: 2.33, 4: 2.0, 5: 1.33, 6: 1.0}
    model = ShopperModel(
        _judged([(term, p, r) for p, r in grades.items()]), CFG.model_copy(update={"examination_eta": 0})
    )
    rates = _click_rate(model, term, list(grades), n=10_000)  # eta 0: every rank looked at, only relevance differs
    assert list(rates) == sorted(rates, reverse=True) and rates[0] > rates[3] + 0.5
    for rank, pid in enumerate(grades):
        assert rates[rank] == pytest.approx(model.click_probability(term, pid), abs=0.02)
    assert model.click_probability(term, 1) == pytest.approx(CFG.click_at_relevance_3)
    assert model.click_probability(term, 6) == pytest.approx(CFG.click_at_relevance_1)
    # add-to-carts and purchases only follow clicks, and rise with relevance too
    rng = np.random.default_rng(2)
    kinds = Counter((i.product_id, i.type) for _ in range(10_000) for i in model.feedback(rng, term, [1, 4, 6]))
    assert kinds[(1, "add_to_cart")] > kinds[(4, "add_to_cart")] > kinds[(6, "add_to_cart")] == 0
    assert 0 < kinds[(1, "purchase")] < kinds[(1, "add_to_cart")] < kinds[(1, "click")]


def test_higher_ranks_are_clicked_more_and_unjudged_rarely() -> None:
    term, other = _terms(2)
    rows = [(term, p, 3.0) for p in range(1, 11)] + [(other, 99, 3.0)]
    model = ShopperModel(_judged(rows), CFG)
    rates = _click_rate(model, term, list(range(1, 11)))
    expected = CFG.click_at_relevance_3 / np.arange(1, 11) ** CFG.examination_eta
    assert rates == pytest.approx(expected, abs=0.015)
    assert rates[0] > 4 * rates[4]
    # 99 is judged for another term only: unjudged for this one, clicked at the documented low rate even at rank 1
    unjudged = _click_rate(model, term, [99, 1])
    assert unjudged[0] == pytest.approx(CFG.unjudged_click, abs=0.01) and unjudged[0] < 0.1 < unjudged[1]
    steeper = ShopperModel(_judged(rows), CFG.model_copy(update={"examination_eta": 2.0}))
    assert steeper.examination(np.array([1, 2, 4])) == pytest.approx([1, 0.25, 1 / 16])


def test_judged_at_launch_splits_training_terms_deterministically(judgments: pd.DataFrame) -> None:
    train = training_judgments(judgments)
    terms = sorted(set(train["search_term"].map(normalize_term)))
    assert all(is_judged_at_launch(t, 1.0) for t in terms) and not any(is_judged_at_launch(t, 0.0) for t in terms)
    at_30 = {t for t in terms if is_judged_at_launch(t, 0.3)}
    at_60 = {t for t in terms if is_judged_at_launch(t, 0.6)}
    assert at_30 < at_60  # nested: a term judged at a smaller share stays judged at a larger one
    assert len(at_30) / len(terms) == pytest.approx(0.3, abs=0.02)
    assert is_judged_at_launch("  Angle Bracket", 0.5) == is_judged_at_launch("angle bracket", 0.5)
    judged, click_only = split_judged_at_launch(train, 0.3)
    assert len(judged) + len(click_only) == len(train)
    assert set(judged["search_term"].map(normalize_term)) == at_30
    assert not set(judged["search_term"].map(normalize_term)) & set(click_only["search_term"].map(normalize_term))
    everything, nothing = split_judged_at_launch(train, 1.0)
    assert everything.equals(train) and nothing.empty  # the default keeps today's training data exactly
    model = ShopperModel(judgments, CFG, judged_at_launch=0.3)
    assert model.click_only == frozenset(terms) - at_30
    assert ShopperModel(judgments, CFG).click_only == frozenset()


def test_config_defaults_and_refusals() -> None:
    cfg = load_config("default", {"simulate.users": 3})
    assert cfg.simulate.users == 3 and cfg.data.judged_at_launch == 1.0
    with pytest.raises(ValidationError):
        SimulateConfig(click_at_relevance_1=0.5, click_at_relevance_3=0.4)
    with pytest.raises(ValidationError):
        DataConfig(judged_at_launch=1.5)


def test_draw_users_from_the_event_log_population() -> None:
    users = draw_users(np.random.default_rng(0), 30, 10)
    assert len(set(users)) == 10 and all(1 <= u <= 30 for u in users)
    assert draw_users(np.random.default_rng(0), 5, 7) == [1, 2, 3, 4, 5, 6, 7]  # beyond it: new shoppers


class StandIn:
    """A stand-in for the service's HTTP contract (search answers, event acknowledgements), recording requests."""

    def __init__(self, catalog: list[int]) -> None:
        self.catalog, self.searches, self.posts = catalog, [], []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if request.url.path == "/v1/search":
            rid = f"r{len(self.searches)}"
            self.searches.append((body["user_id"], body["query"], rid))
            start = sum(map(ord, body["query"])) % len(self.catalog)
            hits = [
                {"product_id": p, "title": "t", "score": 1.0} for p in (self.catalog * 2)[start : start + body["k"]]
            ]
            return httpx.Response(200, json={"request_id": rid, "results": hits})
        self.posts.append(body["events"])
        n = len(body["events"])
        return httpx.Response(202, json={"received": n, "accepted": n, "duplicates": 0, "online": True})


def test_replay_is_deterministic_and_sends_the_model_s_events(model: ShopperModel) -> None:
    catalog = sorted({p for term in model.terms[:300] for p in model.relevance[term]})
    cfg = CFG.model_copy(update={"think_seconds": 0, "concurrency": 3, "event_batch": 2, "k": 10})
    played = copy.copy(model)  # the same shoppers, played flat out by 3 threads in batches of 2 events
    played.cfg = cfg

    def run(seed: int) -> tuple[StandIn, dict]:
        stand_in = StandIn(catalog)
        with httpx.Client(transport=httpx.MockTransport(stand_in), base_url="http://sim") as client:
            summary = replay(client, played, [3, 8, 21, 40], seed=seed, minutes=5, sessions_per_user=6)
        return stand_in, summary.to_dict()

    a, sa = run(4)
    b, sb = run(4)
    assert sa["stopped"] == "sessions" and sa["sessions"] == 24 and sa["simulated"] is True
    by_user = lambda s: sorted((u, q) for u, q, _ in s.searches)  # noqa: E731 (threads interleave users)
    assert by_user(a) == by_user(b) and by_user(a) != by_user(run(5)[0])
    assert {q for _, q, _ in a.searches} <= set(model.terms)
    assert {u for u, _, _ in a.searches} == {3, 8, 21, 40}
    sent = [e for post in a.posts for e in post]
    assert all(len(post) <= 2 for post in a.posts)
    assert sa["events"] == {t: sum(e["type"] == t for e in sent) for t in ("click", "add_to_cart", "purchase")}
    assert sa["accepted"] == len(sent) > 0 and sa["errors"] == {}
    answered = {rid: u for u, _, rid in a.searches}
    assert all(answered[e["request_id"]] == e["user_id"] for e in sent)


def test_replay_ends_when_the_caller_sets_stop(model: ShopperModel) -> None:
    import threading

    catalog = sorted({p for term in model.terms[:50] for p in model.relevance[term]})
    played = copy.copy(model)
    played.cfg = CFG.model_copy(update={"think_seconds": 0, "concurrency": 2})
    stop = threading.Event()
    stand_in = StandIn(catalog)

    def answer_then_stop(request: httpx.Request) -> httpx.Response:
        if len(stand_in.searches) >= 5:
            stop.set()  # the caller's own end (bench/new_arrivals.py: its monitor alarmed), long before the clock's
        return stand_in(request)

    with httpx.Client(transport=httpx.MockTransport(answer_then_stop), base_url="http://sim") as client:
        summary = replay(client, played, [1, 2, 3, 4], seed=1, minutes=5, stop=stop).to_dict()
    assert summary["stopped"] == "stop" and summary["seconds"] < 60
    assert 5 <= summary["searches"] <= 5 + 2  # each of the 2 threads finishes at most its current request
