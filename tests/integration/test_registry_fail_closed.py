"""The registry fails closed on real stores: an unreachable or corrupt MLflow is an error, never "no champion"; a
champion whose bundle is not the registered one fails the gate; a run key with a quote cannot change a search filter;
every download of a registered bundle is checked against the sha256 manifest recorded at registration."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pipelines.config import CONFIG_DIR, REPO_ROOT, Paths
from pipelines.registry import mlflow_client as registry
from pipelines.runtime.bundle import EMBEDDINGS_FILE, INDEX_DIR, REPORT_FILE, bundle_manifest
from pipelines.steps import retrain

# A candidate that clears every default floor: only the comparison with the champion can stop it.
CANDIDATE = {
    "ndcg_at_10": 0.99,
    "category_accuracy": 0.99,
    "parity_cosine_min": 1.0,
    "latency_p99_ms": 1.0,
    "size_mb": 1.0,
    "ood_ndcg_at_10": 0.6,  # the out-of-domain rule is on in the default profile: a missing figure fails the gate
    "base_ood_ndcg_at_10": 0.6,
    "snapshot_hash": "fail-closed",
}
EMBEDDINGS = f"{INDEX_DIR}/{EMBEDDINGS_FILE}"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed: connections are refused


def _profile(tmp_path: Path, model: str) -> str:
    """configs/default.yaml with its own registered model name (a path is a valid `profile` param)."""
    raw = yaml.safe_load((CONFIG_DIR / "default.yaml").read_text())
    raw.setdefault("registry", {})["model_name"] = model
    path = tmp_path / f"{model}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture
def registry_restored() -> Iterator[None]:
    """mlflow's global tracking/registry URI back on the session store afterwards (registry.client sets them)."""
    import mlflow

    uri = os.environ["MLFLOW_TRACKING_URI"]
    yield
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


@pytest.fixture
def unreachable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, registry_restored: None) -> Paths:
    """MLflow down: a tracking server address where nothing listens; MLflow's HTTP retries kept short."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("SHOPGUIDE_HOME", str(tmp_path))
    return Paths.from_env()


@pytest.fixture
def corrupt_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, registry_restored: None) -> Paths:
    """The local profile's SQLite backend store, overwritten with garbage (a torn copy, a bad disk)."""
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not an SQLite database " * 64)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("SHOPGUIDE_HOME", str(tmp_path))
    return Paths.from_env()


def _store_errors() -> tuple[type[BaseException], ...]:
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    return (MlflowException, SQLAlchemyError)


@pytest.mark.parametrize("broken", ["unreachable", "corrupt_store"])
def test_registry_reads_raise_instead_of_answering_none(broken: str, request: pytest.FixtureRequest) -> None:
    paths: Paths = request.getfixturevalue(broken)
    reads = {
        "alias_version": lambda: registry.alias_version(paths, "fail-closed", registry.CHAMPION),
        "version_report": lambda: registry.version_report(paths, "fail-closed", "1"),
        "find_version": lambda: registry.find_version(paths, "fail-closed", "a-run-key"),
        "champion_history": lambda: registry.champion_history(paths, "fail-closed"),
        "version_manifest": lambda: registry.version_manifest(paths, "fail-closed", "1"),
    }
    for name, read in reads.items():
        started = time.monotonic()
        with pytest.raises(_store_errors()) as raised:
            read()
        print(f"{broken}: {name} raised {type(raised.value).__name__} in {time.monotonic() - started:.1f} s")


@pytest.mark.parametrize("broken", ["unreachable", "corrupt_store"])
def test_gate_and_promote_steps_fail_instead_of_deciding_on_floors_alone(
    broken: str, request: pytest.FixtureRequest, tmp_path: Path, champion
) -> None:
    paths: Paths = request.getfixturevalue(broken)  # after `champion` was built on the session's working store
    params = {"profile": _profile(tmp_path, "fail-closed")}
    with pytest.raises(_store_errors()):
        retrain.gate(params, {"mlflow_run_id": "never-reached"}, CANDIDATE)
    decision = {"passed": True, "reasons": ["ok: test"], "champion_version": "1"}
    with pytest.raises(_store_errors()) as raised:  # not a PromotionError saying the version does not exist
        retrain.promote(params, {"mlflow_run_id": "never-reached"}, {"version": "2"}, decision, {}, "fail-closed-run")
    assert not isinstance(raised.value, registry.PromotionError)
    with pytest.raises(_store_errors()):  # find_version raises: the run is not registered a second time
        registry.register_bundle(paths, "never-reached", champion.bundle_dir, "fail-closed", "a-run-key", {})


# --- a real champion, its report broken in the artifact store ---------------------------------------------------


def _register_copy(champion, model: str, run_key: str, tmp_path: Path, extra_files: int = 0) -> tuple[str, Path]:
    """The session champion's bundle registered once more under `model` (its own logged model, so its own files in
    the artifact store); returns the version and where its bundle lies in the artifact store."""
    from mlflow.utils.file_utils import local_file_uri_to_path

    paths = Paths.from_env()
    bundle = tmp_path / run_key / registry.BUNDLE_ARTIFACT
    shutil.copytree(champion.bundle_dir, bundle)
    for i in range(extra_files):
        (bundle / "extra").mkdir(exist_ok=True)
        (bundle / "extra" / f"file-{i:03d}.txt").write_text(f"extra {i}\n")
    run_id = registry.start_run(paths, run_key, {})
    version = registry.register_bundle(paths, run_id, bundle, model, run_key, {"gate_passed": "true"})
    registry.end_run(paths, run_id)
    stored = Path(local_file_uri_to_path(registry.client(paths).get_model_version_download_uri(model, version)))
    return version, stored / "artifacts" / registry.BUNDLE_ARTIFACT


def test_a_champion_whose_bundle_is_not_the_registered_one_fails_the_gate(
    champion, shopguide_home: Paths, tmp_path: Path
) -> None:
    """The gate re-evaluates @champion from its registered bundle: one whose files no longer match the manifest
    recorded at registration (a report truncated, then deleted in the artifact store) cannot be evaluated, and that
    fails the gate with the reason, never "no champion yet"."""
    from pipelines.data.dataset import Snapshot
    from pipelines.runtime.bundle import PER_QUERY_FILE

    paths, model = shopguide_home, "fail-closed-gate"
    version, stored = _register_copy(champion, model, "fail-closed-gate-champion", tmp_path)
    registry.set_alias(paths, model, registry.CHAMPION, version)
    run_key = "fail-closed-gate-candidate"
    run_id = registry.start_run(paths, run_key, {})
    snap = {"mlflow_run_id": run_id, "run_key": run_key, "snapshot_dir": str(champion.snapshot_dir)}
    params = {"profile": _profile(tmp_path, model)}
    # the champion's own figures as the candidate's, on the champion's snapshot: the paired difference is exactly 0
    candidate = {
        **CANDIDATE,
        "snapshot_hash": Snapshot.open(champion.snapshot_dir).hash,
        "per_query_url": str(champion.bundle_dir / PER_QUERY_FILE),
    }

    readable = retrain.gate(params, snap, candidate)
    assert readable["passed"] and readable["champion_version"] == version, readable
    assert any("vs champion" in r and "difference +0.0000" in r for r in readable["reasons"]), readable

    report = stored / REPORT_FILE
    report.write_text(report.read_text()[:40])  # truncated: exists, not the registered file
    corrupt = retrain.gate(params, snap, candidate)
    print("corrupt report:", corrupt["reasons"][-1])
    assert not corrupt["passed"]
    assert corrupt["reasons"][-1].startswith(f"FAIL: champion version {version} exists but cannot be evaluated")
    assert REPORT_FILE in corrupt["reasons"][-1]

    report.unlink()  # gone: MLflow answers RESOURCE_DOES_NOT_EXIST, which must not read as "no champion yet"
    missing = retrain.gate(params, snap, candidate)
    print("missing report:", missing["reasons"][-1])
    assert not missing["passed"] and REPORT_FILE in missing["reasons"][-1]
    assert not any("no champion yet" in r for r in missing["reasons"])
    assert registry.client(paths).get_run(run_id).data.tags["gate_passed"] == "false"


# --- hostile run keys in search filters -----------------------------------------------------------------------------


def test_a_run_key_with_a_quote_cannot_change_the_run_filter(shopguide_home: Paths) -> None:
    paths = shopguide_home
    victim = registry.start_run(paths, "fail-closed-victim", {})
    # unquoted, this key made the filter "tags.shopguide_run_key = 'fail-closed-victim' and attributes.run_name != ''"
    # and start_run handed back the victim's MLflow run
    hostile_key = "fail-closed-victim' and attributes.run_name != '"
    hostile = registry.start_run(paths, hostile_key, {})
    assert hostile != victim
    assert registry.client(paths).get_run(hostile).data.tags["shopguide_run_key"] == hostile_key
    assert registry.start_run(paths, hostile_key, {}) == hostile  # and it is found again, exactly
    assert registry.start_run(paths, 'fail-closed-"double"', {}) not in (victim, hostile)
    for unquotable in ("both ' and \" quotes", "a backslash \\", "a\nnewline"):
        with pytest.raises(ValueError, match="cannot be matched exactly"):
            registry.start_run(paths, unquotable, {})


def test_a_run_key_with_a_quote_cannot_change_the_version_filter(shopguide_home: Paths, tmp_path: Path) -> None:
    paths, model = shopguide_home, "fail-closed-filters"
    c = registry.client(paths)
    c.create_registered_model(model)
    mv = c.create_model_version(model, tmp_path.as_uri(), tags={"shopguide_run_key": "victim-run"})
    assert registry.find_version(paths, model, "victim-run").version == mv.version
    # unquoted: "name = '<model>' and tags.shopguide_run_key = 'victim-run' and name = '<model>'", the victim's version,
    # so register_bundle would have returned another run's version instead of registering this one
    assert registry.find_version(paths, model, f"victim-run' and name = '{model}") is None
    assert registry.find_version(paths, f"{model}' and name = '{model}", "victim-run") is None


# --- sha256 manifests ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def verified_model(champion, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path]:
    model = "fail-closed-manifest"
    version, stored = _register_copy(champion, model, "fail-closed-manifest", tmp_path_factory.mktemp("reg"))
    return model, version, stored


def _flip_a_byte(path: Path) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit: what only a hash notices
    return data


def test_a_registered_version_records_the_sha256_of_every_file(verified_model, shopguide_home: Paths) -> None:
    model, version, stored = verified_model
    tag = registry.client(shopguide_home).get_model_version(model, version).tags[registry.MANIFEST_TAG]
    manifest = registry.version_manifest(shopguide_home, model, version)
    assert json.loads(tag) == manifest == bundle_manifest(stored)
    assert EMBEDDINGS in manifest and len(tag) <= 5000
    print(f"{len(manifest)} files, tag {len(tag)} chars")


def test_an_altered_file_in_the_artifact_store_is_refused(
    verified_model, shopguide_home: Paths, tmp_path: Path
) -> None:
    model, version, stored = verified_model
    paths, cache = shopguide_home, tmp_path / "cache"
    original = _flip_a_byte(stored / EMBEDDINGS)
    try:
        with pytest.raises(registry.BundleMismatch, match=f"altered: {EMBEDDINGS}") as refused:
            registry.download_bundle(paths, model, version, cache)
        print(refused.value)
        assert list(cache.iterdir()) == []  # the bad download is gone, nothing looks complete
        with pytest.raises(registry.PromotionError, match=f"not servable.*altered: {EMBEDDINGS}") as blocked:
            registry.promote(paths, model, version, "looks fine", "test:alice", force=True)  # force does not help
        print(blocked.value)
        assert registry.alias_version(paths, model, registry.CHAMPION) is None
    finally:
        (stored / EMBEDDINGS).write_bytes(original)

    bundle = registry.download_bundle(paths, model, version, cache)
    assert bundle == cache / version / "model" / "artifacts" / registry.BUNDLE_ARTIFACT
    assert bundle_manifest(bundle) == registry.version_manifest(paths, model, version)
    # a copy altered in the cache after download is not reused: it is replaced by a verified download
    _flip_a_byte(bundle / EMBEDDINGS)
    again = registry.download_bundle(paths, model, version, cache)
    assert bundle_manifest(again) == registry.version_manifest(paths, model, version)
    assert sorted(p.name for p in cache.iterdir()) == [version]


def test_a_manifest_too_big_for_a_tag_is_a_run_artifact_with_its_digest_in_the_tag(
    champion, shopguide_home: Paths, tmp_path: Path
) -> None:
    paths, model = shopguide_home, "fail-closed-big-manifest"
    version, stored = _register_copy(champion, model, "fail-closed-big-manifest", tmp_path, extra_files=60)
    tags = registry.client(paths).get_model_version(model, version).tags
    assert tags[registry.MANIFEST_TAG].startswith("sha256:") and tags[registry.MANIFEST_URI_TAG].endswith(".json")
    manifest = registry.version_manifest(paths, model, version)
    assert manifest == bundle_manifest(stored) and len(json.dumps(manifest)) > 5000
    registry.download_bundle(paths, model, version, tmp_path / "ok")

    _flip_a_byte(stored / "extra" / "file-042.txt")
    with pytest.raises(registry.BundleMismatch, match="altered: extra/file-042.txt"):
        registry.download_bundle(paths, model, version, tmp_path / "altered")
    from mlflow.utils.file_utils import local_file_uri_to_path

    recorded = Path(local_file_uri_to_path(tags[registry.MANIFEST_URI_TAG]))
    recorded.write_text(json.dumps(bundle_manifest(stored)))  # "fix" the record to match the altered file
    with pytest.raises(registry.BundleMismatch, match="does not match the sha256 recorded on the version"):
        registry.download_bundle(paths, model, version, tmp_path / "forged")


DOWNLOADER = """
import json, sys, time
from pipelines.config import Paths
from pipelines.registry import mlflow_client as registry
model, version, cache, start_at = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
paths = Paths.from_env()
registry.client(paths)  # imports and connections before the start line
time.sleep(max(0.0, start_at - time.time()))
began = time.time()
bundle = registry.download_bundle(paths, model, version, cache)
print(json.dumps({"began": began, "ended": time.time(), "bundle": str(bundle)}))
"""


def test_two_processes_download_one_version_into_one_cache(verified_model, tmp_path: Path) -> None:
    """Two replicas sharing a cache volume, cold, at the same moment: both succeed and the copy verifies."""
    model, version, _ = verified_model
    cache = tmp_path / "shared-cache"
    start_at = time.time() + 20  # both children have imported MLflow by then
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", DOWNLOADER, model, version, str(cache), str(start_at)],
            cwd=REPO_ROOT,
            env=os.environ.copy(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(results)
    (a, b) = results
    assert a["began"] < b["ended"] and b["began"] < a["ended"], "the downloads did not overlap: nothing was tested"
    assert a["bundle"] == b["bundle"]
    paths = Paths.from_env()
    assert bundle_manifest(Path(a["bundle"])) == registry.version_manifest(paths, model, version)
    assert sorted(p.name for p in cache.iterdir()) == [version]  # no temporary folder left behind
