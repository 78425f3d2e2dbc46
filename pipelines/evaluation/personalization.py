"""Offline evaluation of personalisation on held-out simulated events: HitRate@10 / nDCG@10 with vs without it."""

from __future__ import annotations

import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.config import MODEL_NAME, FeaturesConfig, Paths
from pipelines.features.store import (
    PRODUCT_SERVICE,
    PRODUCT_VIEW,
    USER_SERVICE,
    _as_utc,
    apply_feature_repo,
    build_feature_tables,
    feature_store,
    historical_user_features,
    load_events,
    offline_entities,
    write_feature_tables,
)
from pipelines.runtime import personalize
from pipelines.runtime.topk import top_k

STEP = "personalization"
HELDOUT_EVENT_TYPES = ("click",)
# Feast's point-in-time join keeps rows stamped <= the entity time; asking 1 ms before the event keeps the event
# itself (and anything at the same instant) out of the features it is evaluated with.
JOIN_MARGIN = pd.Timedelta(milliseconds=1)
CHUNK = 256  # events scored per matmul: 256 x catalog float32 scores (~55 MB for the full catalog)


def heldout_events(
    events: pd.DataFrame,
    cutoff: datetime,
    event_types: tuple[str, ...] = HELDOUT_EVENT_TYPES,
    max_events: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """The held-out (user, query, product) events: `event_types` strictly after `cutoff` (each user's later events).

    One row per (user, query, product), its first occurrence; rows without a query are dropped (nothing to rank).
    `max_events` keeps a deterministic random subset (by `seed`), in time order.
    """
    at = _as_utc(cutoff)
    held = events[events["event_type"].isin(event_types) & (events["event_timestamp"] > at) & events["query"].notna()]
    held = held.sort_values("event_timestamp", kind="stable").drop_duplicates(["user_id", "query", "product_id"])
    if max_events is not None and len(held) > max_events:
        held = held.sample(n=max_events, random_state=seed).sort_values("event_timestamp", kind="stable")
    return held[["user_id", "query", "product_id", "event_timestamp"]].reset_index(drop=True)


def point_in_time_histories(paths: Paths, held: pd.DataFrame) -> list[list[int]]:
    """Each held-out event's `recent_products` from the served FeatureService as of just before the event."""
    entity_df = pd.DataFrame(
        {"user_id": held["user_id"].astype("int64"), "event_timestamp": held["event_timestamp"] - JOIN_MARGIN}
    )
    joined = historical_user_features(paths, entity_df)
    return [[int(p) for p in v] if isinstance(v, list | np.ndarray) else [] for v in joined["recent_products"]]


def popularity_as_of(paths: Paths, product_ids: np.ndarray, at: datetime) -> np.ndarray:
    """personalize.popularity_scores of every index product from product_v1, point-in-time at `at` (0 without a row).

    Only products with an offline row are asked for (the rest have no popularity at any time).
    """
    known = offline_entities(paths, PRODUCT_VIEW)  # the configured offline store (parquet or PostgreSQL)
    asked = np.asarray([p for p in product_ids if int(p) in known], dtype=np.int64)
    views = np.zeros(len(product_ids))
    clicks = np.zeros(len(product_ids))
    if len(asked):
        store = feature_store(paths)
        entity_df = pd.DataFrame({"product_id": asked, "event_timestamp": _as_utc(at)})
        joined = store.get_historical_features(
            entity_df=entity_df, features=store.get_feature_service(PRODUCT_SERVICE)
        ).to_df()
        by_id = joined.set_index("product_id")
        position = {int(p): i for i, p in enumerate(product_ids)}
        rows = np.asarray([position[int(p)] for p in by_id.index], dtype=np.int64)
        views[rows] = by_id["views_30d"].fillna(0).to_numpy(float)
        clicks[rows] = by_id["clicks_30d"].fillna(0).to_numpy(float)
    return personalize.popularity_scores(views, clicks)


def _top(index_embeddings: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    """Top-k index rows for each vector (n, k), best first, CHUNK vectors per matmul."""
    out = np.empty((len(vectors), min(k, len(index_embeddings))), dtype=np.int64)
    for start in range(0, len(vectors), CHUNK):
        out[start : start + CHUNK] = top_k(vectors[start : start + CHUNK] @ index_embeddings.T, k)[0]
    return out


def _per_event(targets: list[int], ranked: list[list[int]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-event HitRate@k (ir-measures Success@k) and nDCG@k, one relevant product per event."""
    import ir_measures
    from ir_measures import Success, nDCG

    qrels = {str(i): {str(t): 1} for i, t in enumerate(targets)}
    run = {str(i): {str(p): float(k - r) for r, p in enumerate(rows)} for i, rows in enumerate(ranked)}
    hit, ndcg = np.zeros(len(targets)), np.zeros(len(targets))
    for m in ir_measures.iter_calc([Success @ k, nDCG @ k], qrels, run):
        (hit if m.measure == Success @ k else ndcg)[int(m.query_id)] = m.value
    return hit, ndcg


def _bootstrap_delta(users: np.ndarray, delta: np.ndarray, resamples: int = 1000, seed: int = 0) -> list[float]:
    """95% interval of the mean per-event delta, resampling users (a user's events are not independent)."""
    codes, inverse = np.unique(users, return_inverse=True)
    sums = np.bincount(inverse, weights=delta, minlength=len(codes))
    counts = np.bincount(inverse, minlength=len(codes))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(codes), size=(resamples, len(codes)))
    means = sums[picks].sum(axis=1) / np.maximum(counts[picks].sum(axis=1), 1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def evaluate_personalization(
    bundle_dir: str | Path,
    events: pd.DataFrame,
    as_of: datetime,
    heldout_days: float = 7.0,
    weight: float = FeaturesConfig().personalization_weight,
    k: int = 10,
    temperature: float = personalize.ATTENTION_TEMPERATURE,
    recent_n: int = FeaturesConfig().recent_products,
    max_events: int | None = None,
    sweep: tuple[float, ...] = (),
    feast_home: str | Path | None = None,
) -> dict[str, Any]:
    """Personalised vs plain ranking of the held-out events with one bundle's encoder and product index.

    Split by time: events up to `as_of - heldout_days` are history only; each held-out (user, query, clicked
    product) after it is one evaluation query. Its features come from Feast's point-in-time join on the served
    FeatureService (search_v2) as of just before the event, built from the whole log up to `as_of` in a private
    Feast home (`feast_home`, default a temporary folder): never from the event's own future. The catalog is ranked
    for the query by cos(q, p) (plain) and by cos(q, p) + weight * cos(u, p) with u = runtime.personalize.user_vector
    (attention over the history, `temperature`): HitRate@k and nDCG@k of the clicked product. Also scored:
    `recommend` (history only, history excluded) against the product_v1 popularity fallback as of the cutoff.
    Returns a flat dict of numbers (what log_personalization logs) and `sweep` weights' HitRate/nDCG.
    """
    from pipelines.runtime.encoder import OnnxEncoder
    from pipelines.runtime.index import ProductIndex

    as_of_utc = _as_utc(as_of)
    cutoff = as_of_utc - pd.Timedelta(days=heldout_days)
    index = ProductIndex.load(bundle_dir)
    held = heldout_events(events[events["event_timestamp"] <= as_of_utc], cutoff.to_pydatetime(), max_events=max_events)
    rows_of = index.rows_of
    in_index = np.asarray([len(rows_of([p])) == 1 for p in held["product_id"]], dtype=bool)
    skipped = int((~in_index).sum())
    held = held[in_index].reset_index(drop=True)
    if held.empty:
        raise ValueError(f"no held-out {HELDOUT_EVENT_TYPES} events after {cutoff.isoformat()} in this catalog")

    with tempfile.TemporaryDirectory(prefix="shopguide-personalization-") as scratch:
        paths = Paths(Path(feast_home or scratch).resolve())
        write_feature_tables(build_feature_tables(events, as_of_utc.to_pydatetime(), recent_n), paths)
        apply_feature_repo(paths)
        histories = point_in_time_histories(paths, held)
        popularity = popularity_as_of(paths, index.product_ids, cutoff.to_pydatetime())

    encoder = OnnxEncoder.load(bundle_dir)
    queries = sorted(set(held["query"].astype(str)))
    query_emb, _ = encoder.encode(queries)
    by_query = dict(zip(queries, query_emb, strict=True))
    emb = index.embeddings
    q = np.stack([by_query[str(t)] for t in held["query"]]).astype(np.float32)
    history_rows = [rows_of(h) for h in histories]
    targets = [int(rows_of([p])[0]) for p in held["product_id"]]
    u_query = np.zeros_like(q)  # attention user vectors (search); zero = no history -> the plain ranking
    has_user = np.zeros(len(held), dtype=bool)
    for i, rows in enumerate(history_rows):
        vec = personalize.user_vector(emb[rows], q[i], temperature) if len(rows) else None
        if vec is not None:
            u_query[i], has_user[i] = vec, True
    target_in_history = np.asarray([t in set(r.tolist()) for t, r in zip(targets, history_rows, strict=True)])

    def score(w: float) -> tuple[np.ndarray, np.ndarray]:
        return _per_event(targets, _top(emb, (q + np.float32(w) * u_query).astype(np.float32), k).tolist(), k)

    plain_hit, plain_ndcg = score(0.0)
    pers_hit, pers_ndcg = score(weight)
    recommended = [
        personalize.recommend(emb, rows, k, exclude_history=True, popularity=popularity)[0].tolist()
        for rows in history_rows
    ]
    rec_hit, rec_ndcg = _per_event(targets, recommended, k)
    popular = personalize.top_k(popularity, k)[0].tolist()
    pop_hit, pop_ndcg = _per_event(targets, [popular] * len(targets), k)

    users = held["user_id"].to_numpy()
    new = ~target_in_history
    metrics: dict[str, Any] = {
        "events": len(held),
        "users": int(held["user_id"].nunique()),
        "skipped_not_in_index": skipped,
        "events_with_history": int(has_user.sum()),
        "target_in_history_share": float(target_in_history.mean()),
        "weight": float(weight),
        "temperature": float(temperature),
        "heldout_days": float(heldout_days),
        f"plain_hit_rate_at_{k}": float(plain_hit.mean()),
        f"plain_ndcg_at_{k}": float(plain_ndcg.mean()),
        f"personalized_hit_rate_at_{k}": float(pers_hit.mean()),
        f"personalized_ndcg_at_{k}": float(pers_ndcg.mean()),
        f"delta_hit_rate_at_{k}": float(pers_hit.mean() - plain_hit.mean()),
        f"delta_ndcg_at_{k}": float(pers_ndcg.mean() - plain_ndcg.mean()),
        # Where the gain comes from: re-finding a product already in the history vs products new to the user.
        f"plain_hit_rate_at_{k}_new_product": float(plain_hit[new].mean()) if new.any() else float("nan"),
        f"personalized_hit_rate_at_{k}_new_product": float(pers_hit[new].mean()) if new.any() else float("nan"),
        f"plain_hit_rate_at_{k}_in_history": float(plain_hit[~new].mean()) if (~new).any() else float("nan"),
        f"personalized_hit_rate_at_{k}_in_history": float(pers_hit[~new].mean()) if (~new).any() else float("nan"),
        f"recommend_hit_rate_at_{k}": float(rec_hit.mean()),
        f"recommend_ndcg_at_{k}": float(rec_ndcg.mean()),
        f"popularity_hit_rate_at_{k}": float(pop_hit.mean()),
        f"popularity_ndcg_at_{k}": float(pop_ndcg.mean()),
    }
    low, high = _bootstrap_delta(users, pers_hit - plain_hit)
    metrics[f"delta_hit_rate_at_{k}_ci95_low"], metrics[f"delta_hit_rate_at_{k}_ci95_high"] = low, high
    for w in sweep:
        hit, ndcg = score(w)
        metrics[f"sweep_w{w:g}_hit_rate_at_{k}"] = float(hit.mean())
        metrics[f"sweep_w{w:g}_ndcg_at_{k}"] = float(ndcg.mean())
    return metrics


def log_personalization(
    paths: Paths, run_id: str, metrics: dict[str, Any], params: dict[str, Any] | None = None
) -> None:
    """Log the metrics (as `personalization.<name>`) and params on an MLflow run (registry.mlflow_client)."""
    from pipelines.registry.mlflow_client import log_step

    log_step(paths, run_id, STEP, metrics, params)


def evaluate_registered(
    events_path: str | Path,
    as_of: datetime,
    paths: Paths | None = None,
    model_name: str = MODEL_NAME,
    alias: str = "champion",
    run_key: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Evaluate the version `alias` points to and log it to MLflow in its own run; small JSON values back.

    The run is keyed by (model, version, as_of) unless `run_key` is given, so re-running the same evaluation reuses
    its run. Raises LookupError when the alias does not resolve.
    """
    from pipelines.registry import mlflow_client as registry

    paths = paths or Paths.from_env()
    version = registry.alias_version(paths, model_name, alias)
    if version is None:
        raise LookupError(f"{model_name}@{alias} does not resolve in {paths.mlflow_tracking_uri}")
    as_of_utc = _as_utc(as_of)
    work = paths.run_dir(f"personalization-{model_name}-v{version}")
    bundle = registry.download_bundle(paths, model_name, version, work / "bundle")
    events = load_events(events_path)
    metrics = evaluate_personalization(bundle, events, as_of_utc.to_pydatetime(), **kwargs)
    key = run_key or f"personalization-{model_name}-v{version}-{as_of_utc.isoformat()}"
    run_id = registry.start_run(
        paths,
        key,
        {"model_name": model_name, "model_version": str(version), "evaluation": STEP, "feature_service": USER_SERVICE},
    )
    params = {
        "events_path": str(events_path),
        "as_of": as_of_utc.isoformat(),
        "alias": alias,
        "feature_service": USER_SERVICE,
        **{k: v for k, v in kwargs.items() if k != "feast_home"},
    }
    log_personalization(paths, run_id, metrics, params)
    registry.end_run(paths, run_id)
    return {"model_name": model_name, "version": str(version), "run_id": run_id, **metrics}


__all__ = [
    "evaluate_personalization",
    "evaluate_registered",
    "heldout_events",
    "log_personalization",
    "point_in_time_histories",
    "popularity_as_of",
]
