"""Online user features for the service: one search_v1 FeatureService read per request, failures as one exception."""

from __future__ import annotations

import threading
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
    plus Feast's response assembly. A failure to connect is retried on the next call, so the service recovers once
    the store is back; every failure surfaces as FeaturesUnavailable, never as Feast's or the store's own errors.
    """

    def __init__(self, paths: Paths | None = None, *, store: FeatureStore | None = None,
                 service: str = USER_SERVICE) -> None:
        self._paths = paths
        self._store = store
        self._service_name = service
        self._service: FeatureService | None = None
        self._lock = threading.Lock()

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
                    self._store = feature_store(self._paths or Paths.from_env())
                self._service = self._store.get_feature_service(self._service_name)
            except Exception as exc:  # any Feast, registry or driver error means "no features", never a crash
                raise FeaturesUnavailable(f"Feast feature service {self._service_name!r} unavailable: {exc}") from exc
            return self._store, self._service

    def check(self) -> None:
        """Raise FeaturesUnavailable unless the registry answers and the online store can be read (for /health)."""
        self.user_features(0)

    def user_features(self, user_id: int) -> dict[str, Any] | None:
        """The user's features by name (recent_products most recent first); None when the user has no online row."""
        store, service = self._connect()
        try:
            row = store.get_online_features(features=service, entity_rows=[{"user_id": int(user_id)}]).to_dict()
        except Exception as exc:
            raise FeaturesUnavailable(f"online read of {self._service_name!r} failed: {exc}") from exc
        values = {name: column[0] for name, column in row.items() if name != "user_id"}
        if all(value is None for value in values.values()):
            return None
        return values
