"""The durable log folder the service writes (request log, event log): layout, segments, parts, and the reader.

Layout under a log's folder, one hive partition per UTC date of each row's `ts`:

    date=2026-12-04/part-<writer>-<seq>.parquet    rolled parts: what any parquet reader sees
    date=2026-12-04/_seg-<writer>-<seq>.arrows     the open segment: Arrow IPC stream, appended + fsynced per flush

A writer appends each flush's rows to its segment as one record batch, then rolls the segment into the part of the
same name (about once a minute): per-second durability without a parquet file per second. A segment is locked
(flock) by its writer; one nobody holds was left by a crash and is read as is (its complete batches), then rolled by
the next writer that starts. The `_` prefix hides segments from pyarrow.dataset, Spark or DuckDB globs of *.parquet.

With a shared store (SHOPGUIDE_LOG_STORE, any URL fsspec understands: s3://bucket/logs with the `s3` extra,
file:///shared/logs, ...), the rolled parts go there instead, under `<store>/<log name>/date=.../part-*.parquet`, while
the open segments stay in the local folder: an fsync per second on a local disk, one upload a minute. Readers read the
local folder and the store. Chosen over a PostgreSQL table because the log is append-only analytics data at request
rate (millions of rows a day) that every reader scans by time window as parquet: an object store keeps that volume
out of the database Airflow, MLflow and Feast share, keeps one format and one reader for both profiles, and leaves
retention to the store's lifecycle rules. What it costs: a host sees another host's rows once they are rolled (the
roll interval, 60 s), where a table would show them within the flush interval.

Every log's schema has a non-null `ts` (timestamp, UTC): the time that decides a row's partition and that readers
filter on. Imports nothing else of pipelines: serving writes with it, pipelines.data reads with it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

SEGMENT_PREFIX, SEGMENT_SUFFIX = "_seg-", ".arrows"
PART_PREFIX, PART_SUFFIX = "part-", ".parquet"
LOG_STORE_ENV = "SHOPGUIDE_LOG_STORE"
# Object stores whose PUT makes an object visible whole or not at all: a part is written to its name directly.
_ATOMIC_PUT = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"}


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


def _in_window(names: Iterable[str], start: datetime | None, end: datetime | None) -> list[str]:
    """The partition names that can hold rows with start <= ts < end (None: unbounded), oldest first."""
    # a partition holds the rows of its UTC date; the bounds' own dates are included (rows are filtered by the caller)
    first = partition_name(partition_day(start)) if start is not None else ""
    last = partition_name(partition_day(end) + timedelta(days=1)) if end is not None else "date=~"
    return sorted(n for n in names if n.startswith("date=") and first <= n < last)


def partitions(root: Path, start: datetime | None = None, end: datetime | None = None) -> list[Path]:
    """The date partitions that can hold rows with start <= ts < end (None: unbounded), oldest first."""
    if not root.is_dir():
        return []
    return [root / n for n in _in_window((p.name for p in root.iterdir() if p.is_dir()), start, end)]


def modified(info: dict[str, Any]) -> float | None:
    """When a store's file was last written (POSIX seconds), from an fsspec listing entry; None when it does not say."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


@dataclass(frozen=True)
class LogStore:
    """The shared store of one log's rolled parts: `<url>/date=.../part-*.parquet`, through fsspec."""

    url: str
    fs: Any  # fsspec.AbstractFileSystem (untyped)
    root: str  # `url` as a path of `fs`

    @classmethod
    def at(cls, base_url: str, log_name: str) -> LogStore:
        """The log `log_name` (request_log, event_log) under SHOPGUIDE_LOG_STORE's URL. Raises (ImportError, ValueError)
        when fsspec cannot open it, e.g. s3:// without s3fs: a service should not start writing where it cannot roll."""
        url = f"{base_url.strip().rstrip('/')}/{log_name}"
        fs, root = fsspec.core.url_to_fs(url)
        return cls(url, fs, str(root).rstrip("/"))

    @classmethod
    def from_env(cls, log_name: str, environ: Mapping[str, str] | None = None) -> LogStore | None:
        """The log's store when SHOPGUIDE_LOG_STORE is set; None: the local folder alone (the embedded default)."""
        url = (os.environ if environ is None else environ).get(LOG_STORE_ENV, "").strip()
        return cls.at(url, log_name) if url else None

    def part_path(self, partition: str, part: str) -> str:
        return f"{self.root}/{partition}/{part}"

    def _ls(self, path: str) -> list[dict[str, Any]]:
        self.fs.invalidate_cache(path)  # s3fs & co cache listings: another writer's new part must show
        try:
            return list(self.fs.ls(path, detail=True))
        except FileNotFoundError:
            return []

    def partitions(self, start: datetime | None = None, end: datetime | None = None) -> list[str]:
        names = (e["name"].rstrip("/").rsplit("/", 1)[-1] for e in self._ls(self.root) if e.get("type") == "directory")
        return _in_window(names, start, end)

    def parts(self, partition: str) -> dict[str, dict[str, Any]]:
        """The partition's parts by file name, each with its listing entry (name = its path in the store)."""
        found = {}
        for entry in self._ls(f"{self.root}/{partition}"):
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry.get("type") == "file" and name.startswith(PART_PREFIX) and name.endswith(PART_SUFFIX):
                found[name] = entry
        return found

    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(path))

    def put(self, table: pa.Table, path: str) -> None:
        """Write a part so that readers see all of it or nothing, and it survives a crash once this returns."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        folder, name = path.rsplit("/", 1)
        if isinstance(self.fs, LocalFileSystem):  # a shared disk: the local folder's fsync + rename
            local = Path(folder)
            local.mkdir(parents=True, exist_ok=True)
            with open(local / f".{name}.tmp", "wb") as f:
                f.write(data)
                os.fsync(f.fileno())
            os.replace(local / f".{name}.tmp", path)
            fsync_dir(local)
        elif set(_protocols(self.fs)) & _ATOMIC_PUT:
            self.fs.pipe_file(path, data)
        else:  # e.g. sftp, hdfs: a hidden name, then a rename (readers list part-*.parquet only)
            self.fs.pipe_file(f"{folder}/.{name}.tmp", data)
            self.fs.mv(f"{folder}/.{name}.tmp", path)

    def read(self, paths: Sequence[str], schema: pa.Schema, columns: Sequence[str] | None = None) -> pa.Table:
        """The parts at `paths`, in `schema` (read concurrently: one request each on an object store)."""
        if not paths:
            table = schema.empty_table()
            return table.select(list(columns)) if columns is not None else table
        dataset = ds.dataset(list(paths), schema=schema, format="parquet", filesystem=self.fs)
        return dataset.to_table(columns=list(columns) if columns is not None else None)


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def read_log(
    root: Path,
    schema: pa.Schema,
    start: datetime | None = None,
    end: datetime | None = None,
    store: LogStore | None = None,
) -> pa.Table:
    """Every row of the log with start <= ts < end (None: unbounded), in `schema`, ordered by ts: the local folder's
    parts and segments, and the parts of the shared `store` when there is one.

    Reads the rolled parquet parts and the segments not rolled yet: a live writer's last second, or what a crashed
    writer left. A segment is skipped when its part exists (listed after the segments, so a roll happening during
    the read is seen once: as the segment, or as the part). A part both in the folder and in the store (an upload
    not finished with) is read from the store.
    """
    for name, bound in (("start", start), ("end", end)):
        if bound is not None and bound.tzinfo is None:
            raise ValueError(f"{name} must be timezone-aware (the log is in UTC), got {bound.isoformat()}")
    local = {p.name: p for p in partitions(root, start, end)}
    names = sorted(local.keys() | set(store.partitions(start, end) if store is not None else ()))
    tables: list[pa.Table] = []
    stored_paths: list[str] = []
    for partition in names:
        files = list(local[partition].iterdir()) if partition in local else []
        segments = sorted(p for p in files if is_segment(p))
        parts = {p.name: p for p in files if is_part(p)}
        stored = {name: entry["name"] for name, entry in store.parts(partition).items()} if store is not None else {}
        stored_paths.extend(stored[name] for name in sorted(stored))
        for name in sorted(parts.keys() - stored.keys()):
            try:
                tables.append(pq.read_table(parts[name], schema=schema))
            except FileNotFoundError:  # uploaded and removed after the listing (recover): in the store now
                if store is None:
                    raise
                tables.append(store.read([store.part_path(partition, name)], schema))
        for segment in segments:
            part = part_for(segment)
            if part.name in parts or part.name in stored:
                continue  # rolled, not yet unlinked
            try:
                tables.append(read_segment(segment, schema))
            except FileNotFoundError:  # rolled after the listing: its part is complete now
                if store is not None:
                    tables.append(store.read([store.part_path(partition, part.name)], schema))
                else:
                    tables.append(pq.read_table(part, schema=schema))
    if store is not None and stored_paths:
        tables.append(store.read(stored_paths, schema))
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    ts_type = schema.field("ts").type
    if start is not None:
        table = table.filter(pc.greater_equal(table["ts"], pa.scalar(start, ts_type)))
    if end is not None:
        table = table.filter(pc.less(table["ts"], pa.scalar(end, ts_type)))
    return table.sort_by("ts")
