"""`shopguide loop`'s pure parts: reading a retrain run's outcome from its task states and XComs (skipped, promoted,
not promoted), the feedback volume from the run's metrics, the per-cycle table, the summary table and the JSON."""

from __future__ import annotations

import json

import pytest

from pipelines.evaluation.paired import paired_bootstrap
from pipelines.loop import (
    Comparison,
    CycleReport,
    Feedback,
    LoopPlan,
    RetrainOutcome,
    cycle_table,
    read_outcome,
    summary,
    summary_table,
)

RETRAIN_TASKS = [
    "snapshot",
    "validate",
    "finetune",
    "distill",
    "prune",
    "export_onnx",
    "evaluate_variants",
    "select_variant",
    "evaluate",
    "gate",
    "register",
    "promote_or_keep",
    "promote",
    "keep_champion",
    "conclude",
]
SKIP_REASON = "scheduled run: nothing new to learn, skipped (since @champion 3's snapshot: 12 answers with feedback)"
DECISION_GO = {"go": True, "reason": "train", "facts": {"champion": "3", "new_feedback": 140}}
PAIRED = paired_bootstrap({"a": 0.5, "b": 0.7, "c": 0.2}, {"a": 0.4, "b": 0.7, "c": 0.1}, confidence=0.9).to_dict()
PASSED = ["ok: ndcg_at_10 0.4667 >= 0.05", "ok: no regression vs champion 3: CI [+0.0000, +0.1000]"]
FAILED = ["ok: ndcg_at_10 0.4667 >= 0.05", "FAIL: ndcg_at_10 regression vs champion 3: CI [-0.2000, -0.0100]"]


def _states(branch: str) -> dict[str, str | None]:
    states: dict[str, str | None] = dict.fromkeys(["decide", *RETRAIN_TASKS], "success")
    states["keep_champion" if branch == "promote" else "promote"] = "skipped"
    return states


def _concluded(passed: bool, promoted: bool, registered: str | None = "4", note: str = "") -> dict:
    """The return values of a retrain run that got to conclude, as the DAG's tasks leave them."""
    champion = "4" if promoted else "3"
    branch = "promote" if promoted else "keep_champion"
    outcome = {"champion": champion, "previous_champion": "3", "promoted": promoted, "moved": promoted, "note": note}
    return {
        "decide": True,
        "snapshot": {"mlflow_run_id": "run-1", "snapshot_hash": "abc"},
        "evaluate": {"ndcg_at_10": 0.4667},
        "gate": {"passed": passed, "reasons": PASSED if passed else FAILED, "champion_version": "3", "paired": PAIRED},
        "register": {"version": registered, "registered": registered is not None},
        "promote_or_keep": branch,
        branch: outcome,
        "conclude": {
            "outcome": "promoted" if promoted else "not promoted",
            "gate_passed": passed,
            "champion": champion,
            "moved": promoted,
        },
    }


def test_a_run_that_decided_nothing_is_new_reads_as_skipped() -> None:
    # a short-circuit that skips returns nothing: the decision is decide's pushed XCom (pipelines.airflow_env.pushed)
    states = {"decide": "success", **dict.fromkeys(RETRAIN_TASKS, "skipped")}
    decision = {"go": False, "reason": SKIP_REASON, "facts": {"champion": "3", "new_feedback": 12}}
    out = read_outcome(states, {}, {"decide": {"decision": decision}})
    assert out == RetrainOutcome("skipped", (SKIP_REASON,), 12, "3", "3", None, None, None, None)


def test_a_promoted_run_reads_with_its_paired_comparison() -> None:
    xcoms = _concluded(passed=True, promoted=True)
    out = read_outcome(_states("promote"), xcoms, {"decide": {"decision": DECISION_GO}})
    assert (out.outcome, out.champion_before, out.champion_after, out.candidate) == ("promoted", "3", "4", "4")
    assert (out.new_feedback, out.candidate_ndcg_at_10, out.mlflow_run_id) == (140, 0.4667, "run-1")
    assert out.reasons == tuple(PASSED)
    c = out.comparison
    assert c is not None and (c.terms, c.confidence) == (3, 0.9)
    assert c.candidate == pytest.approx(1.4 / 3) and c.champion == pytest.approx(1.2 / 3)
    assert c.difference == pytest.approx(0.2 / 3) and c.low <= c.difference <= c.high


def test_a_lost_gate_reads_as_not_promoted_with_the_failed_checks() -> None:
    note = "gate failed:\n- " + FAILED[1]
    out = read_outcome(_states("keep"), _concluded(passed=False, promoted=False, registered=None, note=note), {})
    assert (out.outcome, out.champion_after, out.candidate) == ("not promoted", "3", None)
    assert out.failed_reasons == [FAILED[1]]


def test_a_passed_gate_that_was_not_promoted_says_why() -> None:
    note = "auto-promotion is off: promote it with `shopguide promote VERSION`"
    out = read_outcome(_states("keep"), _concluded(passed=True, promoted=False, note=note), {})
    assert out.outcome == "not promoted" and out.candidate == "4"
    assert out.reasons[-1] == note and out.failed_reasons == [*PASSED, note]


def test_a_run_that_neither_skipped_nor_concluded_is_an_error() -> None:
    with pytest.raises(ValueError, match="neither skipped nor concluded"):
        read_outcome({"decide": "success", "snapshot": "failed"}, {"decide": True}, {})


def test_the_feedback_volume_comes_from_the_snapshot_metrics() -> None:
    metrics = {
        "feedback.answers": 412.0,
        "feedback.answers_with_events": 187.0,
        "feedback.events": 318.0,
        "feedback.pairs": 402.0,
        "feedback.positives": 210.0,
        "feedback.negatives": 192.0,
        "feedback.dropped_heldout": 0.0,
    }
    assert Feedback.from_metrics(metrics) == Feedback(412, 187, 318, 402, 210, 192)
    assert Feedback.from_metrics({"feedback.answers": 3.0}) is None  # a snapshot without feedback logs none


def _report(outcome: RetrainOutcome, serving_after: str, seconds: dict[str, float]) -> CycleReport:
    traffic = {"simulated": True, "users": 20, "seed": 11, "seconds": 60.2, "searches": 412, "accepted": 318}
    traffic |= {"events": {"click": 290, "add_to_cart": 25, "purchase": 3}, "errors": {}}
    feedback = Feedback(413, 187, 318, 402, 210, 192) if outcome.outcome != "skipped" else None
    return CycleReport(1, "3", traffic, feedback, outcome, serving_after, seconds)


COMPARISON = Comparison(300, 0.3321, 0.329, 0.0031, -0.0042, 0.0101, 0.95)
PROMOTED = RetrainOutcome("promoted", tuple(PASSED), 187, "3", "4", "4", 0.3321, COMPARISON, "run-1")
SECONDS = {"serve": 12.4, "simulate": 60.2, "features": 41.0, "retrain": 75.3, "swap": 3.1}


def test_the_cycle_table_of_a_promotion() -> None:
    assert cycle_table(_report(PROMOTED, "4", SECONDS), 2).splitlines() == [
        "cycle 1/2",
        "  served                v3",
        "  SIMULATED traffic     20 users, seed 11, 60 s: 412 searches, 318 events sent (318 accepted), 0 errors",
        "  feedback in snapshot  187 answers with feedback of 413, 318 events -> 402 pairs (210 positive, 192 "
        "negative)",
        "  held-out nDCG@10      candidate 0.3321 vs champion v3 0.3290: +0.0031, 95% CI [-0.0042, +0.0101] over 300 "
        "held-out terms",
        "  outcome               PROMOTED: v4 is @champion (was v3); the service answers with v4 after 3.1 s",
        "  seconds               serve 12  simulate 60  features 41  retrain 75  swap 3  total 192",
    ]


def test_the_cycle_table_of_a_lost_gate_lists_the_failed_checks() -> None:
    lost = RetrainOutcome("not promoted", tuple(FAILED), 187, "3", "3", None, 0.3, COMPARISON, "run-1")
    seconds = {k: v for k, v in SECONDS.items() if k not in ("serve", "swap")}
    lines = cycle_table(_report(lost, "3", seconds)).splitlines()
    assert lines[0] == "cycle 1"
    assert "  outcome               NOT PROMOTED: @champion stays v3" in lines
    assert f"                          - {FAILED[1]}" in lines
    assert lines[-1] == "  seconds               simulate 60  features 41  retrain 75  total 176"


def test_the_cycle_table_of_a_skip_shows_the_count_and_the_reason() -> None:
    skipped = RetrainOutcome("skipped", (SKIP_REASON,), 12, "3", "3", None, None, None, None)
    text = cycle_table(_report(skipped, "3", {"simulate": 60.2, "features": 41.0, "retrain": 9.5}))
    assert "  feedback           12 answers with feedback since @champion's snapshot" in text
    assert f"  outcome            SKIPPED: {SKIP_REASON}" in text
    assert "nDCG@10" not in text


def test_the_summary_table_and_json() -> None:
    skipped = RetrainOutcome("skipped", (SKIP_REASON,), 12, "4", "4", None, None, None, None)
    reports = [_report(PROMOTED, "4", SECONDS), _report(skipped, "4", {"simulate": 60.0, "retrain": 9.0})]
    reports[1].cycle, reports[1].served = 2, "4"
    lines = summary_table(reports).splitlines()
    assert lines[0].split() == [
        *("cycle", "served", "searches", "answers", "w/", "fb", "events", "candidate", "champion"),
        *("diff", "[CI]", "outcome", "seconds"),
    ]
    assert lines[1].split() == [
        *("1", "v3", "412", "187", "318", "v4", "0.3321", "v3", "0.3290"),
        *("+0.0031", "[-0.0042,", "+0.0101]", "promoted", "192"),
    ]
    assert lines[2].split() == ["2", "v4", "412", "12", "-", "-", "-", "-", "skipped", "69"]

    plan = LoopPlan(profile="tiny", cycles=2, api_key="secret")
    out = json.loads(json.dumps(summary(plan, reports, 261.04)))  # JSON all the way down
    assert out["simulated"] is True and out["outcomes"] == ["promoted", "skipped"] and out["seconds"] == 261.0
    assert out["plan"]["api_key"] is None  # never written out
    first = out["reports"][0]
    assert first["feedback"]["answers_with_events"] == 187 and first["retrain"]["comparison"]["low"] == -0.0042
    assert first["seconds"]["total"] == 192.0 and first["retrain"]["reasons"] == PASSED


def test_each_cycle_replays_other_shoppers() -> None:
    plan = LoopPlan(profile="tiny", users=7, minutes=0.5, seed=40, think_seconds=0)
    first, second = plan.config(1).simulate, plan.config(2).simulate
    assert (first.users, first.minutes, first.think_seconds, first.seed, second.seed) == (7, 0.5, 0, 40, 41)
    default = LoopPlan(profile="tiny").config(3).simulate
    assert default.seed == LoopPlan(profile="tiny").config(1).simulate.seed + 2 and default.users == 20


def test_the_retrain_runs_with_the_plans_params_and_the_loops_rule() -> None:
    plan = LoopPlan(profile="tiny", retrain_params={"max_regression": 0.05, "profile": "default"})
    assert plan.retrain_conf() == {"max_regression": 0.05, "profile": "tiny", "only_with_new_data": True}
    assert LoopPlan(only_with_new_data=False).retrain_conf() == {"profile": "default", "only_with_new_data": False}


def test_a_plan_can_add_other_users_each_cycle_from_a_launch_share() -> None:
    """bench/feedback_curve.py's plan: cycle n plays cycle_users[n - 1] users, each for a fixed number of sessions,
    and the snapshot and the simulator see the same judged_at_launch (the retrain Param of that name)."""
    plan = LoopPlan(profile="tiny", cycles=3, cycle_users=(50, 150, 600), sessions_per_user=2, judged_at_launch=0.3)
    sims = [plan.config(n).simulate for n in (1, 2, 3)]
    assert [s.users for s in sims] == [50, 150, 600] and {s.sessions_per_user for s in sims} == {2}
    assert plan.config(2).data.judged_at_launch == 0.3 and plan.retrain_conf()["judged_at_launch"] == 0.3
    assert LoopPlan(profile="tiny").config(1).data.judged_at_launch == 1.0
    assert "judged_at_launch" not in LoopPlan(profile="tiny").retrain_conf()
    with pytest.raises(ValueError, match="3 values for 2 cycles"):
        LoopPlan(cycles=2, cycle_users=(1, 2, 3))


def test_the_judged_at_launch_param_reaches_the_snapshots_config() -> None:
    from pipelines.steps.retrain import config_from_params

    assert config_from_params({"profile": "tiny", "judged_at_launch": 0.3}).data.judged_at_launch == 0.3
    assert config_from_params({"profile": "tiny", "judged_at_launch": None}).data.judged_at_launch == 1.0
