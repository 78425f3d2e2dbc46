"""The promotion gate, table-driven: floors alone on the first run, then no regression against the champion
re-evaluated on the same data (a paired bootstrap CI over held-out terms for nDCG@10)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.config import GateConfig, ShopguideConfig, load_config
from pipelines.evaluation.evaluate import per_query_ndcg
from pipelines.evaluation.gate import UnreadableChampion, decide
from pipelines.evaluation.paired import PairedDifference, paired_bootstrap
from pipelines.steps.retrain import KEEP_CHAMPION, PROMOTE, promotion_branch

CFG = GateConfig(
    min_ndcg_at_10=0.30,
    min_category_accuracy=0.80,
    min_parity_cosine=0.97,
    max_latency_p99_ms=10,
    max_size_mb=30,
    max_regression=0.01,
    max_out_of_domain_drop=0.05,
)
GOOD = {
    "ndcg_at_10": 0.40,
    "category_accuracy": 0.90,
    "parity_cosine_min": 0.99,
    "latency_p99_ms": 3.0,
    "size_mb": 23.0,
    "snapshot_hash": "abc",
    "ood_ndcg_at_10": 0.39,
    "base_ood_ndcg_at_10": 0.40,
    "ood_queries": 1000,
}


def report(**changes):
    return {**GOOD, **changes}


def diff(low: float, high: float, mean: float | None = None) -> PairedDifference:
    """A paired nDCG@10 difference (candidate - champion) with the given CI."""
    mean = (low + high) / 2 if mean is None else mean
    return PairedDifference("ndcg_at_10", 200, 0.40 + mean, 0.40, mean, low, high, 0.95, 2000)


@pytest.mark.parametrize(
    ("name", "candidate", "champion", "paired", "passed", "reason"),
    [
        ("first run, floors met", report(), None, None, True, "no champion yet"),
        (
            "better than champion",
            report(ndcg_at_10=0.42),
            report(),
            diff(0.01, 0.03),
            True,
            "ok: ndcg_at_10 0.4200 vs champion 0.4000 on the same 200 held-out terms: difference +0.0200, 95% CI "
            "[+0.0100, +0.0300]",
        ),
        ("a tie within the margin", report(), report(), diff(-0.009, 0.008), True, "ok: ndcg_at_10"),
        # the mean is within the old tolerance, but the interval reaches further down than max_regression allows
        ("a tie too noisy to show", report(), report(), diff(-0.03, 0.03, -0.002), False, "FAIL: ndcg_at_10"),
        ("regression", report(ndcg_at_10=0.35), report(), diff(-0.07, -0.03), False, "lower bound >= -0.01 required"),
        ("no paired comparison", report(), report(), None, False, "FAIL: ndcg_at_10: no paired per-query comparison"),
        (
            "category regression",
            report(category_accuracy=0.85),
            report(),
            diff(-0.005, 0.005),
            False,
            "FAIL: category_accuracy 0.8500 vs champion 0.9000",
        ),
        ("floor miss", report(ndcg_at_10=0.25), None, None, False, "FAIL: ndcg_at_10 0.25 >= 0.3"),
        ("parity miss", report(parity_cosine_min=0.9), None, None, False, "FAIL: parity_cosine_min 0.9 >= 0.97"),
        ("latency miss", report(latency_p99_ms=25.0), None, None, False, "FAIL: latency_p99_ms 25 <= 10"),
        ("size miss", report(size_mb=90.0), None, None, False, "FAIL: size_mb 90 <= 30"),
        (
            "missing metric",
            {k: v for k, v in GOOD.items() if k != "parity_cosine_min"},
            None,
            None,
            False,
            "parity_cosine_min missing",
        ),
        # figures from another snapshot are never compared, however good the candidate looks against them
        (
            "champion on other data",
            report(ndcg_at_10=0.99),
            report(snapshot_hash="zzz"),
            diff(0.1, 0.2),
            False,
            "FAIL: the champion was evaluated on snapshot zzz, the candidate on abc",
        ),
        # a champion exists but cannot be evaluated: never "no champion yet", however good the candidate
        (
            "champion unreadable",
            report(ndcg_at_10=0.99),
            UnreadableChampion("7", "model.onnx differs from its recorded manifest"),
            None,
            False,
            "FAIL: champion version 7 exists but cannot be evaluated (model.onnx differs from its recorded manifest)",
        ),
    ],
)
def test_gate(name, candidate, champion, paired, passed, reason):
    decision = decide(candidate, champion, CFG, paired)
    assert decision.passed is passed, (name, decision.reasons)
    assert any(reason in r for r in decision.reasons), (name, decision.reasons)


OOD = ("ood_ndcg_at_10", "base_ood_ndcg_at_10", "ood_queries")


@pytest.mark.parametrize(
    ("name", "max_drop", "figures", "passed", "reason"),
    [
        ("better than the base model", 0.05, (0.45, 0.40), True, "ok: ood_ndcg_at_10 0.4500 vs base model 0.4000"),
        (
            "a drop within the allowance",
            0.05,
            (0.37, 0.40),
            True,
            "ok: ood_ndcg_at_10 0.3700 vs base model 0.4000 on the same 1000 held-out PriceRunner offers: difference "
            "-0.0300 (>= -0.05 required)",
        ),
        # held out on Home Depot, fine: the gate's other rules all pass; only the unseen shop shows the forgetting
        ("forgot general matching", 0.05, (0.30, 0.40), False, "FAIL: ood_ndcg_at_10 0.3000 vs base model 0.4000"),
        ("a stricter allowance", 0.02, (0.37, 0.40), False, "difference -0.0300 (>= -0.02 required)"),
        ("base model's figure missing", 0.05, (0.45, None), False, "FAIL: base_ood_ndcg_at_10 missing"),
        ("candidate's figure missing", 0.05, (None, 0.40), False, "FAIL: ood_ndcg_at_10 missing"),
        ("check not run", 0.05, (None, None), False, "FAIL: ood_ndcg_at_10 and base_ood_ndcg_at_10 missing"),
        ("off, figures bad", None, (0.10, 0.40), True, None),
        ("off, figures missing", None, (None, None), True, None),
    ],
)
def test_out_of_domain_floor(name, max_drop, figures, passed, reason):
    candidate = {k: v for k, v in GOOD.items() if k not in OOD}
    candidate.update({k: v for k, v in zip(OOD, (*figures, 1000), strict=True) if v is not None})
    decision = decide(candidate, None, CFG.model_copy(update={"max_out_of_domain_drop": max_drop}))
    assert decision.passed is passed, (name, decision.reasons)
    if reason is None:  # off: no line about it at all
        assert not any("ood" in r for r in decision.reasons), (name, decision.reasons)
    else:
        assert any(reason in r for r in decision.reasons), (name, decision.reasons)
        assert sum("ood_ndcg_at_10" in r for r in decision.reasons) == 1, (name, decision.reasons)


def test_the_out_of_domain_gate_needs_the_check():
    with pytest.raises(ValueError, match="needs the out-of-domain check"):
        ShopguideConfig.model_validate({"evaluate": {"out_of_domain_queries": 0}})
    off = ShopguideConfig.model_validate(
        {"evaluate": {"out_of_domain_queries": 0}, "gate": {"max_out_of_domain_drop": None}}
    )
    assert off.gate.max_out_of_domain_drop is None
    for profile in ("default", "full", "tiny"):  # on in every shipped profile
        cfg = load_config(profile)
        assert cfg.gate.max_out_of_domain_drop is not None and cfg.evaluate.out_of_domain_queries > 0, profile


def test_every_check_is_reported_even_after_a_failure():
    decision = decide(report(ndcg_at_10=0.1, latency_p99_ms=99.0), report(), CFG, diff(-0.3, -0.2))
    failed = [r for r in decision.reasons if r.startswith("FAIL")]
    assert len(failed) == 3  # the floor, the latency ceiling and the regression vs the champion
    assert decision.summary().startswith("FAILED")


def test_an_unreadable_champion_is_not_read_as_no_champion():
    unreadable = decide(report(), UnreadableChampion("3", "missing"), CFG)
    assert decide(report(), None, CFG).passed and not unreadable.passed
    assert not any("no champion yet" in r for r in unreadable.reasons)
    assert [r for r in unreadable.reasons if r.startswith("FAIL")] == [unreadable.reasons[-1]]


# --- the paired test on hand-built per-query figures ----------------------------------------------------------------


def per_term(values) -> dict[str, float]:
    return {f"term {i:03d}": float(v) for i, v in enumerate(values)}


RNG = np.random.default_rng(7)
CHAMPION_NDCG = RNG.uniform(0.1, 0.9, 400)
NOISE = RNG.normal(0, 0.05, 400)  # per-term differences of two models of the same quality, mean ~0


@pytest.mark.parametrize(
    ("name", "candidate", "passed"),
    [
        ("identical", CHAMPION_NDCG, True),
        ("clearly worse", np.clip(CHAMPION_NDCG - 0.08 + NOISE, 0, 1), False),
        ("noisy tie", CHAMPION_NDCG + NOISE - NOISE.mean(), True),
        ("better", np.clip(CHAMPION_NDCG + 0.05 + NOISE, 0, 1), True),
        # the same mean difference on 12 terms instead of 400: too few to show it is within the margin
        ("noisy tie on few terms", np.clip(CHAMPION_NDCG + 4 * NOISE - 4 * NOISE.mean(), 0, 1)[:12], False),
    ],
)
def test_paired_bootstrap_decides_no_regression(name, candidate, passed):
    champion = per_term(CHAMPION_NDCG[: len(candidate)])
    paired = paired_bootstrap(per_term(candidate), champion, confidence=CFG.confidence, seed=CFG.bootstrap_seed)
    assert paired.low <= paired.mean_difference <= paired.high, paired
    assert paired.queries == len(candidate)
    decision = decide(report(), report(), CFG, paired)
    assert decision.passed is passed, (name, paired, decision.reasons)
    if name == "identical":
        assert (paired.low, paired.mean_difference, paired.high) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_is_seeded_and_widens_with_confidence():
    candidate, champion = per_term(CHAMPION_NDCG + NOISE), per_term(CHAMPION_NDCG)
    a, b = paired_bootstrap(candidate, champion, seed=3), paired_bootstrap(candidate, champion, seed=3)
    assert a == b
    wide = paired_bootstrap(candidate, champion, confidence=0.99, seed=3)
    assert wide.low < a.low and wide.high > a.high and wide.mean_difference == a.mean_difference


def test_paired_bootstrap_refuses_different_queries():
    with pytest.raises(ValueError, match="different queries"):
        paired_bootstrap(per_term([0.5, 0.6]), {"term 000": 0.5, "other": 0.6})
    with pytest.raises(ValueError, match="no queries"):
        paired_bootstrap({}, {})


def test_the_paired_gate_on_a_hand_built_pair_of_runs():
    """Two retrieval runs over the same judged terms (qrels), scored per term by the evaluation's own code: a
    candidate that loses the best product on most terms fails; the champion against itself passes."""
    terms = [f"q{i}" for i in range(60)]
    qrels = {t: {f"{t}-best": 36, f"{t}-good": 12, f"{t}-poor": 0} for t in terms}
    champion_run = {t: {f"{t}-best": 3.0, f"{t}-good": 2.0, f"{t}-poor": 1.0} for t in terms}
    # the candidate ranks the poor product first on 2 terms in 3, and the best one last
    candidate_run = {
        t: ({f"{t}-poor": 3.0, f"{t}-good": 2.0, f"{t}-best": 1.0} if i % 3 else champion_run[t])
        for i, t in enumerate(terms)
    }
    champion = per_query_ndcg(qrels, champion_run)
    candidate = per_query_ndcg(qrels, candidate_run)
    assert set(champion) == set(terms) and champion[terms[0]] == pytest.approx(1.0)
    worse = paired_bootstrap(candidate, champion, confidence=0.95, seed=0)
    assert worse.high < -CFG.max_regression, worse  # clearly worse: the whole interval is below the margin
    lost = decide(report(), report(), CFG, worse)
    assert not lost.passed
    assert any(r.startswith("FAIL: ndcg_at_10") and "vs champion" in r for r in lost.reasons), lost.reasons
    same = decide(report(), report(), CFG, paired_bootstrap(champion, dict(champion), seed=0))
    assert same.passed, same.reasons


@pytest.mark.parametrize(
    ("passed", "auto_promote", "version", "branch"),
    [
        (True, True, "3", PROMOTE),
        (False, True, "3", KEEP_CHAMPION),  # a lost gate: the run goes on to keep the champion, successfully
        (True, False, "3", KEEP_CHAMPION),  # auto-promotion off: promote by hand
        (True, True, None, KEEP_CHAMPION),  # nothing registered
    ],
)
def test_the_dag_turns_the_decision_into_a_branch(passed, auto_promote, version, branch):
    params = {"profile": "tiny", "auto_promote": auto_promote}
    assert promotion_branch(params, {"passed": passed, "reasons": []}, {"version": version}) == branch
