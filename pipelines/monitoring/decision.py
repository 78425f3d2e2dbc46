"""Which signals of a window alarm: a pure decision from its measurements and the config's thresholds."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pipelines.config import MonitorConfig

# the drift signals, named as the exported metric's `signal` label (docker/prometheus/rules.yml)
DRIFT_SIGNALS = ("query_text", "query_embedding", "category")
VOCABULARY_SIGNAL = "vocabulary"
# the alarms that say the traffic moved away from what the champion learned: a retrain has something to learn
RETRAIN_SIGNALS = (*DRIFT_SIGNALS, VOCABULARY_SIGNAL)


@dataclass(frozen=True)
class DriftResult:
    """One drift test of the window against the reference, as the drift library ran it."""

    score: float | None  # None: the statistic is undefined (chi-square of one category on both sides: no drift)
    detected: bool
    method: str
    threshold: float


@dataclass(frozen=True)
class WindowSignals:
    """What the decision reads. None = not measured (no reference, too few queries, no answer, nothing online)."""

    drift: dict[str, DriftResult | None] = field(default_factory=dict)
    vocab_miss_ratio: float | None = None
    reference_vocab_miss_ratio: float | None = None
    empty_rate: float | None = None
    low_score_rate: float | None = None
    latency_p99_ms: float | None = None
    feature_age_s: dict[str, float | None] = field(default_factory=dict)  # None: nothing of the view online


@dataclass(frozen=True)
class MonitorDecision:
    alarms: dict[str, bool]  # signal -> alarm; only the signals that were measured
    reasons: list[str]
    vocab_miss_threshold: float | None

    @property
    def alarm(self) -> bool:
        return any(self.alarms.values())

    @property
    def drift_detected(self) -> bool:
        return any(self.alarms.get(s, False) for s in DRIFT_SIGNALS)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "alarm": self.alarm, "drift_detected": self.drift_detected}


def vocab_miss_threshold(reference_ratio: float | None, cfg: MonitorConfig) -> float | None:
    """The window's bound: the reference's own share of words outside the vocabulary plus the margin (a subword
    vocabulary splits some everyday words too, so an absolute bound would alarm on the reference itself)."""
    return None if reference_ratio is None else reference_ratio + cfg.vocab_miss_margin


def _bound(alarms: dict[str, bool], reasons: list[str], signal: str, value: float | None, bound: float, what: str):
    if value is None:
        reasons.append(f"{signal}: not measured ({what})")
        return
    alarms[signal] = value > bound
    verdict = "ALARM" if alarms[signal] else "ok"
    reasons.append(f"{signal}: {verdict}, {what} {value:.4g} {'>' if alarms[signal] else '<='} {bound:.4g}")


def decide(signals: WindowSignals, cfg: MonitorConfig) -> MonitorDecision:
    """Drift signals alarm when the library's test detected drift at the configured threshold; the rates, the latency
    and feature ages when they exceed their bound. A signal that was not measured neither alarms nor passes: it is
    left out of `alarms` and its reason says why."""
    alarms: dict[str, bool] = {}
    reasons: list[str] = []
    for signal in DRIFT_SIGNALS:
        result = signals.drift.get(signal)
        if result is None:
            reasons.append(f"{signal}: no drift test (no reference or too few queries in the window)")
            continue
        alarms[signal] = result.detected
        reasons.append(
            f"{signal}: {'ALARM, drift detected' if result.detected else 'ok, no drift'} "
            f"({result.method} score {'undefined' if result.score is None else f'{result.score:.4g}'}, "
            f"threshold {result.threshold:.4g})"
        )
    threshold = vocab_miss_threshold(signals.reference_vocab_miss_ratio, cfg)
    if threshold is None:
        reasons.append("vocabulary: not measured (no reference)")
    else:
        _bound(
            alarms, reasons, VOCABULARY_SIGNAL, signals.vocab_miss_ratio, threshold, "share of words outside the vocab"
        )
    _bound(alarms, reasons, "empty_answers", signals.empty_rate, cfg.max_empty_rate, "empty answer rate")
    _bound(alarms, reasons, "low_scores", signals.low_score_rate, cfg.max_low_score_rate, "low-score answer rate")
    _bound(alarms, reasons, "latency", signals.latency_p99_ms, cfg.latency_slo_p99_ms, "search latency p99 ms")
    for view, age in sorted(signals.feature_age_s.items()):
        if age is None:  # the view is registered and nothing of it is online: the stalest of all
            alarms[f"feature_age:{view}"] = True
            reasons.append(f"feature_age:{view}: ALARM, no row online (or the store could not be read)")
            continue
        bound = cfg.max_feature_age_hours * 3600
        _bound(alarms, reasons, f"feature_age:{view}", age, bound, "newest online row age s")
    return MonitorDecision(alarms, reasons, threshold)


@dataclass(frozen=True)
class Announcement:
    """Whether a window emits the Asset that schedules retraining (the monitor DAG's announce_drift), and why."""

    go: bool
    reason: str


def retrain_alarms(alarms: dict[str, bool]) -> tuple[str, ...]:
    """The window's alarmed signals a retrain can answer (drift, vocabulary misses), in RETRAIN_SIGNALS order; the
    others (latency, empty answers, feature age) are the service's or the feature pipeline's to fix."""
    return tuple(s for s in RETRAIN_SIGNALS if alarms.get(s))


def should_announce_drift(
    alarmed: tuple[str, ...],
    model_version: str | None,
    window_end: datetime,
    previous: tuple[str | None, datetime] | None,
    cooldown_hours: float,
) -> Announcement:
    """Announce when the window alarmed on drift or vocabulary misses, unless the previous announcement
    (`previous`: its model version and window end; None: there was none) was for the same @champion version by a
    window ending less than `cooldown_hours` before or after this one: that retrain was already asked for (a re-run
    of a window, or a backfill, never asks twice), and a drift that persists while candidates lose their gate asks
    again once the cool-down is over. Another version (a new champion) is announced at once."""
    if not alarmed:
        return Announcement(False, "no drift or vocabulary-miss alarm in this window: nothing for a retrain")
    what = f"{', '.join(alarmed)} alarmed against @champion v{model_version}"
    if previous is not None:
        version, end = previous
        cooldown = timedelta(hours=cooldown_hours)
        if version == model_version and abs(window_end - end) < cooldown:
            return Announcement(
                False,
                f"{what}, but the window ending {end.isoformat()} already announced drift for v{version} "
                f"(monitor.retrain_cooldown_hours {cooldown_hours:g}): not asking again",
            )
    return Announcement(True, f"{what}: asking for a retrain")
