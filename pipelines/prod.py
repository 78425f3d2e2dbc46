"""The production profile as real processes on this machine, kept by supervisord: `shopguide prod up|status|down|logs`.

Airflow (api-server, scheduler, dag-processor, Celery workers) on PostgreSQL with a Redis broker, an MLflow tracking
server on PostgreSQL that serves artifacts, Feast with its SQL registry on PostgreSQL and the Redis online store, and
service replicas behind haproxy. Addresses live in docker/prod.env, secrets are generated once into
$SHOPGUIDE_HOME/prod/secrets.env, and every file the processes need is rendered under $SHOPGUIDE_HOME/prod/.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
import xmlrpc.client
from base64 import urlsafe_b64encode
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pipelines.airflow_env import airflow_environ
from pipelines.config import CONFIG_DIR, REPO_ROOT, Paths

ENV_FILE = REPO_ROOT / "docker" / "prod.env"
ADMIN_USER = "admin"
DATABASES = ("airflow", "mlflow", "feast")
# Where DAG tasks hand each other folders: the MLflow server's own artifact store (pipelines/registry/handoff.py).
RUN_STORE = "mlflow-artifacts:/runs"
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# AF_UNIX socket paths are limited to 108 bytes (sun_path) on Linux.
_MAX_SOCKET_PATH = 100
# Generated once, shared by every process: Airflow signs its API and Execution API tokens with the JWT secret (a
# worker whose secret differed could not report task state), the Fernet key encrypts connections and variables.
_SECRETS: dict[str, Callable[[], str]] = {
    "AIRFLOW__API_AUTH__JWT_SECRET": lambda: secrets.token_urlsafe(48),
    "AIRFLOW__API__SECRET_KEY": lambda: secrets.token_urlsafe(32),
    "AIRFLOW__CORE__FERNET_KEY": lambda: urlsafe_b64encode(secrets.token_bytes(32)).decode(),
    "SHOPGUIDE_API_KEYS": lambda: secrets.token_urlsafe(32),
    "SHOPGUIDE_ADMIN_PASSWORD": lambda: secrets.token_urlsafe(18),
}


class ProdError(RuntimeError):
    """The profile cannot be brought up, reached or stopped; the message says why and what to do."""


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (the subset of the docker compose env-file format prod.env uses): '#' comments, no quotes."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ProdError(f"{path}:{number}: expected KEY=VALUE, got {raw!r}")
        values[key.strip()] = value.strip()
    return values


@dataclass(frozen=True)
class ProdConfig:
    """docker/prod.env with the environment's values of the same names, and the files under $SHOPGUIDE_HOME/prod."""

    paths: Paths
    values: Mapping[str, str]

    @classmethod
    def load(
        cls, paths: Paths | None = None, environ: Mapping[str, str] | None = None, env_file: Path = ENV_FILE
    ) -> ProdConfig:
        environ = os.environ if environ is None else environ
        return cls(paths or Paths.from_env(), {k: environ.get(k, v) for k, v in read_env_file(env_file).items()})

    def get(self, key: str) -> str:
        try:
            return self.values[key]
        except KeyError:
            raise ProdError(f"{key} is missing from {ENV_FILE}") from None

    def number(self, key: str) -> int:
        try:
            return int(self.get(key))
        except ValueError:
            raise ProdError(f"{key}={self.get(key)!r} is not a number") from None

    # Files and folders, all under $SHOPGUIDE_HOME/prod.
    @property
    def dir(self) -> Path:
        return self.paths.home / "prod"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def airflow_home(self) -> Path:
        return self.dir / "airflow"

    @property
    def scratch(self) -> Path:
        return self.dir / "scratch"

    @property
    def secrets_file(self) -> Path:
        return self.dir / "secrets.env"

    @property
    def passwords_file(self) -> Path:
        return self.dir / "airflow-passwords.json"

    @property
    def supervisor_conf(self) -> Path:
        return self.dir / "supervisord.conf"

    @property
    def supervisor_socket(self) -> Path:
        return self.dir / "supervisor.sock"

    @property
    def supervisor_pidfile(self) -> Path:
        return self.dir / "supervisord.pid"

    @property
    def fingerprint_file(self) -> Path:
        return self.dir / "running.json"

    @property
    def haproxy_cfg(self) -> Path:
        return self.dir / "haproxy.cfg"

    @property
    def artifacts_destination(self) -> str:
        return self.get("SHOPGUIDE_ARTIFACTS_DESTINATION") or str(self.dir / "mlflow-artifacts")

    @property
    def log_store(self) -> str:
        """Where the replicas' request and event logs roll their parts (pipelines/runtime/logfolder.py): a folder
        beside the artifacts, not the replicas' own log folders, on one host; object storage on several."""
        return self.get("SHOPGUIDE_LOG_STORE") or f"file://{self.dir / 'log-store'}"

    # Addresses.
    def database(self, name: str) -> str:
        db = f"{self.get('SHOPGUIDE_PG_DB_PREFIX')}{name}"
        if not _DB_NAME.match(db):
            raise ProdError(f"database name {db!r}: SHOPGUIDE_PG_DB_PREFIX must give [a-z_][a-z0-9_]*, at most 63")
        return db

    def pg_url(self, name: str, driver: str = "psycopg2") -> str:
        user, password = quote(self.get("SHOPGUIDE_PG_USER"), safe=""), self.get("SHOPGUIDE_PG_PASSWORD")
        auth = f"{user}:{quote(password, safe='')}" if password else user
        host, port = self.get("SHOPGUIDE_PG_HOST"), self.get("SHOPGUIDE_PG_PORT")
        return f"postgresql+{driver}://{auth}@{host}:{port}/{self.database(name)}"

    def redis_server(self, role: str = "") -> tuple[str, int]:
        """(host, port) of the broker's Redis (role "") or the online store's ("FEAST_"; the broker's by default)."""
        host = self.get(f"SHOPGUIDE_{role}REDIS_HOST") or self.get("SHOPGUIDE_REDIS_HOST")
        port = self.get(f"SHOPGUIDE_{role}REDIS_PORT") or self.get("SHOPGUIDE_REDIS_PORT")
        if not port.isdigit():
            raise ProdError(f"SHOPGUIDE_{role}REDIS_PORT={port!r} is not a number")
        return host, int(port)

    def redis_url(self, db_key: str) -> str:
        host, port = self.redis_server()
        return f"redis://{host}:{port}/{self.number(db_key)}"

    def _loopback(self, port_key: str, path: str = "") -> str:
        return f"http://127.0.0.1:{self.number(port_key)}{path}"

    @property
    def airflow_url(self) -> str:
        return self._loopback("SHOPGUIDE_AIRFLOW_PORT")

    @property
    def mlflow_url(self) -> str:
        return self._loopback("SHOPGUIDE_MLFLOW_PORT")

    @property
    def lb_url(self) -> str:
        return self._loopback("SHOPGUIDE_LB_PORT")

    @property
    def stats_url(self) -> str:
        return self._loopback("SHOPGUIDE_LB_STATS_PORT", "/stats")

    @property
    def replica_ports(self) -> list[int]:
        try:
            ports = [int(p) for p in self.get("SHOPGUIDE_REPLICA_PORTS").split(",") if p.strip()]
        except ValueError:
            given = self.get("SHOPGUIDE_REPLICA_PORTS")
            raise ProdError(f"SHOPGUIDE_REPLICA_PORTS={given!r}: expected ports, comma-separated") from None
        if not ports:
            raise ProdError("SHOPGUIDE_REPLICA_PORTS names no port")
        return ports

    @property
    def profile(self) -> str:
        """SHOPGUIDE_PROFILE, checked here: the DAG files refuse to load with an unknown one, which shows only in
        Airflow's import errors."""
        name = self.get("SHOPGUIDE_PROFILE")
        if not (CONFIG_DIR / f"{name}.yaml").is_file():
            known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
            raise ProdError(f"SHOPGUIDE_PROFILE={name!r} is not one of configs/*.yaml: {known}")
        return name

    @property
    def workers(self) -> list[str]:
        """The Celery workers' names (`--celery-hostname`), distinct per worker and per host."""
        host = socket.gethostname()
        return [f"shopguide-worker-{i}@{host}" for i in range(1, self.number("SHOPGUIDE_CELERY_WORKERS") + 1)]

    def ports(self) -> dict[str, int]:
        """Every port the profile listens on, by what listens."""
        ports = {
            "airflow api-server": self.number("SHOPGUIDE_AIRFLOW_PORT"),
            "mlflow": self.number("SHOPGUIDE_MLFLOW_PORT"),
            "haproxy": self.number("SHOPGUIDE_LB_PORT"),
            "haproxy stats": self.number("SHOPGUIDE_LB_STATS_PORT"),
        }
        for i, port in enumerate(self.replica_ports, 1):
            ports[f"replica-{i}"] = port
        for i in range(1, len(self.workers) + 1):
            ports[f"airflow-worker-{i} logs"] = self.number("SHOPGUIDE_WORKER_LOG_PORT") + i - 1
        return ports


def ensure_secrets(cfg: ProdConfig) -> dict[str, str]:
    """secrets.env (mode 600): generated on the first `up`, read back afterwards; keys added later are generated then.
    Also writes the simple auth manager's passwords file from it (mode 600), so the admin password is the one here."""
    cfg.dir.mkdir(parents=True, exist_ok=True)
    found = read_env_file(cfg.secrets_file) if cfg.secrets_file.exists() else {}
    missing = {key: make() for key, make in _SECRETS.items() if not found.get(key)}
    values = {**found, **missing}
    if missing:
        text = "# Generated once by `shopguide prod up`; shared by every process of the profile. Keep it private.\n"
        _write_private(cfg.secrets_file, text + "".join(f"{k}={v}\n" for k, v in values.items()))
    os.chmod(cfg.secrets_file, 0o600)  # a copy restored with looser permissions is tightened
    _write_private(cfg.passwords_file, json.dumps({ADMIN_USER: values["SHOPGUIDE_ADMIN_PASSWORD"]}) + "\n")
    return values


def _write_private(path: Path, text: str) -> None:
    """Write `path` atomically, readable by its owner only from the first byte on."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def environment(cfg: ProdConfig, secret: Mapping[str, str], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables every process of the profile gets (over `base`, default os.environ): the embedded Airflow's
    (DAG folder, PYTHONPATH, offline defaults) turned into the production one, plus the stores' addresses."""
    base = os.environ if base is None else base
    api_port = cfg.number("SHOPGUIDE_AIRFLOW_PORT")
    env = airflow_environ(cfg.paths, api_port=api_port, base=base)
    env.update({k: v for k, v in secret.items() if k.startswith("AIRFLOW__")})
    env.update(
        {
            "AIRFLOW_HOME": str(cfg.airflow_home),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": cfg.pg_url("airflow"),
            # Airflow 3 also opens an asyncio engine on the metadata DB; derived URLs would keep psycopg2
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": cfg.pg_url("airflow", "asyncpg"),
            "AIRFLOW__CELERY__BROKER_URL": cfg.redis_url("SHOPGUIDE_CELERY_REDIS_DB"),
            # the driver named: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which is not installed
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + cfg.pg_url("airflow"),
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(cfg.number("SHOPGUIDE_CELERY_CONCURRENCY")),
            # the steps' libraries imported once per worker, not once per task (pipelines/celery_config.py)
            "AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS": "pipelines.celery_config.CELERY_CONFIG",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(cfg.number("SHOPGUIDE_TASK_HEARTBEAT_TIMEOUT")),
            "SHOPGUIDE_PROFILE": cfg.profile,
            # Logins for the UI and the REST API (POST /auth/token); the embedded profile's "everyone is admin" is off.
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(cfg.passwords_file),
            "AIRFLOW__API__WORKERS": str(cfg.number("SHOPGUIDE_AIRFLOW_API_WORKERS")),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{cfg.airflow_url}/execution/",
            "MLFLOW_TRACKING_URI": cfg.mlflow_url,
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            "SHOPGUIDE_RUN_STORE": RUN_STORE,
            "SHOPGUIDE_SCRATCH": str(cfg.scratch),
            # the replicas roll their logs' parts into it; the features, retrain and monitor tasks read it
            "SHOPGUIDE_LOG_STORE": cfg.log_store,
            "SHOPGUIDE_FEAST_ONLINE_STORE": "redis",
            "SHOPGUIDE_REDIS": "{}:{},db={}".format(
                *cfg.redis_server("FEAST_"), cfg.number("SHOPGUIDE_FEAST_REDIS_DB")
            ),
            "SHOPGUIDE_FEAST_REGISTRY": cfg.pg_url("feast"),
            # the offline feature tables too: a worker on another host reads what the materialize task wrote
            "SHOPGUIDE_FEAST_OFFLINE": cfg.pg_url("feast"),
            # @champion moves hold an advisory lock on Airflow's DB, which every worker and the CLI reach
            "SHOPGUIDE_LOCK_URL": cfg.pg_url("airflow"),
            "SHOPGUIDE_DEPLOYMENT": "production",
            "SHOPGUIDE_API_KEYS": secret["SHOPGUIDE_API_KEYS"],
            "SHOPGUIDE_MODEL_POLL_SECONDS": str(cfg.number("SHOPGUIDE_MODEL_POLL_SECONDS")),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@dataclass(frozen=True)
class Program:
    """One supervised process: its command, start priority and the variables it alone gets."""

    name: str
    command: list[str]
    priority: int
    env: dict[str, str] = field(default_factory=dict)
    stop_seconds: int = 20


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin:/sbin")
    if not found:
        raise ProdError("haproxy is not installed: apt-get install -y haproxy (Debian's package)")
    return found


def programs(cfg: ProdConfig) -> list[Program]:
    """The profile's processes, in start order (supervisord starts them all; each retries until what it needs is up)."""
    py = sys.executable
    airflow = [py, "-m", "airflow"]
    found = [
        Program(
            "mlflow",
            [py, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(cfg.number("SHOPGUIDE_MLFLOW_PORT"))]
            + ["--workers", str(cfg.number("SHOPGUIDE_MLFLOW_WORKERS"))]
            + ["--backend-store-uri", cfg.pg_url("mlflow"), "--serve-artifacts"]
            + ["--artifacts-destination", cfg.artifacts_destination],
            10,
            # its job runner (huey consumers, ~7 processes) serves GenAI features this project does not use
            {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        ),
        Program(
            "airflow-api-server",
            [*airflow, "api-server", "--host", "127.0.0.1", "--port", str(cfg.number("SHOPGUIDE_AIRFLOW_PORT"))],
            20,
        ),
        Program("airflow-scheduler", [*airflow, "scheduler"], 30),
        Program("airflow-dag-processor", [*airflow, "dag-processor"], 30),
    ]
    concurrency = str(cfg.number("SHOPGUIDE_CELERY_CONCURRENCY"))
    for i, worker in enumerate(cfg.workers, 1):
        found.append(
            Program(
                f"airflow-worker-{i}",
                [*airflow, "celery", "worker", "--concurrency", concurrency, "--celery-hostname", worker],
                40,
                # each worker's log server on its own port; task instances record this worker as their hostname
                {
                    "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(cfg.number("SHOPGUIDE_WORKER_LOG_PORT") + i - 1),
                    "AIRFLOW__CORE__HOSTNAME_CALLABLE": "pipelines.prod.worker_hostname",
                    "SHOPGUIDE_WORKER_HOSTNAME": worker,
                },
                # a warm shutdown lets running tasks finish; past this the task is killed and retried later
                stop_seconds=60,
            )
        )
    for i, port in enumerate(cfg.replica_ports, 1):
        found.append(
            Program(
                f"replica-{i}",
                [py, "-m", "uvicorn", "serving.app:app", "--host", "127.0.0.1", "--port", str(port)]
                + ["--log-level", "warning"],
                50,
            )
        )
    found.append(Program("haproxy", [haproxy_binary(), "-db", "-f", str(cfg.haproxy_cfg)], 60, stop_seconds=10))
    return found


def worker_hostname() -> str:
    """Airflow's hostname_callable on the profile's Celery workers: the worker's own name, so that task instances say
    which worker ran them even when several run on one host."""
    return os.environ.get("SHOPGUIDE_WORKER_HOSTNAME") or socket.getfqdn()


def _supervisor_value(text: str) -> str:
    return text.replace("%", "%%")  # supervisord expands %(name)s in its values


def render_supervisord(cfg: ProdConfig, progs: list[Program]) -> str:
    """supervisord.conf: a private unix socket, logs under prod/logs, every program restarted when it dies and stopped
    with its whole process group (Airflow, MLflow and uvicorn start children of their own)."""
    lines = [
        "; Rendered by `shopguide prod up` (pipelines/prod.py); edits are overwritten.",
        "[unix_http_server]",
        f"file={cfg.supervisor_socket}",
        "chmod=0700",
        "[supervisord]",
        f"logfile={cfg.logs / 'supervisord.log'}",
        f"pidfile={cfg.supervisor_pidfile}",
        f"childlogdir={cfg.logs}",
        f"directory={REPO_ROOT}",
        "identifier=shopguide-prod",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "[supervisorctl]",
        f"serverurl=unix://{cfg.supervisor_socket}",
    ]
    for p in progs:
        lines += [
            f"[program:{p.name}]",
            f"command={_supervisor_value(shlex.join(p.command))}",
            f"directory={REPO_ROOT}",
            f"priority={p.priority}",
            "autostart=true",
            "autorestart=true",
            "startsecs=5",
            "startretries=20",
            "stopasgroup=true",
            "killasgroup=true",
            f"stopwaitsecs={p.stop_seconds}",
            "redirect_stderr=true",
            f"stdout_logfile={cfg.logs / (p.name + '.log')}",
            "stdout_logfile_maxbytes=20MB",
            "stdout_logfile_backups=3",
        ]
        if p.env:
            pairs = ",".join(f'{k}="{_supervisor_value(v)}"' for k, v in p.env.items())
            lines.append(f"environment={pairs}")
    return "\n".join(lines) + "\n"


def render_haproxy(cfg: ProdConfig) -> str:
    """haproxy.cfg: least connections over the replicas, each checked on /readyz (a replica without a model is taken
    out), the serving replica named in a response header, and a statistics page."""
    servers = [
        f"    server replica-{i} 127.0.0.1:{port} check inter 2s fall 2 rise 1"
        for i, port in enumerate(cfg.replica_ports, 1)
    ]
    return "\n".join(
        [
            "# Rendered by `shopguide prod up` (pipelines/prod.py); edits are overwritten.",
            "global",
            "    log stdout format raw local0",
            "    maxconn 4096",
            "defaults",
            "    mode http",
            "    log global",
            "    option httplog",
            "    timeout connect 2s",
            "    timeout client 60s",
            "    timeout server 60s",
            # A request whose replica died on the way (refused, reset, no answer) is sent again to another replica:
            # every call of the service is a read or an idempotent write, so a replayed request is safe. The
            # request is kept in the buffer for that (bodies up to tune.bufsize, 16 kB; the service caps at 64 kB).
            "    retries 2",
            "    option redispatch 1",
            "    retry-on all-retryable-errors",
            "frontend shopguide",
            f"    bind 127.0.0.1:{cfg.number('SHOPGUIDE_LB_PORT')}",
            # no replica ready (none has a model yet, or all are down): the balancer answers, in the service's format
            "    http-request return status 503 content-type application/json hdr Retry-After 10 "
            'string \'{"detail":"no service replica is ready (no @champion loaded yet, or all replicas down)"}\' '
            "if { nbsrv(replicas) eq 0 }",
            "    default_backend replicas",
            "backend replicas",
            "    balance leastconn",
            "    option httpchk",
            "    http-check send meth GET uri /readyz",
            "    http-check expect status 200",
            "    http-response set-header X-Shopguide-Replica %[srv_name]",
            *servers,
            "frontend stats",
            f"    bind 127.0.0.1:{cfg.number('SHOPGUIDE_LB_STATS_PORT')}",
            "    stats enable",
            "    stats uri /stats",
            "    stats refresh 5s",
            "",
        ]
    )


# Databases, migrations, Feast.


def _pg_connect(cfg: ProdConfig, dbname: str = "postgres") -> Any:
    import psycopg2

    try:
        conn = psycopg2.connect(
            host=cfg.get("SHOPGUIDE_PG_HOST"),
            port=cfg.number("SHOPGUIDE_PG_PORT"),
            user=cfg.get("SHOPGUIDE_PG_USER"),
            password=cfg.get("SHOPGUIDE_PG_PASSWORD") or None,
            dbname=dbname,
            connect_timeout=5,
        )
    except psycopg2.OperationalError as err:
        raise ProdError(f"PostgreSQL at {cfg.get('SHOPGUIDE_PG_HOST')}:{cfg.get('SHOPGUIDE_PG_PORT')}: {err}") from err
    conn.autocommit = True  # CREATE / DROP DATABASE cannot run inside a transaction
    return conn


def create_databases(cfg: ProdConfig) -> list[str]:
    """Create the profile's databases that do not exist yet; returns the ones created."""
    from psycopg2 import sql

    created = []
    conn = _pg_connect(cfg)
    try:
        with conn.cursor() as cur:
            for name in DATABASES:
                db = cfg.database(name)
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
                if cur.fetchone() is None:
                    cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
                    created.append(db)
    finally:
        conn.close()
    return created


def purge(cfg: ProdConfig) -> None:
    """Drop the profile's databases and flush its two Redis databases: for tests and a reset of a stopped profile.
    Touches nothing else on the servers."""
    import redis
    from psycopg2 import sql

    if is_running(cfg):
        raise ProdError("the profile is running: `shopguide prod down` first")
    conn = _pg_connect(cfg)
    try:
        with conn.cursor() as cur:
            for name in DATABASES:
                # FORCE: a connection a killed process left half-open must not keep the database alive
                stmt = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(cfg.database(name)))
                cur.execute(stmt)
    finally:
        conn.close()
    for role, key in (("", "SHOPGUIDE_CELERY_REDIS_DB"), ("FEAST_", "SHOPGUIDE_FEAST_REDIS_DB")):
        host, port = cfg.redis_server(role)
        client = redis.Redis(host=host, port=port, db=cfg.number(key), socket_connect_timeout=5)
        try:
            client.flushdb()
        except redis.ConnectionError:
            pass  # a server that is gone holds nothing of this profile's
        finally:
            client.close()


@contextlib.contextmanager
def _environ(env: Mapping[str, str]) -> Iterator[None]:
    """os.environ with `env` over it for the duration (Feast's apply reads its switches from the environment)."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _run(command: list[str], env: Mapping[str, str], what: str, timeout: float = 600) -> None:
    proc = subprocess.run(
        command, env=dict(env), capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO_ROOT
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise ProdError(f"{what} exited with {proc.returncode}:\n{tail}")


def prepare_stores(cfg: ProdConfig, env: Mapping[str, str], echo: Callable[[str], None]) -> None:
    """Databases created, Airflow's and MLflow's schemas migrated, the Feast repo applied; all idempotent. Airflow's
    migration (the slowest) runs beside the other two."""
    from pipelines.features.store import apply_feature_repo

    created = create_databases(cfg)
    names = ", ".join(cfg.database(n) for n in DATABASES)
    echo(f"databases {names}: " + (f"created {', '.join(created)}" if created else "all there"))
    cfg.airflow_home.mkdir(parents=True, exist_ok=True)
    migrate = subprocess.Popen(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO_ROOT,
    )
    try:
        _run([sys.executable, "-m", "mlflow", "db", "upgrade", cfg.pg_url("mlflow")], env, "mlflow db upgrade")
        echo("mlflow: backend store schema up to date")
        with _environ(env):
            applied = apply_feature_repo(cfg.paths)
        echo(f"feast apply: {len(applied)} objects in the SQL registry {cfg.database('feast')}, online store Redis")
        output, _ = migrate.communicate(timeout=600)
    except BaseException:
        migrate.kill()
        migrate.wait()
        raise
    if migrate.returncode != 0:
        tail = "\n".join(output.splitlines()[-30:])
        raise ProdError(f"airflow db migrate exited with {migrate.returncode}:\n{tail}")
    echo(f"airflow: metadata DB {cfg.database('airflow')} migrated")


# supervisord.


def _rpc(cfg: ProdConfig) -> Any:
    from supervisor.xmlrpc import SupervisorTransport

    transport = SupervisorTransport(None, None, f"unix://{cfg.supervisor_socket}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


def supervisord_pid(cfg: ProdConfig) -> int | None:
    """The running supervisord of this profile (its pid file names a live process that answers on the socket)."""
    try:
        pid = int(cfg.supervisor_pidfile.read_text().strip())
        os.kill(pid, 0)
        _rpc(cfg).supervisor.getState()
    except (OSError, ValueError, xmlrpc.client.Error):
        return None
    return pid


def is_running(cfg: ProdConfig) -> bool:
    return supervisord_pid(cfg) is not None


def _fingerprint(conf: str, haproxy: str, env: Mapping[str, str]) -> str:
    body = json.dumps({"supervisord": conf, "haproxy": haproxy, "env": dict(sorted(env.items()))})
    return hashlib.sha256(body.encode()).hexdigest()


def _check_ports_free(cfg: ProdConfig) -> None:
    taken = []
    for what, port in cfg.ports().items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # as the servers bind: connections of a stopped profile in TIME_WAIT do not count as the port taken
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                taken.append(f"{what} {port}")
    if taken:
        raise ProdError(f"ports in use: {', '.join(taken)}; free them or change them in {ENV_FILE} / the environment")


def up(cfg: ProdConfig, echo: Callable[[str], None] = print, timeout: float | None = None) -> float:
    """Bring the profile up and wait until every program is healthy; returns the seconds it took. A running profile
    with the same configuration is only checked (and its stopped programs started)."""
    started = time.monotonic()

    def say(message: str) -> None:
        echo(f"[{time.monotonic() - started:5.1f} s] {message}")

    if len(str(cfg.supervisor_socket)) > _MAX_SOCKET_PATH:
        raise ProdError(f"{cfg.supervisor_socket}: path too long for a unix socket; use a shorter SHOPGUIDE_HOME")
    secret = ensure_secrets(cfg)
    env = environment(cfg, secret)
    progs = programs(cfg)
    conf, haproxy = render_supervisord(cfg, progs), render_haproxy(cfg)
    # Only what the profile decides: PATH and the like may differ between two shells without changing anything.
    fingerprint = _fingerprint(conf, haproxy, environment(cfg, secret, base={}))
    if is_running(cfg):
        running = json.loads(cfg.fingerprint_file.read_text()) if cfg.fingerprint_file.exists() else {}
        if running.get("fingerprint") != fingerprint:
            raise ProdError("the profile is running with another configuration: `shopguide prod down`, then `up`")
        say(f"already running (supervisord pid {supervisord_pid(cfg)}): starting any stopped program")
        with contextlib.suppress(xmlrpc.client.Fault):  # ALREADY_STARTED and the like
            _rpc(cfg).supervisor.startAllProcesses(False)
    else:
        _check_ports_free(cfg)
        haproxy_binary()
        prepare_stores(cfg, env, say)
        cfg.logs.mkdir(parents=True, exist_ok=True)
        cfg.scratch.mkdir(parents=True, exist_ok=True)
        if not cfg.artifacts_destination.startswith(("s3://", "gs://", "wasbs://", "hdfs://")):
            Path(cfg.artifacts_destination).mkdir(parents=True, exist_ok=True)
        cfg.haproxy_cfg.write_text(haproxy)
        cfg.supervisor_conf.write_text(conf)
        cfg.fingerprint_file.write_text(json.dumps({"fingerprint": fingerprint}))
        # supervisord passes its own environment to every program: the secrets never go into a file but secrets.env
        proc = subprocess.run(
            [sys.executable, "-m", "supervisor.supervisord", "-c", str(cfg.supervisor_conf)],
            env={**os.environ, **env},
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise ProdError(f"supervisord exited with {proc.returncode}: {(proc.stdout + proc.stderr).strip()}")
        # it daemonizes before it writes its pid file and opens its socket
        answer_by = time.monotonic() + 30
        while not is_running(cfg):
            if time.monotonic() > answer_by:
                raise ProdError(
                    f"supervisord did not answer on {cfg.supervisor_socket}:\n{_log_tail(cfg, 'supervisord')}"
                )
            time.sleep(0.2)
        say(f"supervisord started ({len(progs)} programs); waiting until each is healthy")
    limit = timeout if timeout is not None else cfg.number("SHOPGUIDE_PROD_UP_TIMEOUT")
    wait_healthy(cfg, say, limit - (time.monotonic() - started))
    return time.monotonic() - started


# Health.


@dataclass(frozen=True)
class ProgramStatus:
    name: str
    state: str  # supervisord's: RUNNING, STARTING, BACKOFF, FATAL, STOPPED, ...
    pid: int
    uptime: str
    healthy: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("name", "state", "pid", "uptime", "healthy", "detail")}


def _get(url: str, timeout: float = 3.0) -> Any:
    import httpx

    return httpx.get(url, timeout=timeout)


def _probe(fn: Callable[[], tuple[bool, str]]) -> tuple[bool, str]:
    try:
        return fn()
    except Exception as err:  # a probe that cannot connect is an unhealthy program, not a failed status command
        return False, f"{type(err).__name__}: {err}"[:200]


def _airflow_health(cfg: ProdConfig) -> dict[str, Any]:
    r = _get(f"{cfg.airflow_url}/api/v2/monitor/health")
    r.raise_for_status()
    return dict(r.json())


def _component(health: Mapping[str, Any] | Exception, key: str) -> tuple[bool, str]:
    if isinstance(health, Exception):
        return False, f"api-server not answering /api/v2/monitor/health: {type(health).__name__}: {health}"[:200]
    part = health.get(key) or {}
    status = part.get("status")
    beat = next((v for k, v in part.items() if k.startswith("latest") and v), None)
    return status == "healthy", f"{status}" + (f", heartbeat {beat}" if beat else "")


def _worker_pings(cfg: ProdConfig) -> dict[str, bool]:
    """Which of the profile's Celery workers answer a ping through the broker."""
    from celery import Celery

    app = Celery(broker=cfg.redis_url("SHOPGUIDE_CELERY_REDIS_DB"))
    try:
        replies = app.control.ping(destination=cfg.workers, timeout=1.5)
    finally:
        app.close()
    answered = {name for reply in replies for name in reply}
    return {name: name in answered for name in cfg.workers}


def _haproxy_servers(cfg: ProdConfig) -> dict[str, str]:
    """haproxy's view of each replica: 'UP' or 'DOWN (<last check>)', from its statistics CSV."""
    r = _get(f"{cfg.stats_url};csv")
    r.raise_for_status()
    header, *rows = r.text.lstrip("# ").splitlines()
    cols = header.split(",")
    servers = {}
    for row in rows:
        rec = dict(zip(cols, row.split(","), strict=False))
        if rec.get("pxname") == "replicas" and rec.get("svname", "").startswith("replica-"):
            status = rec.get("status", "")
            check = " ".join(x for x in (rec.get("check_status"), rec.get("check_code")) if x)
            servers[rec["svname"]] = status if status == "UP" else f"{status} ({check})"
    return servers


def health(cfg: ProdConfig) -> dict[str, tuple[bool, str]]:
    """Each program's health from what it answers (not from its process state)."""
    result: dict[str, tuple[bool, str]] = {}

    def mlflow() -> tuple[bool, str]:
        r = _get(f"{cfg.mlflow_url}/health")
        return r.status_code == 200, f"/health {r.status_code} {r.text.strip()[:40]}"

    result["mlflow"] = _probe(mlflow)
    try:
        airflow: dict[str, Any] | Exception = _airflow_health(cfg)
    except Exception as err:  # unhealthy, with the reason: not an absent answer
        airflow = err
    result["airflow-api-server"] = _component(airflow, "metadatabase")
    result["airflow-scheduler"] = _component(airflow, "scheduler")
    result["airflow-dag-processor"] = _component(airflow, "dag_processor")
    try:
        answered, why = _worker_pings(cfg), ""
    except Exception as err:  # the broker down: no worker can be reached
        answered, why = {}, f" (broker: {type(err).__name__}: {err})"[:200]
    for i, worker in enumerate(cfg.workers, 1):
        ok = answered.get(worker, False)
        result[f"airflow-worker-{i}"] = (ok, f"{worker} {'answers' if ok else 'does not answer'} ping{why}")
    for i, port in enumerate(cfg.replica_ports, 1):

        def replica(port: int = port) -> tuple[bool, str]:
            alive = _get(f"http://127.0.0.1:{port}/healthz")
            ready = _get(f"http://127.0.0.1:{port}/readyz")
            body = ready.json()
            if ready.status_code == 200:
                detail = f"ready, model v{body.get('model_version')}"
            else:
                detail = f"alive, not ready: {str(body.get('detail'))[:160]}"
            return alive.status_code == 200, detail

        result[f"replica-{i}"] = _probe(replica)

    def lb() -> tuple[bool, str]:
        servers = _haproxy_servers(cfg)
        return True, ", ".join(f"{k} {v}" for k, v in sorted(servers.items()))

    result["haproxy"] = _probe(lb)
    return result


def _uptime(info: Mapping[str, Any]) -> str:
    if info.get("statename") != "RUNNING":
        return ""
    seconds = int(info.get("now", 0)) - int(info.get("start", 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def status(cfg: ProdConfig) -> list[ProgramStatus]:
    """Each program's supervisord state and health; raises ProdError when the profile is not running."""
    if not is_running(cfg):
        raise ProdError(f"the profile is not running (no supervisord answers on {cfg.supervisor_socket})")
    infos = _rpc(cfg).supervisor.getAllProcessInfo()
    checks = health(cfg)
    out = []
    for info in infos:
        ok, detail = checks.get(info["name"], (False, "no health check"))
        state = info["statename"]
        out.append(
            ProgramStatus(info["name"], state, int(info["pid"]), _uptime(info), ok and state == "RUNNING", detail)
        )
    return out


def _log_tail(cfg: ProdConfig, name: str, lines: int = 15) -> str:
    try:
        return "\n".join((cfg.logs / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_healthy(cfg: ProdConfig, echo: Callable[[str], None] = print, timeout: float = 300) -> list[ProgramStatus]:
    """Poll status() until every program is RUNNING and healthy; a program supervisord gave up on (FATAL) or the
    deadline fails with the tail of the logs of what is not healthy."""
    deadline = time.monotonic() + max(timeout, 1)
    seen: set[str] = set()
    while True:
        current = status(cfg)
        for s in current:
            if s.healthy and s.name not in seen:
                seen.add(s.name)
                echo(f"  {s.name}: healthy ({s.detail})")
        bad = [s for s in current if not s.healthy]
        if not bad:
            return current
        fatal = [s for s in bad if s.state == "FATAL"]
        if fatal or time.monotonic() > deadline:
            why = "gave up on" if fatal else "not healthy in time:"
            report = "\n".join(
                f"--- {s.name} ({s.state}): {s.detail}\n{_log_tail(cfg, s.name)}" for s in (fatal or bad)
            )
            raise ProdError(f"supervisord {why} {', '.join(s.name for s in fatal or bad)}\n{report}")
        time.sleep(2)


def _process_tree(pid: int) -> list[Any]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def down(cfg: ProdConfig, echo: Callable[[str], None] = print, timeout: float = 120) -> bool:
    """Stop every program, then supervisord; False when nothing was running. A process that left its program's group
    (and so outlived supervisord's stop) is terminated too, so that nothing of the profile keeps running."""
    import psutil

    pid = supervisord_pid(cfg)
    if pid is None:
        return False
    tree = _process_tree(pid)
    echo(f"stopping {len(tree) - 1} processes under supervisord pid {pid}")
    with contextlib.suppress(xmlrpc.client.Error, OSError):  # the reply may not come back: the server is exiting
        _rpc(cfg).supervisor.shutdown()
    _gone, alive = psutil.wait_procs(tree, timeout=timeout)
    if alive:
        echo(f"terminating {len(alive)} processes left behind: {[p.pid for p in alive]}")
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=10)
    return True


def log_files(cfg: ProdConfig, program: str | None = None) -> list[Path]:
    names = [p.name for p in programs(cfg)]
    if program is not None and program not in {*names, "supervisord"}:
        raise ProdError(f"no program {program!r}; programs: {', '.join([*names, 'supervisord'])}")
    wanted = [program] if program else [*names, "supervisord"]
    return [cfg.logs / f"{name}.log" for name in wanted if (cfg.logs / f"{name}.log").exists()]


# What a shell needs to act on the profile's stores (`shopguide promote`, `rollback`, `history`): no secret among them.
CLIENT_VARIABLES = (
    "MLFLOW_TRACKING_URI",
    "SHOPGUIDE_LOCK_URL",
    "SHOPGUIDE_RUN_STORE",
    "SHOPGUIDE_FEAST_ONLINE_STORE",
    "SHOPGUIDE_REDIS",
    "SHOPGUIDE_FEAST_REGISTRY",
    # `shopguide features` in that shell reads and writes the offline tables the workers do
    "SHOPGUIDE_FEAST_OFFLINE",
    # and reads the request and event logs the replicas wrote
    "SHOPGUIDE_LOG_STORE",
)


def client_environment(cfg: ProdConfig) -> dict[str, str]:
    """The variables of CLIENT_VARIABLES as the profile's processes have them."""
    env = environment(cfg, dict.fromkeys(_SECRETS, ""), base={})
    return {k: env[k] for k in CLIENT_VARIABLES}


def airflow_api(cfg: ProdConfig) -> Any:
    """An httpx client on Airflow's REST API (`/api/v2`) as the admin user; `.raise_for_status()` is the caller's."""
    import httpx

    headers = {"Authorization": f"Bearer {admin_token(cfg)}"}
    return httpx.Client(base_url=f"{cfg.airflow_url}/api/v2", headers=headers, timeout=30)


def admin_token(cfg: ProdConfig) -> str:
    """A JWT for Airflow's REST API as the admin user (POST /auth/token with the generated password)."""
    import httpx

    password = read_env_file(cfg.secrets_file)["SHOPGUIDE_ADMIN_PASSWORD"]
    r = httpx.post(f"{cfg.airflow_url}/auth/token", json={"username": ADMIN_USER, "password": password}, timeout=10)
    r.raise_for_status()
    return str(r.json()["access_token"])
