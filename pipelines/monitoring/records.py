"""What the monitor keeps per window: one row of a parquet table (the trend plots' source, `shopguide monitor`) and
the latest window's gauges as a Prometheus textfile (node_exporter's textfile collector serves it to Prometheus)."""

from __future__ import annotations

import json
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.config import MonitorConfig, Paths, safe_name
from pipelines.monitoring.decision import DRIFT_SIGNALS, MonitorDecision

TEXTFILE_ENV = "SHOPGUIDE_MONITOR_TEXTFILE"
TEXTFILE_NAME = "shopguide_monitor.prom"

_TS = pa.timestamp("us", tz="UTC")
SCHEMA = pa.schema(
    [
        pa.field("window_start", _TS, nullable=False),
        pa.field("window_end", _TS, nullable=False),
        pa.field("model_version", pa.string()),  # the champion compared with; null: no champion
        pa.field("reference", pa.string()),  # where the reference terms came from
        pa.field("requests", pa.int64()),
        pa.field("distinct_queries", pa.int64()),
        pa.field("empty_rate", pa.float64()),
        pa.field("low_score_rate", pa.float64()),
        pa.field("latency_p50_ms", pa.float64()),
        pa.field("latency_p99_ms", pa.float64()),
        pa.field("vocab_miss_ratio", pa.float64()),
        pa.field("vocab_miss_threshold", pa.float64()),
        pa.field("unk_ratio", pa.float64()),
        *(pa.field(f"{s}_drift_score", pa.float64()) for s in DRIFT_SIGNALS),
        *(pa.field(f"{s}_drift", pa.bool_()) for s in DRIFT_SIGNALS),
        pa.field("alarm", pa.bool_(), nullable=False),
        pa.field("alarms", pa.string()),  # JSON {signal: bool}
        pa.field("engagement", pa.string()),  # JSON [{model_version, searches, ctr, add_to_cart_rate}]
        pa.field("feature_age_s", pa.string()),  # JSON {feature_view: seconds or null}
        pa.field("mlflow_run_id", pa.string()),
        pa.field("recorded_at", _TS, nullable=False),
    ]
)


def windows_dir(paths: Paths) -> Path:
    return paths.home / "monitor" / "windows"


def textfile_path(paths: Paths) -> Path:
    """SHOPGUIDE_MONITOR_TEXTFILE (e.g. a file in node_exporter's --collector.textfile.directory), else one under
    SHOPGUIDE_HOME/monitor."""
    configured = os.environ.get(TEXTFILE_ENV, "").strip()
    return Path(configured) if configured else paths.home / "monitor" / TEXTFILE_NAME


def window_row(
    start: datetime,
    end: datetime,
    measured: dict[str, Any],
    decision: MonitorDecision,
    feature_age_s: dict[str, float | None],
    mlflow_run_id: str | None,
) -> dict[str, Any]:
    """The table's row of one window from the measure step's JSON and the decision."""
    health, vocab, drift = measured["health"], measured.get("vocabulary") or {}, measured.get("drift") or {}
    row: dict[str, Any] = {
        "window_start": start,
        "window_end": end,
        "model_version": measured.get("model_version"),
        "reference": measured.get("reference"),
        **{k: health.get(k) for k in ("requests", "distinct_queries", "empty_rate", "low_score_rate")},
        **{k: health.get(k) for k in ("latency_p50_ms", "latency_p99_ms")},
        "vocab_miss_ratio": vocab.get("miss_ratio"),
        "vocab_miss_threshold": decision.vocab_miss_threshold,
        "unk_ratio": vocab.get("unk_ratio"),
        "alarm": decision.alarm,
        "alarms": json.dumps(decision.alarms, sort_keys=True),
        "engagement": json.dumps(measured.get("engagement") or []),
        "feature_age_s": json.dumps(feature_age_s, sort_keys=True),
        "mlflow_run_id": mlflow_run_id,
        "recorded_at": datetime.now(UTC),
    }
    for signal in DRIFT_SIGNALS:
        result = drift.get(signal)
        row[f"{signal}_drift_score"] = None if result is None else result["score"]
        row[f"{signal}_drift"] = None if result is None else result["detected"]
    return row


def write_window(paths: Paths, row: dict[str, Any]) -> Path:
    """One file per window, named by its end: a re-run of the window replaces its row, windows never share a file."""
    folder = windows_dir(paths)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"window-{safe_name(row['window_end'].astimezone(UTC).strftime('%Y%m%dT%H%M%SZ'))}.parquet"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(pa.Table.from_pylist([row], schema=SCHEMA), tmp)
    os.replace(tmp, path)
    return path


def read_windows(paths: Paths) -> pa.Table:
    """Every recorded window, oldest first (an empty table when none is)."""
    files = sorted(windows_dir(paths).glob("window-*.parquet"))
    if not files:
        return SCHEMA.empty_table()
    table = pa.concat_tables([pq.read_table(f, schema=SCHEMA) for f in files])
    return table.sort_by("window_end")


def write_textfile(paths: Paths, row: dict[str, Any], decision: MonitorDecision) -> Path | None:
    """The gauges docker/prometheus/rules.yml alerts on, for the newest window only: a re-run of an older window
    (a backfill) leaves the file to the newer one. Written atomically (prometheus_client's write_to_textfile)."""
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    path = textfile_path(paths)
    recorded = read_windows(paths)
    if recorded.num_rows and recorded["window_end"][-1].as_py() > row["window_end"]:
        return None
    registry = CollectorRegistry()
    Gauge(
        "shopguide_monitor_last_success_timestamp_seconds",
        "End of the last window the monitor finished (unix seconds).",
        registry=registry,
    ).set(row["window_end"].timestamp())
    drift = Gauge(
        "shopguide_monitor_drift_detected",
        "1 when the drift test fired on the last window, else 0 (absent: not tested).",
        ["signal"],
        registry=registry,
    )
    for signal in DRIFT_SIGNALS:
        if signal in decision.alarms:
            drift.labels(signal=signal).set(int(decision.alarms[signal]))
    if row["vocab_miss_ratio"] is not None and decision.vocab_miss_threshold is not None:
        Gauge(
            "shopguide_monitor_vocab_miss_ratio",
            "Share of the last window's query words outside the served vocabulary.",
            registry=registry,
        ).set(row["vocab_miss_ratio"])
        Gauge(
            "shopguide_monitor_vocab_miss_threshold",
            "The share above which the monitor alarms (the reference's share plus the configured margin).",
            registry=registry,
        ).set(decision.vocab_miss_threshold)
    ages = Gauge(
        "shopguide_monitor_feature_age_seconds",
        "Age of the feature view's newest online row at the window's end.",
        ["feature_view"],
        registry=registry,
    )
    for view, age in json.loads(row["feature_age_s"]).items():
        ages.labels(feature_view=view).set(math.inf if age is None else age)  # nothing online: stale, always
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)
    return path


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def health_table(row: dict[str, Any], cfg: MonitorConfig) -> list[tuple[str, str, str, str]]:
    """(signal, value, bound, status) rows of one recorded window, for `shopguide monitor`. status: ALARM, ok, or
    "-" when the signal was not measured in that window."""
    alarms: dict[str, bool] = json.loads(row["alarms"] or "{}")

    def status(signal: str) -> str:
        return "-" if signal not in alarms else ("ALARM" if alarms[signal] else "ok")

    rows = [(f"{s} drift", _fmt(row[f"{s}_drift_score"]), "library test", status(s)) for s in DRIFT_SIGNALS]
    rows += [
        (
            "vocabulary miss ratio",
            _fmt(row["vocab_miss_ratio"]),
            _fmt(row["vocab_miss_threshold"]),
            status("vocabulary"),
        ),
        ("[UNK] token ratio", _fmt(row["unk_ratio"]), "-", "-"),
        ("empty answer rate", _fmt(row["empty_rate"]), _fmt(cfg.max_empty_rate), status("empty_answers")),
        ("low-score answer rate", _fmt(row["low_score_rate"]), _fmt(cfg.max_low_score_rate), status("low_scores")),
        ("latency p50 ms", _fmt(row["latency_p50_ms"]), "-", "-"),
        ("latency p99 ms", _fmt(row["latency_p99_ms"]), _fmt(cfg.latency_slo_p99_ms), status("latency")),
    ]
    for view, age in sorted(json.loads(row["feature_age_s"] or "{}").items()):
        signal = f"feature_age:{view}"
        rows.append((f"{view} age s", _fmt(age), _fmt(cfg.max_feature_age_hours * 3600), status(signal)))
    for entry in json.loads(row["engagement"] or "[]"):
        v = entry["model_version"]
        rows.append((f"v{v} searches", str(entry["searches"]), "-", "-"))
        rows.append((f"v{v} CTR", _fmt(entry["ctr"]), "-", "-"))
        rows.append((f"v{v} add-to-cart rate", _fmt(entry["add_to_cart_rate"]), "-", "-"))
    return rows
