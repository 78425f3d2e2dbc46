"""The request log's format, defined once for the service that writes it and the pipelines that read it.

Layout under the log folder (default `$SHOPGUIDE_HOME/request_log`), one hive partition per UTC date:

    date=2026-12-04/part-<writer>-<seq>.parquet    rolled parts: what any parquet reader sees
    date=2026-12-04/_seg-<writer>-<seq>.arrows     the open segment: Arrow IPC stream, appended + fsynced per flush

A writer appends each flush's rows to its segment as one record batch, then rolls the segment into the part of the
same name (about once a minute): per-second durability without a parquet file per second. A segment is locked
(flock) by its writer; one nobody holds was left by a crash and is read as is (its complete batches), then rolled by
the next writer that starts. The `_` prefix hides segments from pyarrow.dataset, Spark or DuckDB globs of *.parquet.

Imports nothing else of pipelines: serving writes with it, pipelines.data reads with it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Literal

import pyarrow as pa

REQUEST_LOG_DIRNAME = "request_log"
FORMAT_VERSION = "1"
SEGMENT_PREFIX, SEGMENT_SUFFIX = "_seg-", ".arrows"
PART_PREFIX, PART_SUFFIX = "part-", ".parquet"

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


def to_batch(records: Sequence[RequestRecord]) -> pa.RecordBatch:
    columns = [[getattr(r, name) for r in records] for name in SCHEMA.names]
    return pa.record_batch([pa.array(c, type=f.type) for c, f in zip(columns, SCHEMA, strict=True)], schema=SCHEMA)


def partition_name(day: date) -> str:
    return f"date={day.isoformat()}"


def partition_day(ts: datetime) -> date:
    return ts.astimezone(UTC).date()


def part_for(segment: Path) -> Path:
    """The part a segment rolls into: same folder, same writer and sequence number."""
    stem = segment.name.removeprefix(SEGMENT_PREFIX).removesuffix(SEGMENT_SUFFIX)
    return segment.with_name(f"{PART_PREFIX}{stem}{PART_SUFFIX}")


def is_segment(path: Path) -> bool:
    return path.name.startswith(SEGMENT_PREFIX) and path.name.endswith(SEGMENT_SUFFIX)


def is_part(path: Path) -> bool:
    return path.name.startswith(PART_PREFIX) and path.name.endswith(PART_SUFFIX)


def read_segment(path: Path) -> pa.Table:
    """A segment's complete record batches. A writer killed mid-append leaves a torn last batch: it is skipped, not
    an error (those rows were never reported durable). FileNotFoundError when it was rolled meanwhile."""
    data = path.read_bytes()  # at most one roll interval of rows
    batches: list[pa.RecordBatch] = []
    try:
        reader = pa.ipc.open_stream(pa.BufferReader(data))
        while True:
            batches.append(reader.read_next_batch())
    except StopIteration:
        pass
    except (pa.ArrowInvalid, OSError):  # empty file, torn schema or torn last batch
        pass
    return pa.Table.from_batches(batches, schema=SCHEMA)


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable (POSIX: the directory entry is separate data)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
