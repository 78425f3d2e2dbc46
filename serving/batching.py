"""Micro-batching: concurrent single-query encodes that arrive within a short window share one ONNX Runtime run."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from serving.predictor import Predictor

log = logging.getLogger(__name__)

Encoded = tuple[np.ndarray, np.ndarray]  # (unit vector, category logits) of one text
Item = tuple["Predictor", str, "Future[Encoded]"]  # None in the queue: the worker stops


class MicroBatcher:
    """One worker thread collects up to `max_size` queries for at most `window_s` after the first one, encodes them
    per model version in one run, and hands each caller its own row.

    Adaptive, so that a lone client pays nothing: a query with no other search in flight is encoded at once in the
    caller's thread (no hand-off to the worker); and the worker waits out the window only when there is concurrency
    to gather (its previous batch had more than one query, or more are queued already).
    Requests keep their own predictor: a batch that straddles a hot swap is split by version, so an answer never
    mixes two versions. Callers block on a Future (they run in FastAPI's threadpool).
    """

    def __init__(self, window_s: float, max_size: int, on_batch: Callable[[int], None] | None = None) -> None:
        self.window_s = window_s
        self.max_size = max_size
        self._on_batch = on_batch
        self._queue: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._last_size = 1
        self._in_flight = 0

    def encode(self, predictor: Predictor, text: str) -> Encoded:
        """(unit vector, category logits) of one text, computed alone or in a shared batch."""
        with self._lock:
            self._in_flight += 1
            alone = self._in_flight == 1
        try:
            if alone:
                emb, logits = predictor.encode_many([text])
                if self._on_batch is not None:
                    self._on_batch(1)
                return emb[0], logits[0]
            if self._thread is None:
                self._start()
            done: Future[Encoded] = Future()
            self._queue.put((predictor, text, done))
            return done.result()
        finally:
            with self._lock:
                self._in_flight -= 1

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="shopguide-microbatch", daemon=True)
                self._thread.start()

    def close(self) -> None:
        with self._lock:
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join(timeout=5)
                self._thread = None

    def _collect(self, first: Item) -> tuple[list[Item], bool]:
        batch, stop = [first], False
        wait = self._last_size > 1 or not self._queue.empty()
        deadline = time.perf_counter() + (self.window_s if wait else 0.0)
        while len(batch) < self.max_size:
            remaining = deadline - time.perf_counter()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stop = True
                break
            batch.append(item)
        return batch, stop

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = self._collect(first)
            self._last_size = len(batch)
            by_version: dict[int, list[Item]] = {}
            for item in batch:
                by_version.setdefault(id(item[0]), []).append(item)
            for items in by_version.values():
                predictor = items[0][0]
                try:
                    emb, logits = predictor.encode_many([text for _, text, _ in items])
                except Exception as exc:  # every caller gets the error; the worker lives on
                    for _, _, done in items:
                        done.set_exception(exc)
                    continue
                if self._on_batch is not None:
                    self._on_batch(len(items))
                for row, (_, _, done) in enumerate(items):
                    done.set_result((emb[row], logits[row]))
            if stop:
                return
