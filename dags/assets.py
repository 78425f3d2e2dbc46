"""What the DAGs share: the Assets one DAG produces and another is scheduled on, the config profiles, and the bounds
every task runs under (retries, retry delay, execution timeout) with the `bounded_task` decorator that applies them."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from airflow.sdk import Asset, task
from airflow.sdk.exceptions import AirflowFailException

from pipelines.steps.bounds import dag_bounds, is_permanent

# Updated by the features DAG after a validated event log is materialized; the retrain DAG runs on it.
USER_EVENTS = Asset(name="shopguide_user_events", uri="file://shopguide/user_events")
# Emitted by the monitor DAG when a window alarms on drift or vocabulary misses; the retrain DAG runs on it too.
# The reason rides in the event's extra: an Asset-triggered run has no conf, its tasks read triggering_asset_events.
# Its name is pipelines.steps.monitor.DRIFT_ASSET (tests/dags checks), which the retrain's decide looks for.
DRIFT = Asset(name="shopguide_drift", uri="file://shopguide/drift")

# A new catalog file landed in <landing>/catalog/ (`shopguide catalog land`); its event's extra names the file
# ({"catalog_path": ...}). The catalog DAG runs on it.
CATALOG = Asset(name="shopguide_catalog", uri="file://shopguide/catalog")

# Every configs/<profile>.yaml is a choice of the DAGs' `profile` Param (a file glob).
PROFILES = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
# The profile of runs nobody filled a form for (the schedule, an Asset event): SHOPGUIDE_PROFILE of the deployment,
# read when the DAG files are parsed; a trigger form can still pick any other.
DEFAULT_PROFILE = os.environ.get("SHOPGUIDE_PROFILE") or "default"
if DEFAULT_PROFILE not in PROFILES:
    raise ValueError(f"SHOPGUIDE_PROFILE={DEFAULT_PROFILE!r} is not one of configs/*.yaml: {PROFILES}")

# Fixed when the file is parsed, so taken over every profile a run may pick (pipelines/steps/bounds.py):
# the DAGs pass BOUNDS.default_args and BOUNDS.dag_run_timeout, bounded_task sets each task's own timeout.
BOUNDS = dag_bounds()


def dag_run_key(dag_run: Any) -> str:
    """A DAG run's key (its working folder, its MLflow run's key): unique per run, stable across task retries."""
    return f"{dag_run.dag_id}__{dag_run.run_id}"


def bounded_task(
    python_callable: Callable[..., Any] | None = None,
    /,
    *,
    kind: Literal["python", "short_circuit"] = "python",
    **kwargs: Any,
) -> Any:
    """`@task` (or `@task.<kind>`, e.g. short_circuit) whose execution_timeout is the config's for its task id (the
    function name), and whose permanent errors (bad input, broken data: pipelines.steps.bounds.PERMANENT_ERRORS) fail
    the task without a retry."""

    def decorate(fn: Callable[..., Any]) -> Any:
        @functools.wraps(fn)
        def run(*args: Any, **kw: Any) -> Any:
            try:
                return fn(*args, **kw)
            except Exception as err:
                if is_permanent(err):
                    raise AirflowFailException(f"{type(err).__name__} (not retried): {err}") from err
                raise

        timeout = BOUNDS.timeout(kwargs.get("task_id", fn.__name__))
        decorator = task if kind == "python" else getattr(task, kind)
        return decorator(execution_timeout=timeout, **kwargs)(run)

    return decorate(python_callable) if python_callable is not None else decorate
