"""The service's typed settings, read from SHOPGUIDE_* environment variables (same names in every deployment)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pipelines.config import MODEL_NAME, FeaturesConfig, Paths
from pipelines.runtime.encoder import OrtOptimization
from pipelines.runtime.event_log import EVENT_LOG_DIRNAME
from pipelines.runtime.logfolder import LogStore
from pipelines.runtime.request_log import REQUEST_LOG_DIRNAME


def _default_home() -> Path:
    return Paths.from_env().home


class _Environment(PydanticBaseSettingsSource):
    """Each field's environment variable (its alias) from `environ`; a blank value counts as unset, so `FOO=` in a
    compose file means the default.

    Not pydantic-settings' own EnvSettingsSource: since fields also validate by name, that one would read a variable
    named after the field too (`max_k=5` would set max_k), and it skips empty values but not blank ones.
    """

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.environ = environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        name = field.alias or field_name
        value = self.environ.get(name, "")
        return (value if value.strip() else None), name, False

    def __call__(self) -> dict[str, Any]:
        found = (self.get_field_value(field, name) for name, field in self.settings_cls.model_fields.items())
        return {name: value for value, name, _ in found if value is not None}


class Settings(BaseSettings):
    """`Settings()` reads every field from its SHOPGUIDE_* variable; keyword arguments (by field name) win over the
    environment. Fields validate by name (tests, code) or by their variable (the alias, used in error messages)."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", validate_by_name=True, validate_by_alias=True)

    model_name: str = Field(
        MODEL_NAME, min_length=1, alias="SHOPGUIDE_MODEL_NAME", description="Registered MLflow model to serve."
    )
    alias: str = Field(
        "champion",
        min_length=1,
        alias="SHOPGUIDE_MODEL_ALIAS",
        description="Registry alias resolved to a version at start-up and on every poll.",
    )
    home: Path = Field(
        default_factory=_default_home,
        alias="SHOPGUIDE_HOME",
        description="State root: MLflow (unless MLFLOW_TRACKING_URI says otherwise), Feast, cache.",
    )
    bundle_dir: Path | None = Field(
        None,
        alias="SHOPGUIDE_BUNDLE_DIR",
        description="Serve this bundle folder and never ask MLflow (dev, air-gapped).",
    )
    personalization_weight: float = Field(
        FeaturesConfig().personalization_weight,
        ge=0,
        le=1,
        alias="SHOPGUIDE_PERSONALIZATION_WEIGHT",
        description="w in cos(q, p) + w * cos(u, p); 0 turns personalisation off.",
    )
    model_poll_seconds: float = Field(
        60.0,
        ge=0,
        alias="SHOPGUIDE_MODEL_POLL_SECONDS",
        description="How often the alias is re-resolved for a hot swap; 0 = never.",
    )

    # Request limits: a violation is a 422 (or 413 for the body) that names the limit, never a 500.
    max_query_chars: int = Field(
        256,
        ge=1,
        le=4096,
        alias="SHOPGUIDE_MAX_QUERY_CHARS",
        description="Longest query or text (characters); the encoder reads 32 tokens anyway.",
    )
    max_k: int = Field(100, ge=1, le=1000, alias="SHOPGUIDE_MAX_K", description="Upper bound on results per request.")
    max_batch: int = Field(
        64,
        ge=1,
        le=1024,
        alias="SHOPGUIDE_MAX_BATCH",
        description="Most queries or texts in one /v1/classify or /v1/embed request.",
    )
    max_body_bytes: int = Field(
        64 * 1024,
        ge=1024,
        alias="SHOPGUIDE_MAX_BODY_BYTES",
        description="Larger request bodies are refused with 413 before they are parsed.",
    )
    api_keys: frozenset[str] = Field(
        frozenset(),
        alias="SHOPGUIDE_API_KEYS",
        description="Comma-separated keys accepted in X-API-Key; empty = no auth (refused in production). "
        "/healthz, /readyz and the API docs stay open.",
    )
    deployment: Literal["local", "production"] = Field(
        "local",
        alias="SHOPGUIDE_DEPLOYMENT",
        description="local: an open service is allowed (with a warning); production: SHOPGUIDE_API_KEYS is required "
        "and the service refuses to start without it.",
    )
    registry_timeout_seconds: int = Field(
        5,
        ge=1,
        le=300,
        alias="SHOPGUIDE_REGISTRY_TIMEOUT_SECONDS",
        description="Bound on each MLflow HTTP request of the service (connect and each read; no retries: the poll "
        "is the retry). Start-up with MLflow down spends at most this long on the registry before serving the "
        "cached version or staying not ready.",
    )

    # Fast path. Defaults are what measured best on a loaded 2-core machine (bench/serving.py, issue 7 notes).
    ort_threads: int = Field(
        1,
        ge=0,
        le=64,
        alias="SHOPGUIDE_ORT_THREADS",
        description="ONNX Runtime intra-op threads per request; 0 = one per physical core. "
        "1 wins when requests already run in parallel on few cores.",
    )
    ort_optimization: OrtOptimization = Field(
        "all", alias="SHOPGUIDE_ORT_OPTIMIZATION", description="ONNX Runtime graph optimization level."
    )
    # numpy's OpenBLAS runs the brute-force catalog search (catalogs below ann_min_products) and the fusion; left to
    # itself it starts a thread per core for each request's small matmul, and its threads spin-wait between calls:
    # with 8 clients on 2 cores that tripled the CPU per request (bench/results/serving-blas-2026-12-03.json).
    blas_threads: int = Field(
        1,
        ge=0,
        le=64,
        alias="SHOPGUIDE_BLAS_THREADS",
        description="BLAS (numpy) threads of the service process; 0 = the library's default (one per core).",
    )
    rerank_top_n: int | None = Field(
        None,
        ge=0,
        le=200,
        alias="SHOPGUIDE_RERANK_TOP_N",
        description="Hybrid results /v1/search reranks with the version's cross-encoder (0 = off); unset = the "
        "version's own search.rerank_top_n. A version without a reranker serves its hybrid ranking either way.",
    )
    ann_min_products: int = Field(
        20_000,
        ge=0,
        alias="SHOPGUIDE_ANN_MIN_PRODUCTS",
        description="Catalogs this large or larger are searched with an HNSW index "
        "(usearch) and exact re-scoring; smaller ones by brute force. "
        "0 = always brute force.",
    )
    ann_ef_search: int = Field(
        128,
        ge=10,
        le=4096,
        alias="SHOPGUIDE_ANN_EF_SEARCH",
        description="HNSW search breadth: recall against speed (128: recall@10 ~0.98).",
    )
    ann_connectivity: int = Field(
        16,
        ge=4,
        le=128,
        alias="SHOPGUIDE_ANN_CONNECTIVITY",
        description="HNSW graph degree (M); part of the cached index's key.",
    )

    # Shadow mode: a second alias answers a sample of /v1/search off the response path, only for metrics.
    shadow_alias: str | None = Field(
        None,
        alias="SHOPGUIDE_SHADOW_ALIAS",
        description="Alias to shadow (e.g. challenger); unset = no shadow traffic.",
    )
    shadow_fraction: float = Field(
        0.1,
        ge=0,
        le=1,
        alias="SHOPGUIDE_SHADOW_FRACTION",
        description="Share of /v1/search requests replayed on the shadow model.",
    )
    shadow_queue: int = Field(
        256,
        ge=1,
        le=100_000,
        alias="SHOPGUIDE_SHADOW_QUEUE",
        description="Pending shadow requests beyond this are dropped (and counted).",
    )

    # Request log: every /v1/search and /v1/recommend answer, off the response path (serving/request_log.py).
    request_log_enabled: bool = Field(
        True,
        alias="SHOPGUIDE_REQUEST_LOG_ENABLED",
        description="Log every search and recommend answer (the feedback loop and monitoring read it).",
    )
    request_log_dir: Path | None = Field(
        None,
        alias="SHOPGUIDE_REQUEST_LOG_DIR",
        description="Folder of the partitioned parquet log; unset = request_log under SHOPGUIDE_HOME. "
        "pipelines.data.request_log reads the same variable.",
    )
    request_log_queue: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        alias="SHOPGUIDE_REQUEST_LOG_QUEUE",
        description="Answers waiting for the writer beyond this are dropped (and counted), never waited for.",
    )
    request_log_flush_seconds: float = Field(
        1.0,
        gt=0,
        le=60,
        alias="SHOPGUIDE_REQUEST_LOG_FLUSH_SECONDS",
        description="The writer makes what it has durable (write + fsync) this often: a crash loses at most "
        "this much of the log.",
    )
    request_log_roll_seconds: float = Field(
        60.0,
        gt=0,
        le=86_400,
        alias="SHOPGUIDE_REQUEST_LOG_ROLL_SECONDS",
        description="How often a writer's durable segment becomes a parquet part (also at 100,000 rows and on "
        "shutdown): 60 parts per hour and replica at most.",
    )

    log_store: str | None = Field(
        None,
        alias="SHOPGUIDE_LOG_STORE",
        description="Shared store of both logs' rolled parquet parts, any fsspec URL (s3://bucket/logs with the s3 "
        "extra, file:///shared/logs): the parts go to <URL>/request_log and <URL>/event_log, the open segments stay "
        "in the local folders. Unset = the local folders alone. pipelines.data reads the same variable.",
    )

    # Feedback events (POST /v1/events): the event log shares the request log's flush and roll intervals.
    event_log_dir: Path | None = Field(
        None,
        alias="SHOPGUIDE_EVENT_LOG_DIR",
        description="Folder of the partitioned parquet event log; unset = event_log under SHOPGUIDE_HOME. "
        "pipelines.data.event_log reads the same variable.",
    )
    event_log_queue: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        alias="SHOPGUIDE_EVENT_LOG_QUEUE",
        description="Event requests waiting for the event log's writer beyond this are refused with 503 (the "
        "client retries; duplicates are idempotent), never dropped after being accepted.",
    )
    max_events: int = Field(
        100, ge=1, le=10_000, alias="SHOPGUIDE_MAX_EVENTS", description="Most events in one POST /v1/events."
    )
    events_window_seconds: float = Field(
        3600.0,
        ge=60,
        le=7 * 86_400,
        alias="SHOPGUIDE_EVENTS_WINDOW_SECONDS",
        description="An event may name an answer at most this old; older (or unknown) request ids are refused.",
    )
    events_lookup_size: int = Field(
        100_000,
        ge=1_000,
        le=10_000_000,
        alias="SHOPGUIDE_EVENTS_LOOKUP_SIZE",
        description="Recent answers, and accepted events (for repeats), each replica keeps in memory for the checks, "
        "read from the shared logs, oldest out first: ~600 bytes per k=10 answer and ~350 per event.",
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO",
        alias="SHOPGUIDE_LOG_LEVEL",
        description="Level of the service's JSON-lines log (INFO = one line per request).",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return frozenset(k.strip() for k in value.split(",") if k.strip())
        return value

    @model_validator(mode="after")
    def _production_needs_keys(self) -> Settings:
        self.check_deployment()
        return self

    def check_deployment(self) -> None:
        """Refuse an open production service (also called by create_app: model_copy skips validators)."""
        if self.deployment == "production" and not self.api_keys:
            raise ValueError(
                "SHOPGUIDE_DEPLOYMENT=production requires SHOPGUIDE_API_KEYS (comma-separated keys clients send in "
                "X-API-Key): refusing to start an open production service"
            )

    @field_validator("shadow_alias", "rerank_top_n", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Arguments, then the environment; no .env file or secrets folder is read behind a deployment's back.
        return init_settings, _Environment(settings_cls, os.environ)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings of `environ` alone (default os.environ: the same as `Settings()`)."""
        if environ is None:
            return cls()
        return cls.model_validate(_Environment(cls, environ)())

    @property
    def paths(self) -> Paths:
        return Paths(self.home.resolve())

    @property
    def request_log_folder(self) -> Path:
        return self.request_log_dir or self.home / REQUEST_LOG_DIRNAME

    @property
    def event_log_folder(self) -> Path:
        return self.event_log_dir or self.home / EVENT_LOG_DIRNAME

    def log_store_of(self, log_name: str) -> LogStore | None:
        """The shared store of the log `log_name` (REQUEST_LOG_DIRNAME, EVENT_LOG_DIRNAME); None when not configured.
        Raises when fsspec cannot open the URL (s3:// without s3fs): better at start-up than at the first roll."""
        url = (self.log_store or "").strip()
        return LogStore.at(url, log_name) if url else None
