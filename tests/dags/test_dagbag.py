"""DAG integrity: every file in dags/ parses with Airflow's DagBag and stays cheap to import."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.airflow_env import DAGS_FOLDER

DAG_FILES = sorted(p for p in DAGS_FOLDER.glob("*.py") if not p.name.startswith("_"))
# Design rule 2: these load in tasks only; the dag-processor re-imports every DAG file every refresh_interval.
HEAVY_MODULES = (
    "torch",
    "transformers",
    "sentence_transformers",
    "mlflow",
    "feast",
    "great_expectations",
    "onnx",
    "onnxruntime",
)
_IMPORT_PROBE = """
import importlib.util, json, sys
path = sys.argv[1]
spec = importlib.util.spec_from_file_location("dag_under_test", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(json.dumps(sorted({name.partition(".")[0] for name in sys.modules})))
"""


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def test_dags_folder_has_dag_files() -> None:
    # Guards the parametrized tests below, which would otherwise be skipped silently on an empty folder.
    assert DAG_FILES, f"no DAG files in {DAGS_FOLDER}; expected retrain.py, features.py, promote.py"


def test_whole_folder_parses_without_errors() -> None:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=DAGS_FOLDER, safe_mode=False)
    assert not bag.import_errors, "\n\n".join(f"{f}:\n{e}" for f, e in bag.import_errors.items())
    assert bag.dags, f"DagBag found no DAG in {DAGS_FOLDER}"


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=_ids(DAG_FILES))
def test_dag_file_parses_alone(dag_file: Path) -> None:
    # Files without a DAG (shared Assets, helpers) are allowed; the folder test above requires at least one DAG.
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=dag_file, safe_mode=False)
    assert not bag.import_errors, "\n\n".join(f"{f}:\n{e}" for f, e in bag.import_errors.items())
    for dag in bag.dags.values():
        assert dag.tasks, f"{dag.dag_id} has no tasks"
        # Design rule 5: the trigger form is the only documentation a user sees, so each Param says what it is.
        for name in dag.params:
            param = dag.params.get_param(name)
            assert param.description, f"{dag.dag_id}: Param {name!r} has no description"
            assert "type" in param.schema, f"{dag.dag_id}: Param {name!r} has no type"


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=_ids(DAG_FILES))
def test_dag_file_import_is_light(dag_file: Path) -> None:
    # A fresh interpreter, because the test process itself may already hold torch and friends.
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE, str(dag_file)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"importing {dag_file.name} failed:\n{proc.stderr[-3000:]}"
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    heavy = sorted(loaded.intersection(HEAVY_MODULES))
    assert not heavy, f"{dag_file.name} imports {heavy} at module level; import them inside the tasks"


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=_ids(DAG_FILES))
def test_dag_file_wires_one_step_module(dag_file: Path) -> None:
    # The import-linter contracts in pyproject.toml cover the packages; DAG files are not one, so their end of the
    # arrow (dags -> pipelines.steps) is checked here: at most one pipelines module, and it is a steps module.
    imported = set()
    for node in ast.walk(ast.parse(dag_file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        imported.update(n for n in names if n.partition(".")[0] in {"pipelines", "serving"})
    assert all(n.startswith("pipelines.steps.") for n in imported), f"{dag_file.name} imports {sorted(imported)}"
    modules = {".".join(n.split(".")[:3]) for n in imported}
    assert len(modules) <= 1, f"{dag_file.name} imports several step modules: {sorted(modules)}"


def test_profile_param_offers_every_config_profile() -> None:
    from airflow.dag_processing.dagbag import DagBag

    profiles = sorted(p.stem for p in (DAGS_FOLDER.parent / "configs").glob("*.yaml"))
    bag = DagBag(dag_folder=DAGS_FOLDER, safe_mode=False)
    for dag in bag.dags.values():
        if "profile" in dag.params:
            assert dag.params.get_param("profile").schema["enum"] == profiles, dag.dag_id


_PROFILE_PROBE = """
import json
from airflow.dag_processing.dagbag import DagBag
from pipelines.airflow_env import DAGS_FOLDER
bag = DagBag(dag_folder=DAGS_FOLDER, safe_mode=False)
defaults = {i: d.params.get_param("profile").value for i, d in bag.dags.items() if "profile" in d.params}
print(json.dumps({"defaults": defaults, "errors": {k: v[-300:] for k, v in bag.import_errors.items()}}))
"""


@pytest.mark.parametrize("profile", ["tiny", "no-such-profile"])
def test_scheduled_runs_take_the_deployments_profile(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """SHOPGUIDE_PROFILE sets the profile of runs nobody filled a form for (schedule, Asset event); an unknown one
    is an import error that names it, never a silent fallback."""
    monkeypatch.setenv("SHOPGUIDE_PROFILE", profile)
    out = subprocess.run([sys.executable, "-c", _PROFILE_PROBE], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if profile == "tiny":
        assert result["defaults"] and set(result["defaults"].values()) == {"tiny"}, result
        assert not result["errors"]
    else:
        assert not result["defaults"]
        assert all("SHOPGUIDE_PROFILE='no-such-profile'" in e for e in result["errors"].values()), result


def test_retrain_turns_the_gate_decision_into_a_branch() -> None:
    """Design rule 6: a lost gate is an outcome, not an error. The branch after register runs promote or
    keep_champion (the other is skipped) and conclude runs after either, so the run ends successfully both ways;
    the branch returns the steps' own names for its two task ids."""
    from airflow.dag_processing.dagbag import DagBag

    from pipelines.steps.retrain import KEEP_CHAMPION, PROMOTE

    dag = DagBag(dag_folder=DAGS_FOLDER / "retrain.py", safe_mode=False).dags["shopguide_retrain"]
    branch = dag.get_task("promote_or_keep")
    assert branch.upstream_task_ids == {"gate", "register"}
    assert branch.downstream_task_ids == {PROMOTE, KEEP_CHAMPION}
    conclude = dag.get_task("conclude")
    assert conclude.upstream_task_ids == {"gate", PROMOTE, KEEP_CHAMPION}
    assert conclude.trigger_rule == "none_failed_min_one_success"
    assert {t.task_id for t in dag.leaves} == {"conclude"}


def test_retrain_first_decides_whether_there_is_anything_to_learn() -> None:
    """`decide` is a short-circuit at the root: every other task descends from it, so a "nothing new" skips them all
    (whatever their trigger rules: conclude's would otherwise run) and the run ends successfully."""
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=DAGS_FOLDER / "retrain.py", safe_mode=False).dags["shopguide_retrain"]
    decide = dag.get_task("decide")
    assert type(decide).__name__ == "_ShortCircuitDecoratedOperator" and decide.ignore_downstream_trigger_rules
    assert [t.task_id for t in dag.roots] == ["decide"]
    assert {t.task_id for t in decide.get_flat_relatives(upstream=False)} == set(dag.task_ids) - {"decide"}
    assert decide.execution_timeout is not None  # bounded like every other task
    assert dag.params.get_param("only_with_new_data").schema["type"] == "boolean"


def test_features_announce_user_events_from_a_task_that_can_skip() -> None:
    """Only a successful task emits its outlets' asset events: the one task producing USER_EVENTS is
    announce_events, after materialize, which skips itself when nothing new landed; it reads the previous event."""
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=DAGS_FOLDER / "features.py", safe_mode=False).dags["shopguide_features"]
    producers = [
        t.task_id for t in dag.tasks if any(getattr(o, "name", None) == "shopguide_user_events" for o in t.outlets)
    ]
    assert producers == ["announce_events"]
    announce = dag.get_task("announce_events")
    assert [getattr(i, "name", None) for i in announce.inlets] == ["shopguide_user_events"]
    assert announce.upstream_task_ids == {"land_events", "materialize"} and not announce.downstream_task_ids


def test_the_monitor_announces_drift_from_a_task_that_can_skip_and_the_retrain_runs_on_it() -> None:
    """Only a successful task emits its outlets' asset events: the one task producing the drift Asset is the
    monitor's announce_drift, after record, which skips itself on a quiet window; it reads the previous event (the
    cool-down). The retrain DAG is scheduled on user events or drift, besides its weekly time."""
    from airflow.dag_processing.dagbag import DagBag

    from pipelines.steps.monitor import DRIFT_ASSET

    bag = DagBag(dag_folder=DAGS_FOLDER, safe_mode=False)
    producers = [
        (dag.dag_id, t.task_id)
        for dag in bag.dags.values()
        for t in dag.tasks
        if any(getattr(o, "name", None) == DRIFT_ASSET for o in t.outlets)
    ]
    assert producers == [("shopguide_monitor", "announce_drift")]
    announce = bag.dags["shopguide_monitor"].get_task("announce_drift")
    assert [getattr(i, "name", None) for i in announce.inlets] == [DRIFT_ASSET]
    assert announce.upstream_task_ids == {"record"} and not announce.downstream_task_ids
    retrain = bag.dags["shopguide_retrain"]
    condition = retrain.timetable.asset_condition
    assert type(condition).__name__ == "AssetAny"
    assert sorted(a.name for a in condition.objects) == sorted(["shopguide_user_events", DRIFT_ASSET])


def test_catalog_runs_on_the_catalog_asset_and_validates_before_anything_else() -> None:
    """A landed catalog file (the Asset shopguide_catalog) schedules the catalog DAG; validate is its one root, so a
    bad catalog stops the run before anything is embedded or published."""
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=DAGS_FOLDER / "catalog.py", safe_mode=False).dags["shopguide_catalog"]
    assert [a.name for a in dag.timetable.asset_condition.objects] == ["shopguide_catalog"]
    assert [t.task_id for t in dag.roots] == ["validate"] and [t.task_id for t in dag.leaves] == ["publish"]
    assert dag.get_task("publish").upstream_task_ids == {"validate", "embed", "build_index"}
    assert dag.max_active_runs == 1
