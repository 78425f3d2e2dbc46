"""Reading the service's request log (pipelines.runtime.request_log has the format): one function for a time window."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.config import Paths
from pipelines.runtime.request_log import (
    REQUEST_LOG_DIRNAME,
    SCHEMA,
    is_part,
    is_segment,
    part_for,
    partition_day,
    partition_name,
    read_segment,
)


def request_log_dir(paths: Paths | None = None) -> Path:
    """Where the service writes its log: SHOPGUIDE_REQUEST_LOG_DIR, else `request_log` under SHOPGUIDE_HOME (the
    service's setting of the same name)."""
    configured = os.environ.get("SHOPGUIDE_REQUEST_LOG_DIR", "").strip()
    return Path(configured) if configured else (paths or Paths.from_env()).home / REQUEST_LOG_DIRNAME


def read_request_log(
    start: datetime | None = None, end: datetime | None = None, folder: Path | None = None
) -> pa.Table:
    """Every logged answer with start <= ts < end (None: unbounded), in SCHEMA, ordered by ts.

    Reads the rolled parquet parts and the segments not rolled yet: a live writer's last second, or what a crashed
    writer left. A segment is skipped when its part exists (listed after the segments, so a roll happening during
    the read is seen once: as the segment, or as the part).
    """
    for name, bound in (("start", start), ("end", end)):
        if bound is not None and bound.tzinfo is None:
            raise ValueError(f"{name} must be timezone-aware (the log is in UTC), got {bound.isoformat()}")
    root = folder if folder is not None else request_log_dir()
    if not root.is_dir():
        return SCHEMA.empty_table()
    partitions = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("date="))
    if start is not None or end is not None:
        # a partition holds the rows of its UTC date; the bounds' own dates are included (filtered per row below)
        first = partition_name(partition_day(start)) if start is not None else ""
        last = partition_name(partition_day(end) + timedelta(days=1)) if end is not None else "date=~"
        partitions = [p for p in partitions if first <= p.name < last]
    tables: list[pa.Table] = []
    for partition in partitions:
        segments = [p for p in partition.iterdir() if is_segment(p)]
        parts = {p for p in partition.iterdir() if is_part(p)}
        tables.extend(pq.read_table(p, schema=SCHEMA) for p in sorted(parts))
        for segment in sorted(segments):
            part = part_for(segment)
            if part in parts:
                continue  # rolled, not yet unlinked
            try:
                tables.append(read_segment(segment))
            except FileNotFoundError:  # rolled after the listing: its part is complete now
                tables.append(pq.read_table(part, schema=SCHEMA))
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    if start is not None:
        table = table.filter(pc.greater_equal(table["ts"], pa.scalar(start, SCHEMA.field("ts").type)))
    if end is not None:
        table = table.filter(pc.less(table["ts"], pa.scalar(end, SCHEMA.field("ts").type)))
    return table.sort_by("ts")
