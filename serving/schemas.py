"""Request and response bodies of the HTTP API (the OpenAPI schema at /docs is generated from these)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    StringConstraints,
    Tag,
    create_model,
)

from pipelines.runtime.event_log import EventType

# What X-Request-ID may be (else the service makes a new one), and so what an event's request_id can be.
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:/+=-]{1,128}$"

FallbackReason = Literal[
    "no_online_features",  # the user has no online row or an empty history
    "history_not_in_catalog",  # none of the user's recent products is in this model version's index
    "features_unavailable",  # Feast or its online store could not answer
    "personalization_disabled",  # the service runs with personalization_weight = 0
]


TAXONOMY = (
    "What the category head predicts: its taxonomy's name and labels, e.g. 'pricerunner-10: the 10 PriceRunner "
    "appliance and electronics categories (...)'. Queries outside it get category null."
)
ABSTAINED = (
    "Why category is null: the query's out-of-taxonomy score is below the model version's threshold, calibrated on "
    "validation data; null when a category is given."
)


class SearchRequestBase(BaseModel):
    """Strict: JSON types must match (no "10" for 10, no true for 1) and unknown fields are errors, not ignored."""

    model_config = ConfigDict(strict=True, extra="forbid")

    query: str
    k: int = 10
    user_id: int | None = Field(None, ge=0, le=2**63 - 1, description="Personalise with this user's online features.")


def _text(max_chars: int) -> StringConstraints:
    """A text field's limits: whitespace stripped, then 1 to max_chars characters."""
    return StringConstraints(strip_whitespace=True, min_length=1, max_length=max_chars)


def search_request_model(max_query_chars: int, max_k: int) -> type[SearchRequestBase]:
    """The request body with the deployment's limits baked in, so violations are ordinary 422 validation errors."""
    return create_model(
        "SearchRequest",
        __base__=SearchRequestBase,
        query=(
            Annotated[str, _text(max_query_chars)],
            Field(..., description="Free text; surrounding whitespace is stripped."),
        ),
        k=(int, Field(10, ge=1, le=max_k, description="Number of products to return.")),
    )


class StrictBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


# The fields the endpoints read; the *_request_model functions below redeclare them with the deployment's limits.
class ClassifyRequestBase(StrictBody):
    queries: list[str]


class EmbedRequestBase(StrictBody):
    texts: list[str]


class RecommendRequestBase(StrictBody):
    user_id: int
    k: int = 10


def classify_request_model(max_chars: int, max_batch: int) -> type[ClassifyRequestBase]:
    return create_model(
        "ClassifyRequest",
        __base__=ClassifyRequestBase,
        queries=(
            list[Annotated[str, _text(max_chars)]],
            Field(..., min_length=1, max_length=max_batch, description="Queries to categorise, one ORT run per batch."),
        ),
    )


def embed_request_model(max_chars: int, max_batch: int) -> type[EmbedRequestBase]:
    return create_model(
        "EmbedRequest",
        __base__=EmbedRequestBase,
        texts=(
            list[Annotated[str, _text(max_chars)]],
            Field(..., min_length=1, max_length=max_batch, description="Texts (queries or product titles) to embed."),
        ),
    )


def recommend_request_model(max_k: int) -> type[RecommendRequestBase]:
    return create_model(
        "RecommendRequest",
        __base__=RecommendRequestBase,
        user_id=(int, Field(..., ge=0, le=2**63 - 1, description="Recommend from this user's online history.")),
        k=(int, Field(10, ge=1, le=max_k, description="Number of products to return.")),
    )


class Hit(BaseModel):
    product_id: int
    title: str
    score: float = Field(description="cos(query, product) + weight * cos(user, product) when personalised.")


REQUEST_ID = (
    "This answer's id in the request log (also the X-Request-ID header: the client's own id when it sent a valid "
    "one); feedback events name it."
)


class SearchResponse(BaseModel):
    model_version: str = Field(description="Registry version (or local-<sha> for a fixed bundle) that answered.")
    request_id: str = Field(description=REQUEST_ID)
    query: str
    category: str | None = Field(
        description="The query's category in `taxonomy`; null when the query is outside that taxonomy "
        "(category_abstained_reason says why)."
    )
    taxonomy: str = Field(description=TAXONOMY)
    category_abstained_reason: str | None = Field(None, description=ABSTAINED)
    personalized: bool
    fallback_reason: FallbackReason | None = Field(
        None, description="Why a request with user_id was answered without personalisation."
    )
    results: list[Hit]


class Category(BaseModel):
    query: str
    category: str | None = Field(description="The query's category in `taxonomy`; null when outside it.")
    probability: float = Field(description="Softmax probability of the head's top category (also when abstained).")
    category_abstained_reason: str | None = Field(None, description=ABSTAINED)


class ClassifyResponse(BaseModel):
    model_version: str
    taxonomy: str = Field(description=TAXONOMY)
    results: list[Category] = Field(description="One per query, in request order.")


class EmbedResponse(BaseModel):
    model_version: str
    dim: int
    embeddings: list[list[float]] = Field(description="Unit-length vectors, one per text, in request order.")


class RecommendResponse(BaseModel):
    model_version: str
    request_id: str = Field(description=REQUEST_ID)
    user_id: int
    personalized: bool = Field(description="False: no usable history; fallback_reason says why.")
    fallback_reason: FallbackReason | None = None
    method: Literal["history", "popularity", "none"] = Field(
        description="history: nearest products to the user's recency-weighted recent products (those excluded); "
        "popularity: the fallback, most clicked products; none: no history and no popularity (empty)."
    )
    results: list[Hit]


def _iso_8601(value: object) -> object:
    """JSON has no time type: a timestamp is a string, never a number (whose unit a client could get wrong)."""
    if not isinstance(value, str):
        raise ValueError("expected an ISO 8601 string with a UTC offset, e.g. 2026-12-04T10:15:00Z")
    return value


class Event(StrictBody):
    """One feedback event on a product of an answer of /v1/search or /v1/recommend."""

    request_id: Annotated[str, StringConstraints(pattern=REQUEST_ID_PATTERN)] = Field(
        description="The answer's request_id (its X-Request-ID)."
    )
    user_id: int = Field(ge=0, le=2**63 - 1, description="The shopper; must be the answer's user_id if it had one.")
    product_id: int = Field(
        ge=0, le=2**63 - 1, description="A product of the served catalog; a click must name one the answer showed."
    )
    type: EventType
    # strict models take no string for a datetime; this field parses ISO 8601 strings only (see _iso_8601)
    ts: Annotated[AwareDatetime, Strict(False), BeforeValidator(_iso_8601)] = Field(
        description="When it happened: ISO 8601 with a UTC offset, not before the answer, not in the future."
    )


class EventBatchBase(StrictBody):
    events: list[Event]


def _event_or_batch(value: Any) -> str:
    if isinstance(value, dict):
        return "batch" if "events" in value else "event"
    return "batch" if isinstance(value, EventBatchBase) else "event"


def events_request_type(max_events: int) -> Any:
    """The body of POST /v1/events: one event, or {"events": [...]} with 1 to max_events of them."""
    batch = create_model(
        "EventBatch",
        __base__=EventBatchBase,
        events=(list[Event], Field(..., min_length=1, max_length=max_events, description="Accepted or refused whole.")),
    )
    return Annotated[
        Annotated[Event, Tag("event")] | Annotated[batch, Tag("batch")],
        Discriminator(_event_or_batch),
    ]


class EventsResponse(BaseModel):
    model_version: str = Field(description="The version serving now (events name the answer's own version).")
    received: int = Field(description="Events in the request.")
    accepted: int = Field(description="New events: written to the event log and pushed to the users' online rows.")
    duplicates: int = Field(
        description="Events accepted before (same request_id, product_id and type) or repeated in this request: "
        "acknowledged, not counted again."
    )
    online: bool = Field(
        description="The users' online features include the accepted events. False: the feature store could not be "
        "updated (online_reason); the events are in the event log all the same."
    )
    online_reason: str | None = None


class ShadowInfo(BaseModel):
    alias: str
    version: str | None = Field(description="Shadow version loaded, None while it cannot be loaded.")
    fraction: float
    replayed: int


class ModelInfo(BaseModel):
    model_name: str
    alias: str
    version: str
    source: Literal["registry", "cache", "bundle_dir"] = Field(description="Where the loaded bundle came from.")
    loaded_at: datetime
    products: int
    categories: int
    variant: str | None = Field(
        None, description="Model variant from the bundle's encoder.json (e.g. its quantization)."
    )
    search: Literal["exact", "hnsw"] = Field(description="Catalog search: brute force or HNSW + exact re-scoring.")
    index_version: str | None = Field(
        None,
        description="The catalog index served (the catalog DAG's catalog hash); null = the version's own index.",
    )
    rerank_top_n: int = Field(
        0, description="Search results the version's cross-encoder reranks (0 = none: the hybrid ranking as is)."
    )
    category_rule: str | None = Field(
        None, description="When the category answer abstains (score and threshold), or why it never does."
    )
    problem: str | None = Field(None, description="Why the alias's current version is not the one served, if so.")
    shadow: ShadowInfo | None = None


class ErrorResponse(BaseModel):
    detail: str


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    model_version: str | None = None
    detail: str | None = Field(
        None,
        description="Not ready: why. Ready: set when the alias points at a version that "
        "could not be loaded or resolved (the one named keeps serving).",
    )
