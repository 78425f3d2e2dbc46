"""Landing the SIMULATED user event log for a features run: generate it for the run's as-of time and validate it."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from pipelines.config import DataConfig
from pipelines.data.dataset import load_judgments, select_terms, simulate_events, split_judgments

EVENTS_FILE = "events.parquet"


def land_events(cfg: DataConfig, out_dir: str | Path, as_of: datetime) -> dict[str, Any]:
    """Write the event log a real shop would receive (here: simulated from training judgments) and validate it."""
    from pipelines.data.validate import validate_events

    train, _ = split_judgments(select_terms(load_judgments(), cfg.max_terms))
    events = simulate_events(train, cfg.event_users, as_of, cfg.event_days, cfg.event_seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # raises DataValidationError with a readable report (nothing is materialized then); Data Docs stay in the run
    report = validate_events(events, project_dir=out / "validation")
    events.to_parquet(out / EVENTS_FILE, index=False)
    return {
        "events_path": str(out / EVENTS_FILE),
        "events": len(events),
        "users": int(events["user_id"].nunique()),
        "newest": events["event_timestamp"].max().isoformat(),
        "data_docs": report["data_docs"],
    }
