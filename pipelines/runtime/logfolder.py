"""The durable log folder the service writes (request log, event log): layout, segments, parts, and the reader.

Layout under a log's folder, one hive partition per UTC date of each row's `ts`:

    date=2026-12-04/part-<writer>-<seq>.parquet    rolled parts: what any parquet reader sees
    date=2026-12-04/_seg-<writer>-<seq>.arrows     the open segment: Arrow IPC stream, appended + fsynced per flush

A writer appends each flush's rows to its segment as one record batch, then rolls the segment into the part of the
same name (about once a minute): per-second durability without a parquet file per second. A segment is locked
(flock) by its writer; one nobody holds was left by a crash and is read as is (its complete batches), then rolled by
the next writer that starts. The `_` prefix hides segments from pyarrow.dataset, Spark or DuckDB globs of *.parquet.

Every log's schema has a non-null `ts` (timestamp, UTC): the time that decides a row's partition and that readers
filter on. Imports nothing else of pipelines: serving writes with it, pipelines.data reads with it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SEGMENT_PREFIX, SEGMENT_SUFFIX = "_seg-", ".arrows"
PART_PREFIX, PART_SUFFIX = "part-", ".parquet"


def to_batch(records: Sequence[object], schema: pa.Schema) -> pa.RecordBatch:
    """Records (objects with an attribute per schema field, e.g. frozen dataclasses) as one record batch."""
    columns = [[getattr(r, name) for r in records] for name in schema.names]
    return pa.record_batch([pa.array(c, type=f.type) for c, f in zip(columns, schema, strict=True)], schema=schema)


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


def read_segment(path: Path, schema: pa.Schema) -> pa.Table:
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
    return pa.Table.from_batches(batches, schema=schema)


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable (POSIX: the directory entry is separate data)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partitions(root: Path, start: datetime | None = None, end: datetime | None = None) -> list[Path]:
    """The date partitions that can hold rows with start <= ts < end (None: unbounded), oldest first."""
    if not root.is_dir():
        return []
    found = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("date="))
    # a partition holds the rows of its UTC date; the bounds' own dates are included (rows are filtered by the caller)
    first = partition_name(partition_day(start)) if start is not None else ""
    last = partition_name(partition_day(end) + timedelta(days=1)) if end is not None else "date=~"
    return [p for p in found if first <= p.name < last]


def read_log(root: Path, schema: pa.Schema, start: datetime | None = None, end: datetime | None = None) -> pa.Table:
    """Every row of the log folder with start <= ts < end (None: unbounded), in `schema`, ordered by ts.

    Reads the rolled parquet parts and the segments not rolled yet: a live writer's last second, or what a crashed
    writer left. A segment is skipped when its part exists (listed after the segments, so a roll happening during
    the read is seen once: as the segment, or as the part).
    """
    for name, bound in (("start", start), ("end", end)):
        if bound is not None and bound.tzinfo is None:
            raise ValueError(f"{name} must be timezone-aware (the log is in UTC), got {bound.isoformat()}")
    tables: list[pa.Table] = []
    for partition in partitions(root, start, end):
        segments = [p for p in partition.iterdir() if is_segment(p)]
        parts = {p for p in partition.iterdir() if is_part(p)}
        tables.extend(pq.read_table(p, schema=schema) for p in sorted(parts))
        for segment in sorted(segments):
            part = part_for(segment)
            if part in parts:
                continue  # rolled, not yet unlinked
            try:
                tables.append(read_segment(segment, schema))
            except FileNotFoundError:  # rolled after the listing: its part is complete now
                tables.append(pq.read_table(part, schema=schema))
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    ts_type = schema.field("ts").type
    if start is not None:
        table = table.filter(pc.greater_equal(table["ts"], pa.scalar(start, ts_type)))
    if end is not None:
        table = table.filter(pc.less(table["ts"], pa.scalar(end, ts_type)))
    return table.sort_by("ts")
