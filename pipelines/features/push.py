"""Feedback events into the online store: a user's user_activity row with new events on top, pushed through the
view's PushSource (online only, see feature_repo/definitions.py)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipelines.features.store import (
    DAY_WINDOW,
    LONG_WINDOW,
    SHORT_WINDOW,
    USER_COLUMNS,
    USER_PUSH_SOURCE,
    import_feast,
)

if TYPE_CHECKING:
    from feast import FeatureStore

# Feast's SQLite online store writes through ONE connection per store object, shared by every thread (its
# `with conn:` transactions), so two pushes at once broke each other: "cannot start a transaction within a
# transaction", "database is locked", a SystemError (~6% of pushes at 8 threads). SQLite takes one writer at a time
# anyway, so this process's pushes to it go one by one; Redis' client is a thread-safe pool and keeps its concurrency.
_SQLITE_PUSHES = threading.Lock()


@dataclass(frozen=True)
class UserEvent:
    """One new event of a user, as the online row counts it."""

    product_id: int
    event_type: str
    at: datetime  # timezone-aware


def user_row_with_events(
    row: Mapping[str, Any] | None, events: Sequence[UserEvent], now: datetime, recent_n: int
) -> dict[str, Any]:
    """The user's USER_COLUMNS with `events` (all new to the row) added to `row`, the online one (None: no row yet).

    The definitions of build_feature_tables, as an increment at `now`: an event counts in each window (1, 7, 30 days
    up to `now`) it falls in, its product goes first in recent_products (newest event first, distinct, at most
    `recent_n`), last_event_ts moves forward. The counts already in the row are not aged (that needs the events behind
    them): the features DAG's next materialization recomputes the row from its event log.
    """
    if recent_n < 1:
        raise ValueError("recent_n must be >= 1")
    at = pd.Timestamp(now)
    if at.tzinfo is None:
        raise ValueError(f"{now!r} is naive; feature times must be timezone-aware (UTC)")
    out: dict[str, Any] = {name: (row or {}).get(name) for name in USER_COLUMNS}
    for name in USER_COLUMNS[:-1]:
        out[name] = int(out[name] or 0)
    # an event a client stamped slightly ahead of this clock happened now, not later
    times = [min(pd.Timestamp(e.at), at) for e in events]
    for column, window, kinds in (
        ("events_1d", DAY_WINDOW, None),
        ("events_7d", SHORT_WINDOW, None),
        ("clicks_7d", SHORT_WINDOW, {"click"}),
        ("purchases_30d", LONG_WINDOW, {"purchase"}),
        ("events_30d", LONG_WINDOW, None),
    ):
        counted = [
            t > at - window and (kinds is None or e.event_type in kinds) for e, t in zip(events, times, strict=True)
        ]
        out[column] += sum(counted)
    if times:
        out["last_event_ts"] = max(out["last_event_ts"], int(max(times).timestamp()))
    # ties in time: the later event first, as build_feature_tables orders the log's rows
    order = sorted(range(len(events)), key=lambda i: (times[i], i), reverse=True)
    newest_first = [events[i].product_id for i in order]
    recent = [int(p) for p in newest_first + list(out["recent_products"] or [])]
    out["recent_products"] = list(dict.fromkeys(recent))[:recent_n]
    return out


def push_user_rows(store: FeatureStore, rows: Mapping[int, Mapping[str, Any]], at: datetime) -> None:
    """Write whole user_activity rows (user id -> USER_COLUMNS), stamped `at`, to the online store through the
    PushSource. Whole rows: Feast writes every feature of the view, and Redis keeps a row only if it is newer than
    the stored one (SQLite: the last write wins)."""
    import_feast()  # before any feast module: keeps torch out of the service
    from feast.data_source import PushMode

    frame = pd.DataFrame(
        [
            {"user_id": int(user), "event_timestamp": at, **{c: row[c] for c in USER_COLUMNS}}
            for user, row in rows.items()
        ]
    )
    frame = frame.astype({c: "int64" for c in ("user_id", *USER_COLUMNS[:-1])})
    frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True)
    with _SQLITE_PUSHES if store.config.online_store.type == "sqlite" else contextlib.nullcontext():
        store.push(USER_PUSH_SOURCE, frame, to=PushMode.ONLINE)
