"""The production profile's Celery settings (`[celery] celery_config_options`): Airflow's defaults, plus the libraries
the pipeline steps import, loaded once by each worker instead of once per task.

On Linux a Celery worker forks every task's process from its pool process, which inherits what the worker imported
before it started the pool (Celery's `imports` setting). Airflow's provider preloads its own operators the same way
(`on_celery_import_modules`); the steps import their libraries inside the functions (the DAG files stay light for the
dag-processor), which costs each task process the same seconds of imports again. Only importing: no thread, session
or connection is opened here, so the fork stays safe.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG

# What the steps import (grep "^\s+(import|from)" pipelines/): the deep submodules too, since transformers,
# sentence-transformers and MLflow load theirs lazily on first use.
PRELOADED = (
    "numpy",
    "pandas",
    "pyarrow.parquet",
    "torch",
    "transformers",
    "sentence_transformers",
    "sentence_transformers.sentence_transformer.losses",
    "sentence_transformers.sentence_transformer.evaluation",
    "sentence_transformers.util",
    "sklearn.linear_model",
    "sklearn.feature_extraction.text",
    "sklearn.metrics",
    "sklearn.pipeline",
    "onnx",
    "onnxruntime",
    "onnxruntime.quantization",
    "onnxruntime.transformers.optimizer",
    "bm25s",
    "usearch.index",
    "mlflow",
    "mlflow.pyfunc",
    "mlflow.tracking",
    "great_expectations",
    "feast.feature_store",
)

CELERY_CONFIG: dict[str, Any] = {**DEFAULT_CELERY_CONFIG, "imports": PRELOADED}
