"""Feedback events (POST /v1/events): checked against the answers the service gave (its own, and other replicas'
through the shared request log), repeats recognised, written to the event log, pushed to the users' online rows."""

from __future__ import annotations

import logging
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.config import FeaturesConfig
from pipelines.features.push import UserEvent, user_row_with_events
from pipelines.runtime import event_log, request_log
from pipelines.runtime.event_log import EventRecord
from pipelines.runtime.index import ProductIndex
from pipelines.runtime.logfolder import LogStore, is_part, is_segment, modified, partitions, read_segment
from pipelines.runtime.request_log import RequestRecord
from serving.log_writer import LogWriter
from serving.metrics import Metrics
from serving.online_features import FeaturesUnavailable, OnlineFeatures
from serving.schemas import Event

log = logging.getLogger(__name__)

# Client and replica clocks differ: an event may claim to be this much ahead of the answer or of this replica.
CLOCK_SKEW = timedelta(seconds=60)
# How long past its flush interval another replica's writer may take to make an answer durable (a busy disk).
FLUSH_MARGIN_S = 0.5
# A miss re-lists a log folder at most this often (all misses meanwhile share that listing).
REFRESH_INTERVAL_S = 0.25
# Read-modify-push of a user's online row is serialised per user in this process (striped locks).
USER_LOCKS = 64
# A shared log store (SHOPGUIDE_LOG_STORE) gets a writer's part once a roll interval: listed at most this often, and
# at most every STORE_FORCED_S for a miss that waited (a listing is a request to the store, not a local readdir).
STORE_REFRESH_S = 5.0
STORE_FORCED_S = 1.0

RefusalReason = Literal["unknown_request", "user_mismatch", "not_shown", "unknown_product", "timestamp"]

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Answer:
    """What an event is checked against: one logged answer."""

    ts: datetime
    user_id: int | None
    model_version: str
    product_ids: array[int]  # ranked, best first; array('q'): 144 bytes for k=10, a tuple of ints 400


class LogTail:
    """The rows writers (this process and other replicas) add to a log folder and its shared store, read
    incrementally: each parquet part once, a segment again whenever it grew. Files last written before the window
    hold only older rows: skipped."""

    def __init__(
        self,
        folder: Path,
        schema: pa.Schema,
        columns: Sequence[str],
        window: timedelta,
        store: LogStore | None = None,
    ) -> None:
        self.folder, self.schema, self.columns, self.window = folder, schema, list(columns), window
        self.store = store
        self._read: dict[Path, int] = {}  # file -> its size when read
        self._stored: set[str] = set()  # the store's parts read (a part never changes)
        self._store_listed_at = float("-inf")

    def read_new(self, now: datetime, force: bool = False) -> pa.Table | None:
        since = now - self.window
        tables: list[pa.Table] = []
        listed: set[Path] = set()
        for partition in partitions(self.folder, since):
            try:
                files = [p for p in partition.iterdir() if is_part(p) or is_segment(p)]
            except FileNotFoundError:
                continue
            for path in files:
                try:
                    stat = path.stat()  # before the read: bytes appended during it make the next size differ
                except FileNotFoundError:
                    continue  # a segment rolled meanwhile: its part is in the next listing
                listed.add(path)
                if stat.st_mtime < since.timestamp() or self._read.get(path) == stat.st_size:
                    continue
                try:
                    if is_part(path):
                        tables.append(pq.read_table(path, columns=self.columns, schema=self.schema))
                    else:
                        tables.append(read_segment(path, self.schema).select(self.columns))
                except FileNotFoundError:
                    continue
                except Exception:  # one unreadable file must not stop the checks: logged, not retried until it changes
                    log.warning("%s: cannot read %s", self.folder, path, exc_info=True)
                self._read[path] = stat.st_size
        self._read = {p: size for p, size in self._read.items() if p in listed}  # rolled away or out of the window
        if self.store is not None:
            due = STORE_FORCED_S if force else STORE_REFRESH_S
            if time.monotonic() - self._store_listed_at >= due:
                tables.extend(self._read_store(self.store, since))
        if not tables:
            return None
        table = pa.concat_tables(tables)
        return table.filter(pc.greater_equal(table["ts"], pa.scalar(since, self.schema.field("ts").type)))

    def _read_store(self, store: LogStore, since: datetime) -> list[pa.Table]:
        """The store's parts not read yet and written within the window (give or take another host's clock)."""
        self._store_listed_at = time.monotonic()
        oldest = (since - CLOCK_SKEW).timestamp()
        listed: set[str] = set()
        new: list[str] = []
        for partition in store.partitions(since):
            for entry in store.parts(partition).values():
                path, written = entry["name"], modified(entry)
                listed.add(path)
                if path not in self._stored and (written is None or written >= oldest):
                    new.append(path)
        self._stored = (self._stored & listed) | set(new)
        if not new:
            return []
        try:
            return [store.read(new, self.schema, self.columns)]
        except Exception:  # find the unreadable one; it is logged and not retried, like a local file
            tables = []
            for path in new:
                try:
                    tables.append(store.read([path], self.schema, self.columns))
                except Exception:
                    log.warning("%s: cannot read %s", store.url, path, exc_info=True)
            return tables


class TailedIndex(Generic[K, V]):
    """A bounded map (the oldest entry goes first) of what this process put in, plus what a log folder's tail adds."""

    def __init__(self, tail: LogTail, capacity: int, entries: Callable[[pa.Table], Iterable[tuple[K, V]]]) -> None:
        self.tail, self.capacity, self._entries = tail, capacity, entries
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()
        self._refreshed_at = float("-inf")

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, key: K) -> V | None:
        with self._lock:
            return self._items.get(key)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def discard(self, key: K) -> None:
        with self._lock:
            self._items.pop(key, None)

    def refresh(self, now: datetime, force: bool = False) -> None:
        """Read what the folder's writers added since the last refresh. Single flight: a caller that waited for a
        refresh in progress finds its rows and does not list again, unless `force`."""
        with self._refreshing:
            if not force and time.monotonic() - self._refreshed_at < REFRESH_INTERVAL_S:
                return
            started = time.monotonic()
            try:
                table = self.tail.read_new(now, force)
            except Exception:
                log.exception("%s: reading the log failed", self.tail.folder)
                return
            if table is not None and table.num_rows > self.capacity:  # only the newest would stay anyway
                table = table.sort_by("ts").slice(table.num_rows - self.capacity)
            for key, value in self._entries(table) if table is not None else ():
                self.put(key, value)
            self._refreshed_at = started


def _answers(table: pa.Table) -> Iterable[tuple[str, Answer]]:
    columns = [table[name].to_pylist() for name in ("request_id", "ts", "user_id", "model_version", "product_ids")]
    for request_id, ts, user_id, version, products in zip(*columns, strict=True):
        yield request_id, Answer(ts, user_id, version, array("q", products))


def _event_keys(table: pa.Table) -> Iterable[tuple[tuple[str, int, str], None]]:
    for key in zip(*(table[name].to_pylist() for name in event_log.EVENT_KEY), strict=True):
        yield key, None


@dataclass(frozen=True)
class Refusal:
    """Why one event of a request is refused: its index in the request, the field and the reason."""

    index: int
    field: str
    reason: RefusalReason
    message: str
    value: Any


class EventsRefused(Exception):
    """At least one event of the request is invalid: none of them is accepted."""

    def __init__(self, refusals: list[Refusal]) -> None:
        super().__init__("; ".join(r.message for r in refusals))
        self.refusals = refusals


class EventLogFull(Exception):
    """The event log's writer is behind: nothing was accepted, the client retries later."""


@dataclass(frozen=True)
class Outcome:
    received: int
    accepted: int
    duplicates: int
    online: bool
    online_reason: str | None


class Feedback:
    """The checks, the event log and the online push behind POST /v1/events.

    An event names an answer (request_id) of the last `window`: one this process gave (remembered as it goes out)
    or one in the shared request log (another replica's). It is refused when that answer is unknown or older, was
    for another user, when a click names a product the answer did not show, when a product is neither in the answer
    nor in the served catalog, or when its time is before the answer or in the future (beyond CLOCK_SKEW). A batch
    is accepted or refused whole. The same (request_id, product_id, type) again is a duplicate: acknowledged, not
    written or counted again; repeats are recognised from this process's memory and the shared event log.
    """

    def __init__(
        self,
        features: OnlineFeatures,
        metrics: Metrics,
        writer: LogWriter[EventRecord],
        *,
        request_log_folder: Path,
        event_log_folder: Path,
        request_log_store: LogStore | None = None,
        event_log_store: LogStore | None = None,
        window_seconds: float,
        lookup_size: int,
        flush_seconds: float,
        recent_n: int = FeaturesConfig().recent_products,
    ) -> None:
        self.features, self.metrics, self.writer = features, metrics, writer
        self.window = timedelta(seconds=window_seconds)
        self.recent_n = recent_n
        # another replica's answer is durable within its flush interval: a miss waits this long before it is final
        self.miss_wait_s = flush_seconds + FLUSH_MARGIN_S
        answer_columns = ["request_id", "ts", "user_id", "model_version", "product_ids"]
        self.answers: TailedIndex[str, Answer] = TailedIndex(
            LogTail(request_log_folder, request_log.SCHEMA, answer_columns, self.window, request_log_store),
            lookup_size,
            _answers,
        )
        self.seen: TailedIndex[tuple[str, int, str], None] = TailedIndex(
            LogTail(event_log_folder, event_log.SCHEMA, ["ts", *event_log.EVENT_KEY], self.window, event_log_store),
            lookup_size,
            _event_keys,
        )
        self._claim = threading.Lock()  # what is new is decided and marked in one step
        self._user_locks = [threading.Lock() for _ in range(USER_LOCKS)]

    def remember(self, answer: RequestRecord) -> None:
        """An answer going out now: events may name it before the request log has it."""
        self.answers.put(
            answer.request_id,
            Answer(answer.ts, answer.user_id, answer.model_version, array("q", answer.product_ids)),
        )

    def record(self, events: Sequence[Event], catalog: ProductIndex, received: datetime) -> Outcome:
        """Check, log and push one request's events; raises EventsRefused or EventLogFull (nothing accepted)."""
        keys = [(e.request_id, e.product_id, e.type) for e in events]
        candidates = self._unseen(keys, received)
        answers = self._answers_of([events[i] for i in candidates], received)
        refusals = [
            r
            for i in candidates
            if (r := self._check(i, events[i], answers.get(events[i].request_id), catalog, received))
        ]
        if refusals:
            for e in events:  # the request is refused whole: its valid events too
                self.metrics.events.labels(e.type, "refused").inc()
            for r in refusals:
                self.metrics.events_refused.labels(r.reason).inc()
            raise EventsRefused(refusals)
        with self._claim:  # a concurrent request with the same event may have taken it since the check above
            new = [i for i in candidates if keys[i] not in self.seen]
            for i in new:
                self.seen.put(keys[i], None)
        records = []
        for i in new:
            e, answer = events[i], answers[events[i].request_id]
            position = answer.product_ids.index(e.product_id) if e.product_id in answer.product_ids else None
            records.append(
                EventRecord(
                    received, e.request_id, e.user_id, e.product_id, e.type, e.ts, position, answer.model_version
                )
            )
        if records and not self.writer.submit_all(records):
            for i in new:
                self.seen.discard(keys[i])  # not taken: the client's retry must not count as a repeat
            raise EventLogFull("the event log's writer is behind; retry later (repeats are recognised)")
        accepted = set(new)
        for i, e in enumerate(events):
            self.metrics.events.labels(e.type, "accepted" if i in accepted else "duplicate").inc()
        online_reason = self._push(records, received) if records else None
        return Outcome(len(events), len(records), len(events) - len(records), online_reason is None, online_reason)

    def _unseen(self, keys: Sequence[tuple[str, int, str]], now: datetime) -> list[int]:
        """Indexes of the events not seen before (in this request, this process or the shared event log)."""
        if any(k not in self.seen for k in keys):
            self.seen.refresh(now)  # another replica may have taken some of them
        new: list[int] = []
        batch: set[tuple[str, int, str]] = set()
        for i, key in enumerate(keys):
            if key in batch or key in self.seen:
                continue
            batch.add(key)
            new.append(i)
        return new

    def _answers_of(self, events: Sequence[Event], received: datetime) -> dict[str, Answer]:
        """The answers the events name, from memory, else the shared request log; an id still missing is looked up
        once more after another replica's flush interval when the event is recent (its answer may be in flight)."""
        wanted = {e.request_id for e in events}
        found = {rid: a for rid in wanted if (a := self.answers.get(rid)) is not None}
        if len(found) < len(wanted):
            self.answers.refresh(received)
            found |= {rid: a for rid in wanted - found.keys() if (a := self.answers.get(rid)) is not None}
        if any(e.request_id not in found and abs(e.ts - received) <= CLOCK_SKEW for e in events):
            elapsed = time.time() - received.timestamp()
            time.sleep(max(0.0, self.miss_wait_s - elapsed))
            self.answers.refresh(received, force=True)
            found |= {rid: a for rid in wanted - found.keys() if (a := self.answers.get(rid)) is not None}
        return found

    def _check(
        self, index: int, e: Event, answer: Answer | None, catalog: ProductIndex, received: datetime
    ) -> Refusal | None:
        def refuse(field: str, reason: RefusalReason, message: str, value: Any) -> Refusal:
            return Refusal(index, field, reason, message, value)

        if answer is None or answer.ts < received - self.window:
            message = f"no answer with this request_id in the last {self.window.total_seconds():g} s"
            return refuse("request_id", "unknown_request", message, e.request_id)
        if answer.user_id is not None and answer.user_id != e.user_id:
            return refuse("user_id", "user_mismatch", f"the answer was for user {answer.user_id}", e.user_id)
        shown = e.product_id in answer.product_ids
        if e.type == "click" and not shown:
            return refuse("product_id", "not_shown", "a click must name a product the answer showed", e.product_id)
        if not shown and len(catalog.rows_of([e.product_id])) == 0:
            return refuse("product_id", "unknown_product", "not a product of the served catalog", e.product_id)
        if e.ts < answer.ts - CLOCK_SKEW:
            return refuse("ts", "timestamp", f"before the answer it names ({answer.ts.isoformat()})", e.ts.isoformat())
        if e.ts > received + CLOCK_SKEW:
            return refuse("ts", "timestamp", "in the future", e.ts.isoformat())
        return None

    def _push(self, records: list[EventRecord], now: datetime) -> str | None:
        """The users' online rows with the new events on top; None when pushed, else why not (events stay logged)."""
        by_user: dict[int, list[UserEvent]] = {}
        for r in records:
            by_user.setdefault(r.user_id, []).append(UserEvent(r.product_id, r.event_type, r.event_timestamp))
        users = sorted(by_user)
        locks = sorted({hash(u) % USER_LOCKS for u in users})  # in order: two requests never wait on each other
        started = time.perf_counter()
        for n in locks:
            self._user_locks[n].acquire()
        try:
            current = self.features.users_features(users)
            rows = {
                u: user_row_with_events(row, by_user[u], now, self.recent_n)
                for u, row in zip(users, current, strict=True)
            }
            self.features.push_user_rows(rows, now)
        except FeaturesUnavailable as exc:
            log.warning("events of %d user(s) logged but not pushed online: %s", len(users), exc)
            self.metrics.feature_pushes.labels("failed").inc()
            return str(exc)[:300]
        except Exception:  # a bug here must not lose logged events' acknowledgement
            log.exception("pushing events of %d user(s) failed", len(users))
            self.metrics.feature_pushes.labels("failed").inc()
            return "internal error"
        finally:
            for n in locks:
                self._user_locks[n].release()
        self.metrics.feature_pushes.labels("ok").inc()
        self.metrics.stage.labels("push").observe(time.perf_counter() - started)  # read, update, write
        return None
