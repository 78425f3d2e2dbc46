"""Retention: which registered versions, run folders and caches go, decided by pure functions and applied with
MLflow's own deletes and `mlflow gc`.

Policy (RetentionConfig): every version holding an alias (champion, challenger) and the previous champion (the
rollback target) stay; of the other versions the newest `keep_candidates` stay, a failed one only for
`failed_artifacts_days`. A deleted version loses its registry entry and its logged model (the bundle: ONNX graph,
index, tokenizer); its training run keeps its metrics and small reports, so the history of what was tried stays.
Pipeline run folders (snapshots, fine-tuned teachers, students: the bulk of the disk) go after `run_dirs_days`, in the
local runs folder by their newest file, in a remote run store (pipelines/registry/handoff.py) by their last publish.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pipelines.config import Paths, RetentionConfig
from pipelines.registry.mlflow_client import champion_history, champion_lineage, client, filter_literal

DAY = 86_400.0


@dataclass(frozen=True)
class VersionFacts:
    """What the policy needs to know of one registered version."""

    version: str
    created: datetime
    gate_passed: bool
    aliases: tuple[str, ...] = ()
    model_id: str | None = None


@dataclass(frozen=True)
class Verdict:
    version: str
    keep: bool
    reason: str
    model_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide_versions(
    versions: Iterable[VersionFacts], previous_champion: str | None, cfg: RetentionConfig, now: datetime
) -> list[Verdict]:
    """Keep or delete each version, newest first, with the reason (pure: the registry is read and written elsewhere)."""
    out: list[Verdict] = []
    candidates = 0
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        if v.aliases:
            out.append(Verdict(v.version, True, "holds @" + ", @".join(v.aliases), v.model_id))
            continue
        if v.version == previous_champion:
            out.append(Verdict(v.version, True, "previous champion (the rollback target)", v.model_id))
            continue
        candidates += 1
        age_days = (now - v.created).total_seconds() / DAY
        if candidates > cfg.keep_candidates:
            reason = f"older than the newest {cfg.keep_candidates} candidates"
            out.append(Verdict(v.version, False, reason, v.model_id))
        elif not v.gate_passed and age_days > cfg.failed_artifacts_days:
            reason = f"failed its gate {age_days:.1f} days ago (failed candidates stay {cfg.failed_artifacts_days:g})"
            out.append(Verdict(v.version, False, reason, v.model_id))
        else:
            out.append(Verdict(v.version, True, f"one of the newest {cfg.keep_candidates} candidates", v.model_id))
    return out


def version_facts(paths: Paths, model_name: str) -> list[VersionFacts]:
    from mlflow.exceptions import MlflowException

    c = client(paths)
    try:
        aliases = c.get_registered_model(model_name).aliases  # alias -> version
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    return [
        VersionFacts(
            version=str(mv.version),
            created=datetime.fromtimestamp(mv.creation_timestamp / 1000).astimezone(),
            gate_passed=mv.tags.get("gate_passed") == "true",
            aliases=tuple(sorted(by_version.get(str(mv.version), []))),
            model_id=_logged_model_id(mv.source),
        )
        for mv in c.search_model_versions(f"name = {filter_literal(model_name)}")
    ]


def _logged_model_id(source: str) -> str | None:
    """The logged model a version was registered from (`models:/m-...`; MLflow 3 leaves mv.model_id empty here)."""
    head = source.removeprefix("models:/")
    return head.split("/")[0] if head != source and head.startswith("m-") else None


def previous_champion(paths: Paths, model_name: str) -> str | None:
    lineage = champion_lineage(champion_history(paths, model_name))
    return lineage[-2] if len(lineage) >= 2 else None


def apply_version_verdicts(paths: Paths, model_name: str, verdicts: list[Verdict]) -> list[str]:
    """Delete the versions judged so, then let `mlflow gc` remove their logged models' artifacts for good.

    Re-reads the aliases first: a version that became champion since the decision is never deleted.
    """
    if all(v.keep for v in verdicts):  # nothing to delete (no registered model yet, on a new deployment)
        return []
    c = client(paths)
    held = {str(v) for v in c.get_registered_model(model_name).aliases.values()}
    deleted, models = [], []
    for verdict in verdicts:
        if verdict.keep or verdict.version in held:
            continue
        c.delete_model_version(model_name, verdict.version)
        deleted.append(verdict.version)
        if verdict.model_id:
            c.delete_logged_model(verdict.model_id)
            models.append(verdict.model_id)
    if models:
        collect_garbage(paths, logged_model_ids=models)
    return deleted


def collect_garbage(paths: Paths, logged_model_ids: list[str]) -> None:
    """`mlflow gc` for the deleted logged models: MLflow's own command, so a server-backed store works the same way."""
    uri = paths.mlflow_tracking_uri
    store = ["--tracking-uri", uri] if uri.startswith(("http://", "https://")) else ["--backend-store-uri", uri]
    cmd = [sys.executable, "-m", "mlflow", "gc", *store, "--logged-model-ids", ",".join(logged_model_ids)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **paths.environ()})


def newest_mtime(path: Path) -> float:
    """The newest modification time of anything under path: a run folder still being written counts as recent."""
    stamps = [path.stat().st_mtime]
    stamps += [p.stat().st_mtime for p in path.rglob("*") if not p.is_symlink()]
    return max(stamps)


def stale_folders(root: Path, older_than_days: float, now: float | None = None) -> list[Path]:
    """Folders directly under root untouched for longer than the given days, oldest first."""
    if not root.is_dir():
        return []
    now = time.time() if now is None else now
    aged = [(newest_mtime(p), p) for p in root.iterdir() if p.is_dir() and not p.is_symlink()]
    return [p for stamp, p in sorted(aged) if now - stamp > older_than_days * DAY]


def stale_store_runs(published: dict[str, datetime | None], older_than_days: float, now: datetime) -> list[str]:
    """Remote run-store folders whose last publish is older than the given days, oldest first; a folder without a
    publish time is kept (its age is unknown)."""
    aged = sorted((stamp, run) for run, stamp in published.items() if stamp is not None)
    return [run for stamp, run in aged if (now - stamp).total_seconds() > older_than_days * DAY]


def prune_folders(folders: list[Path]) -> int:
    """Delete the folders; returns the bytes freed."""
    freed = 0
    for folder in folders:
        freed += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
        shutil.rmtree(folder)  # a folder that cannot be deleted fails the step (and is not counted as freed)
    return freed


def stale_cache_entries(cache: Path, keep_versions: set[str], now: float | None = None) -> list[Path]:
    """A model's serving cache (`<version>/` folders beside their `<version>.manifest.json`, the service's layout)
    entries for versions not in keep_versions, and temporary download folders (dot names) a killed process left
    behind: untouched for a day (a download in progress writes into its folder all the time)."""
    if not cache.is_dir():
        return []
    now = time.time() if now is None else now
    folders = [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in keep_versions]
    leftovers = [p for p in cache.iterdir() if p.is_dir() and p.name.startswith(".") and now - newest_mtime(p) > DAY]
    return folders + [m for f in folders if (m := cache / f"{f.name}.manifest.json").is_file()] + leftovers


def least_recent_files(folder: Path, keep: int, suffix: str) -> list[Path]:
    """All but the `keep` most recently modified files with `suffix` (the HNSW graphs, named by content hash)."""
    if not folder.is_dir():
        return []
    files = sorted(
        (p for p in folder.iterdir() if p.is_file() and p.name.endswith(suffix)), key=lambda p: p.stat().st_mtime
    )
    return files[: max(len(files) - keep, 0)]


def remove(paths: list[Path]) -> int:
    """Delete files and folders; returns the bytes freed."""
    folders = [p for p in paths if p.is_dir()]
    freed = prune_folders(folders)
    for p in paths:
        if p.is_file():
            freed += p.stat().st_size
            p.unlink(missing_ok=True)
    return freed
