"""Session-wide isolation: every test writes under one temporary SHOPGUIDE_HOME, offline, never into ./.shopguide."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
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
