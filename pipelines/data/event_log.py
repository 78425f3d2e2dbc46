"""Reading the service's event log (pipelines.runtime.event_log has the format): one function for a time window."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.config import Paths
from pipelines.runtime.event_log import EVENT_KEY, EVENT_LOG_DIRNAME, SCHEMA
from pipelines.runtime.logfolder import LogStore, read_log


def event_log_dir(paths: Paths | None = None) -> Path:
    """Where the service writes its event log: SHOPGUIDE_EVENT_LOG_DIR, else `event_log` under SHOPGUIDE_HOME (the
    service's setting of the same name)."""
    configured = os.environ.get("SHOPGUIDE_EVENT_LOG_DIR", "").strip()
    return Path(configured) if configured else (paths or Paths.from_env()).home / EVENT_LOG_DIRNAME


def event_log_store() -> LogStore | None:
    """Where the rolled parts go when SHOPGUIDE_LOG_STORE is set (`event_log` under that URL); None: the folder."""
    return LogStore.from_env(EVENT_LOG_DIRNAME)


def read_event_log(
    start: datetime | None = None,
    end: datetime | None = None,
    folder: Path | None = None,
    deduplicate: bool = True,
    store: LogStore | None = None,
) -> pa.Table:
    """Every accepted event with start <= ts < end (ts: when the service accepted it; None: unbounded), in SCHEMA,
    ordered by ts. `folder` and `store` default to the service's (event_log_dir, event_log_store).

    With `deduplicate`, each (request_id, product_id, event_type) once, its first acceptance: a replica drops repeats
    it or the log has seen, but two replicas taking the same event within one flush interval both log it.
    """
    folder = folder if folder is not None else event_log_dir()
    table = read_log(folder, SCHEMA, start, end, store if store is not None else event_log_store())
    if not deduplicate or table.num_rows == 0:
        return table
    numbered = table.append_column("_row", pa.array(range(table.num_rows), pa.int64()))
    first = numbered.group_by(list(EVENT_KEY), use_threads=False).aggregate([("_row", "min")])
    rows = first["_row_min"]
    return table.take(pc.take(rows, pc.sort_indices(rows)))  # the log's ts order
