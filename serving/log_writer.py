"""The writer of the service's durable logs (request log, event log): a bounded queue the requests never wait on, and
one background thread that makes the rows durable every flush interval (layout: pipelines/runtime/logfolder.py)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import re
import secrets
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import IO, Generic, Protocol, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.runtime.logfolder import (
    SEGMENT_PREFIX,
    SEGMENT_SUFFIX,
    LogStore,
    fsync_dir,
    is_part,
    is_segment,
    part_for,
    partition_day,
    partition_name,
    read_segment,
    to_batch,
)
from serving.metrics import LogMetrics

log = logging.getLogger(__name__)

ROLL_ROWS = 100_000  # a part at most this large, also within a roll interval


class LogRecord(Protocol):
    """A row of a log: an attribute per schema field, and `ts`, which decides its partition."""

    @property
    def ts(self) -> datetime: ...


R = TypeVar("R", bound=LogRecord)
R_contra = TypeVar("R_contra", bound=LogRecord, contravariant=True)


class LogSink(Protocol[R_contra]):
    """Where the writer thread puts rows. Only that thread calls it, so a sink may block (a slow disk slows the
    writer, which then drops at the queue, never a request)."""

    def open(self) -> None:
        """Before the first append: take over what a crashed writer left."""

    def append(self, records: Sequence[R_contra]) -> None:
        """Make `records` durable before returning (a crash after it loses none of them)."""

    def tick(self) -> None:
        """Called after every flush: housekeeping such as rolling segments into parts."""

    def close(self) -> None:
        """Everything appended is durable and in its final form."""


@dataclass
class _Segment:
    path: Path
    file: IO[bytes]
    writer: pa.ipc.RecordBatchStreamWriter
    opened: float = field(default_factory=time.monotonic)
    rows: int = 0


def _writer_id() -> str:
    """Unique among every process writing into one folder (replicas share it): host, pid and a random token."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class SegmentFolderSink(Generic[R]):
    """Hive-partitioned parquet under `folder`, in `schema`: per UTC date an Arrow IPC segment, appended and fsynced
    on every flush, rolled into a zstd parquet part every `roll_seconds`, at `roll_rows` rows and on close. With a
    `store`, the parts go there (the segments stay in `folder`: the local disk's fsync keeps a crash's loss small)."""

    def __init__(
        self,
        folder: Path,
        schema: pa.Schema,
        roll_seconds: float = 60.0,
        roll_rows: int = ROLL_ROWS,
        store: LogStore | None = None,
    ) -> None:
        self.folder = folder
        self.schema = schema
        self.store = store
        self.roll_seconds = roll_seconds
        self.roll_rows = roll_rows
        self.writer_id = _writer_id()
        self._seq = 0
        self._open: dict[date, _Segment] = {}  # two around midnight: a row's date decides its partition
        self._abandoned: list[Path] = []  # a segment whose append failed: rolled (its complete batches) later

    def open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.recover()

    def recover(self) -> int:
        """Roll every segment no live writer holds (its writer died) into its part; returns how many. With a store,
        also upload the parts the folder holds (written before the store was configured)."""
        rolled = uploaded = 0
        for partition in sorted(self.folder.glob("date=*")):
            rolled += sum(self._roll_unheld(p) for p in sorted(partition.iterdir()) if is_segment(p))
            if self.store is not None:
                uploaded += sum(self._upload(p) for p in sorted(partition.iterdir()) if is_part(p))
        if rolled:
            log.info("%s: rolled %d segment(s) left by a stopped writer", self.folder, rolled)
        if uploaded:
            log.info("%s: uploaded %d part(s) to %s", self.folder, uploaded, self.store.url if self.store else "")
        return rolled

    def _upload(self, part: Path) -> bool:
        """A local part into the store, then removed here (idempotent: another writer may do the same at once)."""
        assert self.store is not None
        target = self.store.part_path(part.parent.name, part.name)
        if not self.store.exists(target):
            try:
                table = pq.read_table(part, schema=self.schema)
            except FileNotFoundError:
                return False
            self.store.put(table, target)
        part.unlink(missing_ok=True)
        fsync_dir(part.parent)
        return True

    def append(self, records: Sequence[R]) -> None:
        by_day: dict[date, list[R]] = {}
        for r in records:
            by_day.setdefault(partition_day(r.ts), []).append(r)
        for day, rows in by_day.items():
            segment = self._open.get(day) or self._new_segment(day)
            try:
                segment.writer.write_batch(to_batch(rows, self.schema))
                segment.file.flush()
                os.fsync(segment.file.fileno())
            except BaseException:
                # a torn batch ends what the segment can be read up to: continue in a new one
                self._seal(day).file.close()
                self._abandoned.append(segment.path)
                raise
            segment.rows += len(rows)

    def tick(self) -> None:
        now = time.monotonic()
        for day, segment in list(self._open.items()):
            if segment.rows >= self.roll_rows or now - segment.opened >= self.roll_seconds:
                self._roll_open(day)
        while self._abandoned:
            self._roll_unheld(self._abandoned[0])
            self._abandoned.pop(0)

    def close(self) -> None:
        failed: Exception | None = None
        for day in list(self._open):
            try:
                self._roll_open(day)
            except Exception as exc:  # durable as a segment anyway: the next writer's recover() rolls it
                failed = failed or exc
        for path in self._abandoned:
            try:
                self._roll_unheld(path)
            except Exception as exc:
                failed = failed or exc
        self._abandoned.clear()
        if failed is not None:
            raise failed

    def _new_segment(self, day: date) -> _Segment:
        partition = self.folder / partition_name(day)
        partition.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        name = f"{SEGMENT_PREFIX}{self.writer_id}-{self._seq:06d}{SEGMENT_SUFFIX}"
        # Locked before it gets its name, so a recovering writer never takes a live segment for an orphan.
        hidden = partition / f".{name}.new"
        file = open(hidden, "wb")  # noqa: SIM115 (kept open until the roll)
        fcntl.flock(file.fileno(), fcntl.LOCK_EX)
        writer = pa.ipc.new_stream(file, self.schema)
        os.replace(hidden, partition / name)
        fsync_dir(partition)  # the name survives a power loss; the contents are fsynced by every append
        segment = _Segment(partition / name, file, writer)
        self._open[day] = segment
        return segment

    def _seal(self, day: date) -> _Segment:
        """No more appends to the day's segment: its end-of-stream marker (the file stays open, still locked)."""
        segment = self._open.pop(day)
        try:
            segment.writer.close()
        except Exception:  # already torn: the reader stops at the last complete batch anyway
            log.warning("could not seal %s cleanly", segment.path, exc_info=True)
        return segment

    def _roll_open(self, day: date) -> None:
        segment = self._seal(day)
        try:
            self._roll_file(segment.path)  # under our lock: no recovering writer rolls it at the same time
        finally:
            segment.file.close()  # releases the lock

    def _roll_unheld(self, segment: Path) -> bool:
        """Roll a segment nobody holds, under its lock; False when a live writer (or another roller) holds it."""
        try:
            fd = os.open(segment, os.O_RDONLY)
        except FileNotFoundError:
            return False  # rolled meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            self._roll_file(segment)
            return True
        finally:
            os.close(fd)  # releases the lock

    def _roll_file(self, segment: Path) -> None:
        """Segment -> part of the same name (written aside, fsynced, renamed; or put into the store), then the segment
        goes; the caller holds the segment's lock. Idempotent: a crash at any point leaves the segment, the part, or
        both (readers then skip the segment), and the next roll finishes the job."""
        part, store = part_for(segment), self.store
        target = store.part_path(segment.parent.name, part.name) if store is not None else ""
        if not (store.exists(target) if store is not None else part.exists()):
            try:
                table = read_segment(segment, self.schema)
            except FileNotFoundError:
                return  # another writer rolled it
            if table.num_rows and store is not None:
                store.put(table, target)  # durable there before the segment goes
            elif table.num_rows:
                tmp = part.with_name(f".{part.name}.tmp")
                pq.write_table(table, tmp, compression="zstd")
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, part)
        segment.unlink(missing_ok=True)
        fsync_dir(segment.parent)


# Wakes the writer for the shutdown: an empty submit, so it needs no special case below.
_WAKE: tuple[()] = ()


class LogWriter(Generic[R]):
    """`submit` never blocks and never raises: a full queue (the writer or its sink too slow) refuses the rows and
    counts them as dropped. The writer thread appends what it has every `flush_seconds` and on close."""

    def __init__(
        self, sink: LogSink[R], capacity: int, flush_seconds: float, metrics: LogMetrics, name: str = "log"
    ) -> None:
        self.sink = sink
        self.flush_seconds = flush_seconds
        self.metrics = metrics
        self.name = name
        # One item per submit (a row, or a batch that must be taken or refused whole)
        self._queue: queue.Queue[tuple[R, ...]] = queue.Queue(maxsize=capacity)
        self._max_pending = capacity
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        metrics.queue.set_function(self._queue.qsize)

    def start(self) -> None:
        if self._thread is None:
            thread_name = f"shopguide-{self.name.replace(' ', '-')}"
            self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
            self._thread.start()

    def submit(self, record: R) -> bool:
        """Queue one row; False (and counted as dropped) when the queue is full or the writer is closing."""
        return self.submit_all((record,))

    def submit_all(self, records: Sequence[R]) -> bool:
        """Queue rows as one item, all or none: False (and counted as dropped) when the queue is full or closing."""
        if self._stopping.is_set():
            self.metrics.dropped.labels("closed").inc(len(records))
            return False
        try:
            self._queue.put_nowait(tuple(records))
        except queue.Full:
            self.metrics.dropped.labels("queue_full").inc(len(records))
            return False
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking rows, append and roll everything queued, wait for it (the lifespan's shutdown)."""
        self._stopping.set()
        if self._thread is None:
            return
        with contextlib.suppress(queue.Full):  # full: the writer is busy and sees the flag after this batch
            self._queue.put_nowait(_WAKE)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("%s writer did not finish within %.0f s: the last rows may be lost", self.name, timeout)
        self._thread = None

    def _run(self) -> None:
        try:
            self.sink.open()
        except Exception:
            log.exception("%s: opening the sink failed; appends will still be tried", self.name)
        pending: list[R] = []
        deadline = time.monotonic() + self.flush_seconds
        while True:
            wait = deadline - time.monotonic()
            if wait > 0 and not self._stopping.is_set() and len(pending) < self._max_pending:
                try:
                    item = self._queue.get(timeout=wait)
                except queue.Empty:
                    continue
                pending.extend(item)
                continue
            stopping = self._stopping.is_set()
            pending.extend(self._drain())
            if pending:
                self._append(pending)
                pending = []
            try:
                self.sink.close() if stopping else self.sink.tick()
            except Exception:
                log.exception("%s: %s failed", self.name, "close" if stopping else "roll")
            if stopping:
                return
            deadline = time.monotonic() + self.flush_seconds

    def _drain(self) -> list[R]:
        rows: list[R] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return rows
            rows.extend(item)

    def _append(self, records: list[R]) -> None:
        started = time.perf_counter()
        try:
            self.sink.append(records)
        except Exception:
            log.exception("%s: %d rows not written", self.name, len(records))
            self.metrics.dropped.labels("write_failed").inc(len(records))
            return
        self.metrics.flush.observe(time.perf_counter() - started)
        self.metrics.written.inc(len(records))
