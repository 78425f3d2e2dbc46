"""The loop in one command: serve @champion, SIMULATED shoppers, the features DAG, the retrain DAG on their feedback,
the gate's verdict, the service's hot swap; per cycle what entered the snapshot, candidate vs champion, the outcome."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

from pipelines.config import Paths, ShopguideConfig, load_config

if TYPE_CHECKING:
    from pipelines.airflow_env import DagTestResult
    from pipelines.service_process import ServiceProcess

Outcome = Literal["promoted", "not promoted", "skipped"]
STAGES = ("serve", "simulate", "features", "retrain", "swap")
FEATURES_DAG, RETRAIN_DAG = "shopguide_features", "shopguide_retrain"
# `run_dag(dag_id, conf)`: one successful DAG run (the CLI's streams its output and exits on a failure or timeout)
RunDag = Callable[[str, dict[str, Any]], "DagTestResult"]
Echo = Callable[[str], None]


class LoopError(RuntimeError):
    """The loop cannot go on: no champion to serve, a simulation that hit its error limit, a swap that never came."""


@dataclass(frozen=True)
class Feedback:
    """The logged traffic that entered a retrain snapshot (its manifest's `feedback`, the MLflow run's feedback.*)."""

    answers: int  # search answers in the window
    answers_with_events: int
    events: int
    pairs: int  # (term, product) training pairs they gave
    positives: int
    negatives: int

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float]) -> Feedback | None:
        """From the run's `feedback.<name>` metrics; None when the snapshot logged none."""
        names = [f.name for f in fields(cls)]
        if not all(f"feedback.{n}" in metrics for n in names):
            return None
        return cls(**{n: int(metrics[f"feedback.{n}"]) for n in names})


@dataclass(frozen=True)
class Comparison:
    """Candidate vs @champion on the same held-out terms (the gate's paired bootstrap): mean nDCG@10 of each and the
    confidence interval of their difference."""

    terms: int
    candidate: float
    champion: float
    difference: float
    low: float
    high: float
    confidence: float

    @classmethod
    def from_paired(cls, paired: Mapping[str, Any]) -> Comparison:
        """From the gate's `paired` (pipelines.evaluation.paired.PairedDifference.to_dict())."""
        return cls(
            terms=int(paired["queries"]),
            candidate=float(paired["candidate"]),
            champion=float(paired["champion"]),
            difference=float(paired["mean_difference"]),
            low=float(paired["low"]),
            high=float(paired["high"]),
            confidence=float(paired["confidence"]),
        )


@dataclass(frozen=True)
class RetrainOutcome:
    """What one retrain DAG run decided, read from its task states and XComs."""

    outcome: Outcome
    reasons: tuple[str, ...]  # skipped: decide's reason; else the gate's reasons (+ why not promoted when it passed)
    new_feedback: int | None  # decide's count: answers with feedback since @champion's snapshot
    champion_before: str | None
    champion_after: str | None
    candidate: str | None  # the registered candidate's version (None: skipped, or a lost gate registers nothing)
    candidate_ndcg_at_10: float | None
    comparison: Comparison | None  # None: skipped, or no champion to pair with
    mlflow_run_id: str | None

    @property
    def failed_reasons(self) -> list[str]:
        """The reasons that kept the candidate out: the gate's failed checks, or every reason when none failed."""
        failed = [r for r in self.reasons if r.startswith("FAIL")]
        return failed or list(self.reasons)


def read_outcome(
    task_states: Mapping[str, str | None], xcoms: Mapping[str, Any], pushed: Mapping[str, Mapping[str, Any]]
) -> RetrainOutcome:
    """A retrain DAG run's outcome from its task states, return values and pushed XComs (DagTestResult's fields).

    skipped: decide said there is nothing to learn (every later task skipped, no return values but decide's pushed
    `decision`); promoted / not promoted: conclude's outcome, with the gate's reasons and paired comparison. A run that
    neither skipped nor concluded raises ValueError (the caller checked it succeeded: that would be a bug)."""
    decision = dict(pushed.get("decide", {}).get("decision") or {})
    facts = decision.get("facts") or {}
    new_feedback = facts.get("new_feedback")
    concluded = xcoms.get("conclude")
    if concluded is None:
        if task_states.get("decide") == "success" and decision.get("go") is False:
            champion = facts.get("champion")
            return RetrainOutcome(
                "skipped", (str(decision.get("reason", "")),), new_feedback, champion, champion, None, None, None, None
            )
        raise ValueError(f"the retrain run neither skipped nor concluded: tasks {dict(task_states)}")
    gate = xcoms.get("gate") or {}
    reasons = [str(r) for r in gate.get("reasons", [])]
    kept = xcoms.get("keep_champion") or {}
    if concluded["outcome"] != "promoted" and gate.get("passed"):  # passed, yet kept: e.g. auto-promotion is off
        reasons.append(str(kept.get("note", "not promoted")).splitlines()[0])
    paired = gate.get("paired")
    ndcg = (xcoms.get("evaluate") or {}).get("ndcg_at_10")
    return RetrainOutcome(
        outcome="promoted" if concluded["outcome"] == "promoted" else "not promoted",
        reasons=tuple(reasons),
        new_feedback=new_feedback,
        champion_before=gate.get("champion_version", facts.get("champion")),
        champion_after=concluded.get("champion"),
        candidate=(xcoms.get("register") or {}).get("version"),
        candidate_ndcg_at_10=float(ndcg) if ndcg is not None else None,
        comparison=Comparison.from_paired(paired) if paired else None,
        mlflow_run_id=(xcoms.get("snapshot") or {}).get("mlflow_run_id"),
    )


@dataclass
class CycleReport:
    """One turn of the loop. `traffic` is the SIMULATED replay's summary (pipelines.data.replay.ReplaySummary)."""

    cycle: int
    served: str | None  # the version that answered the cycle's traffic
    traffic: dict[str, Any]
    feedback: Feedback | None  # what entered the retrain snapshot; None when the run skipped before one
    retrain: RetrainOutcome
    serving_after: str | None  # the version the service answers with at the end of the cycle
    seconds: dict[str, float] = field(default_factory=dict)  # per stage (STAGES), wall time

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["retrain"]["reasons"] = list(self.retrain.reasons)
        out["seconds"] = {k: round(v, 1) for k, v in self.seconds.items()}
        out["seconds"]["total"] = round(sum(self.seconds.values()), 1)
        return out


def _signed(x: float) -> str:
    return f"{x:+.4f}"


def _comparison(r: RetrainOutcome) -> str:
    c = r.comparison
    if c is None:
        ndcg = f"{r.candidate_ndcg_at_10:.4f}" if r.candidate_ndcg_at_10 is not None else "n/a"
        return f"candidate {ndcg} (no champion figures to pair with)"
    return (
        f"candidate {c.candidate:.4f} vs champion v{r.champion_before} {c.champion:.4f}: {_signed(c.difference)}, "
        f"{c.confidence:.0%} CI [{_signed(c.low)}, {_signed(c.high)}] over {c.terms} held-out terms"
    )


def _outcome(report: CycleReport) -> list[str]:
    r = report.retrain
    if r.outcome == "skipped":
        return [f"SKIPPED: {r.reasons[0] if r.reasons else 'nothing new to learn'}"]
    if r.outcome == "promoted":
        swap = report.seconds.get("swap")
        swapped = f"; the service answers with v{report.serving_after}" + (f" after {swap:.1f} s" if swap else "")
        return [f"PROMOTED: v{r.candidate} is @champion (was v{r.champion_before}){swapped}"]
    kept = f"NOT PROMOTED: @champion stays v{r.champion_after}" + (
        f" (candidate v{r.candidate} registered)" if r.candidate else ""
    )
    return [kept, *(f"  - {reason}" for reason in r.failed_reasons)]


def cycle_table(report: CycleReport, cycles: int | None = None) -> str:
    """The cycle as a few aligned lines: traffic, feedback in the snapshot, candidate vs champion, outcome, seconds."""
    t, r, f = report.traffic, report.retrain, report.feedback
    events = sum((t.get("events") or {}).values())
    errors = sum((t.get("errors") or {}).values())
    rows = [
        ("served", f"v{report.served}"),
        (
            "SIMULATED traffic",
            f"{t.get('users')} users, seed {t.get('seed')}, {t.get('seconds', 0):.0f} s: {t.get('searches')} searches, "
            f"{events} events sent ({t.get('accepted')} accepted), {errors} errors",
        ),
    ]
    if f is not None:
        rows.append(
            (
                "feedback in snapshot",
                f"{f.answers_with_events} answers with feedback of {f.answers}, {f.events} events -> {f.pairs} pairs "
                f"({f.positives} positive, {f.negatives} negative)",
            )
        )
    else:
        rows.append(("feedback", f"{r.new_feedback} answers with feedback since @champion's snapshot"))
    if r.outcome != "skipped":
        rows.append(("held-out nDCG@10", _comparison(r)))
    outcome = _outcome(report)
    rows.append(("outcome", outcome[0]))
    rows.extend(("", line) for line in outcome[1:])
    total = sum(report.seconds.values())
    stages = "  ".join(f"{s} {report.seconds[s]:.0f}" for s in STAGES if s in report.seconds)
    rows.append(("seconds", f"{stages}  total {total:.0f}"))
    width = max(len(k) for k, _ in rows)
    head = f"cycle {report.cycle}" + (f"/{cycles}" if cycles else "")
    return "\n".join([head, *(f"  {k:<{width}}  {v}".rstrip() for k, v in rows)])


def summary_table(reports: list[CycleReport]) -> str:
    """One row per cycle: feedback volume, candidate vs champion with the CI, outcome, total seconds."""
    header = ("cycle", "served", "searches", "answers w/ fb", "events", "candidate", "champion", "diff [CI]", "outcome")
    rows: list[tuple[str, ...]] = [(*header, "seconds")]
    for rep in reports:
        r, f, c = rep.retrain, rep.feedback, rep.retrain.comparison
        answers = f.answers_with_events if f is not None else r.new_feedback
        rows.append(
            (
                str(rep.cycle),
                f"v{rep.served}",
                str(rep.traffic.get("searches")),
                str(answers if answers is not None else "-"),
                str(f.events if f is not None else "-"),
                f"v{r.candidate} {c.candidate:.4f}" if c and r.candidate else (f"{c.candidate:.4f}" if c else "-"),
                f"v{r.champion_before} {c.champion:.4f}" if c else "-",
                f"{_signed(c.difference)} [{_signed(c.low)}, {_signed(c.high)}]" if c else "-",
                r.outcome,
                f"{sum(rep.seconds.values()):.0f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in rows)


@dataclass(frozen=True)
class LoopPlan:
    """What `shopguide loop` runs: the profile, the cycles and each cycle's SIMULATED traffic (None: the profile's
    `simulate` value; cycle n replays with seed + n - 1, so the cycles do not repeat one another's shoppers)."""

    profile: str = "default"
    cycles: int = 2
    users: int | None = None
    # users of cycle n (cycle_users[n - 1]) instead of `users`: bench/feedback_curve.py adds traffic in steps
    cycle_users: tuple[int, ...] = ()
    minutes: float | None = None
    seed: int | None = None
    think_seconds: float | None = None
    sessions_per_user: int | None = None  # each simulated user stops after this many sessions (an exact volume)
    # the snapshot's data.judged_at_launch (the retrain Param of that name; the simulator counts click-only searches)
    judged_at_launch: float | None = None
    # the schedule's rule: train only on enough new feedback (retrain.min_new_feedback), else the cycle is "skipped"
    only_with_new_data: bool = True
    port: int = 8000
    poll_seconds: float = 2.0  # the service re-reads @champion this often (SHOPGUIDE_MODEL_POLL_SECONDS)
    ready_timeout: float = 180.0
    swap_timeout: float = 120.0
    api_key: str | None = None
    # more of the retrain DAG's Params (its trigger form), e.g. {"max_regression": 0.05}; Airflow validates them
    retrain_params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cycle_users and len(self.cycle_users) != self.cycles:
            raise ValueError(f"cycle_users has {len(self.cycle_users)} values for {self.cycles} cycles")

    def retrain_conf(self) -> dict[str, Any]:
        launch = {"judged_at_launch": self.judged_at_launch} if self.judged_at_launch is not None else {}
        return {
            **self.retrain_params,
            **launch,
            "profile": self.profile,
            "only_with_new_data": self.only_with_new_data,
        }

    def config(self, cycle: int = 1) -> ShopguideConfig:
        """The profile with this plan's simulate overrides and cycle `cycle`'s users and seed."""
        users = self.cycle_users[cycle - 1] if self.cycle_users else self.users
        flags = {
            "users": users,
            "minutes": self.minutes,
            "think_seconds": self.think_seconds,
            "sessions_per_user": self.sessions_per_user,
        }
        overrides: dict[str, Any] = {f"simulate.{k}": v for k, v in flags.items() if v is not None}
        if self.judged_at_launch is not None:
            overrides["data.judged_at_launch"] = self.judged_at_launch
        seed = self.seed if self.seed is not None else load_config(self.profile).simulate.seed
        overrides["simulate.seed"] = seed + cycle - 1
        return load_config(self.profile, overrides)


def read_feedback(paths: Paths, mlflow_run_id: str) -> Feedback | None:
    """What the retrain run's snapshot took in: its MLflow run's feedback.* metrics."""
    from pipelines.registry import mlflow_client as registry

    return Feedback.from_metrics(registry.client(paths).get_run(mlflow_run_id).data.metrics)


def _answered_by(service: ServiceProcess, api_key: str | None) -> str | None:
    """The model version of one real answer (not only what /readyz says it loaded)."""
    import httpx

    headers = {"X-API-Key": api_key} if api_key else {}
    r = httpx.post(f"{service.url}/v1/search", json={"query": "cordless drill", "k": 1}, headers=headers, timeout=30)
    r.raise_for_status()
    return str(r.json()["model_version"])


def run_cycle(
    plan: LoopPlan,
    cycle: int,
    service: ServiceProcess,
    paths: Paths,
    run_dag: RunDag,
    echo: Echo,
    serve_seconds: float | None = None,
) -> CycleReport:
    """One cycle against the running service: simulate -> features DAG -> retrain DAG -> read the outcome -> wait for
    the hot swap when it promoted."""
    from pipelines.data.replay import ReplaySummary, simulate_traffic

    cfg = plan.config(cycle)
    sim = cfg.simulate
    seconds = {"serve": serve_seconds} if serve_seconds is not None else {}
    served = _answered_by(service, plan.api_key)
    echo(
        f"cycle {cycle}/{plan.cycles}: SIMULATED traffic against v{served}: {sim.users} users, {sim.minutes:g} min, "
        f"seed {sim.seed}"
    )

    def progress(s: ReplaySummary) -> None:
        echo(f"  simulated {s.seconds:4.0f} s: {s.searches} searches, {sum(s.events.values())} events")

    started = time.perf_counter()
    traffic = simulate_traffic(service.url, cfg, api_key=plan.api_key, progress=progress)
    seconds["simulate"] = time.perf_counter() - started
    if traffic.stopped == "errors":
        raise LoopError(f"the simulation stopped at its error limit: {dict(traffic.errors)}")

    echo(f"cycle {cycle}/{plan.cycles}: features DAG (land + materialize the events, announce them)")
    started = time.perf_counter()
    run_dag(FEATURES_DAG, {"profile": plan.profile})
    seconds["features"] = time.perf_counter() - started

    echo(f"cycle {cycle}/{plan.cycles}: retrain DAG (decide, snapshot with the feedback, train, gate, promote)")
    started = time.perf_counter()
    run = run_dag(RETRAIN_DAG, plan.retrain_conf())
    seconds["retrain"] = time.perf_counter() - started
    outcome = read_outcome(run.task_states, run.xcoms, run.pushed)
    feedback = read_feedback(paths, outcome.mlflow_run_id) if outcome.mlflow_run_id else None

    if outcome.outcome == "promoted" and outcome.champion_after is not None:
        echo(f"cycle {cycle}/{plan.cycles}: waiting for the service to swap to v{outcome.champion_after}")
        started = time.perf_counter()
        service.wait_ready(timeout=plan.swap_timeout, version=outcome.champion_after)
        seconds["swap"] = time.perf_counter() - started
    return CycleReport(
        cycle=cycle,
        served=served,
        traffic=traffic.to_dict(),
        feedback=feedback,
        retrain=outcome,
        serving_after=_answered_by(service, plan.api_key),
        seconds=seconds,
    )


def run_loop(
    plan: LoopPlan,
    paths: Paths,
    run_dag: RunDag,
    *,
    echo: Echo = print,
    on_cycle: Callable[[CycleReport], None] | None = None,
) -> list[CycleReport]:
    """Start the service on @champion (polling the alias every plan.poll_seconds), then plan.cycles cycles against
    it; the service stops at the end (its logs flushed). Needs a champion: the first model comes from `shopguide run`
    or `shopguide retrain`."""
    from pipelines.registry import mlflow_client as registry
    from pipelines.service_process import ServiceError, service_process

    model = load_config(plan.profile).registry.model_name
    champion = registry.alias_version(paths, model, registry.CHAMPION)
    if champion is None:
        raise LoopError(f"{model} has no @champion to serve: train one first (`shopguide run` or `shopguide retrain`)")
    env = {"SHOPGUIDE_MODEL_POLL_SECONDS": str(plan.poll_seconds), "SHOPGUIDE_MODEL_NAME": model}
    log = paths.home / "logs" / "loop-service.log"  # its access log would drown the progress lines
    echo(
        f"serving @champion v{champion} on 127.0.0.1:{plan.port} (re-reading the alias every {plan.poll_seconds:g} s; "
        f"its log: {log})"
    )
    reports: list[CycleReport] = []
    started = time.perf_counter()
    with service_process(port=plan.port, env=env, log=log) as service:
        try:
            service.wait_ready(timeout=plan.ready_timeout)
            serve_seconds = time.perf_counter() - started
            for cycle in range(1, plan.cycles + 1):
                report = run_cycle(plan, cycle, service, paths, run_dag, echo, serve_seconds if cycle == 1 else None)
                reports.append(report)
                if on_cycle is not None:
                    on_cycle(report)
        except ServiceError as err:
            raise LoopError(str(err)) from err
    return reports


def summary(plan: LoopPlan, reports: list[CycleReport], seconds: float) -> dict[str, Any]:
    """The JSON of a loop: the plan, every cycle's report, the total time. `simulated`: none of it is real traffic."""
    return {
        "simulated": True,
        "profile": plan.profile,
        "cycles": plan.cycles,
        "plan": asdict(plan) | {"api_key": None, "retrain_params": dict(plan.retrain_params)},
        "reports": [r.to_dict() for r in reports],
        "outcomes": [r.retrain.outcome for r in reports],
        "seconds": round(seconds, 1),
    }
