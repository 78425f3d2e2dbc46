"""The production profile for real: `shopguide prod up` from empty databases of its own, every program healthy, the
REST API, MLflow and the balancer answering, a champion reaching both replicas through haproxy, then `down`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
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
from pipelines.prod import DATABASES, ProdConfig, admin_token, client_environment, purge, read_env_file

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
def profile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Profile]:
    """The profile up from empty databases named for this run, on free ports and empty Redis databases; afterwards
    stopped, its databases dropped and its Redis databases flushed."""
    _require_services()
    run = uuid.uuid4().hex[:8]
    ports = _free_ports(7)
    celery_db, feast_db = _empty_redis_dbs(2)
    overrides = {
        "SHOPGUIDE_HOME": str(tmp_path_factory.mktemp("prod")),
        "SHOPGUIDE_PG_HOST": "127.0.0.1",
        "SHOPGUIDE_PG_PORT": "5432",
        "SHOPGUIDE_PG_DB_PREFIX": f"sgtest_{run}_",
        "SHOPGUIDE_REDIS_HOST": "127.0.0.1",
        "SHOPGUIDE_REDIS_PORT": "6379",
        "SHOPGUIDE_CELERY_REDIS_DB": str(celery_db),
        "SHOPGUIDE_FEAST_REDIS_DB": str(feast_db),
        "SHOPGUIDE_AIRFLOW_PORT": str(ports[0]),
        "SHOPGUIDE_MLFLOW_PORT": str(ports[1]),
        "SHOPGUIDE_LB_PORT": str(ports[2]),
        "SHOPGUIDE_LB_STATS_PORT": str(ports[3]),
        "SHOPGUIDE_REPLICA_PORTS": f"{ports[4]},{ports[5]}",
        "SHOPGUIDE_WORKER_LOG_PORT": str(ports[6]),
        "SHOPGUIDE_CELERY_WORKERS": "1",
        "SHOPGUIDE_ARTIFACTS_DESTINATION": "",
        # a replica notices a new @champion within seconds
        "SHOPGUIDE_MODEL_POLL_SECONDS": "3",
    }
    env = {**os.environ, **overrides}
    cfg = ProdConfig.load(Paths(Path(overrides["SHOPGUIDE_HOME"])), env)
    names = {cfg.database(n) for n in DATABASES}
    assert not names & _existing_databases(cfg), "this run's database names are taken"
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
        self.http = httpx.Client(
            base_url=f"{cfg.airflow_url}/api/v2", headers={"Authorization": f"Bearer {admin_token(cfg)}"}, timeout=30
        )

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


def test_features_dag_runs_on_the_celery_worker_and_its_asset_schedules_retrain(profile: Profile) -> None:
    airflow = Airflow(profile.cfg)
    worker = profile.cfg.workers[0]
    started = time.monotonic()
    run = airflow.call(
        "POST", "/dags/shopguide_features/dagRuns", json={"logical_date": None, "conf": {"profile": "tiny"}}
    )
    for dag_id in ("shopguide_features", "shopguide_retrain"):
        airflow.call("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
    deadline = time.monotonic() + 180
    while True:
        airflow.stop_scheduled_runs()
        state = airflow.call("GET", f"/dags/shopguide_features/dagRuns/{run['dag_run_id']}")["state"]
        if state in {"success", "failed"}:
            break
        assert time.monotonic() < deadline, airflow.tasks("shopguide_features", run["dag_run_id"])
        # often: a catch-up run failed before its queued tasks start costs the worker almost nothing
        time.sleep(0.5)
    tasks = airflow.tasks("shopguide_features", run["dag_run_id"])
    assert state == "success", tasks
    # every task ran on the Celery worker (its name is what task instances record as their hostname), none locally
    assert {(t["task_id"], t["state"], t["hostname"], t["queue"]) for t in tasks} == {
        (t["task_id"], "success", worker, "default") for t in tasks
    }
    features_seconds = time.monotonic() - started
    # materialize emitted the Asset shopguide_user_events: the scheduler itself creates the retrain run
    deadline = time.monotonic() + 60
    while not (triggered := [r for r in airflow.runs("shopguide_retrain") if r["run_type"] == "asset_triggered"]):
        assert time.monotonic() < deadline, airflow.runs("shopguide_retrain")
        airflow.stop_scheduled_runs()
        time.sleep(2)
    (retrain,) = triggered
    assert retrain["triggered_by"] == "asset"
    # it would now train on the default profile (an asset-triggered run has no conf): stop it, and both schedules
    for dag_id in ("shopguide_features", "shopguide_retrain"):
        airflow.call("PATCH", f"/dags/{dag_id}", json={"is_paused": True})
    airflow.call("PATCH", f"/dags/shopguide_retrain/dagRuns/{retrain['dag_run_id']}", json={"state": "failed"})
    airflow.stop_scheduled_runs()
    print(f"features DAG (tiny) on Celery: {features_seconds:.0f} s from trigger to success; retrain asset-triggered")


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


def test_a_champion_reaches_both_replicas_through_the_balancer(
    profile: Profile, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = profile.cfg
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.mlflow_url)
    version = _register_candidate(profile.bundle.result(timeout=300))
    # promoted by a user's shell pointed at the profile (`eval "$(shopguide prod env)"`): the bundle is re-checked
    # against its manifest through the MLflow server, under the advisory lock on Airflow's PostgreSQL database
    client_env = {**profile.env, **client_environment(cfg)}
    exported = _cli(profile.env, "env", timeout=60).stdout
    assert all(f"export {k}=" in exported for k in client_environment(cfg))
    promote = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "promote", version, "--reason", "prod profile test"],
        env=client_env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert promote.returncode == 0, promote.stdout + promote.stderr
    # each replica polls @champion every 3 s, downloads the bundle through the MLflow server, and haproxy's next
    # check (every 2 s) puts it in
    deadline = time.monotonic() + 90
    while not all(s["status"] == "UP" for s in _stats(cfg).values()):
        assert time.monotonic() < deadline, _stats(cfg)
        time.sleep(1)
    api_key = read_env_file(cfg.secrets_file)["SHOPGUIDE_API_KEYS"]
    with httpx.Client(base_url=cfg.lb_url, timeout=30) as http:
        assert http.post("/v1/search", json={"query": "drill"}).status_code == 401  # production: a key is required
        served = Counter()
        for _ in range(20):
            r = http.post("/v1/search", json={"query": "cordless drill", "k": 3}, headers={"X-API-Key": api_key})
            assert r.status_code == 200, r.text
            assert r.json()["model_version"] == version
            served[r.headers["X-Shopguide-Replica"]] += 1
    assert set(served) == {"replica-1", "replica-2"}, served


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
