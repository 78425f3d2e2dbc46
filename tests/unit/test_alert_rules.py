"""docker/prometheus/: scrape configs and alert rules checked by promtool (Debian's `prometheus` package), the rules'
promtool unit tests, and the rules and targets against what the service exports and the profiles run."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from pipelines.config import REPO_ROOT, Paths
from pipelines.prod import ProdConfig
from serving.metrics import Metrics

PROMETHEUS_DIR = REPO_ROOT / "docker" / "prometheus"
RULES = PROMETHEUS_DIR / "rules.yml"
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
CONFIGS = {"compose": PROMETHEUS_DIR / "prometheus.yml", "process": PROMETHEUS_DIR / "prometheus-process.yml"}
# Names the monitor DAG (issue 20 item 1) is to export; nothing exports them yet.
MONITOR_PREFIX = "shopguide_monitor_"
# Labels Prometheus adds to every scraped series, and the bucket label of histograms.
TARGET_LABELS = {"job", "instance"}


def _promtool() -> str:
    found = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").is_file() else None)
    if found is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return found


def _run(*args: str) -> str:
    done = subprocess.run([_promtool(), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _load(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))


def _alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in _load(RULES)["groups"] for r in g["rules"] if "alert" in r}


def _job(config: dict[str, Any]) -> dict[str, Any]:
    """The service's scrape job, the config's own dict (changing it changes the config)."""
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "shopguide"]
    return job


def _targets(config: dict[str, Any]) -> list[str]:
    return [t for group in _job(config)["static_configs"] for t in group["targets"]]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_promtool_accepts_the_scrape_config(name: str, tmp_path: Path) -> None:
    """`promtool check config` of the file as shipped, in a copy of docker/prometheus/ where the API key file it
    names exists (promtool checks that it does). The process profile's key path is relative to the file, so the copy
    keeps the checkout's layout; compose's is the container's /etc/prometheus/secrets/api-key, pointed at the copy."""
    folder = tmp_path / "docker" / "prometheus"
    shutil.copytree(PROMETHEUS_DIR, folder)
    config = folder / CONFIGS[name].name
    rendered = _load(config)
    authorization = _job(rendered)["authorization"]
    if Path(authorization["credentials_file"]).is_absolute():
        authorization["credentials_file"] = str(tmp_path / "api-key")
        config.write_text(yaml.safe_dump(rendered, sort_keys=False))
    key = (config.parent / authorization["credentials_file"]).resolve()
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_text("test-key\n")
    out = _run("check", "config", str(config))
    assert "SUCCESS" in out and "rules found" in out, out


def test_promtool_accepts_the_rules() -> None:
    out = _run("check", "rules", str(RULES))
    assert re.search(r"SUCCESS: \d+ rules found", out), out


def test_the_rules_pass_their_promtool_unit_tests() -> None:
    assert RULE_TESTS, "no docker/prometheus/tests/*.yml"
    _run("test", "rules", *map(str, RULE_TESTS))


def test_every_alert_is_tested_firing_and_silent() -> None:
    """Each alert has a promtool case where it fires and one where it must not (an empty exp_alerts)."""
    fired: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        for case in _load(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    alerts = set(_alerts())
    assert alerts - fired == set(), "alerts never tested firing"
    assert alerts - silent == set(), "alerts never tested silent"
    assert (fired | silent) - alerts == set(), "tests of alerts that do not exist"


def _exported() -> dict[str, set[str]]:
    """Every series name the service exports (a counter's _total, a histogram's _bucket/_count/_sum) and its labels."""
    metrics = Metrics()
    out: dict[str, set[str]] = {}
    # the metrics are attributes of Metrics or of a group on it (LogMetrics: one durable log's writer)
    found = [v for v in vars(metrics).values() if not isinstance(v, MetricWrapperBase) and hasattr(v, "__dict__")]
    for value in [*vars(metrics).values(), *(m for group in found for m in vars(group).values())]:
        if not isinstance(value, MetricWrapperBase):
            continue
        # prometheus_client keeps a metric's label names in _labelnames (no public accessor)
        labels = set(value._labelnames)
        name = value._name
        kind = value._type
        if kind == "counter":
            out[f"{name}_total"] = labels
        elif kind == "histogram":
            out |= {f"{name}_{suffix}": labels | {"le"} for suffix in ("bucket", "count", "sum")}
        else:
            out[name] = labels
    return out


def _selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched on) of every shopguide_* selector in a PromQL expression."""
    found = []
    for m in re.finditer(r"\b(shopguide_[a-z0-9_]+)(?:\{([^}]*)\})?", expr):
        matchers = m.group(2) or ""
        found.append((m.group(1), set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))))
    return found


def test_the_rules_read_only_what_the_service_exports() -> None:
    """A misspelt name or label in a rule gives no series and an alert that can never fire; every shopguide_* name and
    label the rules match on is one serving/metrics.py exports (the monitor's names excepted: not built yet)."""
    exported = _exported()
    used = [s for g in _load(RULES)["groups"] for r in g["rules"] for s in _selectors(r["expr"])]
    assert {name for name, _ in used} & {"shopguide_ready", "shopguide_features_reads_total"}
    for name, labels in used:
        if name.startswith(MONITOR_PREFIX):
            continue
        assert name in exported, f"{name} is not exported by serving/metrics.py"
        assert labels <= exported[name] | TARGET_LABELS, f"{name}: labels {labels - exported[name]} are not exported"


def test_the_process_config_scrapes_the_profile_replicas() -> None:
    """One target per port of SHOPGUIDE_REPLICA_PORTS in docker/prod.env (the file's value, not this shell's)."""
    ports = ProdConfig.load(Paths(REPO_ROOT / ".shopguide"), environ={}).replica_ports
    assert _targets(_load(CONFIGS["process"])) == [f"127.0.0.1:{port}" for port in ports]


def test_the_compose_config_scrapes_every_replica_service() -> None:
    """One target per service of compose.yaml that runs the service (uvicorn serving.app:app), on its --port."""
    services = _load(REPO_ROOT / "docker" / "compose.yaml")["services"]
    expected = []
    for name, service in services.items():
        command = [str(c) for c in service.get("command", [])]
        if command[:2] == ["uvicorn", "serving.app:app"]:
            expected.append(f"{name}:{command[command.index('--port') + 1]}")
    assert expected, "no replica service in compose.yaml"
    assert _targets(_load(CONFIGS["compose"])) == expected


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_both_configs_evaluate_the_same_rules(name: str) -> None:
    config = _load(CONFIGS[name])
    assert config["rule_files"] == [RULES.name]
    assert _job(config)["metrics_path"] == "/metrics"
