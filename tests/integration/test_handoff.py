"""The run store tasks hand each other folders through: in place on a local folder, by URL through a real MLflow
tracking server's proxied artifact store otherwise (each task in its own scratch folder, removed when it ends)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.config import Paths
from pipelines.registry.handoff import HandoffError, task_folders


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`mlflow server` on SQLite with --artifacts-destination: (tracking URI, the server's artifact folder)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    artifacts = root / "artifacts"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    cmd += ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(artifacts)]
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield url, artifacts
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)
    log.close()


@pytest.fixture
def remote(mlflow_server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Paths, Path]:
    url, artifacts = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("SHOPGUIDE_RUN_STORE", "mlflow-artifacts:/runs")
    monkeypatch.setenv("SHOPGUIDE_SCRATCH", str(tmp_path / "scratch"))
    return Paths.from_env(), artifacts


def test_a_local_store_is_written_in_place_and_hands_over_plain_paths(tmp_path: Path) -> None:
    paths = Paths(tmp_path / "home")
    with task_folders("manual__2026-12-03T09:00:00+00:00", paths) as t:
        out = t.output("data")
        (out / "a.txt").write_text("a")
        handed = t.publish({"dir": str(out), "file": str(out / "a.txt"), "n": 3})
    assert handed == {"dir": str(out), "file": str(out / "a.txt"), "n": 3}
    assert out == paths.run_dir("manual__2026-12-03T09:00:00+00:00") / "data"
    assert (out / "a.txt").read_text() == "a"  # stays: the folder is the store


def test_tasks_hand_folders_over_by_url_and_keep_nothing_on_the_worker(remote: tuple[Paths, Path]) -> None:
    paths, artifacts = remote
    with task_folders("run:1", paths) as t:
        out = t.output("model")
        (out / "sub").mkdir()
        (out / "sub" / "w.bin").write_bytes(b"weights")
        handed = t.publish({"model_dir": str(out), "files": [str(out / "sub" / "w.bin")], "name": "teacher"})
        scratch = out.parent.parent
    assert not scratch.exists()  # the task's scratch went with it
    assert handed == {
        "model_dir": "mlflow-artifacts:/runs/run_1/model",
        "files": ["mlflow-artifacts:/runs/run_1/model/sub/w.bin"],
        "name": "teacher",
    }
    assert (artifacts / "runs" / "run_1" / "model" / "sub" / "w.bin").read_bytes() == b"weights"

    # the next task stages it, adds a file to it (extend) and hands it on under the same URL
    with task_folders("run:1", paths) as t:
        local = t.stage(handed)
        assert Path(local["files"][0]).read_bytes() == b"weights"
        assert local["name"] == "teacher"
        extended = t.extend("model")
        assert Path(local["model_dir"]) == extended
        (extended / "index.npy").write_bytes(b"index")
        assert t.publish({"model_dir": local["model_dir"]}) == {"model_dir": handed["model_dir"]}
    with task_folders("run:1", paths) as t:
        assert (Path(t.stage(handed["model_dir"])) / "index.npy").read_bytes() == b"index"


def test_a_url_the_store_does_not_hold_is_refused_and_foreign_strings_pass(remote: tuple[Paths, Path]) -> None:
    paths, _ = remote
    with task_folders("run:2", paths) as t:
        foreign = {"x": "s3://elsewhere/a", "y": "/etc/hostname"}
        assert t.stage(foreign) == foreign
        with pytest.raises(HandoffError, match="cannot stage run_2/missing"):
            t.stage("mlflow-artifacts:/runs/run_2/missing")
        with pytest.raises(HandoffError, match="names no output folder"):
            t.stage("mlflow-artifacts:/runs/run_2")


def test_the_retention_deletes_old_runs_from_a_remote_store_by_their_last_publish(
    remote: tuple[Paths, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The maintenance step on the production profile's kind of store: run folders go by the time a task of theirs
    last published (object stores and the MLflow server report no modification times); a folder no task published
    (no mark) is kept and reported."""
    import json
    from datetime import UTC, datetime, timedelta

    from pipelines.steps.maintenance import prune

    paths, artifacts = remote
    monkeypatch.setenv("SHOPGUIDE_HOME", str(paths.home))
    for run in ("retrain__old", "retrain__new"):
        with task_folders(run, paths) as t:
            (t.output("data") / "snapshot.parquet").write_bytes(b"rows")
            t.publish({})
    (artifacts / "runs" / "stray").mkdir()  # written by something else than a task
    # eight days ago, as its mark says (the server's files have no meaningful mtime to age by)
    old_mark = artifacts / "runs" / "retrain__old" / "_published.json"
    published = datetime.fromisoformat(json.loads(old_mark.read_text())["published_at"])
    old_mark.write_text(json.dumps({"published_at": (published - timedelta(days=8)).isoformat()}))

    dry = prune({"profile": "tiny", "dry_run": True}, paths, datetime.now(UTC))
    assert dry["store_runs"] == ["retrain__old"] and (artifacts / "runs" / "retrain__old").is_dir()
    assert "stray" in dry["store_runs_without_a_publish_time"]  # (the module's other tests publish into this store)
    done = prune({"profile": "tiny"}, paths, datetime.now(UTC))
    assert done["store_runs"] == ["retrain__old"]
    left = {p.name for p in (artifacts / "runs").iterdir()}
    assert "retrain__old" not in left and {"retrain__new", "stray"} <= left
