"""The monitor DAG's steps, one per task: measure a window of the request log against the champion's reference, read
Feast's freshness, then decide, log the window's MLflow run, append its row to the window table and export its gauges;
a window alarming on drift or vocabulary misses announces it (the Asset that schedules retraining).

A window is [end - monitor.window_minutes, end), `end` the DAG run's logical date: every step is keyed to it, so a
re-run of a window replaces that window's report, MLflow run (found again by its key) and table row.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pipelines.config import Paths, ShopguideConfig, load_config, safe_name
from pipelines.registry.handoff import task_folders

EXPERIMENT = "shopguide-monitor"
REPORT_FILE = "drift_report.html"
# The name of the Asset announce_drift emits (dags/assets.py DRIFT) and the retrain DAG's decide reads
DRIFT_ASSET = "shopguide_drift"

# DAG Params that may override the config, and where they land.
PARAM_FIELDS = {
    "window_minutes": "monitor.window_minutes",
    "min_queries": "monitor.min_queries",
}


def config_from_params(params: dict[str, Any]) -> ShopguideConfig:
    overrides = {field: params[name] for name, field in PARAM_FIELDS.items() if params.get(name) is not None}
    return load_config(params.get("profile") or "default", overrides)


def window_of(params: dict[str, Any], end: datetime) -> tuple[datetime, datetime]:
    """[start, end) of the window that ends at `end` (the run's logical date)."""
    return end - timedelta(minutes=config_from_params(params).monitor.window_minutes), end


def window_key(end: datetime) -> str:
    """The window's run key (MLflow run, run-store folder): its end, in UTC."""
    from datetime import UTC

    return f"monitor__{end.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}"


def _snapshot_terms(paths: Paths, run_key: str) -> list[str] | None:
    """The training terms of the snapshot a retrain run froze (its `data` output in the run store), if still kept."""

    from pipelines.registry.handoff import HandoffError, local_folder

    store = paths.run_store
    local = local_folder(store)
    if local is not None:
        folder: Path | None = local / safe_name(run_key) / "data"
        return _terms_in(folder)
    with task_folders(run_key, paths) as t:
        try:
            folder = Path(t.stage(f"{store.rstrip('/')}/{safe_name(run_key)}/data"))
        except HandoffError:
            return None
        return _terms_in(folder)


def _terms_in(folder: Path | None) -> list[str] | None:
    import pandas as pd

    path = None if folder is None else folder / "judgments_train.parquet"
    if path is None or not path.is_file():
        return None
    return pd.read_parquet(path, columns=["search_term"])["search_term"].dropna().astype(str).tolist()


def reference_terms(paths: Paths, model_name: str, version: str) -> tuple[list[str], str]:
    """The champion's training terms and where they came from: its retrain run's snapshot when the run store still
    holds it (retention removes run folders after a week), else the shipped judgments' training split (what every
    profile without a landed judgments file trains on)."""
    from pipelines.data.dataset import load_judgments, split_judgments
    from pipelines.registry import mlflow_client as registry

    tags = registry.version_tags(paths, model_name, version)
    run_key = tags.get("shopguide_run_key")
    terms = _snapshot_terms(paths, run_key) if run_key else None
    if terms:
        return terms, f"snapshot {tags.get('data_snapshot', '?')} of {run_key}"
    train, _ = split_judgments(load_judgments())
    return train["search_term"].dropna().astype(str).tolist(), "shipped training terms (snapshot not kept)"


def latest_window(paths: Paths, model_version: str, after: datetime | None) -> tuple[datetime, tuple[str, ...]] | None:
    """(end, alarmed drift and vocabulary-miss signals) of the latest window recorded against `model_version` that
    ends after `after`; None when there is none. Read from the windows' MLflow runs (tags written by `record`): the
    shared store any worker reads, where the window table is a file under one machine's SHOPGUIDE_HOME. Only the
    48 most recently started runs of the version are looked at (two days of hourly windows): a search, not a scan."""
    from pipelines.monitoring.decision import RETRAIN_SIGNALS
    from pipelines.registry import mlflow_client as registry

    client = registry.client(paths)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:  # the monitor never ran
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.model_version = {registry.filter_literal(model_version)}",
        order_by=["attributes.start_time DESC"],
        max_results=48,
    )
    windows = []
    for run in runs:
        tags = run.data.tags
        if "alarms" not in tags or not tags.get("window_end"):  # a window whose record step did not get that far
            continue
        end = datetime.fromisoformat(tags["window_end"])
        if after is None or end > after:
            alarmed = set(tags["alarms"].split(","))
            windows.append((end, tuple(s for s in RETRAIN_SIGNALS if s in alarmed)))
    return max(windows, default=None)


def measure(params: dict[str, Any], window_end: str) -> dict[str, Any]:
    """Answer health, engagement, vocabulary misses and drift of the window; the drift report goes to the run store."""
    from pipelines.data.event_log import read_event_log
    from pipelines.data.request_log import read_request_log
    from pipelines.monitoring.measure import measure_window
    from pipelines.registry import mlflow_client as registry

    cfg = config_from_params(params)
    paths = Paths.from_env()
    start, end = window_of(params, datetime.fromisoformat(window_end))
    model = cfg.registry.model_name
    version = registry.alias_version(paths, model, registry.CHAMPION)
    bundle = reference = None
    terms: list[str] = []
    if version is not None:
        bundle = registry.download_bundle(paths, model, version, paths.home / "monitor" / "bundles")
        terms, reference = reference_terms(paths, model, version)
    run_key = window_key(end)
    with task_folders(run_key, paths) as t:
        measured = measure_window(
            answers_log=read_request_log(start, end),
            events=read_event_log(start, end),
            bundle_dir=bundle,
            reference_terms=terms,
            cfg=cfg.monitor,
            report_path=t.output("monitor") / REPORT_FILE,
        )
        result = {
            **measured,
            "window_start": start.isoformat(),
            "window_end": end.isoformat(),
            "model_version": version,
            "reference": reference,
            "run_key": run_key,
        }
        print(f"monitor window {start.isoformat()} -> {end.isoformat()}: {_short(result)}")
        return t.publish(result)


def _short(measured: dict[str, Any]) -> str:
    drift = {k: (v or {}).get("detected") for k, v in (measured.get("drift") or {}).items()}
    return f"model {measured.get('model_version')}, health {measured['health']}, drift {drift}"


# The feature-view name under which a feature store with no readable view (unreachable, or nothing applied) is
# reported: never as "no views, so nothing stale".
UNREADABLE_STORE = "no_feature_view_readable"


def feature_freshness(window_end: str) -> dict[str, Any]:
    """Age of each feature view's newest online row at the window's end; an unreachable store is reported, not
    raised (the other signals of the window still count)."""
    from pipelines.features.store import freshness

    try:
        report = freshness(Paths.from_env(), datetime.fromisoformat(window_end))
    except Exception as err:  # Feast not applied yet, or its registry / online store unreachable
        # not "no views": a store nobody can read is the stalest of all (alarm, +Inf in the textfile)
        return {"ages": {UNREADABLE_STORE: None}, "error": f"{type(err).__name__}: {err}"[:500]}
    if not report:
        return {"ages": {UNREADABLE_STORE: None}, "error": "no feature view registered (feast apply not run?)"}
    return {"ages": {view: entry.get("newest_row_age_s") for view, entry in report.items()}}


def record(params: dict[str, Any], measured: dict[str, Any], freshness: dict[str, Any]) -> dict[str, Any]:
    """Decide, then keep the window: its MLflow run (tagged with the model version; metrics, decision, the HTML
    report), its row of the window table and, when it is the newest window, the Prometheus textfile."""
    from pipelines.monitoring import records
    from pipelines.monitoring.decision import decide
    from pipelines.monitoring.measure import signals_of
    from pipelines.registry import mlflow_client as registry

    cfg = config_from_params(params)
    paths = Paths.from_env()
    decision = decide(signals_of(measured, freshness["ages"]), cfg.monitor)
    start, end = datetime.fromisoformat(measured["window_start"]), datetime.fromisoformat(measured["window_end"])
    tags = {
        "model_version": measured.get("model_version") or "none",
        "window_start": measured["window_start"],
        "window_end": measured["window_end"],
        "reference": measured.get("reference") or "none",
        "alarm": str(decision.alarm).lower(),
    }
    run_id = registry.start_run(paths, measured["run_key"], tags, experiment=EXPERIMENT)
    registry.set_run_tags(paths, run_id, {**tags, "alarms": ",".join(s for s, a in decision.alarms.items() if a)})
    row = records.window_row(start, end, measured, decision, freshness["ages"], run_id)
    numeric = {k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    registry.log_step(paths, run_id, "monitor", numeric, params={"config": cfg.monitor.model_dump_json()})
    registry.log_step(paths, run_id, "decision", {f"alarm.{s}": int(a) for s, a in decision.alarms.items()})
    with task_folders(measured["run_key"], paths) as t:
        report = t.stage(measured).get("report_path")
        if report and Path(report).is_file():
            registry.log_file(paths, run_id, Path(report))
    registry.end_run(paths, run_id)
    records.write_window(paths, row)
    textfile = records.write_textfile(paths, row, decision)
    print("monitor decision:\n" + "\n".join(f"- {r}" for r in decision.reasons))
    return {
        **decision.to_dict(),
        "mlflow_run_id": run_id,
        "textfile": str(textfile) if textfile else None,
        "freshness_error": freshness.get("error"),
        "window_start": measured["window_start"],
        "window_end": measured["window_end"],
        "model_version": measured.get("model_version"),
    }


def announce_drift(params: dict[str, Any], recorded: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """Whether the recorded window asks for a retrain (pipelines.monitoring.decision.should_announce_drift), given
    the previous drift asset event ({"extra", "timestamp"}; None: there was none): {"announce", "reason", "extra"}.

    `extra` is what the asset event carries to the retrain run: the reason (the alarmed signals' own verdicts), the
    alarms, the window, the champion's version and the window's MLflow run. It travels in the event, not in a run
    conf: Airflow starts an Asset-triggered run without one, and hands the run its triggering events instead."""
    from pipelines.monitoring.decision import retrain_alarms, should_announce_drift

    cfg = config_from_params(params)
    alarmed = retrain_alarms(recorded["alarms"])
    version, end = recorded.get("model_version"), datetime.fromisoformat(recorded["window_end"])
    before = None
    if previous is not None:
        said = previous.get("extra") or {}
        # an event without our extra (emitted by hand): its own time stands for its window
        before = (said.get("model_version"), datetime.fromisoformat(said.get("window_end") or previous["timestamp"]))
    decision = should_announce_drift(alarmed, version, end, before, cfg.monitor.retrain_cooldown_hours)
    verdicts = [r for r in recorded["reasons"] if r.partition(":")[0] in alarmed]
    extra = {
        "reason": f"monitor window {recorded['window_start']} -> {recorded['window_end']} against @champion "
        f"v{version}: {'; '.join(verdicts) or 'no drift or vocabulary alarm'}",
        "alarms": list(alarmed),
        "window_start": recorded["window_start"],
        "window_end": recorded["window_end"],
        "model_version": version,
        "monitor_run_id": recorded.get("mlflow_run_id"),
    }
    print(f"drift {'announced' if decision.go else 'NOT announced'}: {decision.reason}")
    return {"announce": decision.go, "reason": decision.reason, "extra": extra}
