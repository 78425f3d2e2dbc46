"""Background clients that search a running service without pause, for the tests of a swap under load (a new model
version, a new catalog index): every answer is kept with its start time, every failed request as text."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class Answer:
    started: float  # time.monotonic() when the request was sent
    query: str
    model_version: str
    product_ids: list[int]


class SearchLoad:
    """`clients` threads, each cycling through `queries` (client i starts at query i) with POST /v1/search; with
    `users`, request n carries user_id n % users (the personalised path). A non-200 answer or a reset connection is a
    failure: under a swap there must be none."""

    def __init__(self, url: str, queries: list[str], *, clients: int = 3, k: int = 10, users: int = 0) -> None:
        self.url, self.queries, self.k, self.users = url, queries, k, users
        self.answers: list[Answer] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            n = i
            while not self._stop.is_set():
                n += 1
                query = self.queries[n % len(self.queries)]
                body: dict[str, object] = {"query": query, "k": self.k}
                if self.users:
                    body["user_id"] = n % self.users
                started = time.monotonic()
                try:
                    r = http.post("/v1/search", json=body)
                    if r.status_code != 200:
                        self.failures.append(f"{r.status_code}: {r.text[:200]}")
                        continue
                    answer = r.json()
                    if r.headers["x-model-version"] != answer["model_version"]:
                        self.failures.append(f"header {r.headers['x-model-version']} != {answer['model_version']}")
                        continue
                    ids = [hit["product_id"] for hit in answer["results"]]
                    self.answers.append(Answer(started, query, answer["model_version"], ids))
                except Exception as exc:  # a reset connection is a failed request too
                    self.failures.append(repr(exc))

    @property
    def versions(self) -> Counter[str]:
        """Answers per model version."""
        return Counter(a.model_version for a in self.answers)

    def wait(self, version: str, answers: int = 10, timeout: float = 90) -> None:
        """Until `answers` more answers of `version` came back (the first personalised ones wait for Feast)."""
        target = self.versions[version] + answers
        deadline = time.monotonic() + timeout
        while self.versions[version] < target:
            assert time.monotonic() < deadline, (self.versions, self.failures[:3])
            time.sleep(0.05)

    def __enter__(self) -> SearchLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
