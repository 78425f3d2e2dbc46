"""Run the repo's DAGs on a local, embedded Airflow (SQLite under Paths.airflow_home) from tests and the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any, TextIO

from pipelines.config import REPO_ROOT, Paths

DAGS_FOLDER = REPO_ROOT / "dags"
# Written after a successful `airflow db migrate`; holds the Airflow version and the alembic head it produced.
_MIGRATED_MARKER = ".shopguide-db-migrated.json"
# Offline, quiet defaults for whatever runs inside tasks; a value already in the environment wins.
_OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GX_ANALYTICS_ENABLED": "false",
}


class AirflowCommandError(RuntimeError):
    """An `airflow ...` subprocess failed; the message ends with the tail of its output."""


def _prepend(entry: str, search_path: str, sep: str = os.pathsep) -> str:
    parts = [p for p in search_path.split(sep) if p and p != entry]
    return sep.join([entry, *parts])


def airflow_db_path(paths: Paths) -> Path:
    return paths.airflow_home / "airflow.db"


def airflow_environ(
    paths: Paths,
    *,
    dags_folder: Path | None = None,
    log_level: str = "INFO",
    api_port: int = 8080,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Environment variables (to merge over os.environ) for an embedded Airflow under paths.airflow_home.

    `base` is the environment being extended (default os.environ); it only decides PATH, PYTHONPATH, PYTHONWARNINGS
    and which offline defaults are already set. Production overrides these variables (PostgreSQL, a real executor,
    a real auth manager); nothing here is read from airflow.cfg.
    """
    base = os.environ if base is None else base
    home = paths.airflow_home
    env = {k: base.get(k, v) for k, v in _OFFLINE_DEFAULTS.items()}
    env.update(paths.environ())
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder or DAGS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_db_path(paths)}",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            # A parent that set unit test mode (Airflow's own test helpers do) would swap in unit_tests.cfg.
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": log_level,
            # Local UI/API (`airflow standalone` / `api-server`): no login, so bind to loopback only.
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(api_port),
            # Workers of `standalone`/LocalExecutor report task state here; it must follow the port.
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{api_port}/execution/",
            # Pick up edited DAG files within 30 s instead of 5 min when a dag-processor runs.
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
            # DAG files and tasks import `pipelines` from this checkout whether or not it is pip-installed.
            "PYTHONPATH": _prepend(str(REPO_ROOT), base.get("PYTHONPATH", "")),
            # `airflow standalone` starts its components as `airflow ...` found on PATH: use this venv's.
            "PATH": _prepend(str(Path(sys.executable).parent), base.get("PATH", os.defpath)),
            # `airflow dags ...` warns on every call that graphviz (only for --save-dagrun) is missing.
            "PYTHONWARNINGS": _prepend("ignore:Could not import graphviz", base.get("PYTHONWARNINGS", ""), ","),
        }
    )
    return env


def airflow_command(
    paths: Paths,
    *args: str,
    capture: bool = True,
    timeout: float | None = None,
    log_level: str = "INFO",
    dags_folder: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `airflow ARGS` from this interpreter's environment with airflow_environ(paths); raises on failure."""
    env = {**os.environ, **airflow_environ(paths, dags_folder=dags_folder, log_level=log_level)}
    proc = subprocess.run(
        [sys.executable, "-m", "airflow", *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.STDOUT if capture else None,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout or "").splitlines()[-40:])
        raise AirflowCommandError(f"airflow {' '.join(args)} exited with {proc.returncode}\n{tail}")
    return proc


def _alembic_revision(db: Path) -> str | None:
    if not db.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            row = con.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialize migrations of one AIRFLOW_HOME across processes (parallel test workers, CLI + tests)."""
    import fcntl  # POSIX only, like Airflow itself

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_airflow_db(paths: Paths, *, timeout: float = 300) -> None:
    """Migrate the Airflow metadata DB once: ~5 s on a fresh SQLite, a few ms when this Airflow already did it."""
    home = paths.airflow_home
    marker = home / _MIGRATED_MARKER
    airflow_version = version("apache-airflow-core")

    def up_to_date() -> bool:
        try:
            done = json.loads(marker.read_text())
        except (OSError, ValueError):
            return False
        return done.get("airflow") == airflow_version and done.get("revision") == _alembic_revision(
            airflow_db_path(paths)
        )

    if up_to_date():
        return
    with _file_lock(home / ".shopguide-db-migrate.lock"):
        if up_to_date():
            return
        airflow_command(paths, "db", "migrate", timeout=timeout)
        revision = _alembic_revision(airflow_db_path(paths))
        if revision is None:
            raise AirflowCommandError(f"airflow db migrate left no alembic revision in {airflow_db_path(paths)}")
        marker.write_text(json.dumps({"airflow": airflow_version, "revision": revision}))


@dataclass(frozen=True)
class DagTestResult:
    """Outcome of one `airflow dags test`, read back from the metadata DB after the process exits."""

    dag_id: str
    returncode: int
    output: str
    run_id: str | None = None
    state: str | None = None  # dag run state: "success" | "failed" | None when no run was created
    logical_date: str | None = None
    conf: dict[str, Any] = field(default_factory=dict)
    task_states: dict[str, str | None] = field(default_factory=dict)  # "task" or "task[map_index]"
    xcoms: dict[str, Any] = field(default_factory=dict)  # return values, keyed like task_states

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.state == "success"

    def xcom(self, task_id: str, default: Any = None) -> Any:
        return self.xcoms.get(task_id, default)

    def check(self) -> DagTestResult:
        """Raise AirflowCommandError unless the run succeeded; returns self for chaining."""
        if not self.ok:
            failed = sorted(t for t, s in self.task_states.items() if s in {"failed", "upstream_failed"})
            tail = "\n".join(self.output.splitlines()[-60:])
            raise AirflowCommandError(
                f"dag {self.dag_id} run {self.run_id} ended {self.state} (exit {self.returncode}); "
                f"failed tasks: {failed}\n{tail}"
            )
        return self


def _run_ids(db: Path, dag_id: str) -> set[str]:
    try:
        with contextlib.closing(sqlite3.connect(db)) as con:
            return {r[0] for r in con.execute("SELECT run_id FROM dag_run WHERE dag_id = ?", (dag_id,))}
    except sqlite3.Error:
        return set()


def _key(task_id: str, map_index: int) -> str:
    return task_id if map_index < 0 else f"{task_id}[{map_index}]"


def _read_run(db: Path, dag_id: str, known: set[str]) -> dict[str, Any]:
    """The newest run of dag_id whose run id is not in `known`, with its task states and return values.

    By run id, not by primary key: a test run that replaces the run with the same logical date (the newest row) can
    get the deleted row's id again in SQLite.
    """
    with contextlib.closing(sqlite3.connect(db)) as con:
        rows = con.execute(
            "SELECT id, run_id, state, logical_date, conf FROM dag_run WHERE dag_id = ? ORDER BY id DESC", (dag_id,)
        ).fetchall()
        row = next((r for r in rows if r[1] not in known), None)
        if row is None:
            return {}
        pk, run_id, state, logical_date, conf = row
        tis = con.execute(
            "SELECT task_id, map_index, state FROM task_instance WHERE dag_id = ? AND run_id = ?", (dag_id, run_id)
        ).fetchall()
        xcoms = con.execute(
            "SELECT task_id, map_index, value FROM xcom WHERE dag_run_id = ? AND key = 'return_value'", (pk,)
        ).fetchall()
    return {
        "run_id": run_id,
        "state": state,
        "logical_date": logical_date,
        "conf": json.loads(conf) if conf else {},
        "task_states": {_key(t, m): s for t, m, s in tis},
        "xcoms": {_key(t, m): json.loads(v) if isinstance(v, str | bytes) else v for t, m, v in xcoms},
    }


def _pump(stream: TextIO, sink: list[str], echo: bool) -> None:
    for line in stream:
        sink.append(line)
        if echo:
            sys.stdout.write(line)
            sys.stdout.flush()


def run_dag_test(
    paths: Paths,
    dag_id: str,
    conf: Mapping[str, Any] | None = None,
    logical_date: str | datetime | None = None,
    *,
    capture: bool = False,
    quiet: bool = False,
    timeout: float | None = None,
    dags_folder: Path | None = None,
    extra_args: Sequence[str] = (),
) -> DagTestResult:
    """Run `airflow dags test DAG_ID [LOGICAL_DATE] --conf JSON` in a subprocess and read back the run.

    Migrates the DB first if needed. All tasks run inside that one subprocess, sequentially (no executor,
    no scheduler). Output is streamed to stdout unless `capture`; it is kept in the result either way. `quiet`
    lowers Airflow's log level to WARNING (task prints, warnings and tracebacks still show). Never raises for a
    failed run: check `result.ok` or call `result.check()`. The run id is chosen by Airflow
    (`manual__<now>`), and a second test run with the same logical date replaces the first one in the DB.
    """
    ensure_airflow_db(paths)
    db = airflow_db_path(paths)
    before = _run_ids(db, dag_id)
    args = ["dags", "test", dag_id]
    if logical_date is not None:
        args.append(logical_date.isoformat() if isinstance(logical_date, datetime) else logical_date)
    if conf:
        args += ["--conf", json.dumps(dict(conf))]
    args += list(extra_args)
    env = {
        **os.environ,
        **airflow_environ(paths, dags_folder=dags_folder, log_level="WARNING" if quiet else "INFO"),
        "PYTHONUNBUFFERED": "1",
    }
    lines: list[str] = []
    with subprocess.Popen(
        [sys.executable, "-m", "airflow", *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        bufsize=1,
    ) as proc:
        assert proc.stdout is not None
        reader = threading.Thread(target=_pump, args=(proc.stdout, lines, not capture), daemon=True)
        reader.start()
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            reader.join(timeout=5)
            tail = "".join(lines[-40:])
            raise AirflowCommandError(f"airflow dags test {dag_id} timed out after {timeout} s\n{tail}") from None
        reader.join()
    return DagTestResult(dag_id=dag_id, returncode=returncode, output="".join(lines), **_read_run(db, dag_id, before))
