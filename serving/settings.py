"""The service's typed settings, read from SHOPGUIDE_* environment variables (same names in every deployment)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from pipelines.config import MODEL_NAME, FeaturesConfig, Paths


def _default_home() -> Path:
    return Paths.from_env().home


class Settings(BaseModel):
    """Fields validate by name (tests, code) or by their environment variable (the alias, used in error messages)."""

    model_config = ConfigDict(frozen=True, extra="ignore", validate_by_name=True, validate_by_alias=True)

    model_name: str = Field(MODEL_NAME, min_length=1, alias="SHOPGUIDE_MODEL_NAME",
                            description="Registered MLflow model to serve.")
    alias: str = Field("champion", min_length=1, alias="SHOPGUIDE_MODEL_ALIAS",
                       description="Registry alias resolved to a version at start-up and on every poll.")
    home: Path = Field(default_factory=_default_home, alias="SHOPGUIDE_HOME",
                       description="State root: MLflow (unless MLFLOW_TRACKING_URI says otherwise), Feast, cache.")
    bundle_dir: Path | None = Field(None, alias="SHOPGUIDE_BUNDLE_DIR",
                                    description="Serve this bundle folder and never ask MLflow (dev, air-gapped).")
    personalization_weight: float = Field(FeaturesConfig().personalization_weight, ge=0, le=1,
                                          alias="SHOPGUIDE_PERSONALIZATION_WEIGHT",
                                          description="w in cos(q, p) + w * cos(u, p); 0 turns personalisation off.")
    max_query_chars: int = Field(256, ge=1, le=4096, alias="SHOPGUIDE_MAX_QUERY_CHARS",
                                 description="Longer queries are rejected (422); the encoder reads 32 tokens anyway.")
    max_k: int = Field(100, ge=1, le=1000, alias="SHOPGUIDE_MAX_K", description="Upper bound on results per request.")
    ort_threads: int = Field(0, ge=0, le=64, alias="SHOPGUIDE_ORT_THREADS",
                             description="ONNX Runtime intra-op threads; 0 = one per physical core.")
    model_poll_seconds: float = Field(60.0, ge=0, alias="SHOPGUIDE_MODEL_POLL_SECONDS",
                                      description="How often the alias is re-resolved for a hot swap; 0 = never.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the aliased variables; empty values count as unset so `FOO=` in a compose file means the default."""
        env = os.environ if environ is None else environ
        names = {field.alias for field in cls.model_fields.values() if field.alias}
        return cls.model_validate({k: v for k, v in env.items() if k in names and v.strip()})

    @property
    def paths(self) -> Paths:
        return Paths(self.home.resolve())
