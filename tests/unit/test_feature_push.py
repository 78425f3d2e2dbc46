"""pipelines.features.push: a user's online row with new events on top equals the row the features DAG builds from
the whole log (while nothing needs ageing), table-driven on a small hand-made log."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from pipelines.features.push import UserEvent, user_row_with_events
from pipelines.features.store import USER_COLUMNS, USER_VIEW, build_feature_tables

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
USER = 7


def _log(events: list[tuple[int, str, datetime]]) -> pd.DataFrame:
    frame = pd.DataFrame(events, columns=["product_id", "event_type", "event_timestamp"]).assign(user_id=USER)
    frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True)
    return frame.astype({"product_id": "int64", "user_id": "int64", "event_type": "string"})


def _row(log: pd.DataFrame, at: datetime, recent_n: int) -> dict:
    table = build_feature_tables(log, at, recent_n)[USER_VIEW]
    last = table[table["user_id"] == USER].sort_values("event_timestamp").iloc[-1]
    return {c: (list(last[c]) if c == "recent_products" else int(last[c])) for c in USER_COLUMNS}


OLD = [
    (10, "view", NOW - timedelta(hours=20)),
    (11, "click", NOW - timedelta(hours=19)),
    (12, "purchase", NOW - timedelta(hours=18)),
    (10, "click", NOW - timedelta(hours=17)),
]


@pytest.mark.parametrize(
    "new",
    [
        [(13, "click", NOW - timedelta(minutes=5))],
        [(11, "add_to_cart", NOW - timedelta(minutes=9)), (14, "purchase", NOW - timedelta(minutes=2))],
        [(14, "click", NOW - timedelta(minutes=1)), (15, "click", NOW - timedelta(minutes=1))],  # a tie in time
        [(16, "click", NOW), (12, "click", NOW - timedelta(seconds=1)), (13, "view", NOW - timedelta(seconds=2))],
    ],
    ids=["one-click", "known-product-moves-first", "tie", "three"],
)
@pytest.mark.parametrize("recent_n", [2, 10])
def test_increment_equals_the_batch_definition(new: list, recent_n: int) -> None:
    before = _row(_log(OLD), NOW - timedelta(hours=1), recent_n)
    pushed = user_row_with_events(before, [UserEvent(*e) for e in new], NOW, recent_n)
    assert pushed == _row(_log(OLD + new), NOW, recent_n)


def test_a_first_event_makes_a_row_and_each_event_counts_in_its_windows() -> None:
    events = [
        UserEvent(1, "click", NOW - timedelta(days=3)),  # 7 and 30 days, not the last day
        UserEvent(2, "purchase", NOW - timedelta(days=10)),  # 30 days only
        UserEvent(3, "click", NOW + timedelta(seconds=30)),  # a client clock ahead: it happened now
    ]
    row = user_row_with_events(None, events, NOW, 10)
    assert row == {
        "events_1d": 1,
        "events_7d": 2,
        "clicks_7d": 2,
        "purchases_30d": 1,
        "events_30d": 3,
        "last_event_ts": int(NOW.timestamp()),
        "recent_products": [3, 1, 2],
    }
    with pytest.raises(ValueError, match="timezone-aware"):
        user_row_with_events(None, events, NOW.replace(tzinfo=None), 10)
