"""Request and response bodies of the HTTP API (the OpenAPI schema at /docs is generated from these)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model

FallbackReason = Literal[
    "no_online_features",  # the user has no online row or an empty history
    "history_not_in_catalog",  # none of the user's recent products is in this model version's index
    "features_unavailable",  # Feast or its online store could not answer
    "personalization_disabled",  # the service runs with personalization_weight = 0
]


class SearchRequestBase(BaseModel):
    """Strict: JSON types must match (no "10" for 10, no true for 1) and unknown fields are errors, not ignored."""

    model_config = ConfigDict(strict=True, extra="forbid")

    query: str
    k: int = 10
    user_id: int | None = Field(None, ge=0, le=2**63 - 1, description="Personalise with this user's online features.")


def search_request_model(max_query_chars: int, max_k: int) -> type[SearchRequestBase]:
    """The request body with the deployment's limits baked in, so violations are ordinary 422 validation errors."""
    query = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=max_query_chars)]
    return create_model(
        "SearchRequest",
        __base__=SearchRequestBase,
        query=(query, Field(..., description="Free text; surrounding whitespace is stripped.")),
        k=(int, Field(10, ge=1, le=max_k, description="Number of products to return.")),
    )


class Hit(BaseModel):
    product_id: int
    title: str
    score: float = Field(description="cos(query, product) + weight * cos(user, product) when personalised.")


class SearchResponse(BaseModel):
    model_version: str = Field(description="Registry version (or local-<sha> for a fixed bundle) that answered.")
    query: str
    category: str = Field(description="Predicted category of the query.")
    personalized: bool
    fallback_reason: FallbackReason | None = Field(
        None, description="Why a request with user_id was answered without personalisation.")
    results: list[Hit]


class ModelInfo(BaseModel):
    model_name: str
    alias: str
    version: str
    source: Literal["registry", "cache", "bundle_dir"] = Field(description="Where the loaded bundle came from.")
    loaded_at: datetime
    products: int
    categories: int


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    model_version: str | None = None
    detail: str | None = None
