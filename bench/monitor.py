"""The monitor's cost per window: wall time and peak memory of one window's measurements (the monitor DAG's measure
task: pipelines.monitoring.measure.measure_window) for windows of N search answers.

    .venv/bin/python bench/monitor.py --bundle DIR [--profile default] [--sizes 100,1000,10000] [--repeats 3]

Not part of the test suite. The window's answers are built, not served: N search answers whose queries are real Home
Depot training terms drawn with replacement (by their judgment counts, as the SIMULATED shoppers draw them: a window
of N answers holds fewer distinct queries, and the drift tests see each distinct query once), a click on a fifth of
them; the reference is the profile's monitor.reference_queries training terms, encoded once per window as the task
does. `--bundle` is a served bundle folder (its tokenizer and ONNX encoder), e.g. the champion bench/new_arrivals.py
downloaded: <its home>/bench/bundles/<version>/model/artifacts/bundle. Each (N, mode) runs in a fresh process,
--repeats times, medians reported; peak memory is that process's peak RSS (the imports and the window included) and
the increase over its RSS just before measure_window. Baseline, in the same run: the same window with the drift tests
off (min_queries above N: answer health, engagement and the vocabulary misses only), so the drift tests' own cost is
the difference. Feast's freshness read and the MLflow logging of the DAG's other tasks are not in it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("rates_only", "full")  # baseline first


def _rss_mb() -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def window_tables(n: int, seed: int = 0) -> tuple[Any, Any, int]:
    """(request log, event log, distinct queries) of a window of `n` search answers on real training terms."""
    import numpy as np
    import pyarrow as pa

    from pipelines.data.dataset import load_judgments
    from pipelines.data.traffic import term_frequency
    from pipelines.runtime import event_log
    from pipelines.runtime.logfolder import to_batch
    from pipelines.runtime.request_log import SCHEMA, RequestRecord

    freq = term_frequency(load_judgments())
    rng = np.random.default_rng(seed)
    terms = rng.choice(freq.index.to_numpy(), size=n, p=(freq / freq.sum()).to_numpy())
    start = datetime(2026, 12, 1, tzinfo=UTC)
    categories = ["Fridges", "Microwaves", None, None, None]
    answers = [
        RequestRecord(
            f"r{i}",
            start + timedelta(seconds=i * 3600 / n),
            "search",
            "1",
            str(term),
            int(rng.integers(1, 2000)),
            10,
            categories[i % len(categories)],
            [int(p) for p in rng.integers(100000, 200000, size=10)],
            sorted(rng.random(10).astype(float).tolist(), reverse=True),
            False,
            None,
            None,
            float(rng.gamma(2.0, 3.0)),
        )
        for i, term in enumerate(terms)
    ]
    clicks = [
        event_log.EventRecord(
            a.ts + timedelta(seconds=5),
            a.request_id,
            int(a.user_id or 0),
            a.product_ids[0],
            "click",
            a.ts + timedelta(seconds=5),
            0,
            "1",
        )
        for a in answers[::5]
    ]
    requests = pa.Table.from_batches([to_batch(answers, SCHEMA)])
    events = pa.Table.from_batches([to_batch(clicks, event_log.SCHEMA)])
    return requests, events, len({str(t).lower() for t in terms})


def child(n: int, mode: str, bundle: str, profile: str) -> dict[str, Any]:
    """One window's measure_window in this process: its seconds and memory."""
    from pipelines.config import load_config
    from pipelines.data.dataset import load_judgments, split_judgments
    from pipelines.monitoring.measure import measure_window

    cfg = load_config(profile).monitor
    if mode == "rates_only":
        cfg = cfg.model_copy(update={"min_queries": n + 1})
    requests, events, distinct = window_tables(n)
    train, _ = split_judgments(load_judgments())
    reference = train["search_term"].dropna().astype(str).tolist()
    before = _rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        out = measure_window(requests, events, Path(bundle), reference, cfg, Path(tmp) / "report.html")
        seconds = time.perf_counter() - started
        report_kb = (Path(tmp) / "report.html").stat().st_size / 1024 if out["report_path"] else 0.0
    return {
        "seconds": seconds,
        "peak_rss_mb": _rss_mb(),
        "rss_before_mb": before,
        "distinct_queries": distinct,
        "drift_tests": sorted(out["drift"]),
        "report_kb": round(report_kb, 1),
    }


def run_child(n: int, mode: str, bundle: str, profile: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(n), "--mode", mode, "--bundle", bundle, "--profile", profile],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if proc.returncode != 0:
        raise SystemExit(f"window of {n} ({mode}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, help="a served bundle folder (tokenizer + ONNX encoder)")
    parser.add_argument("--profile", default="default", help="whose monitor section (reference_queries, thresholds)")
    parser.add_argument("--sizes", default="100,1000,10000", help="search answers per window")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, default="full", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.mode, args.bundle, args.profile)))
        return {}

    from pipelines.config import load_config

    monitor = load_config(args.profile).monitor
    sizes = [int(s) for s in args.sizes.split(",")]
    report: dict[str, Any] = {
        "bench": "monitor",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "python": platform.python_version()},
        "bundle": args.bundle,
        "profile": args.profile,
        "reference_queries": monitor.reference_queries,
        "baseline": "rates_only: the same window without the drift tests (health, engagement, vocabulary misses)",
        "repeats": args.repeats,
        "windows": [],
    }
    for n in sizes:
        for mode in MODES:
            runs = []
            for r in range(args.repeats):  # round-robin would interleave sizes; each run is its own process anyway
                runs.append(run_child(n, mode, args.bundle, args.profile))
                print(
                    f"  N={n} {mode} run {r + 1}: {runs[-1]['seconds']:.2f} s, peak {runs[-1]['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
            report["windows"].append(
                {
                    "answers": n,
                    "mode": mode,
                    "distinct_queries": runs[0]["distinct_queries"],
                    "drift_tests": runs[0]["drift_tests"],
                    "seconds_median": round(statistics.median(r["seconds"] for r in runs), 3),
                    "seconds_all": [round(r["seconds"], 3) for r in runs],
                    "peak_rss_mb_median": round(statistics.median(r["peak_rss_mb"] for r in runs), 1),
                    "rss_increase_mb_median": round(
                        statistics.median(r["peak_rss_mb"] - r["rss_before_mb"] for r in runs), 1
                    ),
                    "report_kb": runs[0]["report_kb"],
                }
            )
    report["machine"]["loadavg_end"] = os.getloadavg()
    base = {w["answers"]: w for w in report["windows"] if w["mode"] == "rates_only"}
    print(
        f"\nmonitor cost per window ({args.profile} profile, {monitor.reference_queries} reference terms), "
        f"medians of {args.repeats}"
    )
    print(
        f"{'answers':>8}{'distinct':>10}  {'mode':<11}{'seconds':>9}{'x base':>8}{'peak MB':>9}{'+MB':>7}"
        f"{'report KB':>11}"
    )
    for w in report["windows"]:
        ratio = w["seconds_median"] / base[w["answers"]]["seconds_median"]
        print(
            f"{w['answers']:>8}{w['distinct_queries']:>10}  {w['mode']:<11}{w['seconds_median']:>9.2f}{ratio:>8.1f}"
            f"{w['peak_rss_mb_median']:>9.0f}{w['rss_increase_mb_median']:>7.0f}{w['report_kb']:>11.0f}"
        )
    text = json.dumps(report, indent=2)
    out = args.json or ROOT / "bench" / "results" / f"monitor-{datetime.now(UTC):%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
