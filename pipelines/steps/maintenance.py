"""Housekeeping (the maintenance DAG's step and `shopguide prune`): apply the retention policy of the profile."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pipelines.config import Paths, load_config


def prune(params: dict[str, Any], paths: Paths | None = None, now: datetime | None = None) -> dict[str, Any]:
    """`params`: profile, dry_run. Deletes what the policy (config `retention`) lets go and reports every verdict.

    Registered versions first (MLflow delete + `mlflow gc`), then pipeline run folders by age (the local runs folder,
    and the run store when it is remote: the production profile's MLflow server), then the local serving cache's
    versions that are no longer kept and all but the most recently used HNSW graphs.
    """
    from pipelines.registry import handoff, retention

    paths = paths or Paths.from_env()
    cfg = load_config(params.get("profile") or "default")
    model, policy, dry_run = cfg.registry.model_name, cfg.retention, bool(params.get("dry_run"))
    now = now or datetime.now().astimezone()
    verdicts = retention.decide_versions(
        retention.version_facts(paths, model), retention.previous_champion(paths, model), policy, now
    )
    deleted = [] if dry_run else retention.apply_version_verdicts(paths, model, verdicts)
    runs = retention.stale_folders(paths.runs, policy.run_dirs_days, now.timestamp())
    remote = handoff.local_folder(paths.run_store) is None
    published = handoff.store_runs(paths.run_store, paths.mlflow_tracking_uri) if remote else {}
    store_runs = retention.stale_store_runs(published, policy.run_dirs_days, now)
    kept = {v.version for v in verdicts if v.keep}
    # the service's layout (serving/predictor.py): <cache>/<model>/<version>/ and <cache>/ann/<hash>.usearch
    cache = retention.stale_cache_entries(paths.serving_cache / model, kept)
    cache += retention.least_recent_files(paths.serving_cache / "ann", len(kept), ".usearch")
    freed = 0 if dry_run else retention.prune_folders(runs) + retention.remove(cache)
    if store_runs and not dry_run:
        handoff.delete_store_runs(paths.run_store, store_runs, paths.mlflow_tracking_uri)
    report = {
        "dry_run": dry_run,
        "versions": [v.to_dict() for v in verdicts],
        "deleted_versions": deleted,
        "run_folders": [p.name for p in runs],
        "store_runs": store_runs,
        "store_runs_without_a_publish_time": sorted(r for r, stamp in published.items() if stamp is None),
        "cache_entries": [p.name for p in cache],
        "freed_mb": round(freed / 1e6, 1),
    }
    verb = "would delete" if dry_run else "deleted"
    print(
        f"retention ({model}): {verb} versions {[v.version for v in verdicts if not v.keep]}, "
        f"{len(runs)} run folders, {len(store_runs)} run-store folders, {len(cache)} cache entries; freed "
        f"{report['freed_mb']} MB locally"
    )
    for v in verdicts:
        print(f"  version {v.version}: {'keep' if v.keep else 'delete'} ({v.reason})")
    return report
