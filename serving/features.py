"""Online user features for the service: one search_v1 FeatureService read per request, failures as one exception."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from pipelines.config import Paths

if TYPE_CHECKING:
    from feast import FeatureService, FeatureStore

USER_SERVICE = "search_v1"  # the versioned feature list serving asks for (pipelines.features.USER_SERVICE)


class FeaturesUnavailable(RuntimeError):
    """Feast or its online store cannot answer; the app serves a non-personalised answer and says so."""


class OnlineFeatures:
    """Reads one user's search_v1 features from the Feast online store (SQLite by default, Redis in production).

    Connects lazily and keeps one FeatureStore and the resolved FeatureService, so a read is the online-store lookup
    plus Feast's response assembly (~0.1 ms on SQLite). Every failure surfaces as FeaturesUnavailable, never as
    Feast's or the store's own errors. After a failure, calls fail at once for `retry_after_s` seconds (a dead store
    costs one slow request per interval, not one per request); then the next call tries again, so the service
    recovers by itself when the store is back.
    """

    def __init__(self, paths: Paths | None = None, *, store: FeatureStore | None = None,
                 service: str = USER_SERVICE, retry_after_s: float = 2.0) -> None:
        self._paths = paths
        self._store = store
        self._service_name = service
        self._service: FeatureService | None = None
        self._retry_after_s = retry_after_s
        self._down_until = 0.0
        self._last_error = ""
        self._lock = threading.Lock()

    def _fail(self, message: str, exc: Exception) -> FeaturesUnavailable:
        self._last_error = f"{message}: {type(exc).__name__}: {exc}"
        self._down_until = time.monotonic() + self._retry_after_s
        return FeaturesUnavailable(self._last_error)

    def _connect(self) -> tuple[FeatureStore, FeatureService]:
        store, service = self._store, self._service
        if store is not None and service is not None:
            return store, service
        with self._lock:
            try:
                if self._store is None:
                    # Imported here: Feast is slow to import and the app must start (non-personalised) without it.
                    from pipelines.features import feature_store, import_feast

                    import_feast()
                    self._store = feature_store(self._paths or Paths.from_env(), serving=True)
                if self._service is None:
                    # Bypass the registry cache: after a failure the cached registry may predate the first apply.
                    self._service = self._store.get_feature_service(self._service_name, allow_cache=False)
            except Exception as exc:  # any Feast, registry or driver error means "no features", never a crash
                raise self._fail(f"feature service {self._service_name!r} unavailable", exc) from exc
            return self._store, self._service

    def check(self) -> None:
        """Raise FeaturesUnavailable unless the registry answers and the online store can be read (for /health)."""
        self.user_features(0)

    def user_features(self, user_id: int) -> dict[str, Any] | None:
        """The user's features by name (recent_products most recent first); None when the user has no online row."""
        if self._down_until and time.monotonic() < self._down_until:
            raise FeaturesUnavailable(f"still unavailable (retrying in <= {self._retry_after_s:g} s): "
                                      f"{self._last_error}")
        store, service = self._connect()
        try:
            row = store.get_online_features(features=service, entity_rows=[{"user_id": int(user_id)}]).to_dict()
        except Exception as exc:
            raise self._fail(f"online read of {self._service_name!r} failed", exc) from exc
        self._down_until = 0.0
        values = {name: column[0] for name, column in row.items() if name != "user_id"}
        if all(value is None for value in values.values()):
            return None
        return values
