"""Run the repo's DAGs on a local, embedded Airflow (SQLite under Paths.airflow_home) from tests and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any, TextIO

from filelock import FileLock

from pipelines.config import REPO_ROOT, Paths

DAGS_FOLDER = REPO_ROOT / "dags"
# Written after a successful `airflow db migrate`: the Airflow version and the DB file (device, inode, size) it left.
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


class DagRunTimeout(AirflowCommandError):
    """A DAG run outlived its time limit: its processes were stopped and the run marked failed; `result` is the run
    as Airflow's DB has it afterwards (no run when Airflow had not created one yet)."""

    def __init__(self, message: str, result: DagTestResult, timeout: float) -> None:
        super().__init__(message)
        self.result = result
        self.timeout = timeout


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


def _db_identity(db: Path) -> dict[str, int] | None:
    try:
        st = db.stat()
    except OSError:
        return None
    return {"device": st.st_dev, "inode": st.st_ino, "size": st.st_size}


def ensure_airflow_db(paths: Paths, *, timeout: float = 300) -> None:
    """Migrate the Airflow metadata DB once: ~5 s on a fresh SQLite, ~2 ms (no Airflow start-up) when already done.

    Whether the DB is migrated is Airflow's call (`airflow db migrate` is idempotent), but asking it costs an Airflow
    start-up (seconds), and tests and the CLI call this before every DAG run. So the answer is remembered in a marker
    file: the same Airflow version and the same DB file it migrated (same inode, not smaller) skip the migration; a
    deleted, replaced or recreated DB, or another Airflow version, migrates again.
    """
    home = paths.airflow_home
    db = airflow_db_path(paths)
    marker = home / _MIGRATED_MARKER
    airflow_version = version("apache-airflow-core")

    def up_to_date() -> bool:
        try:
            done = json.loads(marker.read_text())
        except (OSError, ValueError):
            return False
        now, then = _db_identity(db), done.get("db") or {}
        return (
            done.get("airflow") == airflow_version
            and now is not None
            and (now["device"], now["inode"]) == (then.get("device"), then.get("inode"))
            and now["size"] >= then.get("size", 0)
        )

    if up_to_date():
        return
    home.mkdir(parents=True, exist_ok=True)
    # Parallel test workers and the CLI may share one AIRFLOW_HOME: one migrates, the others wait and then skip.
    with FileLock(home / ".shopguide-db-migrate.lock", timeout=timeout):
        if up_to_date():
            return
        airflow_command(paths, "db", "migrate", timeout=timeout)
        identity = _db_identity(db)
        if identity is None:
            raise AirflowCommandError(f"airflow db migrate left no database at {db}")
        marker.write_text(json.dumps({"airflow": airflow_version, "db": identity}))


@dataclass(frozen=True)
class DagTestResult:
    """Outcome of one `airflow dags test`, read back through Airflow's models by the process that ran it."""

    dag_id: str
    returncode: int
    output: str
    run_id: str | None = None
    state: str | None = None  # dag run state: "success" | "failed" | None when no run was created
    logical_date: str | None = None  # ISO 8601, None for a run without one
    conf: dict[str, Any] = field(default_factory=dict)
    task_states: dict[str, str | None] = field(default_factory=dict)  # "task" or "task[map_index]"
    task_tries: dict[str, int] = field(default_factory=dict)  # attempts so far (1 + retries used), keyed the same
    xcoms: dict[str, Any] = field(default_factory=dict)  # return values, keyed like task_states
    # values a task pushed under a key of its own (xcom_push), {task: {key: value}}: e.g. decide's "decision", which
    # a short-circuit that skips pushes instead of a return value
    pushed: dict[str, dict[str, Any]] = field(default_factory=dict)

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


def _key(task_id: str, map_index: int) -> str:
    return task_id if map_index < 0 else f"{task_id}[{map_index}]"


def _read_run(dag_id: str, since: datetime) -> dict[str, Any]:
    """The newest run of dag_id created at or after `since`, with its task states and return values.

    Runs inside the `airflow dags test` process, through Airflow's models and session: the CLI prints no run id and
    has no command for XCom values, and a second CLI call per query would cost another Airflow start-up.
    """
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        # `dags test` stamps run_after with the time it creates the run (its logical date may be any date).
        runs = [r for r in DagRun.find(dag_id=dag_id, session=session) if r.run_after >= since]
        if not runs:
            return {}
        run = max(runs, key=lambda r: r.run_after)
        # Any: get_many is annotated Select[tuple[XComModel]] (SQLAlchemy 2.0 style), rows of tuples to 2.1's stubs.
        xcoms: list[Any] = list(session.scalars(XComModel.get_many(run_id=run.run_id, dag_ids=dag_id)))
        pushed: dict[str, dict[str, Any]] = {}
        for x in xcoms:
            if x.key != "return_value":
                pushed.setdefault(_key(x.task_id, x.map_index), {})[x.key] = XComModel.deserialize_value(x)
        tis = run.get_task_instances(session=session)
        return {
            "run_id": run.run_id,
            "state": str(run.state) if run.state else None,
            "logical_date": run.logical_date.isoformat() if run.logical_date else None,
            "conf": dict(run.conf or {}),
            "task_states": {_key(ti.task_id, ti.map_index): str(ti.state) if ti.state else None for ti in tis},
            "task_tries": {_key(ti.task_id, ti.map_index): ti.try_number for ti in tis},
            "xcoms": {
                _key(x.task_id, x.map_index): XComModel.deserialize_value(x) for x in xcoms if x.key == "return_value"
            },
            "pushed": pushed,
        }


def _dags_test_main(result_file: str, dag_id: str, airflow_args: Sequence[str]) -> None:
    """`airflow AIRFLOW_ARGS` (a `dags test`) in this process, then the run it created as JSON in result_file.

    Airflow's own CLI entry point parses and runs the command, so its output, errors and exit status are those of
    `airflow dags test`; the run is read back even when the command fails (a failed run is still a run).
    """
    from airflow.__main__ import main

    since = datetime.now(UTC)
    sys.argv = ["airflow", *airflow_args]
    try:
        main()
    finally:
        Path(result_file).write_text(json.dumps(_read_run(dag_id, since), default=str))


def _stop_run_main(result_file: str, dag_id: str, since: str) -> None:
    """Mark the unfinished runs of dag_id created since `since` failed, as Airflow's scheduler does at a DAG's
    dagrun_timeout, except that a task that was running or queued when it was stopped is marked failed (the
    scheduler marks every unfinished task skipped) so the run shows where the time ran out; then write the newest
    run as JSON to result_file. Runs in its own process after the `dags test` process was killed."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, State, TaskInstanceState

    started = datetime.fromisoformat(since)
    interrupted = {TaskInstanceState.RUNNING, TaskInstanceState.QUEUED, TaskInstanceState.RESTARTING}
    with create_session() as session:
        for run in DagRun.find(dag_id=dag_id, session=session):
            if run.run_after < started or run.state in State.finished_dr_states:
                continue
            for ti in run.get_task_instances(state=State.unfinished, session=session):
                ti.set_state(
                    TaskInstanceState.FAILED if ti.state in interrupted else TaskInstanceState.SKIPPED, session=session
                )
            run.set_state(DagRunState.FAILED)
            session.merge(run)
    Path(result_file).write_text(json.dumps(_read_run(dag_id, started), default=str))


def _stop_group(proc: subprocess.Popen[str], grace: float) -> None:
    """SIGTERM the process group `proc` leads (its own session: tasks' children included), SIGKILL after `grace` s.

    The group is killed even when its leader is gone already: a task's child (a Feast CLI, a memory probe) would
    otherwise keep running and keep the output pipe open.
    """
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # nothing left in the group
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


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
    stop_grace: float = 5.0,
) -> DagTestResult:
    """Run `airflow dags test DAG_ID [LOGICAL_DATE] --conf JSON` in a subprocess and read back the run.

    Migrates the DB first if needed. All tasks run inside that one subprocess, sequentially (no executor,
    no scheduler). Output is streamed to stdout unless `capture`; it is kept in the result either way. `quiet`
    lowers Airflow's log level to WARNING (task prints, warnings and tracebacks still show). Never raises for a
    failed run: check `result.ok` or call `result.check()`. The run id is chosen by Airflow
    (`manual__<now>`), and a second test run with the same logical date replaces the first one in the DB.

    `timeout` (seconds) bounds the whole command: past it the subprocess and every process it started get SIGTERM,
    SIGKILL `stop_grace` seconds later (Airflow's task runner answers SIGTERM only with the task's on_kill(), so the
    kill is what stops a running task), the run is marked failed in Airflow's DB (a few seconds: one more Airflow
    start-up) and DagRunTimeout is raised. An interrupt (Ctrl-C) stops them the same way: they run in their own
    session, out of the terminal's reach.
    """
    ensure_airflow_db(paths)
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
    since = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="shopguide-dag-test-") as tmp:
        result_file = Path(tmp) / "run.json"
        command = [sys.executable, "-m", "pipelines.airflow_env", str(result_file), dag_id, *args]
        with subprocess.Popen(
            command,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            bufsize=1,
            start_new_session=True,
        ) as proc:
            assert proc.stdout is not None
            reader = threading.Thread(target=_pump, args=(proc.stdout, lines, not capture), daemon=True)
            reader.start()
            try:
                returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _stop_group(proc, stop_grace)
                reader.join(timeout=5)
                stop = [sys.executable, "-m", "pipelines.airflow_env", "--stop", str(result_file), dag_id]
                subprocess.run([*stop, since.isoformat()], env=env, capture_output=True, timeout=300, check=False)
                result = DagTestResult(
                    dag_id=dag_id, returncode=proc.returncode, output="".join(lines), **_load(result_file)
                )
                where = f"run {result.run_id} marked failed" if result.run_id else "no run had been created yet"
                raise DagRunTimeout(
                    f"{dag_id} exceeded its time limit of {timeout:g} s and was stopped; {where}; "
                    f"tasks: {result.task_states}\n" + "".join(lines[-40:]),
                    result,
                    float(timeout or 0),
                ) from None
            except BaseException:  # KeyboardInterrupt and the like: leave nothing running behind
                _stop_group(proc, stop_grace)
                raise
            reader.join()
        run = _load(result_file)
    return DagTestResult(dag_id=dag_id, returncode=returncode, output="".join(lines), **run)


def _load(result_file: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(result_file.read_text()))
    except (OSError, ValueError):  # the process died before it could read the run back
        return {}


if __name__ == "__main__":
    if sys.argv[1] == "--stop":  # after a timeout: --stop RESULT_FILE DAG_ID SINCE
        _stop_run_main(sys.argv[2], sys.argv[3], sys.argv[4])
    else:  # run_dag_test's subprocess: RESULT_FILE DAG_ID dags test DAG_ID ...
        _dags_test_main(sys.argv[1], sys.argv[2], sys.argv[3:])
