"""One window's measurements, from the request log's rows, the feedback events, the champion's bundle and its
reference terms: small JSON for the DAG, the drift report as an HTML file."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipelines.config import MonitorConfig
from pipelines.monitoring.decision import DriftResult, WindowSignals
from pipelines.monitoring.vocabulary import load_tokenizer, vocabulary_stats
from pipelines.monitoring.windows import (
    answer_health,
    current_window,
    engagement_by_version,
    reference_window,
    sample_terms,
    search_answers,
)
from pipelines.runtime.bundle import TOKENIZER_FILE


def measure_window(
    answers_log: pa.Table,
    events: pa.Table,
    bundle_dir: Path | None,
    reference_terms: Sequence[str],
    cfg: MonitorConfig,
    report_path: Path,
) -> dict[str, Any]:
    """Health and engagement always; with a champion's bundle, the vocabulary misses of both sides, and with at least
    cfg.min_queries queries in the window, the drift tests (query text, query embedding, category) and their report
    at `report_path`. `notes` says what was skipped and why."""
    from pipelines.runtime.encoder import OnnxEncoder

    answers = search_answers(answers_log)
    out: dict[str, Any] = {
        "health": answer_health(answers, cfg.low_score),
        "engagement": engagement_by_version(answers, events),
        "vocabulary": None,
        "reference_vocabulary": None,
        "drift": {},
        "report_path": None,
        "notes": [],
    }
    if bundle_dir is None:
        out["notes"].append("no @champion: nothing to compare the window with")
        return out
    terms = sample_terms(reference_terms, cfg.reference_queries)
    current = current_window(answers, cfg.distinct_queries)
    tokenizer = load_tokenizer(bundle_dir / TOKENIZER_FILE)
    out["vocabulary"] = vocabulary_stats(tokenizer, current.texts).to_dict()
    out["reference_vocabulary"] = vocabulary_stats(tokenizer, terms).to_dict()
    out["reference_queries"], out["window_queries"] = len(terms), len(current)
    if len(current) < cfg.min_queries:
        out["notes"].append(
            f"{len(current)} queries in the window, fewer than min_queries {cfg.min_queries}: no drift test"
        )
        return out
    from pipelines.monitoring.drift import drift_tests

    encoder = OnnxEncoder.load(bundle_dir)
    ref_emb, ref_logits = encoder.encode(terms)
    ref_categories = [a.category for a in encoder.categories(ref_logits, ref_emb)]
    cur_emb, _ = encoder.encode(current.texts)
    results, html = drift_tests(reference_window(terms, ref_categories), current, ref_emb, cur_emb, cfg)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(html)
    out["drift"] = {signal: asdict(result) for signal, result in results.items()}
    out["report_path"] = str(report_path)
    return out


def signals_of(measured: dict[str, Any], feature_age_s: dict[str, float | None]) -> WindowSignals:
    """The decision's input from measure_window's JSON and the feature ages."""
    health = measured["health"]
    vocab, ref_vocab = measured.get("vocabulary") or {}, measured.get("reference_vocabulary") or {}
    return WindowSignals(
        drift={s: DriftResult(**r) for s, r in (measured.get("drift") or {}).items()},
        vocab_miss_ratio=vocab.get("miss_ratio"),
        reference_vocab_miss_ratio=ref_vocab.get("miss_ratio"),
        empty_rate=health.get("empty_rate"),
        low_score_rate=health.get("low_score_rate"),
        latency_p99_ms=health.get("latency_p99_ms"),
        feature_age_s=dict(feature_age_s),
    )
