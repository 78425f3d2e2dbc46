"""The promotion gate, table-driven: floors alone on the first run, then no regression against the champion."""

from __future__ import annotations

import pytest

from pipelines.config import GateConfig
from pipelines.evaluation.gate import UnreadableChampion, decide

CFG = GateConfig(
    min_ndcg_at_10=0.30,
    min_category_accuracy=0.80,
    min_parity_cosine=0.97,
    max_latency_p99_ms=10,
    max_size_mb=30,
    max_regression=0.01,
)
GOOD = {
    "ndcg_at_10": 0.40,
    "category_accuracy": 0.90,
    "parity_cosine_min": 0.99,
    "latency_p99_ms": 3.0,
    "size_mb": 23.0,
    "snapshot_hash": "abc",
}


def report(**changes):
    return {**GOOD, **changes}


@pytest.mark.parametrize(
    ("name", "candidate", "champion", "passed", "reason"),
    [
        ("first run, floors met", report(), None, True, "no champion yet"),
        ("better than champion", report(ndcg_at_10=0.42), report(), True, "ndcg_at_10 0.4200 vs champion 0.4000"),
        ("within tolerance", report(ndcg_at_10=0.395), report(), True, "ok: ndcg_at_10"),
        ("regression", report(ndcg_at_10=0.35), report(), False, "FAIL: ndcg_at_10 0.3500 vs champion 0.4000"),
        ("category regression", report(category_accuracy=0.85), report(), False, "FAIL: category_accuracy 0.8500"),
        ("floor miss", report(ndcg_at_10=0.25), None, False, "FAIL: ndcg_at_10 0.25 >= 0.3"),
        ("parity miss", report(parity_cosine_min=0.9), None, False, "FAIL: parity_cosine_min 0.9 >= 0.97"),
        ("latency miss", report(latency_p99_ms=25.0), None, False, "FAIL: latency_p99_ms 25 <= 10"),
        ("size miss", report(size_mb=90.0), None, False, "FAIL: size_mb 90 <= 30"),
        (
            "missing metric",
            {k: v for k, v in GOOD.items() if k != "parity_cosine_min"},
            None,
            False,
            "parity_cosine_min missing",
        ),
        ("champion on other data", report(), report(snapshot_hash="zzz"), True, "another data snapshot"),
        # a champion exists but its report cannot be read: never "no champion yet", however good the candidate
        (
            "champion report unreadable",
            report(ndcg_at_10=0.99),
            UnreadableChampion("7", "evaluation.json is not JSON"),
            False,
            "FAIL: champion version 7 exists but its evaluation report cannot be read (evaluation.json is not JSON)",
        ),
    ],
)
def test_gate(name, candidate, champion, passed, reason):
    decision = decide(candidate, champion, CFG)
    assert decision.passed is passed, (name, decision.reasons)
    assert any(reason in r for r in decision.reasons), (name, decision.reasons)


def test_every_check_is_reported_even_after_a_failure():
    decision = decide(report(ndcg_at_10=0.1, latency_p99_ms=99.0), report(), CFG)
    failed = [r for r in decision.reasons if r.startswith("FAIL")]
    assert len(failed) == 3  # the floor, the latency ceiling and the regression vs the champion
    assert decision.summary().startswith("FAILED")


def test_an_unreadable_champion_is_not_read_as_no_champion():
    unreadable = decide(report(), UnreadableChampion("3", "missing"), CFG)
    assert decide(report(), None, CFG).passed and not unreadable.passed
    assert not any("no champion yet" in r for r in unreadable.reasons)
    assert [r for r in unreadable.reasons if r.startswith("FAIL")] == [unreadable.reasons[-1]]
