"""The `shopguide` command: run the whole job, a single DAG, the service, or move the champion alias."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from pipelines.config import MODEL_NAME, Paths

if TYPE_CHECKING:
    from pipelines.airflow_env import DagTestResult
    from pipelines.prod import ProdConfig

app = typer.Typer(
    help="shopguide: train, compress, gate, promote and serve a shopping-guide encoder.",
    no_args_is_help=True,
    add_completion=False,
)

DEMO_QUERIES = ["cordless drill", "outdoor patio furniture", "led light bulbs 60 watt", "toilet seat", "wood stain"]
Profile = Annotated[str, typer.Option(help="Config profile: configs/<profile>.yaml.")]
TimeoutMinutes = Annotated[
    float | None,
    typer.Option(
        min=0.001,
        help="Stop a DAG run that takes longer than this many minutes (exit status 124); default: the profile's "
        "orchestration.dag_run_timeout_minutes.",
    ),
]
# the exit status of coreutils' timeout(1) when the time ran out
TIMEOUT_EXIT = 124


def _env(paths: Paths) -> None:
    """Point this process and every child (Airflow, MLflow, Feast, uvicorn) at one SHOPGUIDE_HOME, offline."""
    from pipelines.airflow_env import airflow_environ

    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }.items():
        os.environ.setdefault(key, value)
    os.environ.update(airflow_environ(paths))


def _banner(text: str) -> None:
    typer.secho(f"\n=== {text} ===", fg=typer.colors.CYAN, bold=True)


def dag_run_timeout_minutes(profile: str, minutes: float | None) -> float:
    """How long one CLI DAG run may take: `minutes` (the --timeout-minutes flag) or the profile's config."""
    from pipelines.config import load_config

    return minutes if minutes is not None else load_config(profile).orchestration.dag_run_timeout_minutes


def _run_dag(paths: Paths, dag_id: str, conf: dict, quiet: bool, timeout_minutes: float) -> DagTestResult:
    """One DAG run under `airflow dags test`, its output streamed; a failed or timed-out run exits the command."""
    from pipelines.airflow_env import DagRunTimeout, run_dag_test

    started = time.perf_counter()
    try:
        result = run_dag_test(
            paths, dag_id, conf, datetime.now(UTC).replace(microsecond=0), quiet=quiet, timeout=timeout_minutes * 60
        )
    except DagRunTimeout as err:
        run = err.result
        where = f"run {run.run_id} is marked failed" if run.run_id else "Airflow had not created the run yet"
        typer.secho(
            f"{dag_id} TIMED OUT: still running after its {timeout_minutes:g} min limit (--timeout-minutes, default "
            f"orchestration.dag_run_timeout_minutes of the profile), so it was stopped after "
            f"{time.perf_counter() - started:.0f} s; {where}; tasks: {run.task_states}",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(TIMEOUT_EXIT) from None
    typer.echo(f"{dag_id}: {result.state} in {time.perf_counter() - started:.0f} s; tasks: {result.task_states}")
    if not result.ok:
        typer.secho(f"{dag_id} did not succeed; the task log above says why.", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    return result


@app.command()
def init() -> None:
    """Create SHOPGUIDE_HOME and migrate the embedded Airflow DB (the other stores create themselves)."""
    from pipelines.airflow_env import ensure_airflow_db

    paths = Paths.from_env()
    _env(paths)
    paths.home.mkdir(parents=True, exist_ok=True)
    ensure_airflow_db(paths)
    typer.echo(
        f"SHOPGUIDE_HOME={paths.home}\nMLFLOW_TRACKING_URI={paths.mlflow_tracking_uri}\n"
        f"AIRFLOW_HOME={paths.airflow_home}"
    )


@app.command()
def features(profile: Profile = "default", quiet: bool = False, timeout_minutes: TimeoutMinutes = None) -> None:
    """Run the features DAG once (airflow dags test): land + validate events, Feast materialize."""
    paths = Paths.from_env()
    _env(paths)
    limit = dag_run_timeout_minutes(profile, timeout_minutes)
    _run_dag(paths, "shopguide_features", {"profile": profile}, quiet, limit)


@app.command()
def retrain(
    profile: Profile = "default",
    max_steps: Annotated[int | None, typer.Option(help="Override the training steps.")] = None,
    judgments: Annotated[
        str | None,
        typer.Option(
            help="A judgments CSV in the landing folder (SHOPGUIDE_LANDING, default $SHOPGUIDE_HOME/landing): a name "
            "relative to it or a path inside it. Default: the shipped data."
        ),
    ] = None,
    only_with_new_data: Annotated[
        bool,
        typer.Option(
            help="Train only when something is new since @champion's snapshot (the schedule's rule: "
            "retrain.min_new_feedback answers with feedback, a monitor drift alarm or --judgments); else the run "
            "ends as skipped in seconds."
        ),
    ] = False,
    quiet: bool = False,
    timeout_minutes: TimeoutMinutes = None,
) -> None:
    """Run the retrain DAG once (airflow dags test): validate -> fine-tune -> export -> evaluate -> gate -> promote or
    keep the champion (a lost gate is an outcome: the command succeeds and says "not promoted")."""
    paths = Paths.from_env()
    _env(paths)
    conf: dict = {"profile": profile, **({"max_steps": max_steps} if max_steps is not None else {})}
    if only_with_new_data:
        conf["only_with_new_data"] = True
    if judgments is not None:
        from pipelines.data.dataset import JudgmentsPathError, landed_judgments

        try:  # the snapshot task checks it again; here it fails in a second, before Airflow starts
            conf["judgments_path"] = str(landed_judgments(judgments, paths.landing))
        except JudgmentsPathError as err:
            raise typer.BadParameter(str(err), param_hint="--judgments") from None
    xcoms = _run_dag(paths, "shopguide_retrain", conf, quiet, dag_run_timeout_minutes(profile, timeout_minutes)).xcoms
    typer.echo(json.dumps({k: xcoms.get(k) for k in ("decide", "evaluate", "gate", "conclude")}, indent=2))


@app.command()
def serve(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve models:/shopguide-encoder@champion with uvicorn (FastAPI + ONNX Runtime)."""
    paths = Paths.from_env()
    _env(paths)
    os.execvp(
        sys.executable,
        [
            sys.executable,
            "-m",
            "uvicorn",
            "serving.app:app",
            "--host",
            host,
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
    )


def demo_queries(url: str, user_id: int | None) -> None:
    """A few real Home Depot search terms, one of them for a simulated user, printed with the model version."""
    import httpx

    # generous: the service warms Feast up in the background once ready (7-11 s seen on a loaded 2-core machine) and
    # a personalised request sent before that ends waits for it; a demo that times out would fail `make run` after
    # the whole pipeline succeeded
    with httpx.Client(base_url=url, timeout=60) as http:
        asks = [{"query": q, "k": 3} for q in DEMO_QUERIES]
        if user_id is not None:
            asks.append({"query": DEMO_QUERIES[0], "k": 3, "user_id": user_id})
        for body in asks:
            started = time.perf_counter()
            r = http.post("/v1/search", json=body)
            ms = (time.perf_counter() - started) * 1000
            r.raise_for_status()
            ans = r.json()
            who = f" user {body['user_id']} (personalized={ans.get('personalized')})" if "user_id" in body else ""
            typer.secho(
                f"\n> {body['query']!r}{who} -> category {ans.get('category')!r}, "
                f"model v{ans['model_version']}, {ms:.1f} ms",
                bold=True,
            )
            for hit in ans["results"]:
                typer.echo(f"    {hit['score']:.3f}  {hit['product_id']}  {hit['title']}")


Reason = Annotated[str, typer.Option(help="Why (required; recorded in the registry with who did it).")]
Force = Annotated[
    bool, typer.Option(help="Allow a version that failed its gate or has no recorded sha256 manifest (recorded).")
]
Model = Annotated[str, typer.Option(help="Registered model name.")]


def _actor() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "cli:unknown"


def _move(action: str, version: str | None, reason: str, force: bool, model: str) -> None:
    from pipelines.registry import mlflow_client as registry

    paths = Paths.from_env()
    _env(paths)
    try:
        if action == registry.PROMOTE:
            move = registry.promote(paths, model, str(version), reason, _actor(), force=force)
        else:
            move = registry.rollback(paths, model, reason, _actor(), force=force)
    except registry.PromotionError as err:
        typer.secho(f"{action} refused: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    typer.secho(move.summary(), fg=typer.colors.GREEN if move.moved else None)


@app.command()
def promote(
    version: Annotated[int, typer.Argument(min=1, help="Registered version to make @champion.")],
    reason: Reason,
    force: Force = False,
    model: Model = MODEL_NAME,
) -> None:
    """Move @champion to VERSION after re-checking its artifacts and gate result (a no-op if it already is)."""
    _move("promote", str(version), reason, force, model)


@app.command()
def rollback(reason: Reason, force: Force = False, model: Model = MODEL_NAME) -> None:
    """Move @champion back to the version it held before; a second rollback goes further back."""
    _move("rollback", None, reason, force, model)


@app.command()
def history(model: Model = MODEL_NAME) -> None:
    """Every recorded move of @champion, oldest first, and where the aliases point now."""
    from pipelines.registry import mlflow_client as registry

    paths = Paths.from_env()
    _env(paths)
    for e in registry.champion_history(paths, model):
        forced = " FORCED" if e.get("forced") else ""
        typer.echo(
            f"{e['at']}  {e['action']:<8} {e.get('previous') or '(none)'} -> {e['version']}{forced}  "
            f"by {e['actor']}: {e['reason']}"
        )
    for alias in (registry.CHAMPION, registry.CHALLENGER):
        typer.echo(f"@{alias} = {registry.alias_version(paths, model, alias) or '(none)'}")


@app.command()
def prune(
    profile: Profile = "default",
    dry_run: Annotated[bool, typer.Option(help="Only report what the retention policy would delete.")] = False,
) -> None:
    """Apply the profile's retention policy now (the maintenance DAG does it daily): old registered versions and their
    artifacts, old pipeline run folders, unused serving-cache entries. Champions and the rollback target stay."""
    from pipelines.steps.maintenance import prune as prune_step

    paths = Paths.from_env()
    _env(paths)
    prune_step({"profile": profile, "dry_run": dry_run}, paths)


@app.command()
def monitor(
    profile: Annotated[str, typer.Option(help="Config profile whose `monitor` bounds are shown.")] = "default",
    as_json: Annotated[bool, typer.Option("--json", help="The latest window's row as JSON.")] = False,
) -> None:
    """The latest monitored window's health (the shopguide_monitor DAG writes one row per window)."""
    from pipelines.config import load_config
    from pipelines.monitoring.records import health_table, read_windows

    paths = Paths.from_env()
    table = read_windows(paths)
    if table.num_rows == 0:
        typer.echo(f"no monitored window yet in {paths.home} (the shopguide_monitor DAG writes them hourly)")
        raise typer.Exit(1)
    row = table.slice(table.num_rows - 1).to_pylist()[0]
    if as_json:
        typer.echo(json.dumps(row, default=str, indent=2))
        return
    start, end = row["window_start"], row["window_end"]
    typer.echo(
        f"window {start:%Y-%m-%d %H:%M} -> {end:%H:%M} UTC  @champion v{row['model_version'] or '(none)'}  "
        f"{row['requests']} searches, {row['distinct_queries']} distinct queries  "
        f"{'ALARM' if row['alarm'] else 'healthy'}\nreference: {row['reference'] or '(none)'}"
    )
    rows = [("signal", "value", "bound", "status"), *health_table(row, load_config(profile).monitor)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        line = "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        typer.secho(line, fg=typer.colors.RED if r[3] == "ALARM" else None)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def airflow(ctx: typer.Context) -> None:
    """Any `airflow ...` command on the embedded Airflow, e.g. `shopguide airflow standalone` for the UI."""
    paths = Paths.from_env()
    _env(paths)
    from pipelines.airflow_env import ensure_airflow_db

    ensure_airflow_db(paths)
    os.execvp(sys.executable, [sys.executable, "-m", "airflow", *ctx.args])


@app.command("mlflow-ui")
def mlflow_ui(port: int = 5000) -> None:
    """The MLflow UI over the embedded tracking store and registry."""
    paths = Paths.from_env()
    _env(paths)
    os.execvp(
        sys.executable,
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            paths.mlflow_tracking_uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
    )


# Wall time of `shopguide run` per profile on this project's reference machine (2 cores, no GPU), install excluded.
RUN_MINUTES = {"tiny": "5", "default": "25-30"}


def _require_free_port(port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as err:
            raise typer.BadParameter(f"127.0.0.1:{port} is taken ({err.strerror}); pass --port N") from err


@app.command()
def run(
    profile: Profile = "default",
    port: int = 8000,
    quiet: Annotated[bool, typer.Option(help="Airflow logs at WARNING instead of INFO.")] = True,
    timeout_minutes: TimeoutMinutes = None,
) -> None:
    """The main job: features DAG, retrain DAG, then the service answering a few real queries."""
    _require_free_port(port)  # before half an hour of training, not after it
    limit = dag_run_timeout_minutes(profile, timeout_minutes)  # an unknown profile fails here, before Airflow
    paths = Paths.from_env()
    _env(paths)
    started = time.perf_counter()
    _banner(
        f"shopguide run (profile {profile}): about {RUN_MINUTES.get(profile, 'more than 30')} min on 2 CPU cores, "
        f"then the service on 127.0.0.1:{port} (--port to change); home {paths.home}"
    )
    _banner("1/3 features DAG: land + validate the simulated event log, Feast apply + materialize")
    landed = _run_dag(paths, "shopguide_features", {"profile": profile}, quiet, limit).xcoms
    _banner("2/3 retrain DAG: snapshot, validate, fine-tune, export ONNX + INT8, index, evaluate, gate, promote")
    xcoms = _run_dag(paths, "shopguide_retrain", {"profile": profile}, quiet, limit).xcoms
    report, decision = xcoms.get("evaluate", {}), xcoms.get("gate", {})
    typer.echo(
        json.dumps(
            {
                k: report.get(k)
                for k in (
                    "ndcg_at_10",
                    "mrr_at_10",
                    "recall_at_100",
                    "category_accuracy",
                    "latency_p99_ms",
                    "size_mb",
                    "parity_cosine_min",
                )
            },
            indent=2,
        )
    )
    typer.echo(
        "gate: "
        + ("PASSED" if decision.get("passed") else "FAILED")
        + "\n  "
        + "\n  ".join(decision.get("reasons", []))
    )
    _banner(f"3/3 serving models:/{MODEL_NAME}@champion on http://127.0.0.1:{port}")
    from pipelines.service_process import service_process

    with service_process(port=port) as service:
        ready = service.wait_ready()
        typer.echo(f"ready: {ready}")
        events = landed.get("land_events", {})
        demo_queries(service.url, 1 if events.get("users") else None)
    _banner(f"done in {time.perf_counter() - started:.0f} s")
    typer.echo(f"""Next:
  serve:      .venv/bin/shopguide serve --port {port}      then open http://127.0.0.1:{port}/docs
  MLflow UI:  .venv/bin/shopguide mlflow-ui                   then open http://127.0.0.1:5000
  Airflow UI: .venv/bin/shopguide airflow standalone          then open http://127.0.0.1:8080""")


@app.command()
def simulate(
    users: Annotated[
        int | None, typer.Option(min=1, help="Simulated users (default: the profile's simulate.users).")
    ] = None,
    minutes: Annotated[float | None, typer.Option(min=0.001, help="How long to run (simulate.minutes).")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Same seed: same users, searches and (for the same answers) events.")
    ] = None,
    url: Annotated[str, typer.Option(help="Base URL of the running service.")] = "http://127.0.0.1:8000",
    sessions: Annotated[
        int | None, typer.Option(min=1, help="Stop each user after this many sessions (an exact replay).")
    ] = None,
    think_seconds: Annotated[
        float | None, typer.Option(min=0, help="Mean pause after each search of a client thread (0: flat out).")
    ] = None,
    profile: Profile = "default",
    api_key: Annotated[
        str | None, typer.Option(envvar="SHOPGUIDE_API_KEY", help="Sent as X-API-Key (a service with keys).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON instead of a table.")] = False,
) -> None:
    """SIMULATED shoppers against a running service: searches drawn from the training terms' frequency, clicks and
    add-to-carts from the Home Depot judgments of the products shown (position bias; unjudged products rarely
    clicked), sent to POST /v1/events. Every request and event it causes is simulated traffic, not real shoppers'."""
    import httpx

    from pipelines.config import load_config
    from pipelines.data.replay import ReplaySummary, simulate_traffic

    flags = {"users": users, "minutes": minutes, "seed": seed, "sessions_per_user": sessions}
    flags["think_seconds"] = think_seconds
    cfg = load_config(profile, {f"simulate.{k}": v for k, v in flags.items() if v is not None})
    sim = cfg.simulate
    url = url.rstrip("/")
    try:
        ready = httpx.get(f"{url}/readyz", timeout=sim.timeout_seconds)
    except httpx.HTTPError as err:
        typer.secho(f"no service at {url}: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    if ready.status_code != 200:
        typer.secho(f"the service at {url} is not ready: {ready.text}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    until = (
        f"{sim.sessions_per_user} sessions each, at most {sim.minutes:g} min"
        if sim.sessions_per_user
        else (f"{sim.minutes:g} min")
    )
    typer.secho(
        f"SIMULATED traffic against {url} (model {ready.json().get('model_version')}): {sim.users} users, {until}, "
        f"seed {sim.seed}, {sim.concurrency} client threads",
        bold=True,
        err=True,
    )

    def progress(s: ReplaySummary) -> None:
        typer.echo(
            f"  simulated {s.seconds:5.0f} s: {s.searches} searches, {sum(s.events.values())} events, "
            f"{sum(s.errors.values())} errors",
            err=True,
        )

    summary = simulate_traffic(url, cfg, api_key=api_key, progress=progress)
    typer.echo(json.dumps(summary.to_dict(), indent=2) if as_json else summary.table())
    if summary.stopped == "errors":
        raise typer.Exit(1)


def _name_values(pairs: list[str], flag: str) -> dict[str, object]:
    """NAME=VALUE strings -> {NAME: VALUE}, VALUE parsed as JSON when it is (0.05, true, null), else kept as text."""
    out: dict[str, object] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise typer.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint=flag)
        try:
            out[name.strip()] = json.loads(value)
        except ValueError:
            out[name.strip()] = value
    return out


@app.command()
def loop(
    cycles: Annotated[int, typer.Option(min=1, help="Turns of the loop.")] = 2,
    users: Annotated[
        int | None, typer.Option(min=1, help="SIMULATED users per cycle (default: the profile's simulate.users).")
    ] = None,
    minutes: Annotated[
        float | None, typer.Option(min=0.001, help="Minutes of simulated traffic per cycle (simulate.minutes).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Cycle n replays with seed + n - 1 (simulate.seed).")] = None,
    think_seconds: Annotated[
        float | None, typer.Option(min=0, help="Mean pause after each simulated search (0: flat out).")
    ] = None,
    profile: Profile = "default",
    port: int = 8000,
    only_with_new_data: Annotated[
        bool,
        typer.Option(
            "--only-with-new-data/--always-train",
            help="Train only on retrain.min_new_feedback answers with feedback since @champion's snapshot (the "
            "schedule's rule; else the cycle is skipped and its traffic counts in the next), or every cycle.",
        ),
    ] = True,
    poll_seconds: Annotated[
        float, typer.Option(min=0.1, help="How often the service re-reads @champion (its hot-swap poll).")
    ] = 2.0,
    retrain_param: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=VALUE, repeatable: a Param of the retrain DAG's trigger form for every cycle's run (VALUE read "
            "as JSON, else a string), e.g. max_regression=0.05 or max_steps=20.",
        ),
    ] = None,
    json_out: Annotated[Path | None, typer.Option(help="Also write the JSON summary to this file.")] = None,
    quiet: Annotated[bool, typer.Option(help="Airflow logs at WARNING instead of INFO.")] = True,
    timeout_minutes: TimeoutMinutes = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="SHOPGUIDE_API_KEY", help="Sent as X-API-Key (a service with keys).")
    ] = None,
) -> None:
    """The loop, CYCLES times: serve @champion, SIMULATED shoppers search and click (`shopguide simulate`), the
    features DAG lands the events, the retrain DAG trains on the feedback, gates the candidate against the champion
    (paired CI) and promotes it, and the service hot-swaps. Prints per cycle the feedback that entered the snapshot,
    candidate vs champion and the outcome, then a JSON summary. The traffic is simulated, not real shoppers'."""
    from pipelines.loop import LoopError, LoopPlan, cycle_table, run_loop, summary, summary_table

    params = _name_values(retrain_param or [], "--retrain-param")
    _require_free_port(port)
    limit = dag_run_timeout_minutes(profile, timeout_minutes)  # an unknown profile fails here, before anything runs
    paths = Paths.from_env()
    _env(paths)
    plan = LoopPlan(
        profile=profile,
        cycles=cycles,
        users=users,
        minutes=minutes,
        seed=seed,
        think_seconds=think_seconds,
        only_with_new_data=only_with_new_data,
        port=port,
        poll_seconds=poll_seconds,
        api_key=api_key,
        retrain_params=params,
    )
    sim = plan.config().simulate
    _banner(
        f"shopguide loop (profile {profile}): {cycles} cycles of {sim.users} SIMULATED users for {sim.minutes:g} min, "
        f"then the features and retrain DAGs; home {paths.home}"
    )

    def show(report) -> None:
        _banner(f"cycle {report.cycle}/{cycles} done")
        typer.echo(cycle_table(report, cycles))

    started = time.perf_counter()
    try:
        reports = run_loop(
            plan,
            paths,
            lambda dag_id, conf: _run_dag(paths, dag_id, conf, quiet, limit),
            echo=lambda line: typer.secho(line, bold=True, err=True),
            on_cycle=show,
        )
    except LoopError as err:
        typer.secho(f"loop stopped: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    result = summary(plan, reports, time.perf_counter() - started)
    _banner(f"loop done in {result['seconds']:.0f} s (SIMULATED traffic)")
    typer.echo(summary_table(reports))
    text = json.dumps(result, indent=2)
    typer.echo(text)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")


catalog_app = typer.Typer(help="Catalog freshness without retraining: land a new catalog file.", no_args_is_help=True)
app.add_typer(catalog_app, name="catalog")


@catalog_app.command("land")
def catalog_land(
    file: Annotated[
        str,
        typer.Argument(
            help="The whole catalog: CSV (with a header) or parquet, columns product_uid, "
            "product_title; products not in it leave the served index."
        ),
    ],
    profile: Profile = "default",
    run: Annotated[
        bool,
        typer.Option(
            help="Run the catalog DAG on it now (airflow dags test, the embedded default). --no-run only lands the "
            "file; a deployed Airflow then runs the DAG on a shopguide_catalog asset event naming it."
        ),
    ] = True,
    quiet: bool = False,
    timeout_minutes: TimeoutMinutes = None,
) -> None:
    """Land a catalog file in <landing>/catalog/ and run the catalog DAG on it: validate (GX), embed the new
    products with @champion's encoder, rebuild the dense + BM25 index, publish it for the same version; a running
    service swaps it in on its next poll."""
    from pathlib import Path

    from pipelines.data.catalog import CatalogPathError, catalog_landing, land_catalog

    paths = Paths.from_env()
    _env(paths)
    source = Path(file)
    if not source.is_file():
        raise typer.BadParameter(f"no such file: {file}", param_hint="FILE")
    try:
        landed = land_catalog(source, paths.landing, datetime.now(UTC))
    except CatalogPathError as err:
        raise typer.BadParameter(str(err), param_hint="FILE") from None
    name = landed.relative_to(catalog_landing(paths.landing)).as_posix()
    typer.echo(f"landed {landed} (catalog_path {name!r})")
    if not run:
        typer.echo(f'emit the shopguide_catalog asset event with extra {{"catalog_path": "{name}"}} to index it')
        return
    conf = {"profile": profile, "catalog_path": name}
    xcoms = _run_dag(paths, "shopguide_catalog", conf, quiet, dag_run_timeout_minutes(profile, timeout_minutes)).xcoms
    typer.echo(json.dumps({k: xcoms.get(k) for k in ("validate", "embed", "build_index", "publish")}, indent=2))


prod_app = typer.Typer(
    help="The production profile on this machine: Airflow on Celery, an MLflow server, Feast on PostgreSQL + Redis, "
    "service replicas behind haproxy, all kept by supervisord. Addresses: docker/prod.env (the environment wins).",
    no_args_is_help=True,
)
app.add_typer(prod_app, name="prod")


def _prod_config() -> ProdConfig:
    from pipelines.prod import ProdConfig  # here: the other commands start without it

    return ProdConfig.load()


@prod_app.command("up")
def prod_up(
    timeout: Annotated[
        float | None, typer.Option(help="Seconds to wait for every program to be healthy (SHOPGUIDE_PROD_UP_TIMEOUT).")
    ] = None,
) -> None:
    """Create the databases if missing, migrate Airflow and MLflow, feast apply, start supervisord and wait until
    every program is healthy. Running it again on a running profile only checks it."""
    from pipelines.prod import ProdError, up

    cfg = _prod_config()
    try:
        seconds = up(cfg, echo=typer.echo, timeout=timeout)
    except ProdError as err:
        typer.secho(f"prod up failed: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    typer.secho(f"production profile up in {seconds:.0f} s", fg=typer.colors.GREEN)
    typer.echo(
        f"  Airflow UI/API  {cfg.airflow_url}  (user admin, password: SHOPGUIDE_ADMIN_PASSWORD in {cfg.secrets_file})\n"
        f"  MLflow          {cfg.mlflow_url}\n"
        f"  service (LB)    {cfg.lb_url}  (X-API-Key: SHOPGUIDE_API_KEYS in {cfg.secrets_file})\n"
        f"  haproxy stats   {cfg.stats_url}\n"
        f"  logs            shopguide prod logs [PROGRAM]; files in {cfg.logs}"
    )


@prod_app.command("status")
def prod_status(as_json: Annotated[bool, typer.Option("--json", help="One JSON object per program.")] = False) -> None:
    """Each program's supervisord state and health (exit status 1 when one is not healthy, 3 when not running)."""
    from pipelines.prod import ProdError, status

    try:
        rows = status(_prod_config())
    except ProdError as err:
        typer.secho(str(err), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(3) from None
    for s in rows:
        if as_json:
            typer.echo(json.dumps(s.as_dict()))
        else:
            mark = typer.style("healthy", fg=typer.colors.GREEN) if s.healthy else typer.style("UNHEALTHY", fg="red")
            typer.echo(f"{s.name:<24} {s.state:<9} pid {s.pid:<7} up {s.uptime or '-':<8} {mark}  {s.detail}")
    if not all(s.healthy for s in rows):
        raise typer.Exit(1)


@prod_app.command("down")
def prod_down() -> None:
    """Stop every program and supervisord (databases, Redis and files stay)."""
    from pipelines.prod import down

    if not down(_prod_config(), echo=typer.echo):
        typer.echo("the production profile is not running")
        return
    typer.echo("production profile stopped")


@prod_app.command("env")
def prod_env() -> None:
    """`export` lines pointing a shell at the profile's stores (no secrets): `eval "$(shopguide prod env)"`, then
    `shopguide promote / rollback / history` act on the MLflow server under the profile's lock."""
    import shlex

    from pipelines.prod import client_environment

    for key, value in client_environment(_prod_config()).items():
        typer.echo(f"export {key}={shlex.quote(value)}")


@prod_app.command("logs")
def prod_logs(
    program: Annotated[str | None, typer.Argument(help="One program (default: all), e.g. airflow-worker-1.")] = None,
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, help="Lines of each log to show first.")] = 50,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing what is appended.")] = False,
) -> None:
    """Tail the programs' logs (tail(1) on the files supervisord writes)."""
    from pipelines.prod import ProdError, log_files

    try:
        files = log_files(_prod_config(), program)
    except ProdError as err:
        raise typer.BadParameter(str(err), param_hint="PROGRAM") from None
    if not files:
        typer.echo("no logs yet: `shopguide prod up` first")
        raise typer.Exit(1)
    os.execvp("tail", ["tail", "-n", str(lines), *(["-F"] if follow else []), *map(str, files)])


if __name__ == "__main__":
    app()
