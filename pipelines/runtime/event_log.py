"""The event log's format (feedback events the service accepted on POST /v1/events), defined once for the service
that writes it and the pipelines that read it, in the log folder layout of pipelines/runtime/logfolder.py (default
folder `$SHOPGUIDE_HOME/event_log`).

The columns `user_id`, `product_id`, `event_type` and `event_timestamp` are those of the features pipeline's event
log (pipelines.features.store.EVENT_COLUMNS), so the feature tables can be built from it as they are from the
simulated one. Imports nothing outside pipelines.runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import pyarrow as pa

EVENT_LOG_DIRNAME = "event_log"
FORMAT_VERSION = "1"

EventType = Literal["click", "add_to_cart", "purchase"]
EVENT_TYPES: tuple[EventType, ...] = ("click", "add_to_cart", "purchase")
# One event is one (answer, product, type): a repeat is the same event sent again (a client retry), not a new one.
EVENT_KEY = ("request_id", "product_id", "event_type")

SCHEMA = pa.schema(
    [
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),  # when the service accepted it: the partition
        pa.field("request_id", pa.string(), nullable=False),  # the answer it follows: a row of the request log
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("product_id", pa.int64(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),  # click | add_to_cart | purchase
        pa.field("event_timestamp", pa.timestamp("us", tz="UTC"), nullable=False),  # when it happened (the client's)
        pa.field("position", pa.int32()),  # the product's 0-based rank in that answer; null: it was not in it
        pa.field("model_version", pa.string(), nullable=False),  # the version that gave the answer
    ],
    metadata={"shopguide.event_log.version": FORMAT_VERSION},
)


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One accepted event: a row of SCHEMA."""

    ts: datetime
    request_id: str
    user_id: int
    product_id: int
    event_type: EventType
    event_timestamp: datetime
    position: int | None
    model_version: str
