"""The promotion gate: a pure decision from the candidate's report, the champion's on the same data, the thresholds."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pipelines.config import GateConfig
from pipelines.evaluation.paired import PairedDifference


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
    """@champion exists but its bundle cannot be evaluated (files missing or not the registered ones): the gate refuses.

    Distinct from "no champion" (None): reading a broken champion as "none" would let floors alone decide and a weaker
    candidate through. A registry that cannot be reached at all never gets here: the task raises and Airflow retries.
    """

    version: str
    problem: str


def _check(ok: bool, text: str, out: list[tuple[bool, str]]) -> None:
    out.append((ok, ("ok: " if ok else "FAIL: ") + text))


def _out_of_domain(candidate: dict[str, Any], max_drop: float, out: list[tuple[bool, str]]) -> None:
    """The candidate's out-of-domain nDCG@10 against the base model's on the same queries (evaluation.out_of_domain);
    a missing figure fails: the check is on, and a run that did not measure it shows nothing about forgetting."""
    new, base = candidate.get("ood_ndcg_at_10"), candidate.get("base_ood_ndcg_at_10")
    if new is None or base is None:
        missing = " and ".join(n for n, v in (("ood_ndcg_at_10", new), ("base_ood_ndcg_at_10", base)) if v is None)
        _check(False, f"{missing} missing from the candidate's report (the out-of-domain check is on)", out)
        return
    _check(
        new >= base - max_drop,
        f"ood_ndcg_at_10 {new:.4f} vs base model {base:.4f} on the same {candidate.get('ood_queries', '?')} held-out "
        f"PriceRunner offers: difference {new - base:+.4f} (>= -{max_drop} required)",
        out,
    )


def decide(
    candidate: dict[str, Any],
    champion: dict[str, Any] | UnreadableChampion | None,
    cfg: GateConfig,
    paired: PairedDifference | None = None,
) -> GateDecision:
    """Absolute floors, the out-of-domain check when it is on, then no regression against the champion when one
    exists.

    `champion`: the champion's report from the same evaluation code on the candidate's snapshot (its held-out terms
    and offers), None when there is no champion, or UnreadableChampion, which fails the gate. `paired`: the bootstrap
    CI of the per-query nDCG@10 difference (candidate - champion) on those terms (evaluation.paired).

    No regression:
    - nDCG@10, a paired test: passes when the CI's lower bound is >= -cfg.max_regression, i.e. the data are
      consistent with a drop of at most max_regression at the CI's confidence (a non-inferiority test). A candidate
      whose interval is too wide to show that (few held-out terms, noisy differences) keeps the champion.
    - category accuracy: candidate >= champion - cfg.max_regression (one figure over the same held-out offers).
    A champion report from another snapshot, or no paired comparison, fails: figures from different data are not
    compared.

    Out of domain (cfg.max_out_of_domain_drop, None = off): the candidate's ood_ndcg_at_10 >= its report's
    base_ood_ndcg_at_10 (the base model on the same offers) - max_out_of_domain_drop; a missing figure fails.
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
    if cfg.max_out_of_domain_drop is not None:
        _out_of_domain(candidate, cfg.max_out_of_domain_drop, checks)
    if champion is None:
        checks.append((True, "ok: no champion yet, floors alone decide"))
    elif isinstance(champion, UnreadableChampion):
        _check(
            False,
            f"champion version {champion.version} exists but cannot be evaluated ({champion.problem}): no "
            "comparison, no promotion; fix or re-register that version, or promote by hand",
            checks,
        )
    elif champion.get("snapshot_hash") != candidate.get("snapshot_hash"):
        _check(
            False,
            f"the champion was evaluated on snapshot {champion.get('snapshot_hash')}, the candidate on "
            f"{candidate.get('snapshot_hash')}: no comparison on different data",
            checks,
        )
    else:
        if paired is None:
            _check(False, "ndcg_at_10: no paired per-query comparison with the champion", checks)
        else:
            _check(
                paired.low >= -cfg.max_regression,
                f"ndcg_at_10 {paired.candidate:.4f} vs champion {paired.champion:.4f} on the same {paired.queries} "
                f"held-out terms: difference {paired.mean_difference:+.4f}, {paired.confidence:.0%} CI "
                f"[{paired.low:+.4f}, {paired.high:+.4f}] (lower bound >= -{cfg.max_regression} required)",
                checks,
            )
        new, old = candidate.get("category_accuracy"), champion.get("category_accuracy")
        if new is None or old is None:
            checks.append((True, "ok: category_accuracy not comparable with the champion (missing)"))
        else:
            _check(
                new >= old - cfg.max_regression,
                f"category_accuracy {new:.4f} vs champion {old:.4f} (tolerance {cfg.max_regression})",
                checks,
            )
    return GateDecision(passed=all(ok for ok, _ in checks), reasons=[text for _, text in checks])
