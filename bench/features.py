"""Online feature read latency, p50/p99 for 1 and 32 users, on SQLite and Redis: Feast's SDK vs serving's own read.

    .venv/bin/python bench/features.py [--users 10000] [--stores sqlite,redis] [--repeats 5] [--out FILE]

Each store gets a temporary SHOPGUIDE_HOME holding `--users` users x the served FeatureService (search_v2, 7 features,
recent_products = 10 ids) and a catalog-sized product_popularity view, applied and materialized with the pipeline's
own functions; Redis is a private redis-server on a free loopback port (never a shared instance), stopped at the end.
Timed, per store and batch size (users drawn uniformly, a fixed seed):

- `feast_sdk`: FeatureStore.get_online_features(FeatureService, entity_rows).to_dict() (the issue's reference);
- `serving`: serving.online_features.OnlineFeatures.user_features / users_features (what the service calls per request);
- `popularity`: OnlineFeatures.popularity over the whole catalog (the recommend fallback's cached read).

Per repeat: p50/p99 wall time, p99 of the calling thread's CPU time, and the share of reads during which the thread
was involuntarily switched out (getrusage RUSAGE_THREAD ru_nivcsw) with the p99 of the reads that were not. On a
shared, oversubscribed machine the wall p99 measures the scheduler more than the code; `null` (a pure-Python loop
calibrated to the serving read's p50, timed the same way) shows that floor. With Redis every read wakes redis-server
on the same cores, so nearly every read counts as switched out there: only SQLite's split isolates the code.
Medians over repeats go to stdout as JSON.
Never part of the test pass/fail.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
# The repo first: bench/ (this script's folder, sys.path[0]) holds serving.py, which would shadow the package.
sys.path.insert(0, str(REPO))

from pipelines.config import Paths  # noqa: E402
from pipelines.features import store as F  # noqa: E402
from serving.online_features import OnlineFeatures  # noqa: E402

AS_OF = datetime(2026, 1, 1, tzinfo=UTC)
CATALOG = 54_667  # the Home Depot catalog size: the popularity read covers a whole index
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def feature_tables(users: int, products: int, recent_n: int = 10, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Synthetic rows with the real schemas, one per entity at AS_OF (values do not change read cost)."""
    rng = np.random.default_rng(seed)
    first_product = 100_001
    ts = pd.Timestamp(AS_OF)
    user_rows = pd.DataFrame(
        {
            "user_id": np.arange(1, users + 1, dtype=np.int64),
            "event_timestamp": ts,
            "events_1d": rng.integers(0, 20, users),
            "events_7d": rng.integers(0, 80, users),
            "clicks_7d": rng.integers(0, 30, users),
            "purchases_30d": rng.integers(0, 5, users),
            "events_30d": rng.integers(0, 300, users),
            "last_event_ts": int(AS_OF.timestamp()) - rng.integers(0, 86400, users),
            "recent_products": [
                [int(p) for p in row]
                for row in rng.integers(first_product, first_product + products, (users, recent_n))
            ],
        }
    )
    views = rng.integers(0, 500, products)
    clicks = (views * rng.uniform(0, 0.4, products)).astype(np.int64)
    product_rows = pd.DataFrame(
        {
            "product_id": np.arange(first_product, first_product + products, dtype=np.int64),
            "event_timestamp": ts,
            "views_30d": views,
            "clicks_30d": clicks,
            "ctr": np.where(views > 0, clicks / np.maximum(views, 1), 0.0),
        }
    )
    return {F.USER_VIEW: user_rows, F.PRODUCT_VIEW: product_rows}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def private_redis(workdir: Path) -> Iterator[int]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            REDIS_SERVER,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"redis-server did not start on port {port}")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextmanager
def _redis_for(kind: str, workdir: Path) -> Iterator[int | None]:
    """A private redis-server's port for kind "redis", None for SQLite."""
    if kind != "redis":
        yield None
        return
    with private_redis(workdir) as port:
        yield port


@contextmanager
def store_home(kind: str, users: int, products: int, workdir: Path) -> Iterator[Paths]:
    """A home with the tables written, applied and materialized into `kind` (sqlite or a private redis)."""
    paths = Paths(workdir / kind)
    saved = {k: os.environ.get(k) for k in (F.ONLINE_STORE_ENV, F.REDIS_ENV)}
    with _redis_for(kind, workdir) as port:
        try:
            os.environ[F.ONLINE_STORE_ENV] = kind
            if port is not None:
                os.environ[F.REDIS_ENV] = f"127.0.0.1:{port}"
            F.write_feature_tables(feature_tables(users, products), paths)
            F.apply_feature_repo(paths)
            F.materialize(paths, AS_OF)
            yield paths
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _switches() -> int:
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw


def time_calls(call: Callable[[Any], Any], args: list[Any]) -> dict[str, float]:
    """Wall and thread-CPU time of call(a) for each a, and which calls were preempted (involuntary switches)."""
    wall, cpu, preempted = [], [], []
    for a in args:
        s0, c0 = _switches(), time.thread_time()
        t0 = time.perf_counter()
        call(a)
        t1 = time.perf_counter()
        c1, s1 = time.thread_time(), _switches()
        wall.append(t1 - t0)
        cpu.append(c1 - c0)
        preempted.append(s1 != s0)
    ms = np.asarray(wall) * 1000
    hit = np.asarray(preempted)
    clean = ms[~hit] if (~hit).any() else ms
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "cpu_p99_ms": float(np.percentile(np.asarray(cpu) * 1000, 99)),
        "preempted_share": float(hit.mean()),
        "p99_not_preempted_ms": float(np.percentile(clean, 99)),
    }


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(r[key] for r in runs), 4) for key in runs[0]}


def _null_work(n: int) -> Callable[[Any], Any]:
    def work(_: Any) -> int:
        return sum(range(n))

    return work


def bench_store(paths: Paths, users: int, reads: int, batch_reads: int, repeats: int, seed: int) -> dict[str, Any]:
    online = OnlineFeatures(paths)
    store = F.feature_store(paths, serving=True)
    service = store.get_feature_service(F.USER_SERVICE)
    rng = np.random.default_rng(seed)
    singles = [int(u) for u in rng.integers(1, users + 1, reads)]
    batches = [[int(u) for u in row] for row in rng.integers(1, users + 1, (batch_reads, 32))]
    assert online.user_features(singles[0]) is not None, "no online row: materialization did not reach the store"
    calls = {
        ("feast_sdk", 1): lambda u: store.get_online_features(features=service, entity_rows=[{"user_id": u}]).to_dict(),
        ("serving", 1): online.user_features,
        ("feast_sdk", 32): lambda b: store.get_online_features(
            features=service, entity_rows=[{"user_id": u} for u in b]
        ).to_dict(),
        ("serving", 32): online.users_features,
    }
    results: dict[str, Any] = {}
    for (method, batch), call in calls.items():
        args = singles if batch == 1 else batches
        for a in args[:200]:  # warm-up: connections, registry cache, proto classes
            call(a)
        runs = []
        for _ in range(repeats):
            gc.collect()
            runs.append(time_calls(call, args))
        results[f"{method}_{batch}"] = _median(runs)
        results[f"{method}_{batch}"]["repeats"] = repeats
    # A pure-Python loop as long as the serving read (by p50): its wall p99 is the machine's scheduling floor.
    probe = time_calls(_null_work(10_000), singles[:300])["p50_ms"]
    null = _null_work(max(100, int(10_000 * results["serving_1"]["p50_ms"] / max(probe, 1e-6))))
    results["null_1"] = _median([time_calls(null, singles) for _ in range(repeats)])
    product_ids = np.arange(100_001, 100_001 + CATALOG, dtype=np.int64)
    pop = []
    for _ in range(3):
        fresh = OnlineFeatures(paths)
        t0 = time.perf_counter()
        fresh.popularity(product_ids)
        pop.append((time.perf_counter() - t0) * 1000)
    results["popularity_catalog_ms"] = round(statistics.median(pop), 1)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--products", type=int, default=CATALOG)
    parser.add_argument("--stores", default="sqlite,redis")
    parser.add_argument("--reads", type=int, default=2000, help="single-user reads per repeat")
    parser.add_argument("--batch-reads", type=int, default=300, help="32-user reads per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    report: dict[str, Any] = {
        "bench": "features",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "python": platform.python_version(),
            "feast": F.import_feast().__version__,
        },
        "feature_service": F.USER_SERVICE,
        "users": args.users,
        "products": args.products,
        "stores": {},
    }
    with tempfile.TemporaryDirectory(prefix="shopguide-bench-features-") as tmp:
        for kind in [s.strip() for s in args.stores.split(",") if s.strip()]:
            if kind == "redis" and not Path(REDIS_SERVER).is_file():
                report["stores"][kind] = {"skipped": f"{REDIS_SERVER} not installed (apt-get install redis-server)"}
                continue
            t0 = time.perf_counter()
            with store_home(kind, args.users, args.products, Path(tmp)) as paths:
                setup_s = time.perf_counter() - t0
                report["stores"][kind] = {
                    "setup_s": round(setup_s, 1),
                    **bench_store(paths, args.users, args.reads, args.batch_reads, args.repeats, args.seed),
                }
    report["machine"]["loadavg_end"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
