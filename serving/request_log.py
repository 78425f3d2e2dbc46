"""The request log's writer: the service's log writer (serving/log_writer.py) over the request log's schema
(pipelines/runtime/request_log.py)."""

from __future__ import annotations

from pathlib import Path

from pipelines.runtime.logfolder import LogStore
from pipelines.runtime.request_log import SCHEMA, RequestRecord
from serving.log_writer import ROLL_ROWS, LogSink, LogWriter, SegmentFolderSink
from serving.metrics import Metrics

RequestLogSink = LogSink[RequestRecord]


class ParquetFolderSink(SegmentFolderSink[RequestRecord]):
    """The request log's folder: hive-partitioned parquet parts and fsynced segments in SCHEMA (the parts in `store`
    when there is one)."""

    def __init__(
        self, folder: Path, roll_seconds: float = 60.0, roll_rows: int = ROLL_ROWS, store: LogStore | None = None
    ) -> None:
        super().__init__(folder, SCHEMA, roll_seconds, roll_rows, store)


class RequestLog(LogWriter[RequestRecord]):
    """Answers of /v1/search and /v1/recommend, off the response path; a full queue drops the row and counts it."""

    def __init__(self, sink: RequestLogSink, capacity: int, flush_seconds: float, metrics: Metrics) -> None:
        super().__init__(sink, capacity, flush_seconds, metrics.request_log, "request log")
