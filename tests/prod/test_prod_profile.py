"""The production profile for real: `shopguide prod up` from empty databases of its own, every program healthy, the
REST API, MLflow and the balancer answering, a champion reaching both replicas through haproxy, then `down`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipelines.config import MODEL_NAME, Paths
from pipelines.prod import (
    DATABASES,
    ProdConfig,
    admin_token,
    airflow_api,
    client_environment,
    purge,
    read_env_file,
)

pytestmark = pytest.mark.prod

REPO_ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = {
    "mlflow",
    "airflow-api-server",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-worker-1",
    "replica-1",
    "replica-2",
    "haproxy",
}
CHAMPION_RUN_KEY = "prod-test-champion"
SHOPGUIDE_DAGS = {"shopguide_features", "shopguide_retrain", "shopguide_promote"}


@dataclass
class Profile:
    cfg: ProdConfig
    env: dict[str, str]  # what the CLI runs with: the session's environment + this profile's overrides
    up_seconds: float
    bundle: Future[Bundle]  # a champion's bundle, built beside the profile's start-up


def _cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "prod", *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _empty_redis_dbs(n: int) -> list[int]:
    """Logical Redis databases nothing else uses (empty), from the top: this run flushes them at the end."""
    import redis

    free = []
    for db in range(15, 2, -1):
        with redis.Redis(host="127.0.0.1", port=6379, db=db, socket_connect_timeout=2) as client:
            if client.dbsize() == 0:
                free.append(db)
    if len(free) < n:
        pytest.skip(f"fewer than {n} empty Redis databases on 127.0.0.1:6379")
    return free[:n]


def _existing_databases(cfg: ProdConfig) -> set[str]:
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=5432, user=cfg.get("SHOPGUIDE_PG_USER"), dbname="postgres")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database")
            return {row[0] for row in cur.fetchall()}
    finally:
        conn.close()


def _require_services() -> None:
    if not (shutil.which("haproxy") or Path("/usr/sbin/haproxy").exists()):
        pytest.skip("haproxy is not installed (.ci/run installs Debian's)")
    for what, port in (("PostgreSQL", 5432), ("Redis", 6379)):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except OSError:
            pytest.skip(f"no {what} on 127.0.0.1:{port}")


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory, private_redis) -> Iterator[Profile]:
    """The profile up from empty databases named for this run, on free ports, an empty Redis database of the machine's
    server as the Celery broker and a private redis-server as Feast's online store (a test stops it); afterwards
    stopped, its databases dropped and its Redis databases flushed."""
    _require_services()
    run = uuid.uuid4().hex[:8]
    ports = _free_ports(7)
    (celery_db,) = _empty_redis_dbs(1)
    stack = contextlib.ExitStack()
    feast_port = stack.enter_context(private_redis(tmp_path_factory.mktemp("feast-redis")))
    stack.callback(_stop_redis, feast_port)  # a test may have replaced the server it started
    overrides = {
        "SHOPGUIDE_HOME": str(tmp_path_factory.mktemp("prod")),
        "SHOPGUIDE_PG_HOST": "127.0.0.1",
        "SHOPGUIDE_PG_PORT": "5432",
        "SHOPGUIDE_PG_DB_PREFIX": f"sgtest_{run}_",
        "SHOPGUIDE_REDIS_HOST": "127.0.0.1",
        "SHOPGUIDE_REDIS_PORT": "6379",
        "SHOPGUIDE_CELERY_REDIS_DB": str(celery_db),
        "SHOPGUIDE_FEAST_REDIS_HOST": "127.0.0.1",
        "SHOPGUIDE_FEAST_REDIS_PORT": str(feast_port),
        "SHOPGUIDE_FEAST_REDIS_DB": "0",
        "SHOPGUIDE_AIRFLOW_PORT": str(ports[0]),
        "SHOPGUIDE_MLFLOW_PORT": str(ports[1]),
        "SHOPGUIDE_LB_PORT": str(ports[2]),
        "SHOPGUIDE_LB_STATS_PORT": str(ports[3]),
        "SHOPGUIDE_REPLICA_PORTS": f"{ports[4]},{ports[5]}",
        "SHOPGUIDE_WORKER_LOG_PORT": str(ports[6]),
        "SHOPGUIDE_CELERY_WORKERS": "1",
        # the schedule's and the Asset events' runs train on the tiny profile (no form fills them in)
        "SHOPGUIDE_PROFILE": "tiny",
        # a task whose worker died is failed (then retried) 20 s after its last heartbeat, not 120 s
        "SHOPGUIDE_TASK_HEARTBEAT_TIMEOUT": "20",
        "SHOPGUIDE_ARTIFACTS_DESTINATION": "",
        # a replica notices a new @champion within seconds
        "SHOPGUIDE_MODEL_POLL_SECONDS": "3",
    }
    env = {**os.environ, **overrides}
    cfg = ProdConfig.load(Paths(Path(overrides["SHOPGUIDE_HOME"])), env)
    names = {cfg.database(n) for n in DATABASES}
    if names & _existing_databases(cfg):
        stack.close()
        pytest.fail(f"this run's database names are taken: {names}")
    builder = ThreadPoolExecutor(1)
    try:
        bundle = builder.submit(_build_champion_bundle, tmp_path_factory.mktemp("champion"))
        started = time.monotonic()
        proc = _cli(env, "up", "--timeout", "240")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield Profile(cfg, env, time.monotonic() - started, bundle)
    finally:
        builder.shutdown(wait=True, cancel_futures=True)
        _cli(env, "down", timeout=180)
        purge(cfg)
        stack.close()
        assert not names & _existing_databases(cfg)


def _status(p: Profile) -> dict[str, dict[str, Any]]:
    proc = _cli(p.env, "status", "--json", timeout=60)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["name"]: r for r in rows}


def test_up_from_empty_databases_every_program_running_and_healthy(profile: Profile) -> None:
    assert {profile.cfg.database(n) for n in DATABASES} <= _existing_databases(profile.cfg)
    rows = _status(profile)
    assert set(rows) == PROGRAMS
    unhealthy = {n: r for n, r in rows.items() if not (r["state"] == "RUNNING" and r["healthy"])}
    assert not unhealthy
    assert "answers ping" in rows["airflow-worker-1"]["detail"]
    # the step libraries are in the worker before any task: its task processes fork with them (celery_config.py)
    maps = Path(f"/proc/{rows['airflow-worker-1']['pid']}/maps").read_text()
    assert "libtorch_cpu" in maps and "onnxruntime" in maps
    print(f"prod up from empty databases: {profile.up_seconds:.0f} s")


def test_secrets_generated_once_private_and_shared_by_every_process(profile: Profile) -> None:
    cfg = profile.cfg
    for path in (cfg.secrets_file, cfg.passwords_file):
        assert path.stat().st_mode & 0o777 == 0o600, path
    secret = read_env_file(cfg.secrets_file)
    # Every program inherits supervisord's environment and no program overrides these keys. (The programs' own
    # /proc/<pid>/environ is no witness: Airflow's setproctitle writes the process title over that memory.)
    pid = int(cfg.supervisor_pidfile.read_text())
    items = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    environ = dict(item.split("=", 1) for item in items if "=" in item)
    shared = ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API__SECRET_KEY")
    for key in (*shared, "SHOPGUIDE_API_KEYS"):
        assert environ[key] == secret[key], key
    conf = cfg.supervisor_conf.read_text()
    assert not any(key in conf for key in (*shared, "SHOPGUIDE_API_KEYS")), "a secret in supervisord.conf"
    assert environ["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert environ["SHOPGUIDE_RUN_STORE"] == "mlflow-artifacts:/runs"
    assert environ["MLFLOW_TRACKING_URI"] == cfg.mlflow_url
    assert environ["SHOPGUIDE_DEPLOYMENT"] == "production"


def test_rest_api_lists_the_dags_with_a_token_only(profile: Profile) -> None:
    cfg = profile.cfg
    assert httpx.get(f"{cfg.airflow_url}/api/v2/dags", timeout=10).status_code == 401
    token = admin_token(cfg)
    r = httpx.get(f"{cfg.airflow_url}/api/v2/dags", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 200, r.text
    assert {d["dag_id"] for d in r.json()["dags"]} >= SHOPGUIDE_DAGS
    health = httpx.get(f"{cfg.airflow_url}/api/v2/monitor/health", timeout=10).json()
    assert {health[k]["status"] for k in ("metadatabase", "scheduler", "dag_processor")} == {"healthy"}


def test_mlflow_server_answers_and_serves_artifacts(profile: Profile) -> None:
    cfg = profile.cfg
    r = httpx.get(f"{cfg.mlflow_url}/health", timeout=10)
    assert (r.status_code, r.text.strip()) == (200, "OK")
    # experiments keep their artifacts behind the server (proxied), so workers and replicas need no shared disk
    r = httpx.get(f"{cfg.mlflow_url}/api/2.0/mlflow/experiments/get", params={"experiment_id": "0"}, timeout=10)
    assert r.json()["experiment"]["artifact_location"].startswith("mlflow-artifacts:/")


def _stats(cfg: ProdConfig) -> dict[str, dict[str, str]]:
    text = httpx.get(f"{cfg.stats_url};csv", timeout=10).text
    header, *rows = text.lstrip("# ").splitlines()
    cols = header.split(",")
    recs = [dict(zip(cols, row.split(","), strict=False)) for row in rows]
    return {r["svname"]: r for r in recs if r.get("pxname") == "replicas" and r["svname"].startswith("replica-")}


def test_without_a_champion_the_replicas_are_alive_not_ready_and_the_balancer_answers(profile: Profile) -> None:
    cfg = profile.cfg
    for port in cfg.replica_ports:
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["status"] == "not_ready"
    # haproxy's checks reach each replica over HTTP and get its 503 (L7STS), not a refused connection (L4CON)
    deadline = time.monotonic() + 30
    while True:
        servers = _stats(cfg)
        if all(s["check_status"] == "L7STS" for s in servers.values()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert {n: (s["status"], s["check_status"], s["check_code"]) for n, s in servers.items()} == {
        "replica-1": ("DOWN", "L7STS", "503"),
        "replica-2": ("DOWN", "L7STS", "503"),
    }
    # with no replica ready the balancer answers itself, in the service's JSON error format
    api_key = read_env_file(cfg.secrets_file)["SHOPGUIDE_API_KEYS"]
    r = httpx.post(f"{cfg.lb_url}/v1/search", json={"query": "drill"}, headers={"X-API-Key": api_key}, timeout=10)
    assert r.status_code == 503
    assert "no service replica is ready" in r.json()["detail"]
    assert r.headers["Retry-After"] == "10" and "X-Shopguide-Replica" not in r.headers


def test_up_again_changes_nothing(profile: Profile) -> None:
    before = {n: r["pid"] for n, r in _status(profile).items()}
    proc = _cli(profile.env, "up", "--timeout", "60")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "already running" in proc.stdout
    assert {n: r["pid"] for n, r in _status(profile).items()} == before


class Airflow:
    """Airflow's REST API as the admin user."""

    def __init__(self, cfg: ProdConfig) -> None:
        self.http = airflow_api(cfg)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        r = self.http.request(method, path, **kwargs)
        assert r.is_success, f"{method} {path}: {r.status_code} {r.text}"
        return r.json()

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        return list(self.call("GET", f"/dags/{dag_id}/dagRuns")["dag_runs"])

    def tasks(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return list(self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"])

    def stop_scheduled_runs(self) -> None:
        """Unpaused, both DAGs start the run of their latest schedule slot (hourly features, weekly retrain) on the
        default profile: minutes of work this test does not need, so those runs are marked failed."""
        for dag_id in ("shopguide_features", "shopguide_retrain"):
            for run in self.runs(dag_id):
                if run["run_type"] == "scheduled" and run["state"] in {"queued", "running"}:
                    self.call("PATCH", f"/dags/{dag_id}/dagRuns/{run['dag_run_id']}", json={"state": "failed"})

    def wait_run(self, dag_id: str, run_id: str, timeout: float, every: float = 2) -> str:
        """The run's final state; scheduled catch-up runs are stopped meanwhile (see stop_scheduled_runs)."""
        deadline = time.monotonic() + timeout
        while (state := self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"]) not in {"success", "failed"}:
            assert time.monotonic() < deadline, self.tasks(dag_id, run_id)
            self.stop_scheduled_runs()
            time.sleep(every)
        return str(state)

    def xcom(self, dag_id: str, run_id: str, task_id: str) -> Any:
        path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value"
        return self.call("GET", path, params={"deserialize": True})["value"]


def _on_the_worker(tasks: list[dict[str, Any]], worker: str) -> None:
    """Every task instance ran on the Celery worker (its name is what task instances record as their hostname)."""
    ran = [t for t in tasks if t["state"] not in {"skipped", "upstream_failed"}]
    assert ran and {(t["hostname"], t["queue"]) for t in ran} == {(worker, "default")}, tasks


@dataclass
class Champions:
    """The versions the tests in this module move @champion between."""

    trained: str = ""  # registered and promoted by the Asset-triggered retrain run
    trained_run: str = ""  # that run's id


CHAMPIONS = Champions()


def registry_client(cfg: ProdConfig) -> Any:
    from pipelines.registry.mlflow_client import client

    return client(cfg.paths)


def _champion(cfg: ProdConfig) -> str | None:
    from pipelines.registry.mlflow_client import CHAMPION, alias_version

    return alias_version(cfg.paths, MODEL_NAME, CHAMPION)


def test_features_on_celery_then_the_scheduler_retrains_from_its_asset_and_promotes(
    profile: Profile, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", profile.cfg.mlflow_url)
    airflow = Airflow(profile.cfg)
    worker = profile.cfg.workers[0]
    started = time.monotonic()
    # no conf: the run takes the deployment's profile (SHOPGUIDE_PROFILE=tiny), as the schedule's runs do
    run = airflow.call("POST", "/dags/shopguide_features/dagRuns", json={"logical_date": None})
    for dag_id in ("shopguide_features", "shopguide_retrain"):
        airflow.call("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
    state = airflow.wait_run("shopguide_features", run["dag_run_id"], 240, every=0.5)
    tasks = airflow.tasks("shopguide_features", run["dag_run_id"])
    assert state == "success", tasks
    _on_the_worker(tasks, worker)
    features_seconds = time.monotonic() - started
    airflow.call("PATCH", "/dags/shopguide_features", json={"is_paused": True})
    # materialize emitted the Asset shopguide_user_events: the scheduler itself creates the retrain run
    deadline = time.monotonic() + 60
    while not (triggered := [r for r in airflow.runs("shopguide_retrain") if r["run_type"] == "asset_triggered"]):
        assert time.monotonic() < deadline, airflow.runs("shopguide_retrain")
        airflow.stop_scheduled_runs()
        time.sleep(1)
    (retrain,) = triggered
    assert retrain["triggered_by"] == "asset"
    state = airflow.wait_run("shopguide_retrain", retrain["dag_run_id"], 900)  # ~5 min on a quiet 2-core machine
    retrain_seconds = time.monotonic() - started - features_seconds
    tasks = airflow.tasks("shopguide_retrain", retrain["dag_run_id"])
    assert state == "success", tasks
    _on_the_worker(tasks, worker)
    mlflow_run = airflow.xcom("shopguide_retrain", retrain["dag_run_id"], "snapshot")["mlflow_run_id"]
    assert registry_client(profile.cfg).get_run(mlflow_run).data.tags["profile"] == "tiny"
    registered = airflow.xcom("shopguide_retrain", retrain["dag_run_id"], "register")
    assert registered["registered"] and _champion(profile.cfg) == registered["version"]
    CHAMPIONS.trained, CHAMPIONS.trained_run = registered["version"], retrain["dag_run_id"]
    print(
        f"on Celery, tiny: features {features_seconds:.0f} s trigger to success; asset-triggered retrain "
        f"{retrain_seconds:.0f} s from the features run's success to its own"
    )


class Load:
    """A client sending /v1/search through the balancer until stopped; every answer or error is kept.

    Like browsers, Go's http.Transport or urllib3's Retry, it sends an idempotent request once more when a reused
    keep-alive connection is closed before any response (RFC 9112, 9.3.1): haproxy closes the client's connection
    that way when the replica behind a reused server connection dies (its `http-reuse safe` relies on the client's
    retry). Those retries are counted; anything else is a failure.
    """

    def __init__(self, cfg: ProdConfig) -> None:
        self.url = f"{cfg.lb_url}/v1/search"
        self.headers = {"X-API-Key": read_env_file(cfg.secrets_file)["SHOPGUIDE_API_KEYS"]}
        self.answers: list[tuple[float, str, str]] = []  # (time, replica, model version)
        self.failures: list[str] = []
        self.retried = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._send, daemon=True)

    def _send(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self._stop.is_set():
                try:
                    try:
                        r = http.post(self.url, json={"query": "cordless drill", "k": 3}, headers=self.headers)
                    except httpx.RemoteProtocolError:  # closed without a response: once more, on a new connection
                        self.retried += 1
                        r = http.post(self.url, json={"query": "cordless drill", "k": 3}, headers=self.headers)
                except httpx.HTTPError as err:
                    self.failures.append(f"{datetime.now(UTC):%H:%M:%S.%f} {type(err).__name__}: {err}")
                    continue
                if r.status_code != 200:
                    self.failures.append(f"{datetime.now(UTC):%H:%M:%S.%f} {r.status_code} {r.text[:200]}")
                else:
                    self.answers.append((time.monotonic(), r.headers["X-Shopguide-Replica"], r.json()["model_version"]))

    def check(self, cfg: ProdConfig) -> None:
        """No failed request; otherwise the failures with what haproxy logged around them."""
        if self.failures:
            log = [line for line in (cfg.logs / "haproxy.log").read_text().splitlines() if "STATS" not in line]
            pytest.fail(f"{len(self.failures)} failed requests: {self.failures[:5]}\nhaproxy:\n" + "\n".join(log[-60:]))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def wait_all_serve(self, version: str, replicas: set[str], timeout: float = 90) -> None:
        """Wait until each of `replicas` has answered with `version` three times in a row."""
        deadline = time.monotonic() + timeout
        while True:
            latest: dict[str, list[str]] = {}
            for _, replica, served in self.answers[-40:]:
                latest.setdefault(replica, []).append(served)
            if set(latest) >= replicas and all(v[-3:] == [version] * 3 for r, v in latest.items() if r in replicas):
                return
            assert time.monotonic() < deadline, (version, latest, self.failures[-5:])
            time.sleep(0.5)


def _shell(p: Profile, *args: str) -> subprocess.CompletedProcess[str]:
    """The `shopguide` CLI in a user's shell pointed at the profile (`eval "$(shopguide prod env)"`)."""
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        env={**p.env, **client_environment(p.cfg)},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_promote_and_rollback_swap_both_replicas_under_load_without_a_failed_request(
    profile: Profile, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = profile.cfg
    assert CHAMPIONS.trained, "needs the retrain test's champion"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.mlflow_url)
    replicas = {f"replica-{i}" for i in range(1, len(cfg.replica_ports) + 1)}
    exported = _cli(profile.env, "env", timeout=60).stdout
    assert all(f"export {k}=" in exported for k in client_environment(cfg))
    other = _register_candidate(profile.bundle.result(timeout=300))
    with Load(cfg) as load:
        load.wait_all_serve(CHAMPIONS.trained, replicas)
        # the bundle is re-checked against its manifest through the MLflow server, under the advisory lock on
        # Airflow's PostgreSQL database; each replica polls @champion every 3 s and swaps in the new version
        promote = _shell(profile, "promote", other, "--reason", "prod profile test")
        assert promote.returncode == 0, promote.stdout + promote.stderr
        load.wait_all_serve(other, replicas)
        rollback = _shell(profile, "rollback", "--reason", "prod profile test: back")
        assert rollback.returncode == 0, rollback.stdout + rollback.stderr
        load.wait_all_serve(CHAMPIONS.trained, replicas)
    assert _champion(cfg) == CHAMPIONS.trained
    load.check(cfg)
    served = Counter((replica, version) for _, replica, version in load.answers)
    assert {(r, v) for r in replicas for v in (CHAMPIONS.trained, other)} <= set(served), served
    print(
        f"promote + rollback under load: {len(load.answers)} answers, 0 failed, {load.retried} resent: {dict(served)}"
    )
    with httpx.Client(base_url=cfg.lb_url, timeout=30) as http:
        assert http.post("/v1/search", json={"query": "drill"}).status_code == 401  # production: a key is required


def _pid(p: Profile, program: str) -> int:
    return int(_status(p)[program]["pid"])


def _kill_tree(pid: int) -> None:
    """SIGKILL a program and everything it started, as a lost host would (no warm shutdown, no cleanup)."""
    import psutil

    parent = psutil.Process(pid)
    for proc in [parent, *parent.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def _supervisorctl(p: Profile, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(p.cfg.supervisor_conf), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return proc.stdout + proc.stderr


def test_a_replica_killed_under_load_costs_no_request(profile: Profile) -> None:
    cfg = profile.cfg
    before = _pid(profile, "replica-1")
    with Load(cfg) as load:
        time.sleep(2)
        _kill_tree(before)
        # supervisord starts it again; it loads @champion from its cache and haproxy's check puts it back
        deadline = time.monotonic() + 90
        while not (_pid(profile, "replica-1") not in {0, before} and _stats(cfg)["replica-1"]["status"] == "UP"):
            assert time.monotonic() < deadline, _stats(cfg)
            time.sleep(1)
        load.wait_all_serve(CHAMPIONS.trained, {"replica-1", "replica-2"})
    load.check(cfg)
    print(f"replica-1 killed under load: {len(load.answers)} answers, 0 failed, {load.retried} resent")


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200
    except httpx.ConnectError:
        return False


def test_with_mlflow_down_a_restarted_replica_serves_the_cached_champion(profile: Profile) -> None:
    cfg = profile.cfg
    try:
        assert "stopped" in _supervisorctl(profile, "stop", "mlflow")
        assert httpx.get(f"{cfg.mlflow_url}/health", timeout=5).status_code != 200
    except httpx.ConnectError:
        pass  # refused: down, as wanted
    try:
        assert "started" in _supervisorctl(profile, "restart", "replica-2")
        port = cfg.replica_ports[1]
        # uvicorn binds its port after the app's start-up (the model from the cache, once the registry is given up)
        deadline = time.monotonic() + 90
        while not _ready(port):
            assert time.monotonic() < deadline, (cfg.logs / "replica-2.log").read_text()[-3000:]
            time.sleep(1)
        key = read_env_file(cfg.secrets_file)["SHOPGUIDE_API_KEYS"]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/search", json={"query": "drill"}, headers={"X-API-Key": key})
        assert r.status_code == 200 and r.json()["model_version"] == CHAMPIONS.trained, r.text
    finally:
        _supervisorctl(profile, "start", "mlflow")
    deadline = time.monotonic() + 60
    while not _status(profile)["mlflow"]["healthy"]:
        assert time.monotonic() < deadline, _status(profile)["mlflow"]


def _stop_redis(port: int) -> None:
    import redis

    with contextlib.suppress(redis.ConnectionError):
        redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=2).shutdown(nosave=True)


def test_with_the_online_store_down_answers_are_anonymous_and_say_so(profile: Profile, redis_server) -> None:
    cfg = profile.cfg
    _, port = cfg.redis_server("FEAST_")
    key = {"X-API-Key": read_env_file(cfg.secrets_file)["SHOPGUIDE_API_KEYS"]}
    with httpx.Client(base_url=cfg.lb_url, timeout=30, headers=key) as http:
        # a simulated user whose history the features DAG materialized into the online store
        bodies = ({"query": "cordless drill", "k": 5, "user_id": user} for user in range(1, 31))
        body = next((b for b in bodies if http.post("/v1/search", json=b).json()["personalized"]), None)
        assert body is not None, "no simulated user 1-30 is personalised"
        _stop_redis(port)
        try:
            for _ in range(10):  # both replicas
                r = http.post("/v1/search", json=body)
                assert r.status_code == 200, r.text
                assert not r.json()["personalized"] and r.json()["fallback_reason"] == "features_unavailable"
                assert [x["product_id"] for x in r.json()["results"]]
        finally:
            server = redis_server(port, cfg.dir)
        # back: the replicas read the store again (empty now: the user is unknown, not unavailable)
        deadline = time.monotonic() + 30
        while (r := http.post("/v1/search", json=body).json()).get("fallback_reason") == "features_unavailable":
            assert time.monotonic() < deadline, r
            time.sleep(0.5)
    assert server.poll() is None


def test_a_worse_retrain_from_rest_outlives_a_killed_worker_and_loses_its_gate(
    profile: Profile, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = profile.cfg
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.mlflow_url)
    airflow = Airflow(cfg)
    worker = cfg.workers[0]
    # the base model (0 training steps) ranking alone (no BM25 fused in) against the fine-tuned hybrid champion, on
    # the same tiny data: clearly worse (BM25 would lift the 0-step model about as much as the trained one)
    worse = {"max_steps": 0, "lexical_weight": 0.0}
    run = airflow.call("POST", "/dags/shopguide_retrain/dagRuns", json={"logical_date": None, "conf": worse})
    run_id = run["dag_run_id"]
    # kill the worker, and every task process it started, in the middle of a task after the snapshot (decide and
    # snapshot take a second or two: the kill could land after they finished)
    deadline = time.monotonic() + 300
    while not (
        running := [
            t
            for t in airflow.tasks("shopguide_retrain", run_id)
            if t["state"] == "running" and t["task_id"] not in {"decide", "snapshot"}
        ]
    ):
        assert time.monotonic() < deadline, airflow.tasks("shopguide_retrain", run_id)
        time.sleep(0.5)
    killed = running[0]["task_id"]
    _kill_tree(_pid(profile, "airflow-worker-1"))
    state = airflow.wait_run("shopguide_retrain", run_id, 900)
    tasks = {t["task_id"]: t for t in airflow.tasks("shopguide_retrain", run_id)}
    # a lost gate is an outcome, not an error: the run succeeds through the branch that keeps the champion
    assert state == "success", tasks
    # no heartbeat from the dead worker: the scheduler failed the task, which was retried on the restarted worker
    assert (tasks[killed]["state"], tasks[killed]["try_number"]) == ("success", 2), tasks[killed]
    _on_the_worker(list(tasks.values()), worker)
    assert {
        t: tasks[t]["state"] for t in ("gate", "register", "promote_or_keep", "promote", "keep_champion", "conclude")
    } == {
        "gate": "success",
        "register": "success",
        "promote_or_keep": "success",
        "promote": "skipped",
        "keep_champion": "success",
        "conclude": "success",
    }
    assert airflow.xcom("shopguide_retrain", run_id, "conclude")["outcome"] == "not promoted"
    decision = airflow.xcom("shopguide_retrain", run_id, "gate")
    assert not decision["passed"] and decision["champion_version"] == CHAMPIONS.trained, decision
    assert any(r.startswith("FAIL: ndcg_at_10") and "vs champion" in r for r in decision["reasons"]), decision
    # the champion was re-evaluated on this run's snapshot: the paired CI lies below the allowed drop
    assert decision["paired"]["low"] < -0.01 and decision["champion_report"]["ndcg_at_10"] > 0, decision
    assert _champion(cfg) == CHAMPIONS.trained
    # honest precondition: the candidate really is worse on the held-out terms
    report = airflow.xcom("shopguide_retrain", run_id, "evaluate")
    champion_report = airflow.xcom("shopguide_retrain", CHAMPIONS.trained_run, "evaluate")
    assert report["ndcg_at_10"] < champion_report["ndcg_at_10"], (report, champion_report)
    # registered for the record, as the challenger, never promoted
    from pipelines.registry.mlflow_client import CHALLENGER, alias_version, champion_history

    candidate = airflow.xcom("shopguide_retrain", run_id, "register")["version"]
    assert int(candidate) > int(CHAMPIONS.trained)
    assert alias_version(cfg.paths, MODEL_NAME, CHALLENGER) == candidate
    client = registry_client(cfg)
    tags = client.get_model_version(MODEL_NAME, candidate).tags
    assert tags["gate_passed"] == "false" and "FAIL: ndcg_at_10" in tags["gate_reasons"]
    assert client.get_run(tags["mlflow_run_id"]).data.tags["outcome"] == "not promoted"
    assert champion_history(cfg.paths, MODEL_NAME)[-1]["version"] == CHAMPIONS.trained
    print(f"worse retrain: {killed} killed with its worker, retried (try 2), gate lost, not promoted, champion kept")


@dataclass(frozen=True)
class Bundle:
    home: Path
    path: Path
    lineage: dict[str, str]


def _build_champion_bundle(home: Path) -> Bundle:
    """A real bundle (base MiniLM, 0 training steps, small catalog) built with the pipeline's own functions, as
    tests/integration/conftest.py builds its champion (~30 s of CPU, so it is built while the profile comes up)."""
    from pipelines.config import DataConfig, EvaluateConfig, TrainConfig
    from pipelines.data.dataset import snapshot_data
    from pipelines.steps.bundle import build_bundle

    work = Paths(home).run_dir(CHAMPION_RUN_KEY)
    as_of = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
    snapshot = snapshot_data(DataConfig(max_terms=60, max_offers=400, event_users=10), work / "snapshot", as_of)
    train = TrainConfig(max_steps=0, head_max_offers=200, head_epochs=3)
    evaluation = EvaluateConfig(max_category_offers=100, latency_queries=10)
    lineage = {"snapshot_hash": snapshot.hash, "run_key": CHAMPION_RUN_KEY}
    bundle, _ = build_bundle(snapshot.path, work, train, 4, evaluation, "prod test fixture", lineage)
    return Bundle(home, bundle, lineage)


def _register_candidate(bundle: Bundle) -> str:
    """Register the bundle on the MLflow server MLFLOW_TRACKING_URI names, as the retrain DAG's register step does
    for a candidate that passed its gate (tag gate_passed=true)."""
    from pipelines.registry.mlflow_client import end_run, register_bundle, start_run

    paths = Paths(bundle.home)
    run_id = start_run(paths, CHAMPION_RUN_KEY, bundle.lineage)
    tags = {**bundle.lineage, "gate_passed": "true"}
    version = register_bundle(paths, run_id, bundle.path, MODEL_NAME, CHAMPION_RUN_KEY, tags)
    end_run(paths, run_id)
    return version


def test_down_leaves_no_process_behind(profile: Profile) -> None:
    import psutil

    pid = int(profile.cfg.supervisor_pidfile.read_text())
    tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    assert len(tree) > len(PROGRAMS)
    started = time.monotonic()
    proc = _cli(profile.env, "down", timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
    for what, port in profile.cfg.ports().items():
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"{what} still listening on {port}"
    assert _cli(profile.env, "status").returncode == 3
    print(f"prod down: {time.monotonic() - started:.0f} s")
