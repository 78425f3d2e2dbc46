"""What the DAGs share: the Assets one DAG produces and another is scheduled on, and the config profiles."""

from __future__ import annotations

from pathlib import Path

from airflow.sdk import Asset

# Updated by the features DAG after a validated event log is materialized; the retrain DAG runs on it.
USER_EVENTS = Asset(name="shopguide_user_events", uri="file://shopguide/user_events")

# Every configs/<profile>.yaml is a choice of the DAGs' `profile` Param (a file glob: no pipelines import at parse).
PROFILES = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
