"""The feedback curve: held-out nDCG@10 of a model retrained after N SIMULATED users of traffic vs the launch champion.

    nice -n 19 .venv/bin/python bench/feedback_curve.py --volumes 50 200 800 [--judged-at-launch 0.3] [--home DIR]

Not part of the test suite; about 25 minutes on the tiny profile on 2 cores. In a fresh SHOPGUIDE_HOME (a temporary
folder unless --home): the features DAG, then ONE launch champion from the retrain DAG with `judged_at_launch` (that
share of the training terms' judgments; the others reach a model only through simulated clicks), then `shopguide
loop`'s cycles (pipelines/loop.py, no loop code here) against the service on that champion, one per volume: cycle n
adds SIMULATED users until the traffic since launch holds volumes[n - 1] users (each plays --sessions sessions flat
out), lands it (features DAG) and retrains on all of it (`--always-train`, the retrain Params below). Promotion is off
(`auto_promote` false), so @champion stays the launch model: the service answers every volume's traffic with it, each
snapshot's feedback window starts at its snapshot (the volumes are nested: 200 users = the first 50 plus 150 more),
and every candidate is paired with that same champion on the same held-out terms (the gate's paired bootstrap CI).
Every candidate trains from the base model with the same --max-steps as the launch champion: the curve compares data,
not training time. The baseline of each row is the launch champion, re-evaluated in that row's run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# variables that would point the run at another home's stores or logs
FOREIGN = (
    "MLFLOW_TRACKING_URI",
    "AIRFLOW_HOME",
    "SHOPGUIDE_LANDING",
    "SHOPGUIDE_RUN_STORE",
    "SHOPGUIDE_SCRATCH",
    "SHOPGUIDE_REQUEST_LOG_DIR",
    "SHOPGUIDE_EVENT_LOG_DIR",
    "SHOPGUIDE_MONITOR_TEXTFILE",
)


def increments(volumes: list[int]) -> tuple[int, ...]:
    """Users each cycle adds so that the traffic since launch holds volumes[n] users after cycle n."""
    if not volumes or any(v <= 0 for v in volumes) or sorted(set(volumes)) != volumes:
        raise ValueError(f"--volumes must rise strictly and be positive, got {volumes}")
    return tuple(b - a for a, b in zip([0, *volumes], volumes, strict=False))


def row(volume: int, report: dict[str, Any]) -> dict[str, Any]:
    """One point of the curve from a loop CycleReport's dict."""
    fb, r = report["feedback"] or {}, report["retrain"]
    c = r["comparison"] or {}
    return {
        "users": volume,
        "users_added": report["traffic"]["users"],
        "searches_added": report["traffic"]["searches"],
        "click_only_searches_added": report["traffic"].get("click_only_searches"),
        "answers": fb.get("answers"),
        "answers_with_feedback": fb.get("answers_with_events"),
        "events": fb.get("events"),
        "pairs": fb.get("pairs"),
        "positives": fb.get("positives"),
        "negatives": fb.get("negatives"),
        "candidate": r["candidate"],
        "candidate_ndcg_at_10": c.get("candidate"),
        "champion_ndcg_at_10": c.get("champion"),
        "difference": c.get("difference"),
        "ci": [c.get("low"), c.get("high")],
        "confidence": c.get("confidence"),
        "heldout_terms": c.get("terms"),
        "outcome": r["outcome"],
        "seconds": report["seconds"],
    }


def table(rows: list[dict[str, Any]], champion: str) -> str:
    head = ("users", "answers w/ fb / answers", "events", "pairs +/-", "candidate", f"v{champion}", "diff [CI]", "s")
    lines = [head]
    for p in rows:
        s = p["seconds"]
        lines.append(
            (
                str(p["users"]),
                f"{p['answers_with_feedback']} / {p['answers']}",
                str(p["events"]),
                f"{p['positives']}/{p['negatives']}",
                f"v{p['candidate']} {p['candidate_ndcg_at_10']:.4f}",
                f"{p['champion_ndcg_at_10']:.4f}",
                f"{p['difference']:+.4f} [{p['ci'][0]:+.4f}, {p['ci'][1]:+.4f}]",
                f"sim {s.get('simulate', 0):.0f} feat {s.get('features', 0):.0f} retrain {s.get('retrain', 0):.0f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", type=int, nargs="+", default=[50, 200, 800], help="users since launch")
    parser.add_argument("--judged-at-launch", type=float, default=0.3)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--max-steps", type=int, default=60, help="every model's training steps (launch included)")
    parser.add_argument("--sessions", type=int, default=2, help="sessions per simulated user")
    parser.add_argument("--seed", type=int, default=11, help="cycle n replays with seed + n - 1")
    parser.add_argument("--port", type=int, default=8017)
    parser.add_argument("--home", type=Path, help="a fresh SHOPGUIDE_HOME (default: a new temporary folder)")
    parser.add_argument("--json", type=Path, help="default: bench/results/feedback-curve-<date>.json")
    args = parser.parse_args(argv)
    added = increments(args.volumes)

    home = (args.home or Path(tempfile.mkdtemp(prefix="shopguide-curve-"))).resolve()
    if home.exists() and any(home.iterdir()):
        parser.error(f"--home {home} is not empty: the curve needs logs that hold only its own traffic")
    for key in FOREIGN:
        os.environ.pop(key, None)
    os.environ["SHOPGUIDE_HOME"] = str(home)

    from pipelines.airflow_env import airflow_environ, ensure_airflow_db, run_dag_test
    from pipelines.config import Paths, load_config
    from pipelines.loop import FEATURES_DAG, RETRAIN_DAG, LoopPlan, read_outcome, run_loop, summary
    from pipelines.registry import mlflow_client as registry

    paths = Paths.from_env()
    for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)
    os.environ.update(airflow_environ(paths, log_level="WARNING"))
    paths.home.mkdir(parents=True, exist_ok=True)
    ensure_airflow_db(paths)
    model = load_config(args.profile).registry.model_name
    timeout = load_config(args.profile).orchestration.dag_run_timeout_minutes * 60

    def run_dag(dag_id: str, conf: dict[str, Any]):
        now = datetime.now(UTC).replace(microsecond=0)
        result = run_dag_test(paths, dag_id, conf, now, quiet=True, timeout=timeout)
        print(f"{dag_id}: {result.state}; tasks: {result.task_states}", file=sys.stderr)
        if not result.ok:
            print(result.output[-5000:], file=sys.stderr)
            raise SystemExit(f"{dag_id} did not succeed")
        return result

    train = {"max_steps": args.max_steps, "judged_at_launch": args.judged_at_launch}
    report: dict[str, Any] = {
        "bench": "feedback_curve",
        "simulated": True,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "python": platform.python_version()},
        "home": str(home),
        "profile": args.profile,
        "judged_at_launch": args.judged_at_launch,
        "max_steps": args.max_steps,
        "sessions_per_user": args.sessions,
        "volumes": args.volumes,
    }
    started = time.perf_counter()
    run_dag(FEATURES_DAG, {"profile": args.profile})
    report["features_seconds"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    first = run_dag(RETRAIN_DAG, {"profile": args.profile, **train})
    launch = read_outcome(first.task_states, first.xcoms, first.pushed)
    champion = registry.alias_version(paths, model, registry.CHAMPION)
    if launch.outcome != "promoted" or champion is None:
        raise SystemExit(f"the launch model was not promoted: {launch}")
    report["launch"] = {
        "version": champion,
        "ndcg_at_10": launch.candidate_ndcg_at_10,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"launch champion v{champion}: held-out nDCG@10 {launch.candidate_ndcg_at_10}", file=sys.stderr)

    plan = LoopPlan(
        profile=args.profile,
        cycles=len(added),
        cycle_users=added,
        minutes=60.0,  # a cap: each user stops after its sessions
        seed=args.seed,
        think_seconds=0.0,
        sessions_per_user=args.sessions,
        judged_at_launch=args.judged_at_launch,
        only_with_new_data=False,
        port=args.port,
        retrain_params={"max_steps": args.max_steps, "auto_promote": False},
    )

    def same_champion(cycle: Any) -> None:
        now = registry.alias_version(paths, model, registry.CHAMPION)
        if now != champion:  # promotion is off: a moved alias would change every later row's baseline
            raise SystemExit(f"@champion moved from v{champion} to v{now} in cycle {cycle.cycle}")

    started = time.perf_counter()
    reports = run_loop(plan, paths, run_dag, echo=lambda line: print(line, file=sys.stderr), on_cycle=same_champion)
    loop = summary(plan, reports, time.perf_counter() - started)
    report["curve"] = [row(v, r) for v, r in zip(args.volumes, loop["reports"], strict=True)]
    report["loop"] = loop
    report["machine"]["loadavg_end"] = os.getloadavg()

    print(json.dumps(report["curve"], indent=2))
    print(f"\nlaunch v{champion} (judged_at_launch {args.judged_at_launch}, {args.max_steps} steps each):")
    print(table(report["curve"], champion))
    out = args.json or ROOT / "bench" / "results" / f"feedback-curve-{datetime.now(UTC).date()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten: {out}")
    return report


if __name__ == "__main__":
    main()
