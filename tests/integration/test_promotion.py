"""Promotion, rollback and the gate on real components: the SQLite MLflow registry, Airflow DAG runs, the REST API."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipelines.airflow_env import DAGS_FOLDER, DagTestResult, airflow_command, airflow_environ, run_dag_test
from pipelines.config import MODEL_NAME, REPO_ROOT, Paths
from pipelines.registry import mlflow_client as registry
from pipelines.runtime.bundle import ONNX_FILE

FAILED_GATE = ["ok: ndcg_at_10 0.3 >= 0.2", "FAIL: ndcg_at_10 0.3000 vs champion 0.4000 (tolerance 0.01)"]


@dataclass(frozen=True)
class Source:
    """One logged pyfunc over a complete bundle: new registry versions point at it (no re-upload per version)."""

    paths: Paths
    run_id: str
    model_source: str
    bundle_dir: Path
    manifest_tags: dict[str, str]  # the sha256 manifest register_bundle recorded: every version has the same files


@pytest.fixture(scope="module")
def source(champion, shopguide_home: Paths) -> Source:
    """The session champion's bundle (tests/integration/conftest.py), logged once more under a model of our own."""
    paths = shopguide_home
    run_id = registry.start_run(paths, "promotion-tests-source", {})
    version = registry.register_bundle(
        paths, run_id, champion.bundle_dir, "promotion-tests-source", "promotion-tests-source", {"gate_passed": "true"}
    )
    registry.end_run(paths, run_id)
    mv = registry.client(paths).get_model_version("promotion-tests-source", version)
    manifest = {k: v for k, v in mv.tags.items() if k in (registry.MANIFEST_TAG, registry.MANIFEST_URI_TAG)}
    assert manifest, mv.tags
    return Source(paths, run_id, mv.source, champion.bundle_dir, manifest)


def add_version(src: Source, model: str, gate_passed: bool | None, reasons: list[str] | None = None) -> str:
    """A new version of `model` over the complete source bundle, tagged like the retrain DAG tags its candidates
    (gate_passed=None: registered outside the pipeline, no gate result and no sha256 manifest)."""
    from mlflow.exceptions import MlflowException

    c = registry.client(src.paths)
    with contextlib.suppress(MlflowException):  # already exists
        c.create_registered_model(model)
    tags = (
        {}
        if gate_passed is None
        else {
            "gate_passed": str(gate_passed).lower(),
            "gate_reasons": json.dumps(reasons or ["ok: test"]),
            **src.manifest_tags,
        }
    )
    return str(c.create_model_version(model, src.model_source, run_id=src.run_id, tags=tags).version)


def champion_of(paths: Paths, model: str) -> str | None:
    return registry.alias_version(paths, model, registry.CHAMPION)


@contextlib.contextmanager
def aliases_restored(paths: Paths, model: str = MODEL_NAME) -> Iterator[None]:
    """Other modules share MODEL_NAME in this session (test_serving expects its own @champion): put it back after."""
    c = registry.client(paths)
    before = {a: registry.alias_version(paths, model, a) for a in (registry.CHAMPION, registry.CHALLENGER)}
    try:
        yield
    finally:
        for alias, version in before.items():
            if version is None:
                with contextlib.suppress(Exception):
                    c.delete_registered_model_alias(model, alias)
            else:
                c.set_registered_model_alias(model, alias, version)


# --- the registry functions (promote / rollback / history) ---------------------------------------------------------


def test_promote_rollback_and_history(source: Source) -> None:
    paths, model = source.paths, "promotion-tests-history"
    v1, v2, v3 = (add_version(source, model, True) for _ in range(3))

    first = registry.promote(paths, model, v1, "first champion", "test:alice")
    assert (first.moved, first.previous, first.version) == (True, None, v1)
    assert registry.promote(paths, model, v2, "better nDCG", "test:bob").previous == v1
    assert registry.promote(paths, model, int(v3), "better again", "test:bob").previous == v2
    again = registry.promote(paths, model, v3, "clicked twice", "test:bob")
    assert not again.moved and "already is the champion" in again.summary()

    history = registry.champion_history(paths, model)
    assert [(e["action"], e["previous"], e["version"]) for e in history] == [
        ("promote", None, v1),
        ("promote", v1, v2),
        ("promote", v2, v3),
    ]
    assert (history[1]["reason"], history[1]["actor"], history[1]["forced"]) == ("better nDCG", "test:bob", False)
    tags = registry.client(paths).get_model_version(model, v2).tags
    assert (tags["promoted_from"], tags["promotion_reason"], tags["promoted_by"]) == (v1, "better nDCG", "test:bob")

    back = registry.rollback(paths, model, "v3 hurts add-to-cart", "test:carol")
    assert (back.action, back.previous, back.version, back.moved) == ("rollback", v3, v2, True)
    assert champion_of(paths, model) == v2
    print(back.summary())
    further = registry.rollback(paths, model, "v2 as well", "test:carol")  # a second rollback goes further back
    assert (further.previous, further.version) == (v2, v1)
    with pytest.raises(registry.PromotionError, match="no earlier champion is recorded"):
        registry.rollback(paths, model, "and again", "test:carol")
    assert champion_of(paths, model) == v1

    # after a re-promotion, rollback returns to the champion it replaced, not to an older one
    registry.promote(paths, model, v3, "fixed upstream", "test:alice")
    assert registry.rollback(paths, model, "not fixed", "test:alice").version == v1


def test_a_reason_is_required_and_unknown_versions_are_refused(source: Source) -> None:
    paths, model = source.paths, "promotion-tests-reason"
    v1 = add_version(source, model, True)
    with pytest.raises(registry.PromotionError, match="non-empty reason"):
        registry.promote(paths, model, v1, "  ", "test:alice")
    with pytest.raises(registry.PromotionError, match="version 99 does not exist"):
        registry.promote(paths, model, "99", "typo", "test:alice")
    with pytest.raises(registry.PromotionError, match="no @champion"):
        registry.rollback(paths, model, "nothing there", "test:alice")
    assert champion_of(paths, model) is None and registry.champion_history(paths, model) == []


def test_gate_failed_version_needs_force_with_a_reason(source: Source) -> None:
    paths, model = source.paths, "promotion-tests-force"
    good = add_version(source, model, True)
    bad = add_version(source, model, False, FAILED_GATE)
    untagged = add_version(source, model, None)  # registered outside the pipeline: no gate result at all
    registry.promote(paths, model, good, "gate passed", "test:alice")

    with pytest.raises(registry.PromotionError, match="did not pass its gate") as refused:
        registry.promote(paths, model, bad, "looks fine to me", "test:bob")
    assert "FAIL: ndcg_at_10 0.3000 vs champion 0.4000" in str(refused.value) and "force" in str(refused.value)
    with pytest.raises(registry.PromotionError, match=r"gate_passed=missing"):
        registry.promote(paths, model, untagged, "no idea", "test:bob")
    with pytest.raises(registry.PromotionError, match="non-empty reason"):
        registry.promote(paths, model, bad, "", "test:bob", force=True)
    assert champion_of(paths, model) == good and len(registry.champion_history(paths, model)) == 1

    forced = registry.promote(
        paths, model, bad, "holiday catalog hotfix, gate noise on 30 queries", "test:bob", force=True
    )
    print(forced.summary())
    assert forced.moved and forced.forced and "FORCED" in forced.summary() and champion_of(paths, model) == bad
    tags = registry.client(paths).get_model_version(model, bad).tags
    assert (tags["forced"], tags["force_reason"], tags["promoted_by"]) == (
        "true",
        "holiday catalog hotfix, gate noise on 30 queries",
        "test:bob",
    )
    assert registry.champion_history(paths, model)[-1]["forced"] is True
    # force on a version that passed its gate is not recorded as forced
    assert registry.rollback(paths, model, "hotfix over", "test:bob", force=True).forced is False
    assert champion_of(paths, model) == good


def _register_incomplete(src: Source, model: str, tmp_path: Path) -> str:
    """A pyfunc version whose bundle lacks model.onnx, logged straight through MLflow (what a broken job could do)."""
    import mlflow

    bundle = tmp_path / "bundle"
    shutil.copytree(src.bundle_dir, bundle)
    (bundle / ONNX_FILE).unlink()
    with mlflow.start_run(experiment_id=registry.experiment_id(src.paths), run_name="incomplete-bundle"):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(registry.PYFUNC_FILE),
            artifacts={registry.BUNDLE_ARTIFACT: str(bundle)},
            pip_requirements=["mlflow"],
        )
    return str(mlflow.register_model(info.model_uri, model, tags={"gate_passed": "true"}).version)


def test_version_with_a_missing_artifact_is_refused(source: Source, tmp_path: Path) -> None:
    paths, model = source.paths, "promotion-tests-incomplete"
    good = add_version(source, model, True)
    registry.promote(paths, model, good, "complete", "test:alice")
    broken = _register_incomplete(source, model, tmp_path)
    for force in (False, True):  # force overrides a failed gate, never a missing file
        with pytest.raises(registry.PromotionError, match=f"missing: {ONNX_FILE}") as refused:
            registry.promote(paths, model, broken, "newest", "test:bob", force=force)
    print(refused.value)
    assert champion_of(paths, model) == good and len(registry.champion_history(paths, model)) == 1


def test_a_pipeline_run_promotes_at_most_once(source: Source) -> None:
    """A re-run of a retrain DAG run (same run key) after a later rollback must not move @champion back."""
    paths, model = source.paths, "promotion-tests-run-key"
    old, new = add_version(source, model, True), add_version(source, model, True)
    registry.promote(paths, model, old, "first", "test:alice")
    assert registry.promote(paths, model, new, "gate passed", "airflow:test", run_key="retrain__run1").moved
    registry.rollback(paths, model, "bad in production", "test:bob")
    rerun = registry.promote(paths, model, new, "gate passed", "airflow:test", run_key="retrain__run1")
    assert not rerun.moved and "already promoted" in rerun.note, rerun
    assert champion_of(paths, model) == old and len(registry.champion_history(paths, model)) == 3


PROMOTER = """
import json, logging, sys
from pipelines.config import Paths
from pipelines.registry import mlflow_client as registry
model, version, log_file = sys.argv[1:4]
# their debug line "... not acquired ..., waiting" says we are blocked
for name in ("filelock", "pipelines.registry.locks"):
    waits = logging.getLogger(name)
    waits.setLevel(logging.DEBUG)
    waits.addHandler(logging.FileHandler(log_file))
try:
    move = registry.promote(Paths.from_env(), model, version, f"race for {version}", f"test:{version}")
    print(json.dumps({"moved": move.moved, "previous": move.previous, "version": move.version}))
except registry.PromotionError as err:
    print(json.dumps({"refused": str(err)}))
"""


@pytest.fixture(params=["file", "postgres"])
def lock_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The champion lock of one host (a file lock) and of many (a PostgreSQL advisory lock, SHOPGUIDE_LOCK_URL, on a
    database of the test's own)."""
    if request.param == "postgres":
        monkeypatch.setenv("SHOPGUIDE_LOCK_URL", request.getfixturevalue("postgres_database"))
    return str(request.param)


def test_two_promoters_at_once_from_the_same_champion_one_wins(source: Source, tmp_path: Path, lock_kind: str) -> None:
    """Two real processes promote different versions from the same @champion. The test holds the champion lock until
    both are blocked on it, i.e. both have read @champion and re-checked their version (the decision): exactly one
    moves it, the other is refused and names the move it lost to; the history stays one consistent lineage. Both
    lock kinds: the file lock of one host and the PostgreSQL advisory lock of the production profile."""
    paths, model = source.paths, f"promotion-tests-race-{lock_kind}"
    v0, v1, v2 = (add_version(source, model, True) for _ in range(3))
    registry.promote(paths, model, v0, "first champion", "test:alice")
    logs = {v: tmp_path / f"lock-{v}.log" for v in (v1, v2)}
    with registry.champion_lock(paths, model):
        procs = {
            v: subprocess.Popen(
                [sys.executable, "-c", PROMOTER, model, v, str(logs[v])],
                cwd=REPO_ROOT,
                env=os.environ.copy(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for v in (v1, v2)
        }
        deadline = time.monotonic() + 240
        while not all(log.is_file() and "not acquired" in log.read_text() for log in logs.values()):
            assert all(proc.poll() is None for proc in procs.values()), "a promoter ended before the lock was free"
            assert time.monotonic() < deadline, "the promoters never reached the champion lock"
            time.sleep(0.2)
    outcomes = {}
    for v, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        outcomes[v] = json.loads(out.strip().splitlines()[-1])
    print(outcomes)
    moved = [v for v, outcome in outcomes.items() if outcome.get("moved")]
    assert len(moved) == 1, outcomes
    winner, loser = moved[0], v2 if moved[0] == v1 else v1
    assert outcomes[winner]["previous"] == v0
    assert f"moved from {v0} to {winner} since the decision to promote version {loser}" in outcomes[loser]["refused"]
    assert champion_of(paths, model) == winner
    history = registry.champion_history(paths, model)
    assert [(e["previous"], e["version"]) for e in history] == [(None, v0), (v0, winner)]
    assert registry.champion_lineage(history)[-1] == champion_of(paths, model)


def test_a_promotion_decided_against_another_champion_is_refused(source: Source) -> None:
    """The retrain DAG's promote step: the gate compared the candidate with one champion; if another version became
    champion since, the candidate was never compared with it and must not replace it."""
    paths, model = source.paths, "promotion-tests-decided"
    v1, v2, v3 = (add_version(source, model, True) for _ in range(3))
    registry.promote(paths, model, v1, "first champion", "test:alice")
    registry.promote(paths, model, v2, "promoted by hand meanwhile", "test:bob")
    with pytest.raises(registry.PromotionError, match=f"moved from {v1} to {v2} since the decision"):
        registry.promote(paths, model, v3, "gate passed against v1", "airflow:test", decided_against=v1)
    with pytest.raises(registry.PromotionError, match=f"moved from \\(none\\) to {v2}"):
        registry.promote(paths, model, v3, "gate passed, no champion then", "airflow:test", decided_against=None)
    assert champion_of(paths, model) == v2
    assert registry.promote(paths, model, v3, "gate passed against v2", "airflow:test", decided_against=v2).moved


def test_cli_promote_rollback_and_history(source: Source) -> None:
    from typer.testing import CliRunner

    from pipelines.cli import app

    model = "promotion-tests-cli"
    v1, v2 = add_version(source, model, True), add_version(source, model, True)
    bad = add_version(source, model, False, FAILED_GATE)

    def cli(*args: str):
        result = CliRunner().invoke(app, [*args, "--model", model])
        print(result.output)
        return result

    assert f"(none) -> {v1} (reason: first" in cli("promote", v1, "--reason", "first").output
    assert f"{v1} -> {v2}" in cli("promote", v2, "--reason", "second").output
    refused = cli("promote", bad, "--reason", "try it")
    assert refused.exit_code == 1 and "promote refused" in refused.output and "did not pass its gate" in refused.output
    forced = cli("promote", bad, "--reason", "hotfix", "--force")
    assert forced.exit_code == 0 and f"{v2} -> {bad}" in forced.output and "FORCED" in forced.output
    back = cli("rollback", "--reason", "hotfix broke search")
    assert back.exit_code == 0 and f"rollback: {model}@champion {bad} -> {v2}" in back.output
    assert cli("promote", "0", "--reason", "x").exit_code == 2  # typer: VERSION must be >= 1
    shown = cli("history").output
    assert shown.count("promote ") == 3 and "rollback" in shown and f"@champion = {v2}" in shown
    assert champion_of(source.paths, model) == v2


# --- the DAGs -------------------------------------------------------------------------------------------------------


def _dagbag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=DAGS_FOLDER, safe_mode=False)
    assert not bag.import_errors, bag.import_errors
    return bag


def test_retrain_runs_weekly_and_when_the_features_dag_lands_events() -> None:
    import pendulum
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable
    from airflow.serialization.encoders import coerce_to_core_timetable
    from airflow.timetables.base import TimeRestriction

    bag = _dagbag()
    retrain = bag.dags["shopguide_retrain"]
    assert isinstance(retrain.timetable, AssetOrTimeSchedule)
    cron = retrain.timetable.timetable
    assert isinstance(cron, CronTriggerTimetable)
    # new user events (the features DAG) or a drift announcement (the monitor): tests/dags/test_dagbag.py has the latter
    assert sorted((a.name, a.uri) for a in retrain.timetable.asset_condition.objects) == [
        ("shopguide_drift", "file://shopguide/drift"),
        ("shopguide_user_events", "file://shopguide/user_events"),
    ]
    # the features DAG is the producer: its materialize task updates that asset
    producers = [
        t.task_id
        for t in bag.dags["shopguide_features"].tasks
        if any(getattr(o, "name", None) == "shopguide_user_events" for o in t.outlets)
    ]
    assert producers == ["announce_events"]
    # the time half fires every Monday 03:00 UTC, 7 days apart
    core = coerce_to_core_timetable(retrain.timetable)
    window = TimeRestriction(earliest=pendulum.datetime(2026, 1, 1, tz="UTC"), latest=None, catchup=True)
    first = core.next_dagrun_info(last_automated_data_interval=None, restriction=window)
    second = core.next_dagrun_info(last_automated_data_interval=first.data_interval, restriction=window)
    assert first.run_after == pendulum.datetime(2026, 1, 5, 3, tz="UTC")  # a Monday
    assert second.run_after - first.run_after == pendulum.duration(days=7)
    assert "Triggered by assets" in core.description and retrain.max_active_runs == 1


def test_promote_dag_is_a_manual_typed_form() -> None:
    dag = _dagbag().dags["shopguide_promote"]
    assert dag.timetable.__class__.__name__ == "NullTimetable" and [t.task_id for t in dag.tasks] == ["move_champion"]
    schema = {name: dag.params.get_param(name).schema for name in dag.params}
    assert schema["version"] == {"type": ["null", "integer"], "minimum": 1}
    assert schema["action"] == {"type": "string", "enum": ["promote", "rollback"]}
    assert schema["reason"]["type"] == "string" and schema["reason"]["minLength"] == 1
    assert schema["force"] == {"type": "boolean"} and dag.params["force"] is False


@pytest.fixture(scope="module")
def model_aliases_kept(shopguide_home: Paths) -> Iterator[Paths]:
    with aliases_restored(shopguide_home):
        yield shopguide_home


@pytest.mark.slow
def test_promote_dag_rejects_invalid_params(airflow_paths: Paths) -> None:
    run = run_dag_test(
        airflow_paths, "shopguide_promote", {"action": "promote", "version": 0, "reason": ""}, capture=True, timeout=600
    )
    assert not run.ok and run.run_id is None, run.output[-2000:]  # refused before a run exists
    assert "ParamValidationError" in run.output and "version" in run.output


@dataclass(frozen=True)
class RetrainRuns:
    paths: Paths
    better: DagTestResult
    rerun_output: dict[str, str]
    versions_before_rerun: list[str]
    versions_after_rerun: list[str]
    history_before_rerun: list[dict]
    history_after_rerun: list[dict]


def _versions(paths: Paths) -> list[str]:
    return sorted(str(v.version) for v in registry.client(paths).search_model_versions(f"name = '{MODEL_NAME}'"))


@pytest.fixture(scope="module")
def retrain_runs(tiny_pipeline, model_aliases_kept: Paths) -> RetrainRuns:
    """The session's retrain DAG run on the tiny profile (tests/integration/conftest.py: decided on the floors alone),
    then three of its tasks run again under the same run id (`airflow tasks test`), as clearing them in the UI right
    after the run would: register, promote, and the gate, which now finds the run's own version as @champion and
    re-evaluates it on the run's snapshot.

    A worse candidate failing the gate through the DAG is tests/prod's (a REST-triggered run on the Celery worker);
    the gate's rules are tests/unit/test_gate.py's.
    """
    paths, better = tiny_pipeline.paths, tiny_pipeline.retrain
    # @champion as the run left it: other tests of the session may have moved it since
    registry.client(paths).set_registered_model_alias(MODEL_NAME, registry.CHAMPION, better.xcom("register")["version"])
    versions_before, history_before = _versions(paths), registry.champion_history(paths, MODEL_NAME)
    rerun = {
        task: airflow_command(paths, "tasks", "test", "shopguide_retrain", task, better.run_id, timeout=600).stdout
        for task in ("register", "promote", "gate")
    }
    versions_after, history_after = _versions(paths), registry.champion_history(paths, MODEL_NAME)
    return RetrainRuns(paths, better, rerun, versions_before, versions_after, history_before, history_after)


@pytest.mark.slow
def test_a_candidate_that_passes_the_gate_becomes_champion(retrain_runs: RetrainRuns) -> None:
    paths, run = retrain_runs.paths, retrain_runs.better
    decision, version = run.xcom("gate"), run.xcom("register")["version"]
    print("passing run:", json.dumps(decision, indent=2))
    assert decision["passed"] and all(r.startswith("ok: ") for r in decision["reasons"])
    outcome = run.xcom("promote")
    assert (outcome["champion"], outcome["promoted"], outcome["moved"]) == (version, True, True)
    run_key = f"shopguide_retrain__{run.run_id}"
    (entry,) = [e for e in retrain_runs.history_before_rerun if e.get("run_key") == run_key]
    assert (entry["action"], entry["version"]) == ("promote", version)
    assert entry["actor"] == f"airflow:shopguide_retrain/{run.run_id}"
    assert registry.client(paths).get_model_version(MODEL_NAME, version).tags["gate_passed"] == "true"


@pytest.mark.slow
def test_rerunning_tasks_of_a_dag_run_registers_and_promotes_once(retrain_runs: RetrainRuns) -> None:
    assert retrain_runs.versions_after_rerun == retrain_runs.versions_before_rerun
    assert retrain_runs.history_after_rerun == retrain_runs.history_before_rerun
    assert "already promoted version" in retrain_runs.rerun_output["promote"], retrain_runs.rerun_output["promote"]


@pytest.mark.slow
def test_the_gate_re_evaluates_the_champion_on_the_candidates_snapshot(retrain_runs: RetrainRuns) -> None:
    """The gate run again after the promotion compares the candidate with itself as @champion: downloaded from the
    registry and evaluated by the same code on the same held-out terms, it ties exactly (paired CI [0, 0]) and
    passes; the candidate's own figures and the champion's agree."""
    run, out = retrain_runs.better, retrain_runs.rerun_output["gate"]
    version, report = run.xcom("register")["version"], run.xcom("evaluate")
    assert f"Gate vs champion {version}: PASSED" in out, out[-3000:]
    assert f"champion {version} on this snapshot: nDCG@10 {report['ndcg_at_10']:.4f}" in out, out[-3000:]
    assert f"on the same {report['heldout_terms']} held-out terms: difference +0.0000" in out, out[-3000:]
    assert "CI [+0.0000, +0.0000]" in out, out[-3000:]


# --- the REST API of a real api-server ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def airflow_services(paths: Paths, log_dir: Path) -> Iterator[str]:
    """api-server + scheduler + dag-processor on 127.0.0.1:<free port>, each in its own process group, always killed."""
    port = _free_port()
    env = {
        **os.environ,
        **airflow_environ(paths, api_port=port),
        # one JWT secret for the api-server that validates task tokens and the scheduler that issues them
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
    }
    procs: list[subprocess.Popen] = []
    try:
        for component in (["api-server", "--port", str(port)], ["scheduler"], ["dag-processor"]):
            log = (log_dir / f"{component[0]}.log").open("w")
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "airflow", *component],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        yield f"http://127.0.0.1:{port}"
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _poll(what: str, fn, timeout: float, log_dir: Path, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = fn()
        if result:
            return result
        time.sleep(every)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(log_dir.glob("*.log")))
    raise TimeoutError(f"{what} not within {timeout} s\n{logs}")


@pytest.mark.slow
def test_the_promote_dag_through_the_rest_api_promotes_refuses_forces_and_rolls_back(
    source: Source, airflow_paths: Paths, model_aliases_kept: Paths, tmp_path: Path
) -> None:
    """The form's four cases as a user triggers them, run by a real scheduler (LocalExecutor): a promotion, a
    gate-failed version refused at once (no retry: a refusal is not transient), the same version forced with a
    reason, and a rollback to the champion it replaced."""
    import httpx

    paths = airflow_paths
    good = add_version(source, MODEL_NAME, True)
    bad = add_version(source, MODEL_NAME, False, FAILED_GATE)
    with airflow_services(paths, tmp_path) as url, httpx.Client(base_url=url, timeout=10) as http:

        def token() -> str | None:
            with contextlib.suppress(httpx.HTTPError):
                r = http.get("/auth/token")  # simple auth manager, all-admins mode: a JWT without credentials
                if r.status_code == 201:
                    return r.json()["access_token"]
            return None

        jwt = _poll("api-server up", token, 180, tmp_path)
        http.headers["Authorization"] = f"Bearer {jwt}"
        _poll(
            "shopguide_promote parsed",
            lambda: http.get("/api/v2/dags/shopguide_promote").status_code == 200,
            180,
            tmp_path,
        )
        # a paused DAG accepts triggers but never runs them; only this DAG is unpaused (the others stay paused)
        assert http.patch("/api/v2/dags/shopguide_promote", json={"is_paused": False}).status_code == 200

        invalid = http.post(
            "/api/v2/dags/shopguide_promote/dagRuns",
            json={"logical_date": None, "conf": {"action": "promote", "version": 0, "reason": ""}},
        )
        assert invalid.status_code == 400, invalid.text
        assert "version" in invalid.text or "reason" in invalid.text

        def trigger(**conf) -> tuple[dict, dict]:
            """(the finished run, its move_champion task instance); runs one at a time (max_active_runs=1)."""
            created = http.post("/api/v2/dags/shopguide_promote/dagRuns", json={"logical_date": None, "conf": conf})
            assert created.status_code == 200, created.text
            run_id = created.json()["dag_run_id"]
            assert created.json()["conf"] == conf

            def finished() -> dict | None:
                run = http.get(f"/api/v2/dags/shopguide_promote/dagRuns/{run_id}").json()
                return run if run["state"] in ("success", "failed") else None

            run = _poll(f"run {run_id} finished", finished, 300, tmp_path, every=1)
            ti = http.get(f"/api/v2/dags/shopguide_promote/dagRuns/{run_id}/taskInstances/move_champion").json()
            return run, ti

        def xcom(run: dict) -> dict:
            path = f"/api/v2/dags/shopguide_promote/dagRuns/{run['dag_run_id']}/taskInstances/move_champion"
            return http.get(f"{path}/xcomEntries/return_value", params={"deserialize": True}).json()["value"]

        def log(run: dict, ti: dict) -> str:
            path = f"/api/v2/dags/shopguide_promote/dagRuns/{run['dag_run_id']}/taskInstances/move_champion"
            r = http.get(f"{path}/logs/{ti['try_number']}", params={"full_content": True})
            return r.text

        run, _ = trigger(action="promote", version=int(good), reason="triggered through the REST API")
        assert run["state"] == "success", (run, (tmp_path / "scheduler.log").read_text()[-5000:])
        assert champion_of(paths, MODEL_NAME) == good
        entry = registry.champion_history(paths, MODEL_NAME)[-1]
        assert (entry["version"], entry["reason"]) == (good, "triggered through the REST API")
        assert entry["actor"].startswith("airflow:") and run["dag_run_id"] in entry["actor"]

        run, ti = trigger(action="promote", version=int(bad), reason="without force")
        assert (run["state"], ti["state"], ti["try_number"]) == ("failed", "failed", 1), ti
        assert "did not pass its gate" in log(run, ti)
        assert champion_of(paths, MODEL_NAME) == good

        run, _ = trigger(action="promote", version=int(bad), reason="forced from the form", force=True)
        assert run["state"] == "success", run
        move = xcom(run)
        assert (move["version"], move["moved"], move["forced"]) == (bad, True, True)
        assert champion_of(paths, MODEL_NAME) == bad

        run, _ = trigger(action="rollback", reason="forced version misbehaves")
        assert run["state"] == "success", run
        assert (xcom(run)["previous"], xcom(run)["version"]) == (bad, good)
        print("REST-triggered runs: promote, refused, forced, rolled back:", xcom(run))
    assert champion_of(paths, MODEL_NAME) == good
