"""Whether a retrain run has anything to learn: a pure decision from what is new since @champion's snapshot."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from pipelines.config import RetrainConfig

# The run type of a run a person started: the UI's trigger form, the REST API, `shopguide retrain` (`airflow dags
# test`). Every other (the schedule, the features DAG's Asset, another DAG's trigger, a backfill) is the machine's.
MANUAL = "manual"


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
    return (
        f"since @champion {facts.champion}'s snapshot ({since}): {facts.new_feedback} answers with feedback "
        f"(retrain.min_new_feedback {cfg.min_new_feedback}); {window}; {judgments}"
    )


def should_retrain(facts: NewData, cfg: RetrainConfig) -> RetrainDecision:
    """Go or skip, with the reason.

    No champion: go (the first model trains on what there is). A manual run: go, unless its `only_with_new_data`
    asks for the machine's rule. The machine's rule (every other run type): go when a judgments file was given, when
    at least `min_new_feedback` answers got feedback since the champion's snapshot, or when the latest monitor window
    after it alarmed on drift or vocabulary misses; otherwise skip (the run ends early, successfully).
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
