"""Where DAG tasks hand each other folders (snapshot, models, variants, bundles, reports): a run store addressed by URL,
so that any task can run on any worker.

The store is one URL, configured once (SHOPGUIDE_RUN_STORE, Paths.run_store), read and written through MLflow's
artifact repositories: `file://` (a folder), `mlflow-artifacts:/...` (the MLflow tracking server's proxied artifact
store, `mlflow server --artifacts-destination`), `s3://`, `gs://` and the other schemes MLflow knows.

- A local store (the embedded default, `file://$SHOPGUIDE_HOME/runs`) is written in place: a task's output folder IS
  its place in the store, XCom carries plain paths, nothing is copied (the behaviour before the store existed).
- Any other store: each task works in its own scratch folder (under SHOPGUIDE_SCRATCH, removed when the task ends),
  stages what it reads by downloading the folders its input URLs point into, and publishes its output folders;
  XCom carries URLs `<store>/<run>/<output>/<relative path>`. A path on one worker's disk never reaches another task.
  Each publish also writes `<run>/_published.json` (when), the age the retention reads: object stores and the MLflow
  server's artifact API report no modification times.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pipelines.config import Paths, safe_name

PUBLISHED_MARK = "_published.json"


def local_folder(url: str) -> Path | None:
    """The folder a `file:` URL (or a plain path) names; None for any other store."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(url) if parsed.scheme == "" else None


class HandoffError(RuntimeError):
    """A URL outside this run store, or an input folder the store does not hold."""


@dataclass
class TaskFolders:
    """One task's view of the run store: outputs to write, inputs to stage, a publish step for what it returns."""

    store: str
    run: str
    scratch: Path | None  # None: the store is a local folder, written in place
    # the server an mlflow-artifacts: store lives on, passed explicitly: MLflow's process-wide tracking URI (set by
    # mlflow.set_tracking_uri anywhere in the process) would otherwise win over this run's configuration
    tracking_uri: str | None = None
    outputs: dict[str, Path] = field(default_factory=dict)
    staged: dict[str, Path] = field(default_factory=dict)

    @property
    def _local_store(self) -> Path | None:
        return None if self.scratch is not None else local_folder(self.store)

    @property
    def _scratch(self) -> Path:
        if self.scratch is None:
            raise HandoffError("a local run store has no scratch folder")
        return self.scratch

    def output(self, name: str) -> Path:
        """An empty-or-existing folder this task writes `name` into; published with publish()."""
        local = self._local_store
        path = (local / self.run if local is not None else self._scratch / "out") / name
        path.mkdir(parents=True, exist_ok=True)
        self.outputs[name] = path
        return path

    def extend(self, name: str) -> Path:
        """An earlier task's output `name` of this run that this task adds files to (the selected bundle gets its
        indexes): staged, changed here and published back under the same name, so its URLs stay valid. A local
        store's folder is changed in place."""
        local = self._local_store
        if local is not None:
            return self.output(name)
        self._stage_url(f"{self.store.rstrip('/')}/{self.run}/{name}")
        path = self.staged[f"{self.run}/{name}"]
        self.outputs[name] = path
        return path

    def stage(self, value: Any) -> Any:
        """`value` (JSON: dicts, lists, strings) with every URL of this store replaced by a local path; each output
        folder a URL points into is downloaded once into this task's scratch."""
        if self._local_store is not None:
            return value
        return _walk(value, self._stage_url)

    def publish(self, value: Any) -> Any:
        """Upload every output folder, then return `value` with each path inside one replaced by its URL."""
        if self._local_store is not None:
            return value
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        repo = get_artifact_repository(self.store, tracking_uri=self.tracking_uri)
        for name, path in self.outputs.items():
            repo.log_artifacts(str(path), f"{self.run}/{name}")
        if self.outputs:
            mark = self._scratch / PUBLISHED_MARK
            mark.write_text(json.dumps({"published_at": datetime.now(UTC).isoformat()}))
            repo.log_artifact(str(mark), self.run)
        return _walk(value, self._publish_path)

    def _stage_url(self, text: str) -> str:
        prefix = f"{self.store.rstrip('/')}/"
        if not text.startswith(prefix):
            return text
        parts = text[len(prefix) :].split("/", 2)
        if len(parts) < 2 or not all(parts[:2]):
            raise HandoffError(f"{text} names no output folder of the run store {self.store}")
        run, name, rel = parts[0], parts[1], parts[2] if len(parts) == 3 else ""
        key = f"{run}/{name}"
        if key not in self.staged:
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            dst = self._scratch / "in"
            dst.mkdir(parents=True, exist_ok=True)
            try:
                local = get_artifact_repository(self.store, tracking_uri=self.tracking_uri).download_artifacts(
                    key, str(dst)
                )
            except Exception as err:
                raise HandoffError(f"cannot stage {key} from the run store {self.store}: {err}") from err
            self.staged[key] = Path(local)
        return str(self.staged[key] / rel) if rel else str(self.staged[key])

    def _publish_path(self, text: str) -> str:
        """A path in an output or a staged input -> its URL; any other string is left as it is."""
        if not text.startswith("/"):
            return text
        path = Path(text)
        folders = {**{f"{self.run}/{n}": p for n, p in self.outputs.items()}, **self.staged}
        for key, folder in folders.items():
            if path == folder or folder in path.parents:
                rel = path.relative_to(folder).as_posix()
                url = f"{self.store.rstrip('/')}/{key}"
                return f"{url}/{rel}" if rel != "." else url
        return text


def _walk(value: Any, fn: Any) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: _walk(v, fn) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_walk(v, fn) for v in value]
    return value


@contextlib.contextmanager
def task_folders(run_key: str, paths: Paths | None = None) -> Iterator[TaskFolders]:
    """The run store as one task of run `run_key` sees it; a remote store's scratch folder is removed on exit, so
    nothing this task leaves on the worker's disk can be read by the next task."""
    paths = paths or Paths.from_env()
    store = paths.run_store
    run = safe_name(run_key)
    if local_folder(store) is not None:
        yield TaskFolders(store, run, None)
        return
    paths.scratch.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{run[:80]}-", dir=paths.scratch))
    try:
        yield TaskFolders(store, run, scratch, paths.mlflow_tracking_uri)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # scratch only: the store keeps every published output


def store_runs(store: str, tracking_uri: str | None = None) -> dict[str, datetime | None]:
    """Every run folder of a remote run store and when a task of it last published (None: no mark, age unknown)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(store, tracking_uri=tracking_uri)
    runs: dict[str, datetime | None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for info in repo.list_artifacts():
            if not info.is_dir:
                continue
            try:
                mark = repo.download_artifacts(f"{info.path}/{PUBLISHED_MARK}", tmp)
                runs[info.path] = datetime.fromisoformat(json.loads(Path(mark).read_text())["published_at"])
            except Exception:  # no mark (a folder not written by task_folders) or unreadable: never aged out
                runs[info.path] = None
    return runs


def delete_store_runs(store: str, runs: list[str], tracking_uri: str | None = None) -> None:
    """Delete these run folders from a remote run store (the MLflow server deletes from its artifact destination)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(store, tracking_uri=tracking_uri)
    for run in runs:
        repo.delete_artifacts(run)
