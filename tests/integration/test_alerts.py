"""Alerts end to end: a real Prometheus server (Debian's `prometheus`) scrapes real service processes with the shipped
scrape config and rules (docker/prometheus/), and alerts fire when their condition is provoked."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient

from pipelines.config import REPO_ROOT, Paths
from serving.app import create_app
from serving.settings import Settings

if TYPE_CHECKING:
    from tests.integration.conftest import RegisteredChampion

PROMETHEUS_DIR = REPO_ROOT / "docker" / "prometheus"
# Prometheus samples and evaluates every second here (15 s in the shipped config).
STEP = "1s"
# The shipped `for:` holds (2-15 minutes) ride out restarts and model loads; here every alert holds 1 s instead, so
# the test takes seconds. The expressions, labels and annotations are the shipped ones.
TEST_HOLD = "1s"
DEADLINE_S = 90  # fail, rather than hang, when an alert never fires (it fires within ~15 s)
Popen = subprocess.Popen[bytes]


def _prometheus() -> str:
    found = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").is_file() else None)
    if found is None:
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _render(folder: Path, targets: list[str], monitor: str = "127.0.0.1:1") -> Path:
    """docker/prometheus/prometheus-process.yml with the test's targets (the replicas', and the monitor textfile's
    node_exporter: none by default), a 1 s step and a key file of its own, and rules.yml with TEST_HOLD for every
    `for:`; everything else as shipped."""
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = TEST_HOLD
    (folder / "rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus-process.yml").read_text())
    config["global"] = {"scrape_interval": STEP, "scrape_timeout": STEP, "evaluation_interval": STEP}
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"shopguide", "shopguide-monitor"}, jobs
    jobs["shopguide-monitor"]["static_configs"] = [{"targets": [monitor]}]
    job = jobs["shopguide"]
    job["static_configs"] = [{"targets": targets}]
    # the services here run without API keys and ignore the header; the file must exist
    (folder / "api-key").write_text("test-key\n")
    job["authorization"]["credentials_file"] = str(folder / "api-key")
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _wait(url: str, deadline: float, proc: Popen, log: Path, status: int = 200) -> None:
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == status:
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{url} did not answer {status} (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


@contextlib.contextmanager
def _process(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[Popen]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _service(port: int, home: Path, log: Path, **env: str) -> contextlib.AbstractContextManager[Popen]:
    """`uvicorn serving.app:app` on a loopback port, its own SHOPGUIDE_HOME (no Feast repo: feature reads fail), and
    no other SHOPGUIDE_* setting of this shell (API keys, a Redis online store)."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("SHOPGUIDE_")}
    environ = {**inherited, "SHOPGUIDE_HOME": str(home), "SHOPGUIDE_MODEL_POLL_SECONDS": "0", **env}
    args = [sys.executable, "-m", "uvicorn", "serving.app:app", "--host", "127.0.0.1", "--port", str(port)]
    return _process([*args, "--log-level", "warning"], log, environ)


def _active(prometheus: str) -> list[dict[str, Any]]:
    """Prometheus' pending and firing alerts."""
    body = httpx.get(f"{prometheus}/api/v1/alerts", timeout=5).json()
    assert body["status"] == "success", body
    return list(body["data"]["alerts"])


def _firing(alerts: list[dict[str, Any]], name: str) -> set[str]:
    """The instances (or "" for a service-wide alert) for which `name` fires."""
    labels = [a["labels"] for a in alerts if a["state"] == "firing"]
    return {x.get("instance", "") for x in labels if x["alertname"] == name}


def test_alerts_fire_on_a_replica_without_a_model_and_on_lost_features(
    champion: RegisteredChampion, tmp_path: Path
) -> None:
    """Two replicas: `empty` finds no @champion in the registry and loads no model (shopguide_ready 0), `ready` serves
    the champion's bundle but has no feature store (every user-feature read fails). ShopguideReplicaNotReady fires for
    `empty` only, ShopguideFeaturesUnavailable for `ready` only, once personalised searches come in; neither a
    replica down nor "no ready replica" fires."""
    binary = _prometheus()
    empty_port, ready_port, prom_port = _free_port(), _free_port(), _free_port()
    empty, ready = f"127.0.0.1:{empty_port}", f"127.0.0.1:{ready_port}"
    prometheus = f"http://127.0.0.1:{prom_port}"
    config = _render(tmp_path, [empty, ready])
    prom_args = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
        "--log.level=warn",
    ]
    started = time.monotonic()
    deadline = started + DEADLINE_S
    with (
        _service(
            empty_port,
            tmp_path / "empty",
            tmp_path / "empty.log",
            # the session's registry, where this model has no @champion
            SHOPGUIDE_MODEL_NAME=f"{champion.model_name}-never-registered",
        ) as empty_proc,
        _service(
            ready_port,
            tmp_path / "ready",
            tmp_path / "ready.log",
            SHOPGUIDE_BUNDLE_DIR=str(champion.bundle_dir),
        ) as ready_proc,
        _process(prom_args, tmp_path / "prometheus.log") as prom_proc,
    ):
        _wait(f"{prometheus}/-/ready", deadline, prom_proc, tmp_path / "prometheus.log")
        _wait(f"http://{ready}/readyz", deadline, ready_proc, tmp_path / "ready.log")
        searches = 0
        while True:  # `empty` starts meanwhile (its registry lookup imports MLflow: seconds)
            if empty_proc.poll() is not None:
                pytest.fail(f"the replica without a model exited:\n{(tmp_path / 'empty.log').read_text()[-3000:]}")
            # personalised searches: each reads the user's online features, which this home does not have
            answer = httpx.post(f"http://{ready}/v1/search", json={"query": "drill", "user_id": 7}, timeout=60)
            assert answer.status_code == 200 and answer.json()["fallback_reason"] == "features_unavailable", answer.text
            searches += 1
            alerts = _active(prometheus)
            not_ready = _firing(alerts, "ShopguideReplicaNotReady")
            unavailable = _firing(alerts, "ShopguideFeaturesUnavailable")
            if empty in not_ready and ready in unavailable:
                break
            assert time.monotonic() < deadline, f"alerts after {DEADLINE_S} s: {alerts}"
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        assert httpx.get(f"http://{empty}/readyz", timeout=5).status_code == 503
        ready_series = httpx.get(f"{prometheus}/api/v1/query", params={"query": "shopguide_ready"}, timeout=5).json()
        alerts = _active(prometheus)
    # what Prometheus scraped: the gauge of each replica, as /readyz says
    scraped = {r["metric"]["instance"]: r["value"][1] for r in ready_series["data"]["result"]}
    assert scraped == {empty: "0", ready: "1"}, ready_series
    assert _firing(alerts, "ShopguideReplicaNotReady") == {empty}, alerts
    assert _firing(alerts, "ShopguideFeaturesUnavailable") == {ready}, alerts
    # the first personalised search may wait seconds (the replica's Feast import), but a dozen searches are below
    # the pages' traffic floor
    for name in ("ShopguideReplicaDown", "ShopguideNoReadyReplica", "ShopguideSearchLatencyBudgetBurn"):
        assert not [a for a in alerts if a["labels"]["alertname"] == name], alerts
    (alert,) = [a for a in alerts if a["labels"]["alertname"] == "ShopguideReplicaNotReady"]
    assert alert["labels"]["severity"] == "ticket" and "has no model loaded" in alert["annotations"]["summary"]
    print(f"both alerts firing {elapsed:.1f} s after start-up, after {searches} personalised searches")


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in Prometheus text, or None when it is not exported."""
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] == name and all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None


def test_the_service_exports_what_the_rules_read(
    champion: RegisteredChampion, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process, with a real Feast store (the champion's simulated events built, applied and materialized):
    shopguide_ready is 0 until a version is loaded, then 1; each user-feature read the store answers counts as ok,
    for a user with a row and one without; the counters the rules take rate() or increase() of exist at 0 before
    anything happened."""
    from pipelines.features.store import OFFLINE_ENV, ONLINE_STORE_ENV, REDIS_ENV, refresh_features

    for name in (ONLINE_STORE_ENV, REDIS_ENV, OFFLINE_ENV):
        monkeypatch.delenv(name, raising=False)
    paths = Paths(tmp_path / "home")
    refresh_features(champion.snapshot_dir, champion.as_of, paths=paths)
    app = create_app(Settings(home=paths.home, bundle_dir=champion.bundle_dir, model_poll_seconds=0))
    before = app.state.serving.metrics.render().decode()
    with TestClient(app) as c:
        answers = [
            c.post("/v1/search", json={"query": "drill", "user_id": user}).json()["fallback_reason"]
            for user in (1, 10**9)  # a simulated user, and one the store has no row for
        ]
        after = c.get("/metrics").text
    assert _sample(before, "shopguide_ready") == 0 and _sample(after, "shopguide_ready") == 1
    assert "features_unavailable" not in answers and answers[1] == "no_online_features", answers
    assert _sample(after, "shopguide_features_reads_total", result="ok") == 2
    assert _sample(after, "shopguide_features_reads_total", result="unavailable") == 0
    zeros = [
        ("shopguide_features_reads_total", {"result": "ok"}),
        ("shopguide_features_reads_total", {"result": "unavailable"}),
        ("shopguide_request_log_dropped_rows_total", {"reason": "queue_full"}),
        ("shopguide_request_log_dropped_rows_total", {"reason": "write_failed"}),
        ("shopguide_shadow_requests_total", {"result": "failed"}),
        ("shopguide_shadow_category_agreement_total", {"result": "disagree"}),
    ]
    assert [(n, x) for n, x in zeros if _sample(before, n, **x) != 0] == []


def _node_exporter() -> str:
    for name in ("prometheus-node-exporter", "node_exporter"):
        if found := shutil.which(name):
            return found
    pytest.skip("node_exporter not installed (apt-get install prometheus-node-exporter)")


def test_the_monitors_textfile_is_scraped_and_its_alerts_fire(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The monitor DAG's own writer (pipelines/monitoring/records.py) puts a window with query-text drift and
    vocabulary misses above their bound into its textfile; node_exporter's textfile collector serves it (run as
    docker/README.md says), the shipped config's job shopguide-monitor scrapes it, and ShopguideQueryDrift (with its
    `signal` label kept) and ShopguideVocabularyMisses fire; fresh features and a fresh window raise nothing."""
    from datetime import UTC, datetime

    from pipelines.monitoring.decision import MonitorDecision
    from pipelines.monitoring.records import TEXTFILE_ENV, write_textfile

    binary, exporter = _prometheus(), _node_exporter()
    monkeypatch.delenv(TEXTFILE_ENV, raising=False)
    paths = Paths(tmp_path / "home")
    row = {
        "window_end": datetime.now(UTC),
        "vocab_miss_ratio": 0.2,
        "feature_age_s": json.dumps({"user_activity": 60.0}),
    }
    decision = MonitorDecision(
        alarms={"query_text": True, "query_embedding": False, "vocab_miss": True}, reasons=[], vocab_miss_threshold=0.05
    )
    textfile = write_textfile(paths, row, decision)
    assert textfile == paths.home / "monitor" / "shopguide_monitor.prom"
    exporter_port, prom_port = _free_port(), _free_port()
    prometheus = f"http://127.0.0.1:{prom_port}"
    config = _render(tmp_path, ["127.0.0.1:1"], monitor=f"127.0.0.1:{exporter_port}")
    exporter_args = [
        exporter,
        f"--web.listen-address=127.0.0.1:{exporter_port}",
        "--collector.disable-defaults",
        "--collector.textfile",
        f"--collector.textfile.directory={textfile.parent}",
    ]
    prom_args = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
        "--log.level=warn",
    ]
    deadline = time.monotonic() + DEADLINE_S
    with (
        _process(exporter_args, tmp_path / "node_exporter.log") as exporter_proc,
        _process(prom_args, tmp_path / "prometheus.log") as prom_proc,
    ):
        _wait(f"http://127.0.0.1:{exporter_port}/metrics", deadline, exporter_proc, tmp_path / "node_exporter.log")
        _wait(f"{prometheus}/-/ready", deadline, prom_proc, tmp_path / "prometheus.log")
        while True:
            alerts = _active(prometheus)
            firing = {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}
            if {"ShopguideQueryDrift", "ShopguideVocabularyMisses"} <= firing:
                break
            assert time.monotonic() < deadline, f"alerts after {DEADLINE_S} s: {alerts}"
            time.sleep(0.2)
    drift = [a["labels"] for a in alerts if a["labels"]["alertname"] == "ShopguideQueryDrift"]
    assert [a["signal"] for a in drift] == ["query_text"], drift  # one per drifted signal, query_embedding held
    assert not firing & {"ShopguideFeaturesStale", "ShopguideMonitorNotRunning"}, alerts
