"""SIMULATED traffic as a load: the events/s `shopguide simulate` generates and the service's latency under it.

    .venv/bin/python bench/simulate.py --url http://127.0.0.1:8000 --users 20 --minutes 1 [--json out.json]

Not part of the test suite. Against a service that is already running (`shopguide serve`, or any replica), which it
feeds with simulated searches and feedback events (its request log, event log and online features grow: use a home
of its own, never one whose logs a retrain should learn from). Two phases of the same simulator, flat out (no think
time): the baseline, 1 user on 1 client thread (the service at rest but for one shopper), then --users users on
--concurrency threads. For each: searches/s and events/s generated, the client's p50/p99 of /v1/search and
/v1/events, and the service's own /v1/search latency from its /metrics histogram (the requests of that phase only;
p50/p99 are the upper bounds of the buckets they fall in). The load generator shares the machine's cores with a local
service, as in bench/serving.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEARCH = {"endpoint": "/v1/search", "status": "200"}


def search_histogram(url: str, api_key: str | None) -> dict[float, float]:
    """Cumulative bucket counts (upper bound -> count) of the service's /v1/search latency."""
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"X-API-Key": api_key} if api_key else {}
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "shopguide_request_duration_seconds_bucket" and all(
                s.labels.get(k) == v for k, v in SEARCH.items()
            ):
                buckets[float(s.labels["le"])] = s.value
    return buckets


def bucket_quantiles(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """p50/p99 (ms, the bucket's upper bound) of the requests counted between two readings."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    out: dict[str, Any] = {"requests": int(total)}
    for name, q in (("p50_ms_at_most", 0.5), ("p99_ms_at_most", 0.99)):
        bound = next((b for b, c in zip(bounds, counts, strict=True) if total and c >= q * total), None)
        out[name] = None if bound is None else (bound * 1000 if bound != float("inf") else "inf")
    return out


def phase(url: str, profile: str, overrides: dict[str, Any], api_key: str | None) -> dict[str, Any]:
    from pipelines.config import load_config
    from pipelines.data.replay import simulate_traffic

    cfg = load_config(profile, {f"simulate.{k}": v for k, v in overrides.items()})
    before = search_histogram(url, api_key)
    summary = simulate_traffic(url, cfg, api_key=api_key)
    result = summary.to_dict()
    result["service_search"] = bucket_quantiles(before, search_histogram(url, api_key))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=1.0, help="per phase")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--profile", default="default", help="config profile (data.max_terms, data.event_users)")
    parser.add_argument("--api-key", default=os.environ.get("SHOPGUIDE_API_KEY"))
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    url = args.url.rstrip("/")
    ready = httpx.get(f"{url}/readyz", timeout=30)
    ready.raise_for_status()
    report: dict[str, Any] = {
        "bench": "simulate",
        "simulated": True,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "python": platform.python_version()},
        "url": url,
        "model_version": ready.json().get("model_version"),
        "phases": {},
    }
    common = {"seed": args.seed, "minutes": args.minutes, "think_seconds": 0}
    report["phases"]["baseline_1_user"] = phase(
        url, args.profile, common | {"users": 1, "concurrency": 1}, args.api_key
    )
    load = common | {"users": args.users, "concurrency": args.concurrency}
    report["phases"][f"{args.users}_users"] = phase(url, args.profile, load, args.api_key)
    report["machine"]["loadavg_end"] = os.getloadavg()

    print(f"SIMULATED traffic against {url} (model {report['model_version']}), {args.minutes:g} min per phase")
    print(
        f"{'phase':<18}{'searches/s':>11}{'events/s':>10}{'client p50':>12}{'p99':>9}{'service p50<=':>15}{'p99<=':>8}"
    )
    for name, p in report["phases"].items():
        svc = p["service_search"]
        print(
            f"{name:<18}{p['searches_per_s'] or 0:>11.1f}{p['events_per_s'] or 0:>10.1f}"
            f"{p['search_ms']['p50'] or 0:>10.1f}ms{p['search_ms']['p99'] or 0:>7.1f}ms"
            f"{svc['p50_ms_at_most'] or 0:>13}ms{svc['p99_ms_at_most'] or 0:>6}ms"
        )
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
