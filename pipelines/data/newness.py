"""Whether a retrain run has anything to learn: a pure decision from what is new since @champion's snapshot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from pipelines.config import RetrainConfig

# The run type of a run a person started: the UI's trigger form, the REST API, `shopguide retrain` (`airflow dags
# test`). Every other (the schedule, the features DAG's Asset, another DAG's trigger, a backfill) is the machine's.
MANUAL = "manual"


@dataclass(frozen=True)
class Trigger:
    """An asset event that started the run, as the retrain DAG read it from its `triggering_asset_events`."""

    asset: str
    extra: dict[str, Any] = field(default_factory=dict)  # what the producing task said (monitor: reason, alarms)
    timestamp: datetime | None = None
    source: str | None = None  # "<dag id>/<run id>" of the producing run; None: emitted through the API


@dataclass(frozen=True)
class DriftEvent:
    """A monitor window's announcement of drift (the drift Asset's extra): which signals alarmed against which
    version, in the window ending when."""

    model_version: str | None
    window_end: datetime
    alarms: tuple[str, ...]
    reason: str


def drift_event(trigger: Trigger) -> DriftEvent | None:
    """The announcement a drift asset event carries; None when its extra is not the monitor's (emitted by hand) or
    names no alarm: it still names the run's trigger, but states nothing the rule could weigh."""
    extra = trigger.extra
    try:
        end = datetime.fromisoformat(str(extra["window_end"]))
        alarms = tuple(str(a) for a in extra["alarms"])
    except (KeyError, TypeError, ValueError):
        return None
    if not alarms:  # nothing alarmed: no announcement, whatever sent it
        return None
    version = extra.get("model_version")
    return DriftEvent(None if version is None else str(version), end, alarms, str(extra.get("reason") or ""))


def trigger_reason(run_type: str, triggers: Sequence[Trigger]) -> str:
    """Why the run was started, in one line: each triggering asset event's own reason (the monitor's drift verdicts)
    or, without one, its extra; a run no event started says its run type."""
    if not triggers:
        return {MANUAL: "manual run", "scheduled": "the weekly schedule"}.get(run_type, f"{run_type} run")
    said = []
    for t in triggers:
        what = t.extra.get("reason") or (json.dumps(t.extra, sort_keys=True, default=str) if t.extra else "no extra")
        said.append(f"asset {t.asset} from {t.source or 'the API'}: {what}")
    return "; ".join(said)


@dataclass(frozen=True)
class NewData:
    """What the retrain DAG's first task found, cheaply (counts and tags, never a snapshot)."""

    run_type: str
    champion: str | None  # @champion's version; None: no champion yet
    since: datetime | None  # @champion's data_as_of: where "new" starts
    new_feedback: int  # training-term search answers with a click / cart / purchase since `since` (0: not counted)
    alarms: tuple[str, ...]  # drift / vocabulary-miss signals alarmed in the latest monitor window after `since`
    window_end: datetime | None  # that window's end; None: no window recorded against the champion after `since`
    judgments: str | None  # the run's judgments file (Param judgments_path): new judgments landed
    only_with_new_data: bool = False  # a manual run that asks for the machine's rule
    drift_events: tuple[DriftEvent, ...] = ()  # the monitor's drift announcements among the run's trigger events


@dataclass(frozen=True)
class RetrainDecision:
    go: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _found(facts: NewData, cfg: RetrainConfig) -> str:
    since = facts.since.isoformat() if facts.since else "the start of the log"
    window = (
        f"monitor window ending {facts.window_end.isoformat()}: "
        + (f"ALARM {', '.join(facts.alarms)}" if facts.alarms else "no drift or vocabulary alarm")
        if facts.window_end
        else "no monitor window recorded against it since"
    )
    judgments = f"judgments file {facts.judgments!r}" if facts.judgments else "no judgments file"
    stale = [e for e in facts.drift_events if not _counts(e, facts)]
    ignored = (
        "; drift announced against "
        + ", ".join(f"v{e.model_version} (window ending {e.window_end.isoformat()})" for e in stale)
        + " ignored: not @champion since its snapshot"
        if stale
        else ""
    )
    return (
        f"since @champion {facts.champion}'s snapshot ({since}): {facts.new_feedback} answers with feedback "
        f"(retrain.min_new_feedback {cfg.min_new_feedback}); {window}; {judgments}{ignored}"
    )


def _counts(event: DriftEvent, facts: NewData) -> bool:
    """A drift announcement speaks for this champion: made against its version, by a window after its snapshot (an
    older alarm was answered by the retrain that made it, or is about a version no longer served)."""
    return event.model_version == facts.champion and (facts.since is None or event.window_end > facts.since)


def should_retrain(facts: NewData, cfg: RetrainConfig) -> RetrainDecision:
    """Go or skip, with the reason.

    No champion: go (the first model trains on what there is). A manual run: go, unless its `only_with_new_data`
    asks for the machine's rule. The machine's rule (every other run type): go when a judgments file was given, when
    at least `min_new_feedback` answers got feedback since the champion's snapshot, when the latest monitor window
    after it alarmed on drift or vocabulary misses, or when the run was started by the monitor's drift announcement
    against the champion from a window after its snapshot (a later quiet window does not undo it: the drifted
    queries are in the log the retrain learns from); otherwise skip (the run ends early, successfully).
    """
    if facts.champion is None:
        return RetrainDecision(True, "no @champion yet: the first model trains on the data there is")
    found = _found(facts, cfg)
    manual = facts.run_type == MANUAL
    if manual and not facts.only_with_new_data:
        return RetrainDecision(True, f"manual run: trains (Param only_with_new_data is off); {found}")
    new = []
    if facts.judgments:
        new.append("a judgments file was given")
    if facts.new_feedback >= cfg.min_new_feedback:
        new.append(f"{facts.new_feedback} answers with feedback >= {cfg.min_new_feedback}")
    if facts.alarms and facts.window_end is not None:
        new.append(f"the monitor alarmed ({', '.join(facts.alarms)})")
    for event in (e for e in facts.drift_events if _counts(e, facts)):
        new.append(
            f"the monitor announced drift ({', '.join(event.alarms)}) in the window ending "
            f"{event.window_end.isoformat()}"
        )
    who = "manual run with only_with_new_data" if manual else f"{facts.run_type} run"
    if new:
        return RetrainDecision(True, f"{who}: new data: {'; '.join(new)}; {found}")
    return RetrainDecision(False, f"{who}: nothing new to learn, skipped; {found}")


def should_announce(previous_until: datetime | None, as_of: datetime, new_events: int) -> RetrainDecision:
    """Whether a features run emits the Asset that schedules retraining: on the first landing (no announcement yet:
    everything landed is new), or when the service's event log took feedback events since the previous announcement
    (`previous_until`, the as-of time it covered, up to this run's `as_of`). Otherwise nothing new landed: no event,
    and no retrain run is started for nothing."""
    if previous_until is None:
        return RetrainDecision(True, "first landing: no user-events announcement yet")
    if new_events > 0:
        return RetrainDecision(
            True, f"{new_events} feedback events logged in [{previous_until.isoformat()}, {as_of.isoformat()})"
        )
    return RetrainDecision(
        False,
        f"no feedback event logged in [{previous_until.isoformat()}, {as_of.isoformat()}): nothing new since the "
        "previous announcement",
    )
