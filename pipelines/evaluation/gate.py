"""The promotion gate: a pure decision from the candidate's report, the champion's and the thresholds."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pipelines.config import GateConfig

# quality metrics compared against the champion (higher is better)
QUALITY_METRICS = ("ndcg_at_10", "category_accuracy")


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return ("PASSED" if self.passed else "FAILED") + "\n" + "\n".join(f"- {r}" for r in self.reasons)


@dataclass(frozen=True)
class UnreadableChampion:
    """@champion exists but its stored evaluation report cannot be read (missing, not JSON): the gate refuses.

    Distinct from "no champion" (None): reading a broken champion as "none" would let floors alone decide and a weaker
    candidate through. A registry that cannot be reached at all never gets here: the task raises and Airflow retries.
    """

    version: str
    problem: str


def _check(ok: bool, text: str, out: list[tuple[bool, str]]) -> None:
    out.append((ok, ("ok: " if ok else "FAIL: ") + text))


def decide(
    candidate: dict[str, Any], champion: dict[str, Any] | UnreadableChampion | None, cfg: GateConfig
) -> GateDecision:
    """Absolute floors, then no regression beyond cfg.max_regression vs the champion when one exists.

    `champion`: its report, None when there is no champion, or UnreadableChampion, which fails the gate.

    The champion comparison is only meaningful on the same held-out data; a champion evaluated on another snapshot
    is compared anyway but the reason says so.
    """
    checks: list[tuple[bool, str]] = []
    floors = [
        ("ndcg_at_10", ">=", cfg.min_ndcg_at_10),
        ("category_accuracy", ">=", cfg.min_category_accuracy),
        ("parity_cosine_min", ">=", cfg.min_parity_cosine),
        ("latency_p99_ms", "<=", cfg.max_latency_p99_ms),
        ("size_mb", "<=", cfg.max_size_mb),
    ]
    for metric, op, bound in floors:
        value = candidate.get(metric)
        if value is None:
            _check(False, f"{metric} missing from the candidate's report", checks)
            continue
        ok = value >= bound if op == ">=" else value <= bound
        _check(ok, f"{metric} {value:.4g} {op} {bound:.4g}", checks)
    if champion is None:
        checks.append((True, "ok: no champion yet, floors alone decide"))
    elif isinstance(champion, UnreadableChampion):
        _check(
            False,
            f"champion version {champion.version} exists but its evaluation report cannot be read "
            f"({champion.problem}): no comparison, no promotion; fix or re-register that report, or promote by hand",
            checks,
        )
    else:
        same = champion.get("snapshot_hash") == candidate.get("snapshot_hash")
        note = "" if same else " (champion was evaluated on another data snapshot)"
        for metric in QUALITY_METRICS:
            new, old = candidate.get(metric), champion.get(metric)
            if new is None or old is None:
                checks.append((True, f"ok: {metric} not comparable with the champion (missing){note}"))
                continue
            ok = new >= old - cfg.max_regression
            _check(ok, f"{metric} {new:.4f} vs champion {old:.4f} (tolerance {cfg.max_regression}){note}", checks)
    return GateDecision(passed=all(ok for ok, _ in checks), reasons=[text for _, text in checks])
