"""New arrivals, measured end to end: a product line the launch model never saw lands, SIMULATED shoppers search for
it, the monitor alarms, the drift-triggered retrain learns it.

    .venv/bin/python bench/new_arrivals.py [--profile arrivals] [--home DIR] [--json out.json]

Not part of the test suite (~15-20 min on 2 cores). On a home of its own (a fresh temporary SHOPGUIDE_HOME unless
--home; its MLflow store, Airflow DB, Feast stores, landing folder and logs), with the profile's `data.new_arrivals`
(configs/arrivals.yaml: the tiny data with power tools, their blades and bits held back):

1. features DAG, then the launch retrain DAG: no @champion yet, so its snapshot holds the new arrivals back from the
   catalog and every judgment (pipelines.data.dataset.hold_back_new_arrivals); the champion it promotes never saw them;
2. two services on @champion: the shop (its request and event logs feed the monitor) and a measuring one with no
   request log, so that measuring never enters a monitored window;
3. BEFORE: SIMULATED shoppers search the launch terms (the training terms judged on no new arrival) for
   --baseline-seconds; the monitor DAG over the window that ends then: its signals before;
4. the new arrivals' nDCG@10 and hit rate, measured on the measuring service: their terms (the training terms judged
   on a new arrival), each searched once (k 10), against those terms' judgments of new arrivals (graded as in
   pipelines.evaluation.evaluate.heldout_qrels; a hit: a new arrival judged >= 2.0 in the top 10); also nDCG@10
   against all of the terms' judgments. Measured before the index refresh (the arrivals are not in the index);
5. the catalog with the new arrivals (write_arrivals_catalog) lands (pipelines.data.catalog.land_catalog) and the
   catalog DAG indexes it for the same version; seconds from landing to both services answering from it; measured
   again;
6. AFTER: SIMULATED shoppers search the new arrivals' terms only, while the monitor DAG runs back to back over the
   window that ends at each run's start; the time to alarm is from the first such search to the end of the first
   monitor run whose window alarms on drift or vocabulary misses (its announce_drift emits the Asset
   shopguide_drift); the shoppers go on for at least --arrivals-seconds in all, so the retrain has their feedback;
7. the retrain DAG with only_with_new_data (the schedule's rule: its decide trains only on something new, here the
   monitor's alarm, since the profile's min_new_feedback is out of reach), as `shopguide loop` runs it; after a
   promotion both services swap, and the new arrivals are measured a third time; a last window of their traffic
   (--after-seconds) shows the monitor's signals against the new champion.

The vocabulary-miss rate of the new arrivals' terms is given under the launch champion's and the retrained one's
tokenizer (pipelines.monitoring.vocabulary.vocabulary_stats, as the monitor computes it), beside each window's.
Prints a short table and the JSON; writes bench/results/new-arrivals-<date>.json (or --json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.config import Paths, ShopguideConfig, load_config  # noqa: E402

HIT_RELEVANCE = 2.0  # a new arrival judged at least this is a hit in the top 10
K = 10
# environment that would point a child at another home's logs or stores
FOREIGN_ENV = (
    "SHOPGUIDE_REQUEST_LOG_DIR",
    "SHOPGUIDE_EVENT_LOG_DIR",
    "SHOPGUIDE_LOG_STORE",
    "SHOPGUIDE_RUN_STORE",
    "SHOPGUIDE_MONITOR_TEXTFILE",
    "SHOPGUIDE_LANDING",
    "SHOPGUIDE_BUNDLE_DIR",
)


def log(text: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {text}", flush=True)


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


# --- the slice and its terms


def scenario_judgments(cfg: ShopguideConfig) -> dict[str, Any]:
    """The profile's judgments split the scenario's way: the new arrivals' ids, the launch shoppers' rows (training
    terms judged on no new arrival) and the arrival shoppers' rows (every row of a training term judged on one)."""
    from pipelines.data.dataset import catalog_from, new_arrival_ids, normalize_term, profile_judgments
    from pipelines.data.traffic import training_judgments

    judgments = profile_judgments(cfg.data)
    arrivals = new_arrival_ids(catalog_from(judgments), cfg.data.new_arrivals.title_words)
    if not arrivals:
        raise SystemExit(f"profile {cfg.profile!r} has no new arrivals (data.new_arrivals.title_words)")
    train = training_judgments(judgments)
    terms = train["search_term"].map(normalize_term)
    targeted = set(terms[train["product_uid"].isin(arrivals)])
    return {
        "arrivals": arrivals,
        "launch_rows": train[~terms.isin(targeted)].reset_index(drop=True),
        "arrival_rows": train[terms.isin(targeted)].reset_index(drop=True),
    }


def arrival_qrels(rows: Any, arrivals: set[int]) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """(qrels on new arrivals only, qrels on all the terms' judgments), graded as heldout_qrels grades; a term
    without a new arrival judged above irrelevant has no new-arrival qrels."""
    from pipelines.data.dataset import normalize_term
    from pipelines.evaluation.evaluate import GAIN_SCALE

    new: dict[str, dict[str, int]] = {}
    every: dict[str, dict[str, int]] = {}
    for term, pid, rel in rows[["search_term", "product_uid", "relevance"]].itertuples(index=False):
        gain = round((float(rel) - 1.0) * GAIN_SCALE)
        every.setdefault(normalize_term(term), {})[str(pid)] = max(
            gain, every.get(normalize_term(term), {}).get(str(pid), 0)
        )
        if int(pid) in arrivals and gain > 0:
            new.setdefault(normalize_term(term), {})[str(pid)] = gain
    return new, {t: q for t, q in every.items() if any(g > 0 for g in q.values())}


def measure_arrivals(url: str, rows: Any, arrivals: set[int]) -> dict[str, Any]:
    """The new arrivals' nDCG@10 and hit rate on the service at `url` (each term once, anonymous, k 10)."""
    from pipelines.evaluation.evaluate import GAIN_SCALE, per_query_ndcg

    new_qrels, all_qrels = arrival_qrels(rows, arrivals)
    hits_of = {
        t: {int(p) for p, g in q.items() if g >= round((HIT_RELEVANCE - 1.0) * GAIN_SCALE)}
        for t, q in new_qrels.items()
    }
    run: dict[str, dict[str, float]] = {}
    shown_new = 0
    version = index_version = None
    with httpx.Client(base_url=url, timeout=30) as client:
        for term in sorted(all_qrels):
            r = client.post("/v1/search", json={"query": term, "k": K})
            r.raise_for_status()
            body = r.json()
            version = body["model_version"]
            ranked = [int(h["product_id"]) for h in body["results"]]
            run[term] = {str(p): float(K - i) for i, p in enumerate(ranked)}
            shown_new += sum(p in arrivals for p in ranked)
        index_version = client.get("/v1/model").json().get("index_version")
    new_ndcg = per_query_ndcg(new_qrels, run)
    all_ndcg = per_query_ndcg(all_qrels, run)
    hits = [bool(hits_of[t] & {int(p) for p in run.get(t, {})}) for t in new_qrels if hits_of[t]]
    return {
        "model_version": version,
        "index_version": index_version,
        "terms": len(all_qrels),
        "terms_with_new_arrival_judged": len(new_qrels),
        "ndcg_at_10": round(sum(new_ndcg.values()) / len(new_ndcg), 4) if new_ndcg else None,
        "hit_rate_at_10": round(sum(hits) / len(hits), 4) if hits else None,
        "hit_terms": len(hits),
        "ndcg_at_10_all_judgments": round(sum(all_ndcg.values()) / len(all_ndcg), 4) if all_ndcg else None,
        "new_arrivals_shown_per_answer": round(shown_new / len(run), 3) if run else None,
    }


# --- the pipeline's own steps


def run_dag(paths: Paths, dag_id: str, conf: dict[str, Any], timeout: float = 1800) -> Any:
    from pipelines.airflow_env import run_dag_test

    started = time.perf_counter()
    result = run_dag_test(paths, dag_id, conf, now(), capture=True, quiet=True, timeout=timeout).check()
    log(f"{dag_id}: {result.state} in {time.perf_counter() - started:.0f} s")
    return result


def monitor_window(paths: Paths, profile: str, end: datetime | None = None) -> dict[str, Any]:
    """One monitor DAG run over the window that ends at `end` (now): its signals, alarms and announcement."""
    from pipelines.airflow_env import run_dag_test

    end = end or now()
    started = time.perf_counter()
    result = run_dag_test(paths, "shopguide_monitor", {"profile": profile}, end, capture=True, quiet=True).check()
    seconds = time.perf_counter() - started
    measured, recorded = result.xcom("measure") or {}, result.xcom("record") or {}
    vocab = measured.get("vocabulary") or {}
    ref = measured.get("reference_vocabulary") or {}
    out = {
        "window_end": end.isoformat(),
        "seconds": round(seconds, 1),
        "model_version": measured.get("model_version"),
        "health": measured.get("health"),
        "window_queries": measured.get("window_queries"),
        "vocab_miss_ratio": vocab.get("miss_ratio"),
        "vocab_unk_ratio": vocab.get("unk_ratio"),
        "reference_vocab_miss_ratio": ref.get("miss_ratio"),
        "vocab_miss_threshold": recorded.get("vocab_miss_threshold"),
        "top_missed": vocab.get("top_missed", [])[:8],
        "drift": {k: v for k, v in (measured.get("drift") or {}).items()},
        "alarms": recorded.get("alarms"),
        "reasons": recorded.get("reasons"),
        "announced": result.task_states.get("announce_drift") == "success",
        "announcement": (result.xcom("announce_drift") or {}).get("extra"),
        "notes": measured.get("notes"),
    }
    alarmed = [s for s, a in (out["alarms"] or {}).items() if a]
    log(
        f"monitor window -> {end:%H:%M:%S}: {measured.get('window_queries')} queries, vocabulary miss "
        f"{_f(out['vocab_miss_ratio'])} (threshold {_f(out['vocab_miss_threshold'])}), alarms {alarmed or 'none'}, "
        f"{seconds:.0f} s"
    )
    return out


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def vocabulary_of(paths: Paths, model: str, version: str, terms: list[str]) -> dict[str, Any]:
    """The served version's vocabulary size and the miss rate of `terms` under its tokenizer (the monitor's code)."""
    from pipelines.monitoring.vocabulary import load_tokenizer, vocabulary_stats
    from pipelines.registry import mlflow_client as registry
    from pipelines.runtime.bundle import TOKENIZER_FILE

    bundle = registry.download_bundle(paths, model, version, paths.home / "bench" / "bundles")
    tokenizer = load_tokenizer(bundle / TOKENIZER_FILE)
    stats = vocabulary_stats(tokenizer, terms)
    return {
        "model_version": version,
        "vocab_size": tokenizer.get_vocab_size(),
        "miss_ratio": round(stats.miss_ratio or 0.0, 4),
        "unk_ratio": round(stats.unk_ratio or 0.0, 4),
        "top_missed": stats.top_missed[:10],
    }


def wait_index(urls: list[str], index_version: str, timeout: float = 180) -> float:
    """Seconds until every service reports `index_version` in /v1/model."""
    started = time.perf_counter()
    pending = list(urls)
    while pending:
        if time.perf_counter() - started > timeout:
            raise SystemExit(f"{pending} did not serve index {index_version} within {timeout:g} s")
        pending = [
            u for u in pending if httpx.get(f"{u}/v1/model", timeout=10).json().get("index_version") != index_version
        ]
        if pending:
            time.sleep(0.2)
    return time.perf_counter() - started


class Traffic:
    """SIMULATED shoppers in a thread (pipelines.data.replay.simulate_traffic over `rows`' terms) until stopped."""

    def __init__(self, url: str, cfg: ShopguideConfig, rows: Any, minutes: float) -> None:
        from pipelines.data.replay import simulate_traffic

        self.stop = threading.Event()
        self.started = time.perf_counter()
        self.result: Any = None
        cfg = cfg.model_copy(update={"simulate": cfg.simulate.model_copy(update={"minutes": minutes})})

        def play() -> None:
            self.result = simulate_traffic(url, cfg, judgments=rows, stop=self.stop)

        self.thread = threading.Thread(target=play, name="arrivals-traffic", daemon=True)
        self.thread.start()

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def finish(self) -> dict[str, Any]:
        self.stop.set()
        self.thread.join(timeout=120)
        return self.result.to_dict() if self.result is not None else {}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="arrivals", help="a profile with data.new_arrivals (configs/*.yaml)")
    parser.add_argument("--home", type=Path, default=None, help="SHOPGUIDE_HOME of the run (default: a fresh temp dir)")
    parser.add_argument("--port", type=int, default=8310, help="the shop's service; the measuring one: port + 1")
    parser.add_argument("--baseline-seconds", type=float, default=90)
    parser.add_argument("--arrivals-seconds", type=float, default=150, help="least traffic on the new arrivals")
    parser.add_argument("--alarm-timeout-seconds", type=float, default=900)
    parser.add_argument("--after-seconds", type=float, default=60, help="arrivals traffic after the retrain")
    parser.add_argument(
        "--max-regression",
        type=float,
        default=None,
        help="the retrain's gate.max_regression (its DAG Param); default: the profile's",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    started_all = time.perf_counter()
    home = (args.home or Path(tempfile.mkdtemp(prefix="shopguide-arrivals-"))).resolve()
    paths = Paths(home)
    for key in FOREIGN_ENV:
        os.environ.pop(key, None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("AIRFLOW_HOME", None)
    os.environ.update(paths.environ())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["SHOPGUIDE_PROFILE"] = args.profile  # the DAGs' default profile, as a deployment would set it
    cfg = load_config(args.profile)
    model = cfg.registry.model_name
    scenario = scenario_judgments(cfg)
    arrivals, arrival_rows, launch_rows = scenario["arrivals"], scenario["arrival_rows"], scenario["launch_rows"]
    from pipelines.data.dataset import normalize_term

    arrival_terms = sorted(set(arrival_rows["search_term"].map(normalize_term)))
    log(
        f"home {home}; profile {args.profile}: {len(arrivals)} new arrivals, {len(arrival_terms)} of their terms, "
        f"{launch_rows['search_term'].nunique()} launch terms"
    )
    report: dict[str, Any] = {
        "bench": "new_arrivals",
        "simulated_traffic": True,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "python": platform.python_version()},
        "profile": args.profile,
        "home": str(home),
        "slice": {
            "rule": f"a title holding one of {list(cfg.data.new_arrivals.title_words)} as a whole word",
            "new_arrivals": len(arrivals),
            "terms": arrival_terms,
        },
        "seconds": {},
    }
    secs = report["seconds"]

    lap = time.perf_counter()
    run_dag(paths, "shopguide_features", {"profile": args.profile})
    launch = run_dag(paths, "shopguide_retrain", {"profile": args.profile})
    secs["launch_pipeline"] = round(time.perf_counter() - lap, 1)
    from pipelines.loop import read_feedback as loop_feedback
    from pipelines.loop import read_outcome
    from pipelines.registry import mlflow_client as registry

    launch_outcome = read_outcome(launch.task_states, launch.xcoms, launch.pushed)
    champion = registry.alias_version(paths, model, registry.CHAMPION)
    if champion is None:
        raise SystemExit(f"the launch retrain promoted nothing: {launch_outcome}")
    snapshot = Path((launch.xcom("snapshot") or {}).get("snapshot_dir", "/nonexistent"))
    manifest = json.loads((snapshot / "manifest.json").read_text()) if snapshot.is_dir() else {}
    report["launch"] = {
        "champion": champion,
        "variant": (launch.xcom("select_variant") or {}).get("variant"),
        "heldout_ndcg_at_10": launch_outcome.candidate_ndcg_at_10,
        "snapshot_new_arrivals": manifest.get("new_arrivals"),
        "catalog_products": (manifest.get("tables") or {}).get("catalog", {}).get("rows"),
        "vocabulary": vocabulary_of(paths, model, champion, arrival_terms),
        "launch_terms_vocabulary": vocabulary_of(
            paths, model, champion, sorted(set(launch_rows["search_term"].map(normalize_term)))
        ),
    }
    log(
        f"launch champion v{champion} ({report['launch']['variant']}), the new arrivals' terms miss "
        f"{report['launch']['vocabulary']['miss_ratio']:.3f} of their words"
    )

    from pipelines.service_process import service_process

    shop_url, measure_url = f"http://127.0.0.1:{args.port}", f"http://127.0.0.1:{args.port + 1}"
    env = {"SHOPGUIDE_MODEL_POLL_SECONDS": "2", "SHOPGUIDE_MODEL_NAME": model}
    logs = home / "logs"
    with (
        service_process(port=args.port, env=env, log=logs / "shop-service.log") as shop,
        service_process(
            port=args.port + 1,
            env={**env, "SHOPGUIDE_REQUEST_LOG_ENABLED": "false"},
            log=logs / "measure-service.log",
        ) as measurer,
    ):
        shop.wait_ready(timeout=240)
        measurer.wait_ready(timeout=240)

        log(f"BEFORE: launch shoppers for {args.baseline_seconds:g} s")
        lap = time.perf_counter()
        baseline = Traffic(shop_url, cfg, launch_rows, args.baseline_seconds / 60)
        baseline.thread.join()
        report["traffic_before"] = baseline.finish()
        time.sleep(2)  # the service's log flush
        report["monitor_before"] = monitor_window(paths, args.profile)
        secs["before"] = round(time.perf_counter() - lap, 1)

        report["arrivals_before_refresh"] = measure_arrivals(measure_url, arrival_rows, arrivals)
        log(f"before the refresh: {report['arrivals_before_refresh']}")

        from pipelines.data.catalog import land_catalog
        from pipelines.data.dataset import write_arrivals_catalog

        written = home / "bench" / "catalog-with-arrivals.csv"
        report["catalog_file"] = write_arrivals_catalog(cfg.data, written)
        lap = time.perf_counter()
        landed = land_catalog(written, paths.landing, datetime.now(UTC))
        catalog_run = run_dag(paths, "shopguide_catalog", {"profile": args.profile, "catalog_path": landed.name})
        published = catalog_run.xcom("publish") or {}
        dag_seconds = time.perf_counter() - lap
        swap_seconds = wait_index([shop_url, measure_url], published["index_version"])
        report["refresh"] = {
            "embed": catalog_run.xcom("embed"),
            "index_version": published.get("index_version"),
            "dag_seconds": round(dag_seconds, 1),
            "landing_to_served_seconds": round(time.perf_counter() - lap, 1),
            "swap_wait_seconds": round(swap_seconds, 1),
        }
        report["arrivals_after_refresh"] = measure_arrivals(measure_url, arrival_rows, arrivals)
        log(f"after the refresh: {report['arrivals_after_refresh']}")

        log("AFTER: shoppers search the new arrivals; the monitor runs back to back until it alarms")
        lap = time.perf_counter()
        traffic = Traffic(shop_url, cfg, arrival_rows, (args.alarm_timeout_seconds + args.arrivals_seconds) / 60)
        checks: list[dict[str, Any]] = []
        alarm = None
        while alarm is None and traffic.seconds() < args.alarm_timeout_seconds and traffic.thread.is_alive():
            time.sleep(max(0.0, 20 - traffic.seconds()) if not checks else 1)
            window = monitor_window(paths, args.profile)
            window["traffic_seconds_at_window_end"] = round(traffic.seconds() - window["seconds"], 1)
            window["traffic_seconds_at_verdict"] = round(traffic.seconds(), 1)
            checks.append(window)
            from pipelines.monitoring.decision import retrain_alarms

            if retrain_alarms(window["alarms"] or {}):
                alarm = window
        report["monitor_checks"] = checks
        report["monitor_after"] = alarm or (checks[-1] if checks else None)
        report["time_to_alarm_seconds"] = alarm["traffic_seconds_at_verdict"] if alarm else None
        report["time_to_alarm_window_end_seconds"] = alarm["traffic_seconds_at_window_end"] if alarm else None
        while traffic.seconds() < args.arrivals_seconds:
            time.sleep(1)
        report["traffic_after"] = traffic.finish()
        traffic_ended = time.perf_counter()
        secs["after"] = round(time.perf_counter() - lap, 1)
        if alarm is None:
            log("no alarm: the retrain's decide will skip")

        log("the retrain DAG (only_with_new_data: decide trains on the monitor's alarm)")
        lap = time.perf_counter()
        conf: dict[str, Any] = {"profile": args.profile, "only_with_new_data": True}
        if args.max_regression is not None:
            conf["max_regression"] = args.max_regression
        retrain = run_dag(paths, "shopguide_retrain", conf)
        outcome = read_outcome(retrain.task_states, retrain.xcoms, retrain.pushed)
        decision = (retrain.pushed.get("decide") or {}).get("decision") or {}
        secs["retrain"] = round(time.perf_counter() - lap, 1)
        report["retrain"] = {
            "decide": decision.get("reason"),
            "outcome": outcome.outcome,
            "reasons": list(outcome.reasons),
            "candidate": outcome.candidate,
            "variant": (retrain.xcom("select_variant") or {}).get("variant"),
            "comparison": outcome.comparison.__dict__ if outcome.comparison else None,
            "champion_after": outcome.champion_after,
            "feedback": loop_feedback(paths, outcome.mlflow_run_id).__dict__ if outcome.mlflow_run_id else None,
        }
        serving = registry.alias_version(paths, model, registry.CHAMPION)
        if outcome.outcome == "promoted" and serving is not None:
            lap = time.perf_counter()
            shop.wait_ready(timeout=240, version=serving)
            measurer.wait_ready(timeout=240, version=serving)
            report["retrain"]["swap_seconds"] = round(time.perf_counter() - lap, 1)
        report["arrivals_after_retrain"] = measure_arrivals(measure_url, arrival_rows, arrivals)
        log(f"after the retrain (v{serving} serves): {report['arrivals_after_retrain']}")
        retrained = outcome.candidate or serving
        report["retrained"] = (
            {"vocabulary": vocabulary_of(paths, model, retrained, arrival_terms)} if retrained else None
        )
        if outcome.outcome == "not promoted" and outcome.candidate:
            # the gate kept the champion: the candidate (@challenger) is measured the same way, on a service of its own
            with service_process(
                port=args.port + 2,
                env={**env, "SHOPGUIDE_REQUEST_LOG_ENABLED": "false", "SHOPGUIDE_MODEL_ALIAS": registry.CHALLENGER},
                log=logs / "challenger-service.log",
            ) as challenger:
                challenger.wait_ready(timeout=240, version=outcome.candidate)
                report["candidate_after_retrain"] = measure_arrivals(
                    f"http://127.0.0.1:{args.port + 2}", arrival_rows, arrivals
                )
            log(f"the candidate v{outcome.candidate} (@challenger): {report['candidate_after_retrain']}")

        if args.after_seconds > 0 and outcome.outcome == "promoted":
            # the last window holds only traffic after the swap: it starts after the earlier traffic left it
            lap = time.perf_counter()
            time.sleep(max(0.0, traffic_ended + cfg.monitor.window_minutes * 60 + 1 - args.after_seconds - lap))
            last = Traffic(shop_url, cfg, arrival_rows, args.after_seconds / 60)
            last.thread.join()
            report["traffic_after_retrain"] = last.finish()
            time.sleep(2)
            report["monitor_after_retrain"] = monitor_window(paths, args.profile)
            secs["after_retrain_window"] = round(time.perf_counter() - lap, 1)

    secs["total"] = round(time.perf_counter() - started_all, 1)
    report["machine"]["loadavg_end"] = os.getloadavg()
    print_table(report)
    text = json.dumps(report, indent=2, default=str)
    out = args.json or ROOT / "bench" / "results" / f"new-arrivals-{datetime.now(UTC):%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text)
    log(f"wrote {out}")
    return report


def print_table(r: dict[str, Any]) -> None:
    def m(key: str) -> str:
        x = r.get(key) or {}
        return (
            f"v{x.get('model_version')}  nDCG@10 {_f(x.get('ndcg_at_10'))}  hit rate@10 {_f(x.get('hit_rate_at_10'))}  "
            f"(all judgments nDCG@10 {_f(x.get('ndcg_at_10_all_judgments'))})"
        )

    def w(key: str) -> str:
        x = r.get(key) or {}
        alarmed = [s for s, a in (x.get("alarms") or {}).items() if a]
        drift = {s: d.get("detected") for s, d in (x.get("drift") or {}).items()}
        return (
            f"v{x.get('model_version')}  {x.get('window_queries')} queries  "
            f"vocabulary miss {_f(x.get('vocab_miss_ratio'))} (ref {_f(x.get('reference_vocab_miss_ratio'))}, "
            f"threshold {_f(x.get('vocab_miss_threshold'))})  "
            f"drift {drift}  alarms {alarmed or 'none'}"
        )

    s = r["slice"]
    print(f"\nnew arrivals: {s['new_arrivals']} products ({s['rule']}), {len(s['terms'])} training terms target them")
    print(f"  {'arrivals before refresh':<26}{m('arrivals_before_refresh')}")
    ref = r.get("refresh") or {}
    print(
        f"  {'arrivals after refresh':<26}{m('arrivals_after_refresh')}  (landing -> served "
        f"{ref.get('landing_to_served_seconds')} s)"
    )
    print(f"  {'arrivals after retrain':<26}{m('arrivals_after_retrain')}  ({(r.get('retrain') or {}).get('outcome')})")
    if r.get("candidate_after_retrain"):
        print(f"  {'candidate (not promoted)':<26}{m('candidate_after_retrain')}")
    print(f"  {'monitor before':<26}{w('monitor_before')}")
    print(f"  {'monitor after':<26}{w('monitor_after')}")
    if r.get("monitor_after_retrain"):
        print(f"  {'monitor after retrain':<26}{w('monitor_after_retrain')}")
    print(
        f"  {'time to alarm':<26}{r.get('time_to_alarm_seconds')} s of arrivals traffic "
        f"(window end at {r.get('time_to_alarm_window_end_seconds')} s)"
    )
    lv, rv = (r.get("launch") or {}).get("vocabulary") or {}, (r.get("retrained") or {}).get("vocabulary") or {}
    print(
        f"  {'vocabulary miss (terms)':<26}launch v{lv.get('model_version')} {_f(lv.get('miss_ratio'))} "
        f"({lv.get('vocab_size')} tokens) -> v{rv.get('model_version')} {_f(rv.get('miss_ratio'))} "
        f"({rv.get('vocab_size')} tokens)"
    )
    print(f"  {'seconds':<26}{r['seconds']}\n")


if __name__ == "__main__":
    main()
