"""The HTTP service: search, category and model info over the @champion bundle, personalised with Feast features."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from serving.features import FeaturesUnavailable, OnlineFeatures
from serving.predictor import Predictor, load_champion
from serving.schemas import FallbackReason, Health, Hit, ModelInfo, Readiness, SearchResponse, search_request_model
from serving.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ServingState:
    """What requests read: a request takes `predictor` once, so a hot swap never mixes two versions in one answer."""

    settings: Settings
    features: OnlineFeatures
    predictor: Predictor | None = None
    load_error: str | None = None

    def refresh(self) -> None:
        """Load, or swap in the version the alias points to now; on failure keep serving what is loaded."""
        try:
            loaded = load_champion(self.settings, self.predictor)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"[:300]
            log.error("model not loaded: %s", self.load_error)
            return
        if loaded is not self.predictor:
            previous = self.predictor.version if self.predictor else None
            self.predictor, self.load_error = loaded, None
            log.info("serving %s version %s (was %s, source %s)", self.settings.model_name, loaded.version,
                     previous, loaded.source)

    def user_vector(self, user_id: int, predictor: Predictor,
                    query_vec: np.ndarray) -> tuple[np.ndarray | None, FallbackReason | None]:
        if self.settings.personalization_weight <= 0:
            return None, "personalization_disabled"
        try:
            features = self.features.user_features(user_id)
        except FeaturesUnavailable as exc:
            log.warning("serving user %s without personalisation: %s", user_id, exc)
            return None, "features_unavailable"
        except Exception:  # features are an enhancement: whatever breaks there, search still answers
            log.exception("unexpected error reading features of user %s", user_id)
            return None, "features_unavailable"
        recent = (features or {}).get("recent_products") or []
        if not recent:
            return None, "no_online_features"
        user_vec = predictor.user_vector(recent, query_vec)
        return (user_vec, None) if user_vec is not None else (None, "history_not_in_catalog")


async def _poll(state: ServingState) -> None:
    while True:
        await asyncio.sleep(state.settings.model_poll_seconds)
        await asyncio.to_thread(state.refresh)


def create_app(settings: Settings | None = None, predictor: Predictor | None = None) -> FastAPI:
    """Nothing heavy happens here: the model loads in the lifespan, Feast connects on the first personalised request.

    An injected `predictor` is served as is (no registry lookups, no polling).
    """
    settings = settings or Settings.from_env()
    state = ServingState(settings, OnlineFeatures(settings.paths), predictor)
    poll = predictor is None and settings.model_poll_seconds > 0

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.predictor is None:
            # A failed load leaves the process up but not ready (/readyz 503); the poll keeps retrying.
            await asyncio.to_thread(state.refresh)
        task = asyncio.create_task(_poll(state)) if poll else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = FastAPI(title="shopguide", summary="Product search and query categories over the @champion encoder.",
                  version="0.1.0", lifespan=lifespan)
    app.state.serving = state

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    def loaded() -> Predictor:
        current = state.predictor
        if current is None:
            raise HTTPException(503, "model not loaded")
        return current

    search_request = search_request_model(settings.max_query_chars, settings.max_k)

    def search(body: search_request) -> SearchResponse:  # type: ignore[valid-type]
        predictor = loaded()
        query_vec, category = predictor.encode(body.query)
        user_vec, reason = None, None
        if body.user_id is not None:
            user_vec, reason = state.user_vector(body.user_id, predictor, query_vec)
        hits = predictor.rank(query_vec, body.k, user_vec, settings.personalization_weight)
        return SearchResponse(
            model_version=predictor.version, query=body.query, category=category,
            personalized=user_vec is not None, fallback_reason=reason,
            results=[Hit(product_id=h.product_id, title=h.title, score=h.score) for h in hits],
        )

    # The body model is built per app (its limits come from settings); FastAPI resolves string annotations against
    # module globals only, so hand it the class itself.
    search.__annotations__["body"] = search_request
    # Plain `def`: FastAPI runs it in its threadpool, and ORT, numpy and the Feast read release the GIL.
    app.post("/v1/search", response_model=SearchResponse, tags=["search"])(search)

    @app.get("/healthz", response_model=Health, tags=["ops"])
    def healthz() -> Health:
        return Health()

    @app.get("/readyz", response_model=Readiness, tags=["ops"],
             responses={503: {"model": Readiness, "description": "No model loaded yet."}})
    def readyz() -> Readiness | JSONResponse:
        current = state.predictor
        if current is None:
            body = Readiness(status="not_ready", detail=state.load_error or "loading")
            return JSONResponse(body.model_dump(), status_code=503)
        return Readiness(status="ready", model_version=current.version)

    @app.get("/v1/model", response_model=ModelInfo, tags=["model"])
    def model_info() -> ModelInfo:
        current = loaded()
        return ModelInfo(model_name=settings.model_name, alias=settings.alias, version=current.version,
                         source=current.source, loaded_at=current.loaded_at, products=len(current.index),
                         categories=len(current.labels))

    return app


# `uvicorn serving.app:app`: reads settings from the environment, loads nothing until the lifespan starts.
app = create_app()
