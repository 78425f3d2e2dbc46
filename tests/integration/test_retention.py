"""Retention on a real MLflow store: which versions go, that `mlflow gc` really removes their artifacts, and that
champions never go; run folders and serving caches by age and use."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from pipelines.config import Paths, RetentionConfig
from pipelines.registry import mlflow_client as registry
from pipelines.registry import retention
from pipelines.runtime.bundle import REQUIRED_FILES, bundle_manifest

NOW = datetime(2026, 12, 3, 12, 0).astimezone()


def facts(version: int, days_old: float, passed: bool, *aliases: str) -> retention.VersionFacts:
    return retention.VersionFacts(str(version), NOW - timedelta(days=days_old), passed, tuple(aliases))


def test_policy_keeps_aliases_the_rollback_target_and_the_newest_candidates() -> None:
    versions = [
        facts(1, 60, True),  # old, passed, not kept by anything
        facts(2, 50, True),  # the previous champion
        facts(3, 40, True, "champion"),
        facts(4, 30, False),  # failed, expired
        facts(5, 20, True),
        facts(6, 3, False),  # failed, recent
        facts(7, 1, False, "challenger"),  # failed, but aliased
    ]
    verdicts = {v.version: v for v in retention.decide_versions(versions, "2", RetentionConfig(keep_candidates=3), NOW)}
    assert [v for v, d in verdicts.items() if d.keep] == ["7", "6", "5", "3", "2"]
    assert "older than the newest 3" in verdicts["1"].reason
    assert "failed its gate 30.0 days ago" in verdicts["4"].reason
    assert verdicts["7"].reason == "holds @challenger" and "rollback" in verdicts["2"].reason
    none_kept = retention.decide_versions(versions, None, RetentionConfig(keep_candidates=0), NOW)
    assert sorted(v.version for v in none_kept if v.keep) == ["3", "7"]  # only the aliases survive


def add_version(paths: Paths, model: str, folder: Path, gate_passed: bool) -> tuple[str, str]:
    """A version over its own logged model holding a bundle of placeholder files, with the sha256 manifest
    register_bundle records (what promotion verifies; the files' content does not matter here)."""
    c = registry.client(paths)
    logged = c.create_logged_model(registry.experiment_id(paths), name="model")
    c.log_model_artifacts(logged.model_id, str(folder))
    manifest = json.dumps(bundle_manifest(folder / "artifacts" / registry.BUNDLE_ARTIFACT))
    tags = {"gate_passed": str(gate_passed).lower(), registry.MANIFEST_TAG: manifest}
    mv = c.create_model_version(model, f"models:/{logged.model_id}", tags=tags)
    return str(mv.version), logged.model_id


def registry_with_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str, passed: tuple[bool, ...]
) -> tuple[Paths, list[tuple[str, str]]]:
    paths = Paths(tmp_path / "home")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # this test's own store; restored afterwards
    bundle = tmp_path / "model" / "artifacts" / registry.BUNDLE_ARTIFACT
    for name in REQUIRED_FILES:
        (bundle / name).parent.mkdir(parents=True, exist_ok=True)
        (bundle / name).write_bytes(b"\0" * 1024)
    registry.client(paths).create_registered_model(model)
    return paths, [add_version(paths, model, tmp_path / "model", p) for p in passed]


def test_pruning_deletes_versions_and_their_artifacts_but_never_a_champion(tmp_path, monkeypatch) -> None:
    paths, made = registry_with_versions(tmp_path, monkeypatch, "retention-test", (True, True, False, True))
    registry.promote(paths, "retention-test", "1", "first", "test")
    registry.promote(paths, "retention-test", "2", "second", "test")
    artifacts = {v: paths.mlflow_artifacts / "models" / m for v, m in made}
    assert all(p.is_dir() for p in artifacts.values())

    found = retention.version_facts(paths, "retention-test")
    assert {f.version: f.model_id for f in found} == dict(made)
    verdicts = retention.decide_versions(
        found, retention.previous_champion(paths, "retention-test"), RetentionConfig(keep_candidates=1), NOW
    )
    # 2 champion, 1 previous champion, 4 the newest candidate, 3 beyond the newest 1
    assert {v.version: v.keep for v in verdicts} == {"4": True, "3": False, "2": True, "1": True}
    # the champion moves to 3 between decision and deletion: 3 must survive
    registry.promote(paths, "retention-test", "3", "third", "test", force=True)
    assert retention.apply_version_verdicts(paths, "retention-test", verdicts) == []
    verdicts = [retention.Verdict("4", False, "test", dict(made)["4"])]
    assert retention.apply_version_verdicts(paths, "retention-test", verdicts) == ["4"]
    left = {f.version for f in retention.version_facts(paths, "retention-test")}
    assert left == {"1", "2", "3"}
    assert not [p for p in artifacts["4"].rglob("*") if p.is_file()]  # mlflow gc removed the logged model's files
    assert all(artifacts[v].is_dir() for v in ("1", "2", "3"))


def test_run_folders_go_by_their_newest_file_and_caches_by_use(tmp_path) -> None:
    now = time.time()
    runs = tmp_path / "runs"
    for name, age_days in (("old", 10), ("recent", 1), ("old-but-written", 10)):
        (runs / name / "sub").mkdir(parents=True)
        f = runs / name / "sub" / "f.bin"
        f.write_bytes(b"x" * 100)
        stamp = now - age_days * retention.DAY
        for p in (f, f.parent, f.parent.parent):
            os.utime(p, (stamp, stamp))
    os.utime(runs / "old-but-written" / "sub" / "f.bin", (now, now))  # a task still writing into it
    stale = retention.stale_folders(runs, 7, now)
    assert [p.name for p in stale] == ["old"]
    assert retention.prune_folders(stale) == 100 and not (runs / "old").exists()

    cache = tmp_path / "cache"
    for version in ("3", "4", "5"):
        (cache / version).mkdir(parents=True)
        (cache / f"{version}.manifest.json").write_text("{}")
    (cache / ".6.tmp-abc").mkdir()  # a download in progress is never touched
    (cache / ".2.partial").mkdir()  # ... but one a killed process left two days ago is
    os.utime(cache / ".2.partial", (now - 2 * retention.DAY, now - 2 * retention.DAY))
    (cache / "champion.json").write_text("{}")  # the alias pointer
    stale = retention.stale_cache_entries(cache, {"4", "5"}, now)
    assert sorted(p.name for p in stale) == [".2.partial", "3", "3.manifest.json"]
    retention.remove(stale)
    left = sorted(p.name for p in cache.iterdir())
    assert left == [".6.tmp-abc", "4", "4.manifest.json", "5", "5.manifest.json", "champion.json"]

    ann = tmp_path / "ann"
    ann.mkdir()
    for i, name in enumerate(("a.usearch", "b.usearch", "c.usearch")):
        (ann / name).write_bytes(b"g")
        os.utime(ann / name, (now - 100 + i, now - 100 + i))
    assert [p.name for p in retention.least_recent_files(ann, 2, ".usearch")] == ["a.usearch"]


def test_prune_step_reports_first_and_deletes_only_without_dry_run(tmp_path, monkeypatch) -> None:
    from pipelines.steps.maintenance import prune

    paths, made = registry_with_versions(tmp_path, monkeypatch, "prune-step-test", (True, False, True))
    registry.promote(paths, "prune-step-test", "3", "champion", "test")
    profile = tmp_path / "profile.yaml"
    profile.write_text("registry: {model_name: prune-step-test}\nretention: {keep_candidates: 1, run_dirs_days: 7}\n")
    old_run = paths.runs / "old-run"
    old_run.mkdir(parents=True)
    (old_run / "teacher.safetensors").write_bytes(b"w" * 2_000_000)
    stamp = time.time() - 8 * retention.DAY
    os.utime(old_run / "teacher.safetensors", (stamp, stamp))
    os.utime(old_run, (stamp, stamp))

    report = prune({"profile": str(profile), "dry_run": True}, paths)
    assert [(v["version"], v["keep"]) for v in report["versions"]] == [("3", True), ("2", True), ("1", False)]
    assert report["deleted_versions"] == [] and report["run_folders"] == ["old-run"] and old_run.exists()
    assert {f.version for f in retention.version_facts(paths, "prune-step-test")} == {"1", "2", "3"}

    report = prune({"profile": str(profile)}, paths)
    assert report["deleted_versions"] == ["1"] and report["freed_mb"] == 2.0 and not old_run.exists()
    assert {f.version for f in retention.version_facts(paths, "prune-step-test")} == {"2", "3"}


def test_maintenance_dag_runs_the_step_in_real_airflow(airflow_paths: Paths) -> None:
    from pipelines.airflow_env import run_dag_test

    result = run_dag_test(airflow_paths, "shopguide_maintenance", {"dry_run": True}, capture=True)
    assert result.ok, result.output[-3000:]
    assert "retention (shopguide-encoder): would delete" in result.output
