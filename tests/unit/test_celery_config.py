"""The production profile's Celery settings: Airflow's own, plus the step libraries each worker imports once."""

from __future__ import annotations

import importlib.util

from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG

from pipelines.celery_config import CELERY_CONFIG, PRELOADED


def test_airflows_settings_kept_and_the_step_libraries_preloaded() -> None:
    assert {k: v for k, v in CELERY_CONFIG.items() if k != "imports"} == DEFAULT_CELERY_CONFIG
    assert CELERY_CONFIG["imports"] == PRELOADED
    # a name that does not resolve would stop the worker at start: every one is installed
    missing = [name for name in PRELOADED if importlib.util.find_spec(name) is None]
    assert not missing, missing
