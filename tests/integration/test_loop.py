"""`shopguide loop --cycles 1` end to end on the tiny profile: the real service as a child process on the session's
tiny champion, SIMULATED shoppers, the features and retrain DAGs under `airflow dags test`, the gate, the hot swap."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from typer.testing import CliRunner

from pipelines.cli import app as cli
from pipelines.config import MODEL_NAME, Paths
from pipelines.data.event_log import read_event_log
from pipelines.data.request_log import read_request_log
from pipelines.registry import mlflow_client as registry

if TYPE_CHECKING:
    from tests.integration.conftest import TinyPipeline

pytestmark = pytest.mark.slow


@pytest.fixture
def loop_home(tiny_pipeline: TinyPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Paths]:
    """A SHOPGUIDE_HOME of its own holding a copy of the session's registry (the tiny pipeline's version as
    @champion) and Feast stores, with empty request and event logs: the loop moves @champion and retrains on its own
    traffic without touching what the session's other tests read. The copied registry still points at the session's
    artifacts (read; new runs add folders of their own there). Airflow stays the session's (migrated once)."""
    import mlflow

    session_uri = os.environ["MLFLOW_TRACKING_URI"]
    session = tiny_pipeline.paths
    home = tmp_path / "home"
    (home / "mlflow").mkdir(parents=True)
    db = home / "mlflow" / "mlflow.db"
    with sqlite3.connect(session_uri.removeprefix("sqlite:///")) as source, sqlite3.connect(db) as copy:
        source.backup(copy)
    shutil.copytree(session.feast_dir, home / "feast")
    monkeypatch.setenv("SHOPGUIDE_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    paths = Paths.from_env()
    # other tests of the session may have moved @champion since the tiny pipeline's run promoted its version
    registry.set_alias(paths, MODEL_NAME, registry.CHAMPION, tiny_pipeline.retrain.xcom("register")["version"])
    yield paths
    mlflow.set_tracking_uri(session_uri)  # the module-global URI the registry client set, back to the session's
    mlflow.set_registry_uri(session_uri)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_one_cycle_of_the_loop_learns_from_simulated_feedback(loop_home: Paths, tmp_path: Path) -> None:
    champion = registry.alias_version(loop_home, MODEL_NAME, registry.CHAMPION)
    out = tmp_path / "loop.json"
    args = ["loop", "--cycles", "1", "--profile", "tiny", "--users", "12", "--minutes", "0.3", "--seed", "3"]
    args += ["--think-seconds", "0", "--port", str(_free_port()), "--poll-seconds", "1", "--json-out", str(out)]
    # the tiny profile holds 39 held-out terms: the paired CI spans about +-0.03, so at the default allowance
    # (gate.max_regression 0.01) the gate keeps the champion whatever was learned; at 0.1 the candidate is promoted
    # unless it is clearly worse, and the hot swap is what this run checks (a lost gate: tests/unit/test_loop.py)
    args += ["--retrain-param", "max_regression=0.1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output[-5000:]
    summary = json.loads(out.read_text())
    print(json.dumps(summary["reports"][0], indent=2))
    (cycle,) = summary["reports"]
    traffic, feedback, retrain = cycle["traffic"], cycle["feedback"], cycle["retrain"]
    assert summary["simulated"] is True and traffic["simulated"] is True and traffic["errors"] == {}
    assert cycle["served"] == champion and retrain["champion_before"] == champion
    assert "SIMULATED" in result.output and "cycle 1/1" in result.output and "held-out nDCG@10" in result.output

    # the simulated feedback entered the retrain snapshot: its window holds this home's whole logs (the traffic,
    # plus the loop's one probe search before it); enough of it for the schedule's rule to train
    answers = read_request_log().to_pylist()
    events = read_event_log().to_pylist()
    assert retrain["outcome"] != "skipped", retrain
    assert retrain["new_feedback"] >= 100  # the tiny profile's retrain.min_new_feedback
    assert feedback["events"] == traffic["accepted"] == len(events) > 0
    searches = [a for a in answers if a["endpoint"] == "search"]
    assert feedback["answers"] == traffic["searches"] + 1 == len(searches) - 1  # the second probe came after it
    assert 0 < feedback["answers_with_events"] <= feedback["answers"] and feedback["positives"] > 0

    # candidate vs champion on the same held-out terms, with the paired CI
    c = retrain["comparison"]
    assert c["terms"] > 0 and c["low"] <= c["difference"] <= c["high"]
    assert {"simulate", "features", "retrain", "serve"} <= set(cycle["seconds"])
    assert retrain["outcome"] == "promoted", retrain["reasons"]
    assert any(r.startswith("ok: ndcg_at_10") and "(lower bound >= -0.1 required)" in r for r in retrain["reasons"])
    # the service swapped to the new version and answers with it
    new = retrain["candidate"]
    assert retrain["champion_after"] == new != champion and cycle["serving_after"] == new
    assert registry.alias_version(loop_home, MODEL_NAME, registry.CHAMPION) == new
    assert "swap" in cycle["seconds"] and f"PROMOTED: v{new} is @champion (was v{champion})" in result.output
