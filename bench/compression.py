"""Compression suite of one profile in one run: every variant's quality, size, latency, throughput and memory.

    .venv/bin/python bench/compression.py --profile default               # fine-tunes the teacher first
    .venv/bin/python bench/compression.py --model-dir RUN/finetune        # reuse a fine-tuned teacher
    .venv/bin/python bench/compression.py --quick                         # a small slice, minutes

Prints a short table, then the JSON (rows, selection, stage seconds); the markdown report and the Pareto plot are
written to OUT/report. Not part of the test suite; timings depend on what else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# --quick: a few hundred search terms and short training, same code path as the full run
QUICK = {
    "data.max_terms": 400,
    "data.max_offers": 3000,
    "data.event_users": 50,
    "train.max_steps": 30,
    "train.head_max_offers": 1000,
    "compress.distill_steps": 150,
    "compress.distill_max_texts": 4000,
    "compress.throughput_texts": 256,
    "compress.timing_repeats": 3,
    "evaluate.latency_queries": 100,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--quick", action="store_true", help="a small data slice and short training")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. --set compress.distill_steps=500 (YAML value)",
    )
    parser.add_argument("--model-dir", default=None, help="a fine-tuned teacher folder (skips fine-tuning)")
    parser.add_argument("--snapshot-dir", default=None, help="an existing data snapshot (skips snapshotting)")
    parser.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the JSON here")
    args = parser.parse_args()

    import yaml

    from pipelines.compression.variants import compress_model
    from pipelines.config import load_config
    from pipelines.data.dataset import Snapshot, snapshot_data
    from pipelines.training.finetune import finetune_encoder

    overrides = {
        **(QUICK if args.quick else {}),
        **{k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)},
    }
    cfg = load_config(args.profile, overrides)
    work = Path(args.out or tempfile.mkdtemp(prefix="shopguide-compression-"))
    seconds: dict[str, float] = {}
    if args.snapshot_dir:
        snap = Snapshot.open(args.snapshot_dir)
    else:
        snap = snapshot_data(cfg.data, work / "data", datetime(2026, 11, 1, tzinfo=UTC))
    model_dir = args.model_dir
    if model_dir is None:
        t0 = time.perf_counter()
        model_dir = finetune_encoder(snap.path, work / "finetune", cfg.train)["model_dir"]
        seconds["finetune"] = round(time.perf_counter() - t0, 1)
    result = compress_model(model_dir, snap.path, work / "compress", cfg)
    result = {
        "profile": cfg.profile,
        "quick": args.quick,
        "overrides": overrides,
        "work_dir": str(work),
        "teacher_dir": str(model_dir),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "compress_config": cfg.compress.model_dump(),
        **result,
        "stage_seconds": {**seconds, **result["stage_seconds"]},
    }

    print(
        f"\nprofile {cfg.profile}{' (quick)' if args.quick else ''}: {result['validation_terms']} validation terms x "
        f"{result['catalog_products']} products, {cfg.compress.threads} threads, load average "
        f"{result['load_average'][0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(
        f"{'variant':<22} {'nDCG@10':>8} {'%teach':>7} {'cat acc':>8} {'MB':>6} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'x fast':>6} {'prod/s':>7} {'x thru':>6} {'peak MB':>7} {'parity':>7}"
    )
    for r in result["rows"]:

        def f(key, fmt, r=r):
            return "-" if r.get(key) is None else format(r[key], fmt)

        print(
            f"{r['variant']:<22} {f('ndcg_at_10', '.4f'):>8} {f('ndcg_retained', '.1%'):>7} "
            f"{f('category_accuracy', '.4f'):>8} {f('size_mb', '.1f'):>6} {f('latency_p50_ms', '.2f'):>7} "
            f"{f('latency_p99_ms', '.2f'):>7} {f('latency_speedup', '.1f'):>6} {f('products_per_s', '.0f'):>7} "
            f"{f('throughput_gain', '.1f'):>6} {f('model_peak_mb', '.0f'):>7} {f('parity_cosine_min', '.4f'):>7}"
        )
    print(f"selected: {result['selected']['variant']} -- {result['selected']['reason']}")
    print(f"stage seconds: {result['stage_seconds']}")
    print(f"report: {result['selected'].get('report_dir')}")
    print(json.dumps(result, indent=2, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
