"""Airflow Assets shared by the DAGs: what one DAG produces and another is scheduled on."""

from __future__ import annotations

from airflow.sdk import Asset

# Updated by the features DAG after a validated event log is materialized; the retrain DAG runs on it.
USER_EVENTS = Asset(name="shopguide_user_events", uri="file://shopguide/user_events")
