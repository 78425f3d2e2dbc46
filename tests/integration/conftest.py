"""A real registered @champion, built once per session from the shipped data (base MiniLM, 0 training steps); the
features and retrain DAGs run once per session on the tiny profile; a PostgreSQL database of a test's own."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipelines.airflow_env import DagTestResult
from pipelines.config import (
    MODEL_NAME,
    DataConfig,
    EvaluateConfig,
    Paths,
    TrainConfig,
    safe_name,
)

AS_OF = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
RUN_KEY = "integration-serving-champion"
# the run key the monitor tests register the champion under in a store of their own (monitored_champion)
MONITORED_RUN_KEY = "monitor-dag-test-champion"
# Its own registered model: other tests in the session (the DAG end-to-end run) register and promote
# shopguide-encoder in the same MLflow store, and neither side may move the other's @champion.
TEST_MODEL_NAME = f"{MODEL_NAME}-serving-test"


@dataclass(frozen=True)
class RegisteredChampion:
    paths: Paths  # a home of its own (Feast stores, serving cache, run folders); MLflow is the session's store
    model_name: str
    version: str
    bundle_dir: Path
    snapshot_dir: Path
    as_of: datetime  # the snapshot's event log ends here


def monitored_champion(
    champion: RegisteredChampion, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_as_of: datetime | None = None
) -> tuple[Paths, str]:
    """A home of its own whose MLflow store holds the champion's bundle as shopguide-encoder@champion (the profile's
    model name; other tests of the session move the session store's aliases), its snapshot kept in the run store;
    `data_as_of`: the snapshot's as-of time the retrain's decide counts from (None: the run's start)."""
    from pipelines.registry.mlflow_client import (
        CHAMPION,
        DATA_AS_OF_TAG,
        end_run,
        register_bundle,
        set_alias,
        start_run,
    )

    paths = Paths(tmp_path / "home")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for key in (
        "SHOPGUIDE_REQUEST_LOG_DIR",
        "SHOPGUIDE_EVENT_LOG_DIR",
        "SHOPGUIDE_RUN_STORE",
        "SHOPGUIDE_MONITOR_TEXTFILE",
    ):
        monkeypatch.delenv(key, raising=False)
    lineage = {"run_key": MONITORED_RUN_KEY, "data_snapshot": champion.snapshot_dir.name}
    if data_as_of is not None:
        lineage[DATA_AS_OF_TAG] = data_as_of.isoformat()
    run_id = start_run(paths, MONITORED_RUN_KEY, lineage)
    version = register_bundle(paths, run_id, champion.bundle_dir, MODEL_NAME, MONITORED_RUN_KEY, lineage)
    set_alias(paths, MODEL_NAME, CHAMPION, version)
    end_run(paths, run_id)
    shutil.copytree(champion.snapshot_dir, paths.runs / safe_name(MONITORED_RUN_KEY) / "data")
    return paths, version


@pytest.fixture(scope="session")
def champion(shopguide_home: Paths) -> RegisteredChampion:
    """Snapshot -> fine-tune (0 steps, real head) -> ONNX INT8 -> dense + BM25 index -> evaluate -> @champion.

    Every step is the pipeline's own function, on the session's temporary SQLite MLflow store (tests/conftest.py)
    and a home below the session's SHOPGUIDE_HOME; only the sizes are small. ~20-30 s, mostly ONNX export.
    """
    from pipelines.data.dataset import snapshot_data
    from pipelines.registry.mlflow_client import CHAMPION, end_run, register_bundle, set_alias, start_run
    from pipelines.steps.bundle import build_bundle

    paths = Paths(shopguide_home.home / "serving-test")
    work = paths.run_dir(RUN_KEY)
    snapshot = snapshot_data(DataConfig(max_terms=100, max_offers=1000, event_users=30), work / "snapshot", AS_OF)
    train = TrainConfig(max_steps=0, head_max_offers=300, head_epochs=5)
    evaluation = EvaluateConfig(max_category_offers=100, latency_queries=10)
    lineage = {"snapshot_hash": snapshot.hash, "run_key": RUN_KEY}
    bundle, _ = build_bundle(snapshot.path, work, train, 8, evaluation, "integration fixture", lineage)
    run_id = start_run(paths, RUN_KEY, lineage)
    version = register_bundle(paths, run_id, bundle, TEST_MODEL_NAME, RUN_KEY, lineage)
    set_alias(paths, TEST_MODEL_NAME, CHAMPION, version)
    end_run(paths, run_id)
    return RegisteredChampion(paths, TEST_MODEL_NAME, version, bundle, snapshot.path, AS_OF)


@pytest.fixture(scope="session")
def champion_features(champion: RegisteredChampion) -> RegisteredChampion:
    """The champion with its snapshot's simulated events built, applied (`feast apply`) and materialized into its
    home's Feast stores, once per session (the apply alone is a 20-30 s subprocess)."""
    from pipelines.features.store import refresh_features

    result = refresh_features(champion.snapshot_dir, champion.as_of, paths=champion.paths)
    assert result["materialized"]["user_activity"]["entities"] > 0, result
    return champion


@dataclass(frozen=True)
class TinyPipeline:
    paths: Paths
    features: DagTestResult
    retrain: DagTestResult


PIPELINE_DATE = "2026-11-01T00:00:00+00:00"


@pytest.fixture(scope="session")
def tiny_pipeline(airflow_paths: Paths) -> TinyPipeline:
    """The features DAG, then the retrain DAG, on the tiny profile under `airflow dags test`, once per session (~2-3
    min, the longest setup of the suite): test_end_to_end checks what they built, test_promotion what the run decided
    and promoted. @champion of the pipeline's model is cleared first, so the run is decided on the floors alone
    whatever ran before it in the session."""
    from pipelines.airflow_env import run_dag_test
    from pipelines.registry import mlflow_client as registry

    paths = airflow_paths
    features = run_dag_test(paths, "shopguide_features", {"profile": "tiny"}, PIPELINE_DATE, capture=True).check()
    with contextlib.suppress(Exception):  # no registered model yet
        registry.client(paths).delete_registered_model_alias(MODEL_NAME, registry.CHAMPION)
    retrain = run_dag_test(
        paths, "shopguide_retrain", {"profile": "tiny"}, PIPELINE_DATE, capture=True, timeout=1800
    ).check()
    return TinyPipeline(paths, features, retrain)


@contextlib.contextmanager
def _serve_app(app) -> Iterator[str]:
    """The app under uvicorn on a free loopback port, in a thread; yields the base URL once ready."""
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def serve_app() -> Callable[..., contextlib.AbstractContextManager[str]]:
    """`with serve_app(create_app(settings)) as url:` the app over real HTTP (uvicorn in a thread, its lifespan run);
    on leaving, a graceful shutdown (the logs flushed)."""
    return _serve_app


@pytest.fixture
def postgres_database() -> Iterator[str]:
    """A new, empty database on the machine's PostgreSQL (127.0.0.1:5432, trust auth) as a postgresql:// URL; dropped
    after the test. Skips where there is no server or no psycopg2."""
    psycopg2 = pytest.importorskip("psycopg2")
    server = os.environ.get("SHOPGUIDE_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
    try:
        conn = psycopg2.connect(f"{server}/postgres", connect_timeout=5)
    except psycopg2.OperationalError as err:
        pytest.skip(f"no PostgreSQL at {server}: {err}")
    conn.autocommit = True
    name = f"shopguide_test_{secrets.token_hex(4)}"
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{server}/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()


@pytest.fixture
def redis_port(tmp_path: Path, private_redis) -> Iterator[int]:
    """A private redis-server for one test."""
    with private_redis(tmp_path) as port:
        yield port


def _metric_value(app_or_text, name: str, **labels: str) -> float:
    """The sum of the samples named `name` with these labels (a subset) in Prometheus text: /metrics, or a running
    app's own registry; 0 when there is none. Parsed with prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    text = app_or_text if isinstance(app_or_text, str) else app_or_text.state.serving.metrics.render().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


@pytest.fixture(scope="session")
def metric_value():
    """`metric_value(app_or_text, name, **labels)`: a metric's value as the service exports it (see _metric_value)."""
    return _metric_value
