"""Feast objects for shopguide: user and product entities, their activity views, the push source that feedback events
reach the user view through, and the versioned feature services."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.data_source import DataSource
from feast.types import Array, Float32, Int64

# Same rule as pipelines.config.Paths.from_env; repeated here because `feast apply` imports this file on its own.
SHOPGUIDE_HOME = Path(os.environ.get("SHOPGUIDE_HOME", Path(__file__).resolve().parents[1] / ".shopguide")).resolve()
OFFLINE_DATA = SHOPGUIDE_HOME / "feast" / "data"

user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.INT64,
    description="A shopper (simulated in the event log: the real data has no users).",
)

product = Entity(
    name="product",
    join_keys=["product_id"],
    value_type=ValueType.INT64,
    description="A catalog product (Home Depot product_uid).",
)


def _offline_source(view: str, description: str) -> DataSource:
    """The view's offline source in the store SHOPGUIDE_FEAST_OFFLINE selects (pipelines.features.store writes it):
    a table in that PostgreSQL database, or, unset, a parquet file under the home."""
    name = f"{view}_source"
    if os.environ.get("SHOPGUIDE_FEAST_OFFLINE", "").strip():
        # Imported only when selected: the default profile never loads psycopg.
        from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import PostgreSQLSource

        return PostgreSQLSource(
            name=name, table=f"shopguide_{view}", timestamp_field="event_timestamp", description=description
        )
    return FileSource(
        name=name,
        path=str(OFFLINE_DATA / f"{view}.parquet"),
        timestamp_field="event_timestamp",
        description=description,
    )


user_activity_source = _offline_source(
    "user_activity", "Daily point-in-time snapshots of per-user activity, built by pipelines.features.store."
)
product_popularity_source = _offline_source(
    "product_popularity", "Daily point-in-time snapshots of per-product popularity, built by pipelines.features.store."
)

# POST /v1/events pushes each user's updated row here (pipelines.features.push), online only: the offline rows are
# rebuilt from the event logs by the features DAG, so a pushed row written offline would only be overwritten (and
# Feast's parquet store rewrites the whole file per push; its PostgreSQL store has no offline push at all).
# Materialization keeps reading the batch source.
user_activity_push = PushSource(
    name="user_activity_push",
    batch_source=user_activity_source,
    description="The service's feedback events: a user's user_activity row with the new events on top, pushed online.",
)

user_activity = FeatureView(
    name="user_activity",
    entities=[user],
    # A user idle for longer than a month carries no useful intent for personalisation.
    ttl=timedelta(days=30),
    schema=[
        Field(name="events_1d", dtype=Int64, description="Events in the 24 hours up to the row time."),
        Field(name="events_7d", dtype=Int64, description="Events in the 7 days up to the row time."),
        Field(name="clicks_7d", dtype=Int64, description="Clicks in the 7 days up to the row time."),
        Field(name="purchases_30d", dtype=Int64, description="Purchases in the 30 days up to the row time."),
        Field(name="events_30d", dtype=Int64, description="Events in the 30 days up to the row time."),
        Field(name="last_event_ts", dtype=Int64, description="Unix seconds of the user's newest event."),
        Field(name="recent_products", dtype=Array(Int64), description="Last distinct products, most recent first."),
    ],
    online=True,
    source=user_activity_push,
    tags={"owner": "shopguide", "simulated": "true"},
)

product_popularity = FeatureView(
    name="product_popularity",
    entities=[product],
    ttl=timedelta(days=30),
    schema=[
        Field(name="views_30d", dtype=Int64, description="Views in the 30 days up to the row time."),
        Field(name="clicks_30d", dtype=Int64, description="Clicks in the 30 days up to the row time."),
        Field(name="ctr", dtype=Float32, description="clicks_30d / views_30d (0 without views)."),
    ],
    online=True,
    source=product_popularity_source,
    tags={"owner": "shopguide", "simulated": "true"},
)

# Versioned feature lists: serving asks for a service by name, never for loose feature references. Each lists its
# features explicitly, so a column added to a view later never changes a published service under a serving model.
search_v1 = FeatureService(
    name="search_v1",
    features=[
        user_activity[["events_7d", "clicks_7d", "purchases_30d", "events_30d", "last_event_ts", "recent_products"]]
    ],
    description="User features that personalise search and recommendations (first version, kept unchanged).",
)

search_v2 = FeatureService(
    name="search_v2",
    features=[
        user_activity[
            ["events_1d", "events_7d", "clicks_7d", "purchases_30d", "events_30d", "last_event_ts", "recent_products"]
        ]
    ],
    description="search_v1 + events_1d: what serving reads and the personalisation evaluation joins point-in-time.",
)

product_v1 = FeatureService(
    name="product_v1",
    features=[product_popularity[["views_30d", "clicks_30d", "ctr"]]],
    description="Product popularity and click-through: the recommendation fallback for users without history.",
)
