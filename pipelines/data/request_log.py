"""Reading the service's request log (pipelines.runtime.request_log has the format): one function for a time window."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import pyarrow as pa

from pipelines.config import Paths
from pipelines.runtime.logfolder import LogStore, read_log
from pipelines.runtime.request_log import REQUEST_LOG_DIRNAME, SCHEMA


def request_log_dir(paths: Paths | None = None) -> Path:
    """Where the service writes its log: SHOPGUIDE_REQUEST_LOG_DIR, else `request_log` under SHOPGUIDE_HOME (the
    service's setting of the same name)."""
    configured = os.environ.get("SHOPGUIDE_REQUEST_LOG_DIR", "").strip()
    return Path(configured) if configured else (paths or Paths.from_env()).home / REQUEST_LOG_DIRNAME


def request_log_store() -> LogStore | None:
    """Where the rolled parts go when SHOPGUIDE_LOG_STORE is set (`request_log` under that URL); None: the folder."""
    return LogStore.from_env(REQUEST_LOG_DIRNAME)


def read_request_log(
    start: datetime | None = None,
    end: datetime | None = None,
    folder: Path | None = None,
    store: LogStore | None = None,
) -> pa.Table:
    """Every logged answer with start <= ts < end (None: unbounded), in SCHEMA, ordered by ts: the rolled parts
    and the segments not rolled yet (a live writer's last second, or what a crashed writer left), each row once.
    `folder` and `store` default to the service's (request_log_dir, request_log_store); on a host no replica writes
    to, the store alone has the log, up to each writer's last roll."""
    return read_log(
        folder if folder is not None else request_log_dir(),
        SCHEMA,
        start,
        end,
        store if store is not None else request_log_store(),
    )
