"""Shadow mode: replay a sample of /v1/search on a second alias (the challenger) off the response path."""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serving.metrics import Metrics
    from serving.predictor import Predictor

log = logging.getLogger(__name__)

OVERLAP_AT = 10


@dataclass(frozen=True)
class ShadowItem:
    query: str
    k: int
    recent: tuple[int, ...] | None  # the user's history when the champion answer was personalised
    weight: float
    champion_ids: tuple[int, ...]
    champion_category: str | None  # None: the champion abstained
    champion_seconds: float


class ShadowRunner:
    """A bounded queue and one daemon worker: a full queue drops (and counts) samples instead of slowing requests.

    Agreement goes to Prometheus: overlap@10 of the product ids, category agreement, encode+rank latency of both.
    """

    def __init__(self, alias: str, fraction: float, capacity: int, metrics: Metrics, seed: int | None = None) -> None:
        self.alias = alias
        self.fraction = fraction
        self.metrics = metrics
        self.predictor: Predictor | None = None
        self.champion_version: str | None = None
        self._queue: queue.Queue[ShadowItem | None] = queue.Queue(maxsize=capacity)
        self._random = random.Random(seed)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.processed = 0  # replays finished (ok or failed), for tests and /v1/model

    def set_predictor(self, predictor: Predictor | None) -> None:
        self.predictor = predictor
        if predictor is not None:
            self.metrics.set_model(self.metrics.shadow_info, {"alias": self.alias, "version": predictor.version})

    def sampled(self) -> bool:
        return self.predictor is not None and self.fraction > 0 and self._random.random() < self.fraction

    def submit(self, item: ShadowItem) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name="shopguide-shadow", daemon=True)
                    self._thread.start()
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.metrics.shadow_requests.labels("dropped").inc()

    def close(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None

    def _loop(self) -> None:
        while not self._stopped.is_set():
            item = self._queue.get()
            try:
                if item is not None:
                    self._replay(item)
            finally:
                self._queue.task_done()

    def _replay(self, item: ShadowItem) -> None:
        shadow = self.predictor
        if shadow is None:
            return
        if shadow.version == self.champion_version:
            self.metrics.shadow_requests.labels("skipped_same_version").inc()
            return
        try:
            started = time.perf_counter()
            vec, answer = shadow.encode(item.query)
            user = shadow.user_vector(list(item.recent), vec) if item.recent else None
            hits = shadow.rank(vec, item.k, user, item.weight if user is not None else 0.0, item.query)
            seconds = time.perf_counter() - started
        except Exception:
            log.exception("shadow replay on %s version %s failed", self.alias, shadow.version)
            self.metrics.shadow_requests.labels("failed").inc()
            self.processed += 1
            return
        n = min(OVERLAP_AT, item.k)
        overlap = len(set(item.champion_ids[:n]) & {h.product_id for h in hits[:n]}) / n
        m = self.metrics
        m.shadow_overlap.observe(overlap)
        agree = answer.category == item.champion_category
        m.shadow_category_agreement.labels("agree" if agree else "disagree").inc()
        m.shadow_latency.labels("shadow").observe(seconds)
        m.shadow_latency.labels("champion").observe(item.champion_seconds)
        m.shadow_requests.labels("ok").inc()
        self.processed += 1
