"""Retrain: decide (anything new to learn since @champion's snapshot? if not, every later task is skipped and the run
ends in seconds) -> snapshot -> validate -> fine-tune -> compress (distill -> prune -> export -> evaluate variants ->
select), train_reranker (trains only with rerank.enabled) -> evaluate -> gate (vs @champion re-evaluated on the same
snapshot) -> register -> branch: promote | keep_champion -> conclude. A lost gate ends the run successfully with the
outcome "not promoted"; only errors fail a run."""

from __future__ import annotations

import pendulum
from airflow.sdk import (
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    Param,
    dag,
    get_current_context,
    task,
)

from dags.assets import BOUNDS, DEFAULT_PROFILE, DRIFT, PROFILES, USER_EVENTS, bounded_task, dag_run_key

PARAMS = {
    "profile": Param(
        DEFAULT_PROFILE,
        type="string",
        enum=PROFILES,
        description="Config profile (configs/<profile>.yaml) every other value starts from.",
    ),
    "judgments_path": Param(
        None,
        type=["null", "string"],
        description="A Home Depot-format judgments CSV in the landing folder (SHOPGUIDE_LANDING, default "
        "$SHOPGUIDE_HOME/landing): a name relative to it or a path inside it; nothing outside it is read. "
        "Empty = the shipped data.",
    ),
    "only_with_new_data": Param(
        False,
        type="boolean",
        description="Train only when there is something new since @champion's snapshot, as the schedule's and the "
        "Asset's runs do: at least retrain.min_new_feedback answers with feedback, a drift or vocabulary-miss alarm "
        "of the monitor, or a judgments file. Off: a manual run always trains.",
    ),
    "judged_at_launch": Param(
        None,
        type=["null", "number"],
        minimum=0,
        maximum=1,
        description="Share of the training terms whose judgments the snapshot keeps (a young shop's first model); "
        "the others reach training only through the logged feedback. Empty = the profile's value (1.0: all).",
    ),
    "max_steps": Param(
        None,
        type=["null", "integer"],
        minimum=0,
        maximum=100_000,
        description="Contrastive training steps; empty = the profile's value; 0 = base model.",
    ),
    "feedback_weight": Param(
        None,
        type=["null", "number"],
        minimum=0,
        maximum=20,
        description="Copies of each clicked / carted / bought (query, product) pair of the logged traffic since "
        "@champion's snapshot among the training pairs (expected count); 0 = train without the feedback; "
        "empty = the profile's value.",
    ),
    "auto_promote": Param(
        None, type=["null", "boolean"], description="Move @champion when the gate passes; empty = the profile's value."
    ),
    "min_ndcg_at_10": Param(
        None,
        type=["null", "number"],
        minimum=0,
        maximum=1,
        description="Gate floor on held-out nDCG@10; empty = the profile's value.",
    ),
    "min_category_accuracy": Param(
        None, type=["null", "number"], minimum=0, maximum=1, description="Gate floor on held-out category accuracy."
    ),
    "max_regression": Param(
        None,
        type=["null", "number"],
        minimum=0,
        maximum=1,
        description="Allowed drop vs the champion re-evaluated on the same snapshot: the paired bootstrap CI of "
        "the per-term nDCG@10 difference must not reach below -max_regression; category accuracy may drop by this "
        "much. Empty = the profile's value.",
    ),
    "gate_confidence": Param(
        None,
        type=["null", "number"],
        exclusiveMinimum=0.5,
        exclusiveMaximum=1,
        description="Confidence level of the gate's paired bootstrap CI (e.g. 0.95); empty = the profile's value.",
    ),
    "lexical_weight": Param(
        None,
        type=["null", "number"],
        minimum=0,
        maximum=1,
        description="Hybrid search: BM25's share of the fused score; empty = chosen on "
        "validation terms; 0 = the encoder's ranking alone.",
    ),
}


def _run() -> tuple[dict, str, str, dict]:
    """(params, run key, as-of time, lineage tags) of the running DAG run: every path and record is keyed to it."""
    ctx = get_current_context()
    dag_run = ctx["dag_run"]
    as_of = ctx.get("logical_date") or dag_run.run_after
    lineage = {"airflow_dag_id": dag_run.dag_id, "airflow_run_id": dag_run.run_id}
    return dict(ctx["params"]), dag_run_key(dag_run), as_of.isoformat(), lineage


@dag(
    dag_id="shopguide_retrain",
    # weekly, whenever the features DAG lands a new event log, and when the monitor announces drift
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("0 3 * * 1", timezone="UTC"), assets=USER_EVENTS | DRIFT
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=BOUNDS.default_args,
    dagrun_timeout=BOUNDS.dag_run_timeout,
    params=PARAMS,
    tags=["shopguide", "training"],
    doc_md=__doc__,
)
def shopguide_retrain():
    # falsy skips every task after it (whatever their trigger rules); the run still ends successfully
    @bounded_task(kind="short_circuit")
    def decide() -> bool:
        from pipelines.steps.retrain import decide

        params, _, as_of, _ = _run()
        ctx = get_current_context()
        # the Task SDK's DagRunType prints as "DagRunType.MANUAL": its value is the run type's name
        run_type = ctx["dag_run"].run_type
        # an Asset-triggered run has no conf: why it runs (the monitor's drift reason, the landed events) is in the
        # extra of the asset events that started it, all of those since the previous Asset-triggered run
        triggers = [
            {
                "asset": event.asset.name,
                "extra": dict(event.extra or {}),
                "timestamp": event.timestamp.isoformat(),
                "source": f"{event.source_dag_id}/{event.source_run_id}" if event.source_dag_id else None,
            }
            for events in ctx["triggering_asset_events"].values()
            for event in events
        ]
        decision = decide(params, str(getattr(run_type, "value", run_type)), as_of, triggers)
        # the return value is the condition (a dict is always truthy); the reason and the facts go beside it
        ctx["ti"].xcom_push(key="decision", value=decision)
        return decision["go"]

    @bounded_task
    def snapshot() -> dict:
        from pipelines.steps.retrain import snapshot

        params, run_key, as_of, lineage = _run()
        decided = get_current_context()["ti"].xcom_pull(task_ids="decide", key="decision") or {}
        return snapshot(params, run_key, as_of, lineage, trigger_reason=decided.get("trigger_reason"))

    @bounded_task
    def validate(snap: dict) -> dict:
        from pipelines.steps.retrain import validate

        return validate(snap)

    @bounded_task
    def finetune(snap: dict, validated: dict) -> dict:
        from pipelines.steps.retrain import finetune

        return finetune(_run()[0], snap)

    @bounded_task
    def train_reranker(snap: dict, trained: dict) -> dict:
        from pipelines.steps.retrain import train_reranker

        return train_reranker(_run()[0], snap)

    @bounded_task
    def distill(snap: dict, trained: dict) -> dict:
        from pipelines.steps.retrain import distill

        return distill(_run()[0], snap, trained)

    @bounded_task
    def prune(snap: dict, distilled: dict) -> dict:
        from pipelines.steps.retrain import prune

        return prune(_run()[0], snap, distilled)

    @bounded_task
    def export_onnx(snap: dict, pruned: dict) -> dict:
        from pipelines.steps.retrain import export

        return export(_run()[0], snap, pruned)

    @bounded_task
    def evaluate_variants(snap: dict, exported: dict) -> dict:
        from pipelines.steps.retrain import evaluate_variants

        return evaluate_variants(_run()[0], snap, exported)

    @bounded_task
    def select_variant(snap: dict, evaluated: dict) -> dict:
        from pipelines.steps.retrain import select_variant

        return select_variant(_run()[0], snap, evaluated)

    @bounded_task
    def evaluate(snap: dict, selected: dict, reranker: dict) -> dict:
        from pipelines.steps.retrain import evaluate

        return evaluate(_run()[0], snap, selected, reranker)

    @bounded_task
    def gate(snap: dict, report: dict) -> dict:
        from pipelines.steps.retrain import gate

        return gate(_run()[0], snap, report)

    @bounded_task
    def register(snap: dict, selected: dict, report: dict, decision: dict) -> dict:
        from pipelines.steps.retrain import register

        params, run_key, _, lineage = _run()
        return register(params, snap, selected, report, decision, lineage, run_key)

    @task.branch
    def promote_or_keep(decision: dict, registered: dict) -> str:
        from pipelines.steps.retrain import promotion_branch

        return promotion_branch(_run()[0], decision, registered)

    @bounded_task
    def promote(snap: dict, registered: dict, decision: dict) -> dict:
        from pipelines.steps.retrain import promote

        params, run_key, _, lineage = _run()
        return promote(params, snap, registered, decision, lineage, run_key)

    @bounded_task
    def keep_champion(snap: dict, registered: dict, decision: dict) -> dict:
        from pipelines.steps.retrain import keep_champion

        return keep_champion(_run()[0], snap, registered, decision)

    # whichever branch ran; the skipped one hands over None
    @bounded_task(trigger_rule="none_failed_min_one_success")
    def conclude(decision: dict, promoted: dict | None, kept: dict | None) -> dict:
        from pipelines.steps.retrain import conclude

        return conclude(decision, promoted, kept)

    snap = snapshot()
    decide() >> snap
    trained = finetune(snap, validate(snap))
    exported = export_onnx(snap, prune(snap, distill(snap, trained)))
    selected = select_variant(snap, evaluate_variants(snap, exported))
    # after the encoder's training (2 cores: not beside it); trains only with rerank.enabled, else hands on {}
    report = evaluate(snap, selected, train_reranker(snap, trained))
    decision = gate(snap, report)
    registered = register(snap, selected, report, decision)
    branch = promote_or_keep(decision, registered)
    promoted, kept = promote(snap, registered, decision), keep_champion(snap, registered, decision)
    branch >> [promoted, kept]
    conclude(decision, promoted, kept)


shopguide_retrain()
