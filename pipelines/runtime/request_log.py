"""The request log's format, defined once for the service that writes it and the pipelines that read it: its schema
and row type, in the log folder layout of pipelines/runtime/logfolder.py (default folder `$SHOPGUIDE_HOME/request_log`).

Imports nothing outside pipelines.runtime: serving writes with it, pipelines.data reads with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import pyarrow as pa

# The layout helpers, also under the names the request log had before the event log shared them.
from pipelines.runtime.logfolder import is_part, is_segment, part_for

__all__ = ["REQUEST_LOG_DIRNAME", "SCHEMA", "Endpoint", "RequestRecord", "is_part", "is_segment", "part_for"]

REQUEST_LOG_DIRNAME = "request_log"
FORMAT_VERSION = "1"

Endpoint = Literal["search", "recommend"]

SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),  # when the request arrived
        pa.field("endpoint", pa.string(), nullable=False),  # search | recommend
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("query", pa.string()),  # as answered (whitespace stripped); null for recommend
        pa.field("user_id", pa.int64()),
        pa.field("k", pa.int32(), nullable=False),
        pa.field("category", pa.string()),  # null: abstained (search) or not asked (recommend)
        pa.field("product_ids", pa.list_(pa.int64()), nullable=False),  # ranked, best first
        pa.field("scores", pa.list_(pa.float32()), nullable=False),  # the same order
        pa.field("personalized", pa.bool_(), nullable=False),
        pa.field("fallback_reason", pa.string()),
        pa.field("method", pa.string()),  # recommend: history | popularity | none; null for search
        pa.field("latency_ms", pa.float32(), nullable=False),  # request in to response sent, as in /metrics
    ],
    metadata={"shopguide.request_log.version": FORMAT_VERSION},
)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One answered request: a row of SCHEMA (built on the request path, so plain Python values only)."""

    request_id: str
    ts: datetime
    endpoint: Endpoint
    model_version: str
    query: str | None
    user_id: int | None
    k: int
    category: str | None
    product_ids: Sequence[int]
    scores: Sequence[float]
    personalized: bool
    fallback_reason: str | None
    method: str | None
    latency_ms: float
