"""The HTTP service: search, recommend, classify and embed over the @champion bundle, personalised with Feast, and
the feedback events that update those features."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Security
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from threadpoolctl import threadpool_limits

from pipelines.runtime import event_log, personalize
from pipelines.runtime.event_log import EventRecord
from pipelines.runtime.request_log import REQUEST_LOG_DIRNAME, RequestRecord
from serving.events import EventLogFull, EventsRefused, Feedback
from serving.log_writer import LogSink, LogWriter, SegmentFolderSink
from serving.logs import configure_logging
from serving.metrics import Metrics
from serving.online_features import FeaturesUnavailable, OnlineFeatures
from serving.predictor import ModelUnavailable, Predictor, load_options, registry_bounds, resolve
from serving.request_log import ParquetFolderSink, RequestLog, RequestLogSink
from serving.schemas import (
    REQUEST_ID_PATTERN,
    Category,
    ClassifyRequestBase,
    ClassifyResponse,
    EmbedRequestBase,
    EmbedResponse,
    ErrorResponse,
    Event,
    EventBatchBase,
    EventsResponse,
    FallbackReason,
    Health,
    Hit,
    ModelInfo,
    Readiness,
    RecommendRequestBase,
    RecommendResponse,
    SearchRequestBase,
    SearchResponse,
    ShadowInfo,
    classify_request_model,
    embed_request_model,
    events_request_type,
    recommend_request_model,
    search_request_model,
)
from serving.settings import Settings
from serving.shadow import ShadowItem, ShadowRunner

log = logging.getLogger(__name__)
access_log = logging.getLogger("serving.access")

API_KEY_HEADER = "X-API-Key"


def _bearer(value: bytes) -> bytes:
    scheme, _, token = value.partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


# Probes must work without a key; the API docs hold no data and show how to send the key ("Authorize").
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)


@dataclass
class RequestContext:
    """Per-request facts the endpoints add and the access log line reports."""

    request_id: str
    model_version: str | None = None
    stages_ms: dict[str, float] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)
    received_at: float = field(default_factory=time.time)  # wall clock, for the request log's ts
    # logged once the response went out with status 200 (latency filled in); events may name it from then on
    answer: RequestRecord | None = None

    @property
    def received(self) -> datetime:
        return datetime.fromtimestamp(self.received_at, UTC)


_context: ContextVar[RequestContext | None] = ContextVar("shopguide_request", default=None)


def request_context() -> RequestContext:
    """The current request's context (a throwaway one outside a request, e.g. a direct call in a test)."""
    return _context.get() or RequestContext("none")


@dataclass
class ServingState:
    """What requests read: a request takes `predictor` once, so a hot swap never mixes two versions in one answer."""

    settings: Settings
    features: OnlineFeatures
    metrics: Metrics
    predictor: Predictor | None = None
    load_error: str | None = None  # nothing could be loaded (not ready)
    problem: str | None = None  # loaded, but the alias's current version is not what serves (why)
    shadow: ShadowRunner | None = None
    request_log: RequestLog | None = None
    event_log: LogWriter[EventRecord] | None = None
    feedback: Feedback | None = None

    def refresh(self) -> None:
        """Load, or swap in the version the alias points to now; on any failure keep serving what is loaded."""
        alias, m = self.settings.alias, self.metrics
        previous = self.predictor
        try:
            result = resolve(self.settings, previous)
        except Exception as exc:  # nothing loadable at all: stay up, not ready; the poll retries
            self.load_error = f"{type(exc).__name__}: {exc}"[:400]
            m.polls.labels(alias, "unavailable").inc()
            m.load_failing.labels(alias).set(1)
            log.error("model not loaded: %s", self.load_error)
            return
        m.polls.labels(alias, result.outcome).inc()
        self.problem = result.problem
        m.load_failing.labels(alias).set(1 if result.outcome == "load_failed" else 0)
        if result.outcome == "load_failed":
            m.swaps.labels(alias, "failed").inc()
            log.error("keeping version %s: %s", result.predictor.version, result.problem)
        if result.predictor is not previous:
            loaded = result.predictor
            self.predictor, self.load_error = loaded, None
            if previous is not None:
                m.swaps.labels(alias, "ok").inc()
            self._publish(loaded)
            log.info(
                "serving %s version %s, catalog index %s (was %s, %s; source %s, search %s)",
                self.settings.model_name,
                loaded.version,
                loaded.index_version or "of the bundle",
                previous.version if previous else None,
                previous.index_version if previous else None,
                loaded.source,
                loaded.search_kind,
            )
            self.warm_features(loaded)
            if loaded.needs_ann(load_options(self.settings).ann):
                threading.Thread(
                    target=self._upgrade_search, args=(loaded,), name="shopguide-ann-build", daemon=True
                ).start()
        if self.shadow is not None:
            self._refresh_shadow()

    def _upgrade_search(self, predictor: Predictor) -> None:
        """Started with exact search (no cached graph yet): build the HNSW graph now, then switch to it."""
        options = load_options(self.settings)
        try:
            predictor.upgrade_search(options.ann, options.ann_cache)
        except Exception:
            log.exception("HNSW build failed; version %s keeps exact search", predictor.version)
            return
        if self.predictor is predictor:
            self._publish(predictor)
        log.info("version %s now searches with %s", predictor.version, predictor.search_kind)

    def _publish(self, loaded: Predictor) -> None:
        self.metrics.set_model(
            self.metrics.model_info,
            {
                "model_name": self.settings.model_name,
                "alias": self.settings.alias,
                "version": loaded.version,
                "source": loaded.source,
                "search": loaded.search_kind,
            },
        )
        self.metrics.model_loaded_at.set(loaded.loaded_at.timestamp())
        self.metrics.ready.set(1)  # a loaded version is never unloaded: ready from here on

    def _refresh_shadow(self) -> None:
        shadow = self.shadow
        assert shadow is not None
        try:
            result = resolve(self.settings, shadow.predictor, alias=shadow.alias, use_cache=False)
        except ModelUnavailable as exc:
            log.warning("no shadow model: %s", exc)
            return
        except Exception:
            log.exception("shadow %s not loaded", shadow.alias)
            return
        self.metrics.polls.labels(shadow.alias, result.outcome).inc()
        if result.predictor is not shadow.predictor:
            shadow.set_predictor(result.predictor)
            log.info(
                "shadowing %s version %s on %.0f%% of searches",
                shadow.alias,
                result.predictor.version,
                100 * shadow.fraction,
            )
        shadow.champion_version = self.predictor.version if self.predictor else None

    def warm_features(self, predictor: Predictor) -> None:
        """Connect to Feast in a daemon thread (import, FeatureService resolution, a first read), then read the
        popularity fallback of `predictor`'s catalog once, so that none of it lands on a request and /readyz never
        waits for the feature store. Requests that come before the popularity is read get the flagged empty
        fallback and trigger no read of their own (OnlineFeatures.popularity's single flight)."""

        def warm() -> None:
            started = time.perf_counter()
            problem = self.features.warm_up()
            if problem is not None:
                log.info("online features not warmed up (requests will retry): %s", problem)
                return
            log.info("online features ready in %.1f s", time.perf_counter() - started)
            if self.predictor is not predictor:
                return  # swapped again meanwhile: that version's own warm-up reads its popularity
            started = time.perf_counter()
            problem = self.features.warm_popularity(predictor.index.product_ids)
            if problem is None:
                log.info(
                    "popularity of version %s (%d products) read in %.1f s",
                    predictor.version,
                    len(predictor.index),
                    time.perf_counter() - started,
                )
            else:
                log.warning("popularity of version %s not read (requests will retry): %s", predictor.version, problem)

        threading.Thread(target=warm, name="shopguide-features-warmup", daemon=True).start()

    def recent_products(self, user_id: int) -> tuple[list[int], FallbackReason | None]:
        """The user's recent product ids from Feast, or [] and why not. Features are an enhancement: whatever
        breaks there, the request still answers."""
        reads = self.metrics.features_reads
        try:
            features = self.features.user_features(user_id)
        except FeaturesUnavailable as exc:
            log.warning("user %s without online features: %s", user_id, exc)
            reads.labels("unavailable").inc()
            return [], "features_unavailable"
        except Exception:
            log.exception("unexpected error reading features of user %s", user_id)
            reads.labels("unavailable").inc()
            return [], "features_unavailable"
        reads.labels("ok").inc()
        recent = [int(p) for p in (features or {}).get("recent_products") or []]
        return (recent, None) if recent else ([], "no_online_features")

    def user_vector(
        self, user_id: int, predictor: Predictor, query_vec: np.ndarray
    ) -> tuple[np.ndarray | None, FallbackReason | None, list[int]]:
        """(attention user vector, fallback reason, recent product ids) for a personalised search."""
        if self.settings.personalization_weight <= 0:
            return None, "personalization_disabled", []
        recent, reason = self.recent_products(user_id)
        if reason is not None:
            return None, reason, []
        user_vec = predictor.user_vector(recent, query_vec)
        return (user_vec, None, recent) if user_vec is not None else (None, "history_not_in_catalog", [])


class ServingMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware task hop): request id in and out, API keys, body size limit, metrics, one
    JSON access-log line per request, and a JSON 500 without a stack trace for anything unhandled."""

    def __init__(self, app: ASGIApp, state: ServingState, endpoints: frozenset[str]) -> None:
        self.app = app
        self.state = state
        self.endpoints = endpoints
        self.keys = tuple(k.encode() for k in state.settings.api_keys)
        self.max_body = state.settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope["headers"])  # lower-cased names; a repeated header keeps its last value
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        ctx = RequestContext(given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex)
        token = _context.set(ctx)
        path = scope["path"]
        endpoint = path if path in self.endpoints else "other"  # bounded label values
        status, response_started = 500, False

        async def send_with_headers(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                if status == 200 and ctx.answer is not None and self.state.feedback is not None:
                    self.state.feedback.remember(ctx.answer)  # before the client has the id it may send events for
                extra = [(b"x-request-id", ctx.request_id.encode())]
                version = ctx.model_version or (self.state.predictor.version if self.state.predictor else None)
                if version:
                    extra.append((b"x-model-version", version.encode()))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            refusal = self._refuse(path, headers)
            if refusal is None and b"content-length" not in headers and scope["method"] in ("POST", "PUT", "PATCH"):
                receive, refusal = await self._buffered(receive)
            if refusal is not None:
                await self._error(scope, receive, send_with_headers, *refusal)
            else:
                await self.app(scope, receive, send_with_headers)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], path, extra={"request_id": ctx.request_id})
            if not response_started:
                await self._error(scope, receive, send_with_headers, 500, "internal error")
        finally:
            seconds = time.perf_counter() - started
            if ctx.answer is not None and status == 200 and self.state.request_log is not None:
                # after the response went out: the latency is the one /metrics observes; submit never waits
                self.state.request_log.submit(replace(ctx.answer, latency_ms=round(seconds * 1000, 3)))
            m = self.state.metrics
            m.requests.labels(endpoint, scope["method"], str(status)).inc()
            m.latency.labels(endpoint, str(status)).observe(seconds)
            access_log.info(
                "request",
                extra={
                    "request_id": ctx.request_id,
                    "method": scope["method"],
                    "path": path,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 3),
                    "model_version": ctx.model_version,
                    "stages_ms": ctx.stages_ms or None,
                    **ctx.fields,
                },
            )
            _context.reset(token)

    def _refuse(self, path: str, headers: dict[bytes, bytes]) -> tuple[int, str] | None:
        if self.keys and path not in OPEN_PATHS:
            # X-API-Key, or the same key as an RFC 6750 bearer token: what Prometheus' scrape `authorization` sends
            key = headers.get(b"x-api-key") or _bearer(headers.get(b"authorization", b""))
            # compare_digest against every key: the time taken does not tell which prefix matched
            if not any([hmac.compare_digest(key, k) for k in self.keys]):
                return 401, f"missing or invalid API key (header {API_KEY_HEADER}, or Authorization: Bearer)"
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return 413, f"request body larger than {self.max_body} bytes"
        return None

    async def _buffered(self, receive: Receive) -> tuple[Receive, tuple[int, str] | None]:
        """A body without Content-Length (chunked) is read here, up to the limit, then replayed to the app."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return receive, (413, f"request body larger than {self.max_body} bytes")
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay, None

    @staticmethod
    async def _error(scope: Scope, receive: Receive, send: Send, status: int, detail: str) -> None:
        headers = {"www-authenticate": API_KEY_HEADER} if status == 401 else None
        response = JSONResponse({"detail": detail}, status_code=status, headers=headers)
        await response(scope, receive, send)


async def _poll(state: ServingState) -> None:
    while True:
        await asyncio.sleep(state.settings.model_poll_seconds)
        try:
            await asyncio.to_thread(state.refresh)
        except Exception:  # the watcher must outlive any one bad poll
            log.exception("model poll failed")


def _stage(ctx: RequestContext, metrics: Metrics, name: str, since: float) -> float:
    now = time.perf_counter()
    ctx.stages_ms[name] = round((now - since) * 1000, 3)
    metrics.stage.labels(name).observe(now - since)
    return now


def create_app(
    settings: Settings | None = None,
    predictor: Predictor | None = None,
    request_log_sink: RequestLogSink | None = None,
    event_log_sink: LogSink[EventRecord] | None = None,
) -> FastAPI:
    """Nothing heavy happens here: the model loads in the lifespan, Feast connects on the first personalised request.

    An injected `predictor` is served as is (no registry lookups, no polling, no shadow). An injected
    `request_log_sink` or `event_log_sink` replaces that log's parquet folder of the settings.
    """
    settings = settings or Settings()
    settings.check_deployment()  # again: model_copy(update=...) skips the validators
    metrics = Metrics()
    state = ServingState(settings, OnlineFeatures(settings.paths), metrics)
    if predictor is not None:
        state.predictor = predictor
        state._publish(predictor)
    if settings.shadow_alias and predictor is None and settings.bundle_dir is None:
        state.shadow = ShadowRunner(settings.shadow_alias, settings.shadow_fraction, settings.shadow_queue, metrics)
    request_store = settings.log_store_of(REQUEST_LOG_DIRNAME)
    event_store = settings.log_store_of(event_log.EVENT_LOG_DIRNAME)
    if settings.request_log_enabled:
        sink = request_log_sink or ParquetFolderSink(
            settings.request_log_folder, settings.request_log_roll_seconds, store=request_store
        )
        state.request_log = RequestLog(sink, settings.request_log_queue, settings.request_log_flush_seconds, metrics)
    events_sink = event_log_sink or SegmentFolderSink[EventRecord](
        settings.event_log_folder, event_log.SCHEMA, settings.request_log_roll_seconds, store=event_store
    )
    event_writer = state.event_log = LogWriter(
        events_sink, settings.event_log_queue, settings.request_log_flush_seconds, metrics.event_log, "event log"
    )
    feedback = state.feedback = Feedback(
        state.features,
        metrics,
        event_writer,
        request_log_folder=settings.request_log_folder,
        event_log_folder=settings.event_log_folder,
        request_log_store=request_store,
        event_log_store=event_store,
        window_seconds=settings.events_window_seconds,
        lookup_size=settings.events_lookup_size,
        flush_seconds=settings.request_log_flush_seconds,
    )
    poll = predictor is None and settings.model_poll_seconds > 0

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_level)
        if not settings.api_keys:
            log.warning(
                "no SHOPGUIDE_API_KEYS: the API is open to anyone who can reach it (allowed for deployment %r only)",
                settings.deployment,
            )
        if state.request_log is not None:
            state.request_log.start()
        event_writer.start()
        # Every MLflow call of this process from here on is bounded: MLflow down costs seconds, not minutes. BLAS
        # threads are process-wide: limited for the app's lifetime, restored when it stops.
        with registry_bounds(settings), threadpool_limits(settings.blas_threads or None, user_api="blas"):
            if state.predictor is None:
                # A failed load leaves the process up but not ready (/readyz 503); the poll keeps retrying.
                await asyncio.to_thread(state.refresh)
            else:
                state.warm_features(state.predictor)
            task = asyncio.create_task(_poll(state)) if poll else None
            try:
                yield
            finally:
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                if state.shadow is not None:
                    state.shadow.close()
                if state.request_log is not None:
                    # served answers first: whatever is queued is appended and rolled before the process ends
                    await asyncio.to_thread(state.request_log.close)
                await asyncio.to_thread(event_writer.close)

    app = FastAPI(
        title="shopguide",
        version="0.2.0",
        lifespan=lifespan,
        summary="Product search, recommendations, query categories and embeddings over the @champion encoder.",
    )
    app.state.serving = state

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    # Documents the header in OpenAPI (/docs "Authorize"); ServingMiddleware enforces it before any parsing.
    secured = [Security(APIKeyHeader(name=API_KEY_HEADER, auto_error=False))] if settings.api_keys else []
    errors: dict[int | str, dict[str, Any]] = {
        503: {"model": ErrorResponse, "description": "No model loaded yet."},
        413: {"model": ErrorResponse, "description": "Body larger than SHOPGUIDE_MAX_BODY_BYTES."},
        400: {
            "model": ErrorResponse,
            "description": "Body that cannot be decoded (not UTF-8); malformed JSON is a 422.",
        },
    }
    if settings.api_keys:
        errors[401] = {"model": ErrorResponse, "description": "Missing or unknown X-API-Key."}

    def loaded() -> Predictor:
        current = state.predictor
        if current is None:
            raise HTTPException(503, "model not loaded")
        request_context().model_version = current.version
        return current

    search_request = search_request_model(settings.max_query_chars, settings.max_k)
    classify_request = classify_request_model(settings.max_query_chars, settings.max_batch)
    embed_request = embed_request_model(settings.max_query_chars, settings.max_batch)
    recommend_request = recommend_request_model(settings.max_k)

    def search(body: SearchRequestBase) -> SearchResponse:
        predictor = loaded()
        ctx = request_context()
        t = t0 = time.perf_counter()
        query_vec, answer = predictor.encode(body.query)  # the query's category, or an abstention
        t = _stage(ctx, metrics, "encode", t)
        user_vec: np.ndarray | None = None
        reason: FallbackReason | None = None
        recent: list[int] = []
        if body.user_id is not None:
            user_vec, reason, recent = state.user_vector(body.user_id, predictor, query_vec)
            t = _stage(ctx, metrics, "features", t)
            if reason is not None:
                metrics.features_fallbacks.labels("/v1/search", reason).inc()
        hits = predictor.candidates(query_vec, body.k, user_vec, settings.personalization_weight, body.query)
        t = _stage(ctx, metrics, "rank", t)
        if predictor.reranks:
            hits = predictor.rerank(body.query, hits, body.k)
            _stage(ctx, metrics, "rerank", t)
        ctx.answer = RequestRecord(
            request_id=ctx.request_id,
            ts=ctx.received,
            endpoint="search",
            model_version=predictor.version,
            query=body.query,
            user_id=body.user_id,
            k=body.k,
            category=answer.category,
            product_ids=[h.product_id for h in hits],
            scores=[h.score for h in hits],
            personalized=user_vec is not None,
            fallback_reason=reason,
            method=None,
            latency_ms=0.0,
        )
        shadow = state.shadow
        if shadow is not None and shadow.sampled():
            shadow.submit(
                ShadowItem(
                    body.query,
                    body.k,
                    tuple(recent) if user_vec is not None else None,
                    settings.personalization_weight,
                    tuple(h.product_id for h in hits),
                    answer.category,
                    time.perf_counter() - t0,
                )
            )
        return SearchResponse(
            model_version=predictor.version,
            request_id=ctx.request_id,
            query=body.query,
            category=answer.category,
            taxonomy=predictor.taxonomy,
            category_abstained_reason=answer.abstained_reason,
            personalized=user_vec is not None,
            fallback_reason=reason,
            results=[Hit(product_id=h.product_id, title=h.title, score=h.score) for h in hits],
        )

    def recommend(body: RecommendRequestBase) -> RecommendResponse:
        """runtime.personalize.recommend: nearest products to the user's recency-weighted history (history itself
        excluded); without a usable history, the most popular products (product_v1 features), flagged."""
        predictor = loaded()
        ctx = request_context()
        t = time.perf_counter()
        recent, reason = state.recent_products(body.user_id)
        rows = predictor.index.rows_of(recent)
        if recent and len(rows) == 0:
            reason = "history_not_in_catalog"
        popularity = None
        if len(rows) == 0:
            try:
                # never reads here: the version's warm-up reads it once; until then the flagged empty fallback
                popularity = state.features.popularity(predictor.index.product_ids, wait=False)
            except Exception as exc:  # no popularity either: an empty, flagged answer, never a 500
                log.warning("no popularity fallback for user %s: %s", body.user_id, exc)
        t = _stage(ctx, metrics, "features", t)
        top, scores = personalize.recommend(predictor.index.embeddings, rows, body.k, popularity=popularity)
        _stage(ctx, metrics, "rank", t)
        if reason is not None:
            metrics.features_fallbacks.labels("/v1/recommend", reason).inc()
        method = "history" if len(rows) else ("popularity" if popularity is not None else "none")
        results = [
            Hit(product_id=int(predictor.index.product_ids[r]), title=str(predictor.index.titles[r]), score=float(sc))
            for r, sc in zip(top, scores, strict=True)
        ]
        ctx.answer = RequestRecord(
            request_id=ctx.request_id,
            ts=ctx.received,
            endpoint="recommend",
            model_version=predictor.version,
            query=None,
            user_id=body.user_id,
            k=body.k,
            category=None,
            product_ids=[h.product_id for h in results],
            scores=[h.score for h in results],
            personalized=bool(len(rows)),
            fallback_reason=reason,
            method=method,
            latency_ms=0.0,
        )
        return RecommendResponse(
            model_version=predictor.version,
            request_id=ctx.request_id,
            user_id=body.user_id,
            personalized=bool(len(rows)),
            fallback_reason=reason,
            method=method,
            results=results,
        )

    def encode_batch(endpoint: str, texts: list[str]) -> tuple[Predictor, np.ndarray, np.ndarray]:
        """One timed, counted encode of a request's texts: (predictor, embeddings, logits)."""
        predictor = loaded()
        t = time.perf_counter()
        emb, logits = predictor.encode_many(texts)
        _stage(request_context(), metrics, "encode", t)
        metrics.batch.labels(endpoint).observe(len(texts))
        return predictor, emb, logits

    def classify(body: ClassifyRequestBase) -> ClassifyResponse:
        predictor, emb, logits = encode_batch("classify", body.queries)
        return ClassifyResponse(
            model_version=predictor.version,
            taxonomy=predictor.taxonomy,
            results=[
                Category(
                    query=q,
                    category=a.category,
                    probability=a.probability,
                    category_abstained_reason=a.abstained_reason,
                )
                for q, a in zip(body.queries, predictor.categories(logits, emb), strict=True)
            ],
        )

    def embed(body: EmbedRequestBase) -> EmbedResponse:
        predictor, emb, _ = encode_batch("embed", body.texts)
        return EmbedResponse(model_version=predictor.version, dim=int(emb.shape[1]), embeddings=emb.tolist())

    # Plain `def`: FastAPI runs them in its threadpool, and ORT, numpy and the Feast read release the GIL.
    posts: list[tuple[str, Callable[..., BaseModel], type[BaseModel], type[BaseModel], str]] = [
        ("/v1/search", search, search_request, SearchResponse, "search"),
        ("/v1/recommend", recommend, recommend_request, RecommendResponse, "search"),
        ("/v1/classify", classify, classify_request, ClassifyResponse, "model"),
        ("/v1/embed", embed, embed_request, EmbedResponse, "model"),
    ]
    for path, endpoint, body_model, response_model, tag in posts:
        # The body models are built per app (their limits come from settings) and the annotations above name their
        # bases; FastAPI reads the annotation to validate the body, so hand it the class with this app's limits.
        endpoint.__annotations__["body"] = body_model
        app.post(path, response_model=response_model, tags=[tag], dependencies=secured, responses=errors)(endpoint)

    def events(body: Event | EventBatchBase) -> EventsResponse:
        """Clicks, add-to-carts and purchases on the products of earlier answers (their request_id): one event or
        {"events": [...]}, accepted or refused whole (422 with each refused event's reason). Accepted events are in
        the event log within the flush interval and in the users' online features when the answer comes back."""
        predictor = loaded()
        batch = isinstance(body, EventBatchBase)
        items = body.events if isinstance(body, EventBatchBase) else [body]
        ctx = request_context()
        try:
            outcome = feedback.record(items, predictor.index, ctx.received)
        except EventsRefused as exc:
            where: list[str | int] = ["body", "events"] if batch else ["body"]
            detail = [
                {
                    "loc": [*where, *([r.index] if batch else []), r.field],
                    "msg": r.message,
                    "type": r.reason,
                    "input": r.value,
                }
                for r in exc.refusals
            ]
            raise HTTPException(422, detail) from None
        except EventLogFull as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": "1"}) from None
        ctx.fields.update(events=outcome.received, accepted=outcome.accepted, online=outcome.online)
        return EventsResponse(model_version=predictor.version, **asdict(outcome))

    events.__annotations__["body"] = events_request_type(settings.max_events)  # this deployment's max_events
    app.post(
        "/v1/events",
        response_model=EventsResponse,
        status_code=202,
        tags=["feedback"],
        dependencies=secured,
        responses={
            **errors,
            503: {"model": ErrorResponse, "description": "No model loaded yet, or the event log's writer is behind."},
        },
    )(events)

    @app.get("/healthz", response_model=Health, tags=["ops"])
    def healthz() -> Health:
        return Health()

    @app.get(
        "/readyz",
        response_model=Readiness,
        tags=["ops"],
        responses={503: {"model": Readiness, "description": "No model loaded yet."}},
    )
    def readyz() -> Readiness | JSONResponse:
        current = state.predictor
        if current is None:
            body = Readiness(status="not_ready", detail=state.load_error or "loading")
            return JSONResponse(body.model_dump(), status_code=503)
        return Readiness(status="ready", model_version=current.version, detail=state.problem)

    @app.get("/v1/model", response_model=ModelInfo, tags=["model"], dependencies=secured, responses=errors)
    def model_info() -> ModelInfo:
        current = loaded()
        shadow = None
        if state.shadow is not None:
            sp = state.shadow.predictor
            shadow = ShadowInfo(
                alias=state.shadow.alias,
                version=sp.version if sp else None,
                fraction=state.shadow.fraction,
                replayed=state.shadow.processed,
            )
        return ModelInfo(
            model_name=settings.model_name,
            alias=settings.alias,
            version=current.version,
            source=current.source,
            loaded_at=current.loaded_at,
            products=len(current.index),
            categories=len(current.labels),
            variant=current.variant,
            search=current.search_kind,
            index_version=current.index_version,
            rerank_top_n=current.rerank_top_n,
            category_rule=current.encoder.category.describe(),
            problem=state.problem,
            shadow=shadow,
        )

    @app.get(
        "/metrics",
        tags=["ops"],
        response_class=Response,
        dependencies=secured,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
    )
    def prometheus_metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    endpoints = frozenset(r.path for r in app.routes if hasattr(r, "path"))
    app.add_middleware(ServingMiddleware, state=state, endpoints=endpoints)
    return app


# `uvicorn serving.app:app`: reads settings from the environment, loads nothing until the lifespan starts.
app = create_app()
