"""Session-wide isolation: every test writes under one temporary SHOPGUIDE_HOME, offline, never into ./.shopguide."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `pytest` without an installed package still imports this checkout
    sys.path.insert(0, str(REPO_ROOT))

from pipelines.airflow_env import airflow_environ, ensure_airflow_db  # noqa: E402
from pipelines.config import Paths  # noqa: E402

# Set at import time, before any test module imports airflow or mlflow: both read their home from the environment
# once, and Airflow writes airflow.cfg into AIRFLOW_HOME on first import. Explicit paths, so an AIRFLOW_HOME or
# MLFLOW_TRACKING_URI exported in the developer's shell cannot leak into the tests.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="shopguide-test-")).resolve()
os.environ["SHOPGUIDE_HOME"] = str(_SESSION_HOME)
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_HOME / 'mlflow' / 'mlflow.db'}"
os.environ["AIRFLOW_HOME"] = str(_SESSION_HOME / "airflow")
os.environ.pop("SHOPGUIDE_LOG_STORE", None)  # a shell pointed at the production profile (`shopguide prod env`)
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "GX_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "MLFLOW_LOGGING_LEVEL": "WARNING",
    }
)
os.environ.update(airflow_environ(Paths(_SESSION_HOME)))


def pytest_unconfigure(config: pytest.Config) -> None:
    if not os.environ.get("SHOPGUIDE_KEEP_TEST_HOME"):  # set it to inspect stores after a failing run
        shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def shopguide_home() -> Paths:
    """The session's Paths: SHOPGUIDE_HOME, MLflow SQLite store and AIRFLOW_HOME all under one temp dir."""
    paths = Paths.from_env()
    assert paths.home == _SESSION_HOME, "SHOPGUIDE_HOME was changed after conftest set it"
    return paths


@pytest.fixture(scope="session")
def airflow_paths(shopguide_home: Paths) -> Paths:
    """shopguide_home with its Airflow SQLite DB migrated once per session (~5 s); use with run_dag_test."""
    ensure_airflow_db(shopguide_home)
    return shopguide_home


REDIS_SERVER = "/usr/bin/redis-server"


def start_redis_server(port: int, folder: Path) -> subprocess.Popen:
    """redis-server on 127.0.0.1:`port`, keeping nothing on disk, once it answers PING (fails the test otherwise)."""
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)]
    proc = subprocess.Popen([REDIS_SERVER, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            if conn.recv(16).startswith(b"+PONG"):
                return proc
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail(f"redis-server did not start on port {port}")
        time.sleep(0.05)


@contextlib.contextmanager
def _private_redis(folder: Path) -> Iterator[int]:
    """A private, throw-away redis-server on a free loopback port (never the shared 6379 instance): its port."""
    if not Path(REDIS_SERVER).is_file():
        pytest.skip(f"{REDIS_SERVER} not installed (apt-get install redis-server)")
    if importlib.util.find_spec("redis") is None:
        pytest.skip("the redis Python client is not installed (Feast's Redis online store needs feast[redis])")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = start_redis_server(port, folder)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def private_redis() -> Callable[[Path], contextlib.AbstractContextManager[int]]:
    """`with private_redis(folder) as port:` for fixtures of any scope."""
    return _private_redis


@pytest.fixture(scope="session")
def redis_server() -> Callable[[int, Path], subprocess.Popen]:
    """`redis_server(port, folder)`: start_redis_server, for a test that brings a stopped server back on its port."""
    return start_redis_server
