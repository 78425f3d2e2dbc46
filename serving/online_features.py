"""Online features for the service: versioned FeatureService reads from the Feast online store, failing as one error."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.config import Paths
from pipelines.features.store import PRODUCT_SERVICE, USER_SERVICE

if TYPE_CHECKING:
    from feast import FeatureStore, FeatureView, RepoConfig

# Popularity of the whole catalog is one batched read of ~55k rows (seconds of CPU on a busy 2-core machine); it
# moves with each hourly materialization over a 30-day window, so 15 minutes of staleness costs nothing.
POPULARITY_TTL_S = 900.0
# SQLite binds at most 32,766 parameters per statement; Feast's SQLite store puts every key in one IN (...).
READ_CHUNK = 10_000


class FeaturesUnavailable(RuntimeError):
    """Feast or its online store cannot answer; the app serves a non-personalised answer and says so."""


@dataclass(frozen=True)
class _View:
    """One projection of a FeatureService, resolved once: the view, its join key and the features asked for."""

    view: FeatureView
    join_key: str
    features: tuple[str, ...]


class FeatureServiceReader:
    """The one place the service goes below Feast's public API: one FeatureService's rows, read straight from the
    online store through Feast's provider.

    The service is resolved once through the registry (here, in the constructor); each `read` then makes the call
    FeatureStore.get_online_features makes (`provider.online_read` per view) without the SDK's per-request registry
    lookup, request validation and response assembly: ~3x less CPU per read, and no synchronous registry reload on
    the request path when the registry cache expires. What that skips does not apply here: no on-demand views, and
    Feast never applies ttl online. tests/integration/test_online_features.py holds the two to the same answers,
    value by value, on SQLite and Redis. Any Feast, registry or store error propagates as Feast's own.
    """

    def __init__(self, store: FeatureStore, service_name: str) -> None:
        from feast.infra.provider import get_provider
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value
        from feast.type_map import feast_value_type_to_python_type

        # Bypass the registry cache: after a failure the cached registry may predate the first apply.
        service = store.get_feature_service(service_name, allow_cache=False)
        views = []
        for projection in service.feature_view_projections:
            view = store.get_feature_view(projection.name)
            if len(view.join_keys) != 1:
                raise ValueError(f"view {view.name!r} has join keys {view.join_keys}; serving reads one")
            names = tuple(f.name for f in projection.features) or tuple(f.name for f in view.features)
            views.append(_View(view, view.join_keys[0], names))
        self.service_name = service_name
        self.views = tuple(views)
        self.columns = tuple(name for v in self.views for name in v.features)  # the service's features, in order
        self._config: RepoConfig = store.config
        self._provider = get_provider(store.config)
        # Feast's EntityKey and Value protos and its proto -> Python conversion, bound once
        self._entity_key, self._value, self._to_python = EntityKey, Value, feast_value_type_to_python_type

    def read(self, ids: Sequence[int]) -> list[dict[str, Any] | None]:
        """One row per id (None when the store has no row for it), features by name, in the service's order."""
        entity_key, value, to_python = self._entity_key, self._value, self._to_python  # locals: ~55k keys a read
        out: list[dict[str, Any] | None] = [None] * len(ids)
        for part in self.views:
            keys = [entity_key(join_keys=[part.join_key], entity_values=[value(int64_val=int(i))]) for i in ids]
            for start in range(0, len(keys), READ_CHUNK):
                rows = self._provider.online_read(
                    self._config, part.view, keys[start : start + READ_CHUNK], list(part.features)
                )
                for offset, (_, values) in enumerate(rows):
                    # SQLite answers a missing key with no values, Redis with empty ones: both mean "no row".
                    found = (
                        {name: to_python(values[name]) for name in part.features if name in values} if values else {}
                    )
                    if not any(v is not None for v in found.values()):
                        continue
                    row = out[start + offset]
                    if row is None:
                        row = out[start + offset] = dict.fromkeys(self.columns)
                    row.update(found)
        return out


class OnlineFeatures:
    """Reads FeatureService rows (user: search_v2, product: product_v1) from the Feast online store.

    SQLite by default, Redis in production (pipelines.features.store.repo_config). Each service is read through a
    FeatureServiceReader (resolved once, then straight to the store).

    Every failure surfaces as FeaturesUnavailable, never as Feast's or the store's own errors. After a failure,
    calls fail at once for `retry_after_s` seconds (a dead store costs one slow request per interval, not one per
    request) and the services are resolved again on the next try, so the service recovers by itself when the store
    or the registry is back.
    """

    def __init__(
        self,
        paths: Paths | None = None,
        *,
        store: FeatureStore | None = None,
        service: str = USER_SERVICE,
        product_service: str = PRODUCT_SERVICE,
        retry_after_s: float = 2.0,
        popularity_ttl_s: float = POPULARITY_TTL_S,
    ) -> None:
        self._paths = paths
        self._store = store
        self._service_name = service
        self._product_service_name = product_service
        self._readers: dict[str, FeatureServiceReader] = {}
        self._retry_after_s = retry_after_s
        self._down_until = 0.0
        self._last_error = ""
        self._lock = threading.Lock()
        self._popularity_ttl_s = popularity_ttl_s
        # (read at, product ids, scores), newest first: the version being served and the one before it (requests
        # still in flight on the old version after a swap, or a rollback, keep their scores)
        self._popularity: tuple[tuple[float, np.ndarray, np.ndarray], ...] = ()
        self._refreshing = threading.Lock()  # single flight: at most one popularity read at a time, whoever asks

    def _fail(self, message: str, exc: Exception) -> FeaturesUnavailable:
        self._last_error = f"{message}: {type(exc).__name__}: {exc}"
        self._down_until = time.monotonic() + self._retry_after_s
        self._readers = {}  # resolve again on the next try: the registry may have changed under us
        return FeaturesUnavailable(self._last_error)

    def _reader(self, service_name: str) -> FeatureServiceReader:
        reader = self._readers.get(service_name)
        if reader is not None:
            return reader
        self._check_up()
        with self._lock:
            try:
                reader = FeatureServiceReader(self._feature_store(), service_name)
            except Exception as exc:  # any Feast, registry or driver error means "no features", never a crash
                raise self._fail(f"feature service {service_name!r} unavailable", exc) from exc
            self._readers[service_name] = reader
            return reader

    def _feature_store(self) -> FeatureStore:
        if self._store is None:
            # Imported here: Feast is slow to import and the app must start (non-personalised) without it.
            from pipelines.features.store import feature_store, import_feast

            import_feast()
            self._store = feature_store(self._paths or Paths.from_env(), serving=True)
        return self._store

    def _check_up(self) -> None:
        if self._down_until and time.monotonic() < self._down_until:
            raise FeaturesUnavailable(
                f"still unavailable (retrying in <= {self._retry_after_s:g} s): {self._last_error}"
            )

    def _read(self, service_name: str, ids: list[int]) -> list[dict[str, Any] | None]:
        """One row per id (None when the store has no row for it), features by name, in the service's order."""
        self._check_up()
        reader = self._reader(service_name)
        try:
            out = reader.read(ids)
        except Exception as exc:
            raise self._fail(f"online read of {service_name!r} failed", exc) from exc
        self._down_until = 0.0
        return out

    def push_user_rows(self, rows: Mapping[int, Mapping[str, Any]], at: datetime) -> None:
        """Write whole user_activity rows (pipelines.features.push) online through the view's PushSource; fails as
        FeaturesUnavailable (and starts the retry pause) like a read."""
        self._check_up()
        with self._lock:
            try:
                store = self._feature_store()
            except Exception as exc:
                raise self._fail("feature store unavailable", exc) from exc
        try:
            from pipelines.features.push import push_user_rows

            push_user_rows(store, rows, at)
        except Exception as exc:
            raise self._fail("push to the online store failed", exc) from exc
        self._down_until = 0.0

    def warm_up(self) -> str | None:
        """Import Feast, resolve both FeatureServices and read one row now, so that the first personalised request
        pays none of it (seconds on a busy 2-core machine). Returns why not, or None. Tolerant: a failure here
        starts no retry pause, since the store may well be up by the time requests come."""
        try:
            self.user_features(0)
            self._reader(self._product_service_name)
        except FeaturesUnavailable as exc:
            self._down_until = 0.0
            return str(exc)
        return None

    def check(self) -> None:
        """Raise FeaturesUnavailable unless the registry answers and the online store can be read (a probe)."""
        self.user_features(0)

    def user_features(self, user_id: int) -> dict[str, Any] | None:
        """The user's features by name (recent_products most recent first); None when the user has no online row."""
        return self._read(self._service_name, [user_id])[0]

    def users_features(self, user_ids: list[int]) -> list[dict[str, Any] | None]:
        """Several users in one store round trip, in order; None for users without an online row."""
        return self._read(self._service_name, list(user_ids))

    def product_features(self, product_ids: list[int] | np.ndarray) -> list[dict[str, Any] | None]:
        """product_v1 rows (views_30d, clicks_30d, ctr) for the given products, in order; None without a row."""
        return self._read(self._product_service_name, [int(p) for p in product_ids])

    def _cached_popularity(self, product_ids: np.ndarray) -> tuple[float, np.ndarray, np.ndarray] | None:
        return next((entry for entry in self._popularity if entry[1] is product_ids), None)

    def _read_popularity(self, product_ids: np.ndarray) -> np.ndarray:
        from pipelines.runtime.personalize import popularity_scores

        rows = self.product_features(product_ids)
        views = np.asarray([(r.get("views_30d") or 0) if r else 0 for r in rows], dtype=np.float64)
        clicks = np.asarray([(r.get("clicks_30d") or 0) if r else 0 for r in rows], dtype=np.float64)
        scores = popularity_scores(views, clicks)
        others = tuple(entry for entry in self._popularity if entry[1] is not product_ids)
        self._popularity = ((time.monotonic(), product_ids, scores), *others)[:2]  # one assignment: readers never lock
        return scores

    def _fresh(self, product_ids: np.ndarray) -> bool:
        cached = self._cached_popularity(product_ids)
        return cached is not None and time.monotonic() - cached[0] < self._popularity_ttl_s

    def _refresh_popularity(self, product_ids: np.ndarray) -> None:
        """The background read, holding the single-flight lock its starter acquired."""
        try:
            if not self._fresh(product_ids):  # the load-time warm may have finished between the check and the start
                self._read_popularity(product_ids)
        except FeaturesUnavailable:
            pass  # keep serving the previous scores (or the fallback); a later call tries again
        finally:
            self._refreshing.release()

    def _start_refresh(self, product_ids: np.ndarray) -> None:
        if self._refreshing.acquire(blocking=False):  # a read is in flight: it is the one that answers
            threading.Thread(
                target=self._refresh_popularity, args=(product_ids,), name="popularity-refresh", daemon=True
            ).start()

    def warm_popularity(self, product_ids: np.ndarray) -> str | None:
        """Read the popularity of a model version's products now, in the calling thread (the service calls it from
        its warm-up thread when a version is loaded, so no request pays the read). Single flight: a read in flight
        is waited out, and one that already covered these ids is not repeated. Returns why not, or None."""
        with self._refreshing:
            if self._fresh(product_ids):
                return None
            try:
                self._read_popularity(product_ids)
            except FeaturesUnavailable as exc:
                return str(exc)
        return None

    def popularity(self, product_ids: np.ndarray, wait: bool = True) -> np.ndarray:
        """runtime.personalize.popularity_scores of these products from product_v1 (one per id, 0 without a row).

        The read covers the whole id array (a model version's index: 54,667 products, 1.5-6 s of CPU on a busy
        2-core machine), so the scores are cached per id array (compared by identity: pass the index's own array),
        for the two most recent arrays. Past `popularity_ttl_s` a call never waits: it returns the cached scores and
        refreshes them in a background thread. With nothing cached for this array yet, `wait=True` reads
        synchronously (offline callers); `wait=False` (the request path) never reads on the caller's thread: it
        starts the background read unless one is in flight (single flight, so concurrent requests after a hot swap
        cause one read, not one each) and raises FeaturesUnavailable at once. Raises FeaturesUnavailable when
        nothing is cached for this array and the store cannot answer.
        """
        cached = self._cached_popularity(product_ids)
        if cached is None:
            if wait:
                return self._read_popularity(product_ids)
            self._start_refresh(product_ids)
            raise FeaturesUnavailable("product popularity is being read (warming up)")
        if time.monotonic() - cached[0] >= self._popularity_ttl_s:
            self._start_refresh(product_ids)
        return cached[2]
