"""Bounds of every DAG task and DAG run (retries, retry delay, execution timeout) from the config's orchestration
section, and which step errors a retry cannot fix. Plain Python: the DAG files turn these into Airflow arguments."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from pipelines.config import CONFIG_DIR, OrchestrationConfig, load_config

# Errors whose cause is the input or a decision, not the moment: retrying gives the same answer after a wait, so the
# task fails at once. Named, not imported, so that DAG files stay cheap to parse (tests/dags checks each name).
PERMANENT_ERRORS = frozenset(
    {
        "pipelines.data.dataset.LandingPathError",  # a judgments or catalog file outside the landing folder
        "pipelines.data.validate.DataValidationError",  # the data broke an expectation
        "pipelines.compression.variants.CompressionFailed",  # no variant qualifies and the fallback is "fail"
        "pipelines.features.store.StaleFeaturesError",  # materialize already ran: a retry cannot freshen the store
        "pipelines.catalog.index.CatalogIndexError",  # no champion to index for, a catalog that does not fit it
        "pipelines.registry.mlflow_client.PromotionRefused",  # no such version, gate failed, nothing to roll back to
    }
)


@dataclass(frozen=True)
class TaskBounds:
    """What a DAG file needs: `default_args` for every task, `timeout(task_id)` and the DAG run's bound."""

    retries: int
    retry_delay: timedelta
    default_timeout: timedelta
    timeouts: dict[str, timedelta] = field(default_factory=dict)
    dag_run_timeout: timedelta = timedelta(hours=4)

    def timeout(self, task_id: str) -> timedelta:
        return self.timeouts.get(task_id, self.default_timeout)

    @property
    def default_args(self) -> dict[str, Any]:
        return {"retries": self.retries, "retry_delay": self.retry_delay, "execution_timeout": self.default_timeout}


def _minutes(value: float) -> timedelta:
    return timedelta(minutes=value)


def bounds_of(configs: Iterable[OrchestrationConfig]) -> TaskBounds:
    """The most generous bounds over `configs`: each value is the largest any of them asks for.

    A DAG file is parsed once, but each run picks its profile in the `profile` Param, so the task arguments fixed at
    parse time must hold for every profile a run may pick: the largest one's training must not time out.
    """
    configs = list(configs)
    if not configs:
        raise ValueError("bounds_of needs at least one orchestration config")
    task_ids = sorted({t for c in configs for t in c.task_timeout_minutes})
    return TaskBounds(
        retries=max(c.retries for c in configs),
        retry_delay=timedelta(seconds=max(c.retry_delay_seconds for c in configs)),
        default_timeout=_minutes(max(c.default_task_timeout_minutes for c in configs)),
        timeouts={
            t: _minutes(max(c.task_timeout_minutes.get(t, c.default_task_timeout_minutes) for c in configs))
            for t in task_ids
        },
        dag_run_timeout=_minutes(max(c.dag_run_timeout_minutes for c in configs)),
    )


def dag_bounds() -> TaskBounds:
    """Bounds for the DAG files: over every shipped profile (configs/*.yaml); a few ms at parse time."""
    return bounds_of(load_config(p.stem).orchestration for p in sorted(CONFIG_DIR.glob("*.yaml")))


def is_permanent(err: BaseException) -> bool:
    """True when `err` (or a base class of it) is one of PERMANENT_ERRORS."""
    return any(f"{c.__module__}.{c.__qualname__}" in PERMANENT_ERRORS for c in type(err).__mro__)
