"""Prometheus metrics of one app instance (its own registry, so several apps in one process never collide)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

# Seconds; dense below 10 ms where the search latency target lives.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
OVERLAP_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass(frozen=True)
class LogMetrics:
    """One durable log's writer (serving/log_writer.py): rows made durable, rows dropped, queue, append time."""

    written: Counter
    dropped: Counter
    queue: Gauge
    flush: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry, log: str, rows: str, what: str) -> LogMetrics:
        """`shopguide_<log>_written_rows_total`, `..._dropped_rows_total{reason}`, `..._queue_depth` and
        `..._flush_duration_seconds`, described as `rows` (e.g. "Answers of ...") in `what` (e.g. "the request log")."""
        return cls(
            written=Counter(f"shopguide_{log}_written_rows", f"{rows} made durable in {what}.", registry=registry),
            dropped=Counter(
                f"shopguide_{log}_dropped_rows",
                f"{rows} not logged, by reason (queue_full: the writer fell behind; write_failed; closed).",
                ["reason"],
                registry=registry,
            ),
            queue=Gauge(
                f"shopguide_{log}_queue_depth", f"Submits waiting for the writer of {what}.", registry=registry
            ),
            flush=Histogram(
                f"shopguide_{log}_flush_duration_seconds",
                f"Time of one append to {what} (write + fsync) by its writer thread.",
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
        )


class Metrics:
    def __init__(self) -> None:
        self._info_labels: dict[int, dict[str, str]] = {}
        self.registry = r = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)  # CPU seconds, resident memory, open fds of the serving process
        self.requests = Counter(
            "shopguide_requests",
            "HTTP requests by endpoint, method and status.",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "shopguide_request_duration_seconds",
            "Request latency in the app (body read to response sent).",
            ["endpoint", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "shopguide_stage_duration_seconds",
            "Time per serving stage (encode, features, rank, rerank, queue; push: an events request's online update).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch = Histogram(
            "shopguide_batch_size",
            "Texts per /v1/classify and /v1/embed request.",
            ["kind"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.model_info = Gauge(
            "shopguide_model_info",
            "1 for the version being served.",
            ["model_name", "alias", "version", "source", "search"],
            registry=r,
        )
        self.model_loaded_at = Gauge(
            "shopguide_model_loaded_timestamp_seconds", "When the served version was loaded.", registry=r
        )
        self.polls = Counter(
            "shopguide_model_polls",
            "Alias resolutions by outcome (unchanged, loaded, registry_unavailable, load_failed).",
            ["alias", "outcome"],
            registry=r,
        )
        self.swaps = Counter(
            "shopguide_model_swaps",
            "Hot swaps to a new version, by result (ok, failed).",
            ["alias", "result"],
            registry=r,
        )
        self.load_failing = Gauge(
            "shopguide_model_load_failing",
            "1 while the alias points at a version that cannot be loaded (the previous version keeps serving).",
            ["alias"],
            registry=r,
        )
        self.features_fallbacks = Counter(
            "shopguide_features_fallbacks",
            "Requests with user_id answered without personalisation, by reason.",
            ["endpoint", "reason"],
            registry=r,
        )
        self.shadow_requests = Counter(
            "shopguide_shadow_requests",
            "Shadow replays by result (ok, dropped, failed, skipped_same_version).",
            ["result"],
            registry=r,
        )
        self.shadow_overlap = Histogram(
            "shopguide_shadow_overlap_at_10",
            "|top-10 champion & top-10 shadow| / 10 per replayed search.",
            buckets=OVERLAP_BUCKETS,
            registry=r,
        )
        self.shadow_category_agreement = Counter(
            "shopguide_shadow_category_agreement",
            "Replayed searches whose predicted category matches (agree) or not (disagree).",
            ["result"],
            registry=r,
        )
        self.shadow_latency = Histogram(
            "shopguide_shadow_duration_seconds",
            "Encode + rank time of the shadow model, by model (champion, shadow).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.shadow_info = Gauge(
            "shopguide_shadow_model_info",
            "1 for the shadow version being replayed on.",
            ["alias", "version"],
            registry=r,
        )

        self.request_log = LogMetrics.create(
            r, "request_log", "Answers of /v1/search and /v1/recommend", "the request log"
        )
        self.events = Counter(
            "shopguide_events",
            "Feedback events of POST /v1/events by type and outcome (accepted: new; duplicate: acknowledged again, "
            "not counted; refused: the request was refused with 422).",
            ["type", "outcome"],
            registry=r,
        )
        self.events_refused = Counter(
            "shopguide_events_refused",
            "Refused feedback events by reason: unknown_request, user_mismatch, not_shown, unknown_product, timestamp.",
            ["reason"],
            registry=r,
        )
        self.feature_pushes = Counter(
            "shopguide_feature_pushes",
            "Pushes of accepted events to the users' online features, by result (ok, failed: events logged only).",
            ["result"],
            registry=r,
        )
        self.event_log = LogMetrics.create(r, "event_log", "Accepted feedback events", "the event log")

        self.ready = Gauge(
            "shopguide_ready", "1 while a model version is loaded and served (/readyz 200); 0 before.", registry=r
        )
        self.features_reads = Counter(
            "shopguide_features_reads",
            "Reads of a user's online features on the request path, by result (ok, unavailable).",
            ["result"],
            registry=r,
        )
        # Series the alert rules (docker/prometheus/rules.yml) take rate() or increase() of exist at 0 from the start:
        # a counter series that first appears with a value N loses those N to rate() and increase().
        for result in ("ok", "unavailable"):
            self.features_reads.labels(result)
        for reason in ("queue_full", "write_failed", "closed"):
            self.request_log.dropped.labels(reason)
        for result in ("ok", "failed"):
            self.shadow_requests.labels(result)
        for result in ("agree", "disagree"):
            self.shadow_category_agreement.labels(result)

    def set_model(self, gauge: Gauge, labels: dict[str, str]) -> None:
        """One series at 1: the old version's series disappears in the same step."""
        previous = self._info_labels.get(id(gauge))
        if previous is not None and previous != labels:
            with warnings.catch_warnings():
                # Importing Feast sets PROMETHEUS_MULTIPROC_DIR in this process (feast.metrics); prometheus_client
                # then warns on remove() although this registry was created in-process before and is unaffected.
                warnings.simplefilter("ignore", UserWarning)
                gauge.remove(*previous.values())
        gauge.labels(**labels).set(1)
        self._info_labels[id(gauge)] = dict(labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)
