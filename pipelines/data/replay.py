"""Replaying SIMULATED shoppers (pipelines/data/traffic.py) against a running service over HTTP: searches, then their
clicks, add-to-carts and purchases as feedback events naming the answers' request ids."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np
import pandas as pd

from pipelines.config import ShopguideConfig
from pipelines.data.traffic import ShopperModel, user_rng

INTERACTION_TYPES = ("click", "add_to_cart", "purchase")


@dataclass
class ReplaySummary:
    """What one replay did; `simulated` is always true: none of this traffic comes from real shoppers."""

    users: int
    seed: int
    seconds: float = 0.0
    stopped: str = "minutes"  # minutes | sessions | errors | stop
    sessions: int = 0
    searches: int = 0
    click_only_searches: int = 0  # searches for terms whose judgments the first model did not get (judged_at_launch)
    events: Counter[str] = field(default_factory=Counter)  # sent, by type
    event_posts: int = 0
    accepted: int = 0
    duplicates: int = 0
    offline_posts: int = 0  # accepted, but the service could not update the online features
    errors: Counter[str] = field(default_factory=Counter)  # "search 503", "events 422 not_shown", "search timeout"
    search_ms: list[float] = field(default_factory=list, repr=False)
    events_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def requests(self) -> int:
        """Every request sent: answered searches, acknowledged event posts and the failed ones."""
        return self.searches + self.event_posts + sum(self.errors.values())

    def to_dict(self) -> dict[str, Any]:
        def pct(values: list[float], q: float) -> float | None:
            return round(float(np.percentile(values, q)), 2) if values else None

        rate = (lambda n: round(n / self.seconds, 2)) if self.seconds > 0 else (lambda n: None)
        return {
            "simulated": True,
            "users": self.users,
            "seed": self.seed,
            "seconds": round(self.seconds, 2),
            "stopped": self.stopped,
            "sessions": self.sessions,
            "requests": self.requests,
            "searches": self.searches,
            "click_only_searches": self.click_only_searches,
            "events": {t: self.events[t] for t in INTERACTION_TYPES},
            "event_posts": self.event_posts,
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "offline_posts": self.offline_posts,
            "errors": dict(sorted(self.errors.items())),
            "searches_per_s": rate(self.searches),
            "events_per_s": rate(sum(self.events.values())),
            "search_ms": {"p50": pct(self.search_ms, 50), "p99": pct(self.search_ms, 99)},
            "events_ms": {"p50": pct(self.events_ms, 50), "p99": pct(self.events_ms, 99)},
        }

    def table(self) -> str:
        d = self.to_dict()
        errors = ", ".join(f"{k}: {v}" for k, v in d["errors"].items()) or "none"
        ev = d["events"]
        return "\n".join(
            [
                f"SIMULATED traffic: {d['users']} users, seed {d['seed']}, {d['seconds']:.1f} s "
                f"(stopped: {d['stopped']})",
                f"  {'searches':<22}{d['searches']:>8}  {d['searches_per_s'] or 0:>8.1f}/s  "
                f"p50 {d['search_ms']['p50'] or 0:.1f} ms  p99 {d['search_ms']['p99'] or 0:.1f} ms",
                f"  {'  of click-only terms':<22}{d['click_only_searches']:>8}",
                f"  {'events sent':<22}{sum(ev.values()):>8}  {d['events_per_s'] or 0:>8.1f}/s  "
                f"click {ev['click']}, add_to_cart {ev['add_to_cart']}, purchase {ev['purchase']}",
                f"  {'event posts':<22}{d['event_posts']:>8}  accepted {d['accepted']}, duplicates {d['duplicates']}, "
                f"not online {d['offline_posts']}; p50 {d['events_ms']['p50'] or 0:.1f} ms",
                f"  {'errors':<22}{sum(d['errors'].values()):>8}  {errors}",
            ]
        )


class _Replay:
    def __init__(
        self,
        client: httpx.Client,
        model: ShopperModel,
        users: Sequence[int],
        seed: int,
        deadline: float,
        sessions_per_user: int | None,
        stop: threading.Event | None = None,
    ) -> None:
        self.client, self.model, self.seed = client, model, seed
        self.users, self.deadline, self.budget = list(users), deadline, sessions_per_user
        self.cfg = model.cfg
        self.summary = ReplaySummary(users=len(users), seed=seed)
        self.lock = threading.Lock()
        self.stop = stop if stop is not None else threading.Event()

    def _error(self, kind: str) -> None:
        with self.lock:
            self.summary.errors[kind] += 1
            if sum(self.summary.errors.values()) >= self.cfg.max_errors:
                self.summary.stopped = "errors"
                self.stop.set()

    def _post(self, path: str, body: dict[str, Any], ok: int, what: str) -> tuple[dict[str, Any] | None, float]:
        started = time.perf_counter()
        try:
            response = self.client.post(path, json=body)
        except httpx.TimeoutException:
            self._error(f"{what} timeout")
            return None, 0.0
        except httpx.HTTPError as err:
            self._error(f"{what} {type(err).__name__}")
            return None, 0.0
        ms = (time.perf_counter() - started) * 1000
        if response.status_code != ok:
            reasons = ""
            if response.status_code == 422:
                with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):  # not our JSON
                    reasons = " " + ",".join(sorted({str(d.get("type")) for d in response.json()["detail"]}))
            self._error(f"{what} {response.status_code}{reasons}")
            return None, ms
        return response.json(), ms

    def _search(self, user: int, term: str, rng: np.random.Generator) -> None:
        answer, ms = self._post("/v1/search", {"query": term, "k": self.cfg.k, "user_id": user}, 200, "search")
        if answer is None:
            return
        with self.lock:
            self.summary.searches += 1
            self.summary.click_only_searches += term in self.model.click_only
            self.summary.search_ms.append(ms)
        ranked = [int(hit["product_id"]) for hit in answer["results"]]
        interactions = self.model.feedback(rng, term, ranked)
        if not interactions:
            return
        ts = datetime.now(UTC).isoformat()  # after the answer, on this client's clock (the service allows 60 s skew)
        events = [
            {"request_id": answer["request_id"], "user_id": user, "product_id": i.product_id, "type": i.type, "ts": ts}
            for i in interactions
        ]
        for start in range(0, len(events), self.cfg.event_batch):
            chunk = events[start : start + self.cfg.event_batch]
            ack, ms = self._post("/v1/events", {"events": chunk}, 202, "events")
            if ack is None:
                continue
            with self.lock:
                self.summary.event_posts += 1
                self.summary.events.update(e["type"] for e in chunk)
                self.summary.accepted += int(ack["accepted"])
                self.summary.duplicates += int(ack["duplicates"])
                self.summary.offline_posts += not ack["online"]
                self.summary.events_ms.append(ms)

    def _out_of_time(self) -> bool:
        if time.monotonic() >= self.deadline:
            self.stop.set()
        return self.stop.is_set()

    def worker(self, mine: list[int]) -> None:
        """Plays `mine` in turn, one session each per round, until the time, the sessions or the errors run out."""
        decide = {u: user_rng(self.seed, u) for u in mine}
        pause = {u: user_rng(self.seed, u, 1) for u in mine}  # its own stream: think times never move decisions
        done = dict.fromkeys(mine, 0)
        while True:
            active = [u for u in mine if self.budget is None or done[u] < self.budget]
            if not active:
                return
            for user in active:
                for term in self.model.session(decide[user]):
                    if self._out_of_time():
                        return
                    self._search(user, term, decide[user])
                    if self.cfg.think_seconds > 0:
                        wait_s = float(pause[user].exponential(self.cfg.think_seconds))
                        self.stop.wait(min(wait_s, max(0.0, self.deadline - time.monotonic())))
                done[user] += 1
                with self.lock:
                    self.summary.sessions += 1


def replay(
    client: httpx.Client,
    model: ShopperModel,
    users: Sequence[int],
    *,
    seed: int,
    minutes: float,
    sessions_per_user: int | None = None,
    progress: Callable[[ReplaySummary], None] | None = None,
    progress_seconds: float = 5.0,
    stop: threading.Event | None = None,
) -> ReplaySummary:
    """Play SIMULATED `users` against the service behind `client` (an httpx.Client with its base URL and API key) for
    `minutes`, or until each user played `sessions_per_user` sessions; `progress` gets the running summary every
    `progress_seconds`. Each user decides with its own generator (traffic.user_rng), so a seed repeats the same
    searches and, for the same answers, the same events; a run cut by the clock ends wherever the clock ran out.
    Errors are counted, never raised; the run stops after the config's max_errors, or when `stop` is set (the
    caller's own end: the workers finish their current request)."""
    started = time.monotonic()
    run = _Replay(client, model, users, seed, started + minutes * 60, sessions_per_user, stop)
    threads = max(1, min(len(run.users), model.cfg.concurrency))
    shares = [run.users[i::threads] for i in range(threads)]
    with ThreadPoolExecutor(threads, thread_name_prefix="shopguide-simulate") as pool:
        futures = [pool.submit(run.worker, share) for share in shares]
        try:
            while True:
                _, pending = wait(futures, timeout=progress_seconds)
                run.summary.seconds = time.monotonic() - started
                if not pending:
                    break
                if progress is not None:
                    progress(run.summary)
        except BaseException:  # Ctrl-C: the workers finish their current request and stop
            run.stop.set()
            raise
        for f in futures:
            f.result()  # a bug in a worker surfaces here, not as a silently short run
    run.summary.seconds = time.monotonic() - started
    if run.summary.stopped != "errors" and not run.stop.is_set():
        run.summary.stopped = "sessions"
    elif run.summary.stopped != "errors" and stop is not None and time.monotonic() < run.deadline:
        run.summary.stopped = "stop"  # the caller's event, before the clock ran out
    return run.summary


def simulate_traffic(
    url: str,
    cfg: ShopguideConfig,
    *,
    api_key: str | None = None,
    progress: Callable[[ReplaySummary], None] | None = None,
    progress_seconds: float = 5.0,
    judgments: pd.DataFrame | None = None,
    stop: threading.Event | None = None,
) -> ReplaySummary:
    """`shopguide simulate`: the profile's training terms (shipped Home Depot data, `data.max_terms`; `judgments`: the
    terms of those rows instead, e.g. the ones a scenario's traffic targets), `simulate.users` drawn from the event
    log's population (`data.event_users`), replayed against the service at `url` until the time runs out or `stop`
    is set."""
    from pipelines.data.dataset import load_judgments, select_terms
    from pipelines.data.traffic import draw_users

    sim = cfg.simulate
    if judgments is None:
        judgments = select_terms(load_judgments(), cfg.data.max_terms)
    model = ShopperModel(judgments, sim, cfg.data.judged_at_launch)
    users = draw_users(np.random.default_rng(sim.seed), cfg.data.event_users, sim.users)
    headers = {"X-API-Key": api_key} if api_key else {}
    # one connection per client thread, kept alive (httpx's pool), so the run measures requests, not TCP set-ups
    limits = httpx.Limits(max_connections=sim.concurrency, max_keepalive_connections=sim.concurrency)
    with httpx.Client(base_url=url, headers=headers, timeout=sim.timeout_seconds, limits=limits) as client:
        return replay(
            client,
            model,
            users,
            seed=sim.seed,
            minutes=sim.minutes,
            sessions_per_user=sim.sessions_per_user,
            progress=progress,
            progress_seconds=progress_seconds,
            stop=stop,
        )
