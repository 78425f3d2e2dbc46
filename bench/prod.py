"""The production profile measured: a DAG on the Celery worker against `airflow dags test`, and /v1/search through
haproxy with two replicas against one replica behind it and against a replica directly.

    .venv/bin/shopguide prod up
    .venv/bin/python bench/prod.py --json bench/results/prod-<date>.json

Needs a running profile (`shopguide prod up`, with the same SHOPGUIDE_HOME and docker/prod.env / environment).
The serving phases need a champion; `--bundle DIR` registers and promotes one first when there is none. Not part of
the test suite.

DAG runs: the retrain DAG (or `--dag features`) on the tiny profile, `--repeats` times each way, medians quoted:
  celery      triggered through the REST API, scheduled by the scheduler, every task on the profile's Celery worker
              (a process per task, its run store the MLflow server, the offline store PostgreSQL): trigger to
              a final state, and per task the wait from queued to started;
  dags_test   `shopguide retrain --profile tiny` (or `features`) on a fresh embedded home (SQLite, `airflow dags
              test`, the `make run` path).
Each side first runs the features DAG once (the retrain reads its tables; the embedded side migrates its databases).
A retrain that loses its gate to the previous one ends `success` with the outcome "not promoted" (its branch
keep_champion ran, promote was skipped): its time counts the same. The DAGs are unpaused for the bench only (the
features DAG's Asset would start a retrain: the retrain's own runs are the bench's), and scheduled catch-up runs are
marked failed so that only the bench's runs use the worker.

Serving: bench/serving.py's load generator (stdlib clients, keep-alive; wrk too where installed) with real search
terms, the API key of the profile: through haproxy with both replicas, through haproxy with replica-2 stopped, and to
replica-1's port directly. On a 2-core machine the replicas, haproxy and the clients share the cores: the second
replica buys availability there, not throughput; on more cores each replica takes its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving import run_load, run_wrk, search_terms  # noqa: E402
from pipelines.config import MODEL_NAME, Paths  # noqa: E402
from pipelines.prod import CLIENT_VARIABLES, ProdConfig, airflow_api, client_environment, read_env_file  # noqa: E402

DAGS = {"features": "shopguide_features", "retrain": "shopguide_retrain"}


def _iso(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


class Airflow:
    def __init__(self, cfg: ProdConfig) -> None:
        self.http = airflow_api(cfg)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        r = self.http.request(method, path, **kwargs)
        r.raise_for_status()
        return r.json()

    def stop_scheduled(self) -> None:
        for dag_id in DAGS.values():
            for run in self.call("GET", f"/dags/{dag_id}/dagRuns")["dag_runs"]:
                if run["run_type"] != "manual" and run["state"] in {"queued", "running"}:
                    self.call("PATCH", f"/dags/{dag_id}/dagRuns/{run['dag_run_id']}", json={"state": "failed"})


def celery_run(airflow: Airflow, dag_id: str) -> dict[str, Any]:
    """One run through the REST API on the Celery worker: trigger to its final state, and each task's times."""
    started = time.monotonic()
    run = airflow.call("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": {"profile": "tiny"}})
    run_id = run["dag_run_id"]
    while (state := airflow.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"]) not in {"success", "failed"}:
        airflow.stop_scheduled()
        time.sleep(0.25)
    wall = time.monotonic() - started
    tasks = []
    for t in airflow.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]:
        queued, start, end = _iso(t["queued_when"]), _iso(t["start_date"]), _iso(t["end_date"])
        tasks.append(
            {
                "task": t["task_id"],
                "state": t["state"],
                "hostname": t["hostname"],
                "queued_to_start_s": round((start - queued).total_seconds(), 2) if queued and start else None,
                "duration_s": round((end - start).total_seconds(), 2) if start and end else None,
            }
        )
    failed = sorted(t["task"] for t in tasks if t["state"] not in ("success", "skipped"))
    if state != "success":
        raise SystemExit(f"{dag_id} run {run_id} {state} ({failed}): see `shopguide prod logs airflow-worker-1`")
    return {"run_id": run_id, "state": state, "trigger_to_end_s": round(wall, 1), "tasks": tasks}


def dags_test_run(home: Path, dag: str) -> float:
    """`shopguide <dag> --profile tiny` (airflow dags test) on an embedded home: its wall time."""
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_VARIABLES and not k.startswith("AIRFLOW")}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update({"SHOPGUIDE_HOME": str(home), "HF_HUB_OFFLINE": "1"})
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", dag, "--profile", "tiny"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:  # a retrain that loses its gate succeeds ("not promoted"): only errors get here
        raise SystemExit(f"shopguide {dag} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return round(time.monotonic() - started, 1)


def measure_dags(cfg: ProdConfig, dag: str, repeats: int) -> dict[str, Any]:
    dag_id = DAGS[dag]
    airflow = Airflow(cfg)
    paused = {d: airflow.call("GET", f"/dags/{d}")["is_paused"] for d in DAGS.values()}
    for d in DAGS.values():
        airflow.call("PATCH", f"/dags/{d}", json={"is_paused": False})
    try:
        if dag != "features":
            celery_run(airflow, DAGS["features"])
            # its Asset event starts a retrain of the deployment's profile: stopped (the bench starts its own)
            time.sleep(5)
            airflow.stop_scheduled()
        celery = [celery_run(airflow, dag_id) for _ in range(repeats)]
    finally:
        for dag_id_, was in paused.items():
            airflow.call("PATCH", f"/dags/{dag_id_}", json={"is_paused": was})
        airflow.stop_scheduled()
    with tempfile.TemporaryDirectory(prefix="shopguide-bench-prod-") as tmp:
        dags_test_run(Path(tmp), "features")  # warm-up: migrates the embedded databases, fills the feature store
        embedded = [dags_test_run(Path(tmp), dag) for _ in range(repeats)]
    walls = [r["trigger_to_end_s"] for r in celery]
    waits = [t["queued_to_start_s"] for r in celery for t in r["tasks"] if t["queued_to_start_s"] is not None]
    tasks = len([t for t in celery[0]["tasks"] if t["duration_s"] is not None])
    celery_median, embedded_median = statistics.median(walls), statistics.median(embedded)
    return {
        "dag": dag_id,
        "profile": "tiny",
        "tasks": tasks,
        "celery": {"runs": celery, "trigger_to_end_s_median": celery_median},
        "dags_test": {"wall_s": embedded, "wall_s_median": embedded_median},
        "celery_vs_dags_test": round(celery_median / embedded_median, 2),
        "overhead_per_task_s": round((celery_median - embedded_median) / tasks, 1),
        "queued_to_start_s_median": statistics.median(waits) if waits else None,
    }


def _replica_state(cfg: ProdConfig) -> dict[str, str]:
    import httpx

    text = httpx.get(f"{cfg.stats_url};csv", timeout=10).text
    header, *rows = text.lstrip("# ").splitlines()
    cols = header.split(",")
    recs = [dict(zip(cols, row.split(","), strict=False)) for row in rows]
    return {r["svname"]: r["status"] for r in recs if r.get("pxname") == "replicas" and r["svname"] != "BACKEND"}


def _wait_replicas(cfg: ProdConfig, want: dict[str, str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        state = _replica_state(cfg)  # one read of haproxy's statistics per round
        if all(state.get(name) == status for name, status in want.items()):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"replicas {state}, wanted {want}")
        time.sleep(1)


def _supervisorctl(cfg: ProdConfig, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(cfg.supervisor_conf), *args],
        check=True,
        capture_output=True,
    )


def _ensure_champion(cfg: ProdConfig, bundle: Path | None) -> str:
    os.environ.update(client_environment(cfg))
    from pipelines.registry.mlflow_client import CHAMPION, alias_version, end_run, promote, register_bundle, start_run

    paths = cfg.paths
    version = alias_version(paths, MODEL_NAME, CHAMPION)
    if version is None:
        if bundle is None:
            raise SystemExit("no @champion in the profile's registry: run the retrain DAG or pass --bundle DIR")
        run_id = start_run(paths, "bench-prod", {})
        version = register_bundle(paths, run_id, bundle, MODEL_NAME, "bench-prod", {"gate_passed": "true"})
        end_run(paths, run_id)
        promote(paths, MODEL_NAME, version, "bench/prod.py: a champion to serve", "bench/prod.py")
    _wait_replicas(cfg, {f"replica-{i}": "UP" for i in range(1, len(cfg.replica_ports) + 1)})
    return str(version)


def measure_serving(cfg: ProdConfig, args: argparse.Namespace) -> dict[str, Any]:
    bodies = [json.dumps({"query": q, "k": 10}).encode() for q in search_terms(200)]
    headers = {"X-API-Key": read_env_file(cfg.secrets_file)["SHOPGUIDE_API_KEYS"].split(",")[0]}
    lb, direct = cfg.number("SHOPGUIDE_LB_PORT"), cfg.replica_ports[0]
    wrk = shutil.which("wrk") is not None

    def phases(port: int) -> dict[str, Any]:
        run_load(port, "/v1/search", bodies, 1, args.warmup, 60, headers)
        out = {
            "one_client": run_load(port, "/v1/search", bodies, 1, args.requests_1, args.max_seconds, headers),
            "eight_clients": run_load(port, "/v1/search", bodies, 8, args.requests_8, args.max_seconds, headers),
        }
        if wrk:
            out["eight_clients_wrk"] = run_wrk(port, "/v1/search", bodies, 8, args.max_seconds / 2, headers)
        return out

    result = {"haproxy_two_replicas": phases(lb), "replica_direct": phases(direct)}
    _supervisorctl(cfg, "stop", "replica-2")
    try:
        _wait_replicas(cfg, {"replica-2": "DOWN"})
        result["haproxy_one_replica"] = phases(lb)
    finally:
        _supervisorctl(cfg, "start", "replica-2")
        _wait_replicas(cfg, {"replica-2": "UP"})
    return result


def table(result: dict[str, Any]) -> str:
    rows = []
    if "dags" in result:
        d = result["dags"]
        rows += [
            f"{d['dag']} ({d['profile']}, {d['tasks']} tasks), median of {len(d['dags_test']['wall_s'])} runs:",
            f"  Celery worker, trigger to end:     {d['celery']['trigger_to_end_s_median']} s",
            f"  airflow dags test (embedded):      {d['dags_test']['wall_s_median']} s",
            f"  ratio {d['celery_vs_dags_test']}x; {d['overhead_per_task_s']} s more per task; "
            f"queued -> started median {d['queued_to_start_s_median']} s",
        ]
    if "serving" in result:
        rows += ["| /v1/search | 1 client p50 ms | p99 ms | 8 clients req/s | p99 ms | wrk 8 req/s | p99 ms | errors |"]
        rows += ["| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in result["serving"].items():
            w = r.get("eight_clients_wrk", {})
            errors = sum(p["errors"] for p in r.values())
            rows.append(
                f"| {name} | {r['one_client']['p50_ms']} | {r['one_client']['p99_ms']} | "
                f"{r['eight_clients']['throughput_rps']} | {r['eight_clients']['p99_ms']} | "
                f"{w.get('throughput_rps', '-')} | {w.get('p99_ms', '-')} | {errors} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dag", choices=sorted(DAGS), default="retrain")
    parser.add_argument("--repeats", type=int, default=2, help="DAG runs each way")
    parser.add_argument("--skip-dags", action="store_true")
    parser.add_argument("--skip-serving", action="store_true")
    parser.add_argument("--bundle", type=Path, default=None, help="register + promote this bundle if no champion")
    parser.add_argument("--requests-1", type=int, default=1000)
    parser.add_argument("--requests-8", type=int, default=4000)
    parser.add_argument("--max-seconds", type=float, default=30.0, help="per phase")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cfg = ProdConfig.load(Paths.from_env())
    result: dict[str, Any] = {
        "bench": "prod",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "workers": cfg.workers,
        "replicas": len(cfg.replica_ports),
    }
    if not args.skip_dags:
        result["dags"] = measure_dags(cfg, args.dag, args.repeats)
    if not args.skip_serving:
        result["champion"] = _ensure_champion(cfg, args.bundle)
        result["serving"] = measure_serving(cfg, args)
    text = json.dumps(result, indent=2)
    print(text)
    print(table(result))
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
