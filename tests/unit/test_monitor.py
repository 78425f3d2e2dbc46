"""The monitor's core on hand-built windows: drift tests (no drift -> no alarm, a shifted window -> alarm), the
vocabulary miss rate on texts with known new words, answer health, engagement, the pure decision and when a window
announces drift (the Asset that schedules retraining)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipelines.config import MonitorConfig, Paths
from pipelines.monitoring import records
from pipelines.monitoring.decision import (
    DRIFT_SIGNALS,
    DriftResult,
    WindowSignals,
    decide,
    retrain_alarms,
    should_announce_drift,
)
from pipelines.monitoring.vocabulary import vocabulary_stats
from pipelines.monitoring.windows import (
    ABSTAINED,
    CATEGORY,
    QUERY,
    Window,
    answer_health,
    current_window,
    engagement_by_version,
    sample_terms,
)
from pipelines.runtime.event_log import SCHEMA as EVENT_SCHEMA

CFG = MonitorConfig()
HOME = ["cordless", "drill", "hammer", "paint", "white", "wood", "stain", "deck", "screws", "led", "bulb", "toilet"]
HOME += ["seat", "garden", "hose", "patio", "chair", "door", "knob", "faucet", "kitchen", "ceiling", "fan", "tile"]
GADGETS = ["iphone", "case", "hdmi", "cable", "laptop", "charger", "gaming", "mouse", "bluetooth", "headphones", "usb"]
GADGETS += ["webcam", "tablet", "stand", "smartwatch", "band", "router", "monitor", "keyboard", "ssd", "drive", "tv"]
HOME_CATEGORIES = {ABSTAINED: 0.8, "Fridges": 0.1, "Freezers": 0.1}
GADGET_CATEGORIES = {"Mobile Phones": 0.5, "TVs": 0.3, ABSTAINED: 0.2}


def window(
    words: list[str], categories: dict[str, float], n: int, shift: float, seed: int
) -> tuple[Window, np.ndarray]:
    """n queries of 2-3 words from `words`, categories drawn with the given shares, and 32-d unit embeddings drawn
    around a mean `shift` away from the origin's (a hand-built stand-in for the encoder)."""
    rng = np.random.default_rng(seed)
    queries = [" ".join(rng.choice(words, size=rng.integers(2, 4), replace=False)) for _ in range(n)]
    cats = rng.choice(list(categories), size=n, p=list(categories.values()))
    emb = rng.normal(size=(n, 32))
    emb[:, :4] += shift
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return Window(pd.DataFrame({QUERY: queries, CATEGORY: cats})), emb


def test_a_window_like_the_reference_raises_no_drift_alarm() -> None:
    from pipelines.monitoring.drift import drift_tests

    reference, ref_emb = window(HOME, HOME_CATEGORIES, 400, 0.0, seed=1)
    current, cur_emb = window(HOME, HOME_CATEGORIES, 120, 0.0, seed=2)
    results, html = drift_tests(reference, current, ref_emb, cur_emb, CFG)
    assert set(results) == set(DRIFT_SIGNALS)
    assert not any(r.detected for r in results.values()), results
    decision = decide(WindowSignals(drift=results), CFG)
    assert decision.alarms == dict.fromkeys(DRIFT_SIGNALS, False) and not decision.alarm
    assert "<html" in html.lower()


def test_a_shifted_window_raises_every_drift_alarm() -> None:
    from pipelines.monitoring.drift import drift_tests

    reference, ref_emb = window(HOME, HOME_CATEGORIES, 400, 0.0, seed=1)
    current, cur_emb = window(GADGETS, GADGET_CATEGORIES, 120, 1.0, seed=3)
    results, _ = drift_tests(reference, current, ref_emb, cur_emb, CFG)
    assert all(r.detected for r in results.values()), results
    decision = decide(WindowSignals(drift=results), CFG)
    assert decision.drift_detected and decision.alarms == dict.fromkeys(DRIFT_SIGNALS, True)


def test_one_category_on_both_sides_is_no_drift_with_an_undefined_score() -> None:
    """Chi-square of a single value (every answer abstained, as for Home Depot terms) has no p-value: Evidently
    says no drift, and the score is kept as None (JSON and MLflow take no NaN)."""
    from pipelines.monitoring.drift import drift_tests

    cfg = MonitorConfig(text_drift_method="abs_text_content_drift", text_drift_threshold=0.55)
    reference, ref_emb = window(HOME, {ABSTAINED: 1.0}, 200, 0.0, seed=1)
    current, cur_emb = window(HOME, {ABSTAINED: 1.0}, 60, 0.0, seed=2)
    results, _ = drift_tests(reference, current, ref_emb, cur_emb, cfg)
    assert results["category"].score is None and not results["category"].detected
    assert "score undefined" in " ".join(decide(WindowSignals(drift=results), cfg).reasons)


def wordpiece(words: list[str]):
    """A MiniLM-style tokenizer (BERT normalizer and pre-tokenizer, WordPiece) over a known vocabulary: `words`, the
    single ASCII letters and their ## continuations, as a pruned vocabulary keeps them."""
    import string

    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words, *string.ascii_lowercase]
    tokens += [f"##{c}" for c in string.ascii_lowercase]
    tok = Tokenizer(WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok


def test_vocabulary_miss_rate_counts_the_known_new_words() -> None:
    tok = wordpiece(HOME)
    stats = vocabulary_stats(tok, ["Cordless DRILL", "zorblax drill", "paint quixotic zorblax", "led ☃ bulb"])
    # 10 words: zorblax (twice) and quixotic are new; the snowman is one word the vocabulary cannot spell at all
    assert stats.words == 10 and stats.missed_words == 4 and stats.miss_ratio == pytest.approx(0.4)
    assert dict(stats.top_missed) == {"zorblax": 2, "quixotic": 1, "☃": 1}
    assert stats.unk_tokens == 1  # new words split into letters; only the snowman is [UNK]
    assert stats.unk_ratio == pytest.approx(1 / stats.tokens)
    assert vocabulary_stats(tok, ["white wood stain", "toilet seat"]).miss_ratio == 0.0
    assert vocabulary_stats(tok, []).miss_ratio is None


@pytest.mark.parametrize(
    ("window_ratio", "alarm"),
    [(0.10, False), (0.149, False), (0.151, True), (0.40, True)],
)
def test_vocabulary_alarm_is_relative_to_the_reference(window_ratio: float, alarm: bool) -> None:
    decision = decide(WindowSignals(vocab_miss_ratio=window_ratio, reference_vocab_miss_ratio=0.10), CFG)
    assert decision.vocab_miss_threshold == pytest.approx(0.10 + CFG.vocab_miss_margin)
    assert decision.alarms == {"vocabulary": alarm}


@pytest.mark.parametrize(
    ("signals", "expected"),
    [
        (WindowSignals(), {}),  # nothing measured: nothing alarms, nothing passes
        (WindowSignals(empty_rate=0.01, low_score_rate=0.1), {"empty_answers": False, "low_scores": False}),
        (WindowSignals(empty_rate=0.2), {"empty_answers": True}),
        (WindowSignals(low_score_rate=0.9), {"low_scores": True}),
        (WindowSignals(latency_p99_ms=49.0), {"latency": False}),
        (WindowSignals(latency_p99_ms=51.0), {"latency": True}),
        (
            WindowSignals(feature_age_s={"user_activity": 600.0, "product_popularity": 3 * 3600.0}),
            {"feature_age:user_activity": False, "feature_age:product_popularity": True},
        ),
        (WindowSignals(feature_age_s={"user_activity": None}), {"feature_age:user_activity": True}),
        (
            WindowSignals(drift={"category": DriftResult(0.01, True, "chisquare", 0.05)}),
            {"category": True},
        ),
    ],
)
def test_decision_table(signals: WindowSignals, expected: dict[str, bool]) -> None:
    decision = decide(signals, CFG)
    assert decision.alarms == expected
    assert decision.alarm == any(expected.values())
    assert len(decision.reasons) >= len(expected)


END = datetime(2026, 3, 1, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    ("alarmed", "previous", "go", "reason"),
    [
        ((), None, False, "no drift or vocabulary-miss alarm"),
        (("vocabulary",), None, True, "vocabulary alarmed against @champion v3: asking for a retrain"),
        (("query_text", "category"), None, True, "query_text, category alarmed"),
        # the same champion announced an hour ago: that retrain was asked for already
        (("vocabulary",), ("3", END - timedelta(hours=1)), False, "already announced drift for v3"),
        (("vocabulary",), ("3", END - timedelta(hours=23, minutes=59)), False, "retrain_cooldown_hours 24"),
        (("vocabulary",), ("3", END - timedelta(hours=24)), True, "asking for a retrain"),  # the cool-down is over
        (("vocabulary",), ("3", END), False, "already announced"),  # a re-run of the announced window
        (("vocabulary",), ("3", END + timedelta(hours=2)), False, "already announced"),  # a backfill of an older one
        (("vocabulary",), ("2", END - timedelta(hours=1)), True, "asking for a retrain"),  # a new champion
        (("vocabulary",), (None, END - timedelta(hours=1)), True, "asking for a retrain"),  # emitted by hand
    ],
)
def test_when_a_window_announces_drift(
    alarmed: tuple[str, ...], previous: tuple[str | None, datetime] | None, go: bool, reason: str
) -> None:
    announcement = should_announce_drift(alarmed, "3", END, previous, CFG.retrain_cooldown_hours)
    assert announcement.go is go and reason in announcement.reason, announcement


def test_only_drift_and_vocabulary_alarms_ask_for_a_retrain() -> None:
    alarms = {"latency": True, "feature_age:user_activity": True, "vocabulary": True, "query_text": False}
    assert retrain_alarms(alarms) == ("vocabulary",)
    assert retrain_alarms({"category": True, "query_embedding": True}) == ("query_embedding", "category")
    assert retrain_alarms({"empty_answers": True, "low_scores": True}) == ()
    assert should_announce_drift((), "3", END, None, 0).go is False  # a cool-down of 0 still needs an alarm


def test_the_announcement_carries_the_reason_in_the_asset_events_extra() -> None:
    from pipelines.steps.monitor import announce_drift

    recorded = {
        "alarms": {"vocabulary": True, "query_text": False, "latency": True},
        "reasons": [
            "query_text: ok, no drift (perc_text_content_drift score 0.5, threshold 0.95)",
            "vocabulary: ALARM, share of words outside the vocab 0.31 > 0.12",
            "latency: ALARM, search latency p99 ms 80 > 50",
        ],
        "window_start": (END - timedelta(hours=1)).isoformat(),
        "window_end": END.isoformat(),
        "model_version": "3",
        "mlflow_run_id": "abc",
    }
    first = announce_drift({"profile": "tiny"}, recorded, None)
    assert first["announce"], first
    assert first["extra"] == {
        "reason": "monitor window 2026-03-01T11:00:00+00:00 -> 2026-03-01T12:00:00+00:00 against @champion v3: "
        "vocabulary: ALARM, share of words outside the vocab 0.31 > 0.12",
        "alarms": ["vocabulary"],
        "window_start": recorded["window_start"],
        "window_end": recorded["window_end"],
        "model_version": "3",
        "monitor_run_id": "abc",
    }
    json.dumps(first)  # an XCom and an asset event's extra
    again = announce_drift({"profile": "tiny"}, recorded, {"extra": first["extra"], "timestamp": "unused"})
    assert not again["announce"] and "already announced" in again["reason"]
    # the previous event without our extra (emitted by hand): its own time stands for its window
    by_hand = {"extra": {}, "timestamp": (END - timedelta(hours=30)).isoformat()}
    assert announce_drift({"profile": "tiny"}, recorded, by_hand)["announce"]
    quiet = announce_drift({"profile": "tiny"}, {**recorded, "alarms": {"latency": True}}, None)
    assert not quiet["announce"] and quiet["extra"]["alarms"] == []


def answers(rows: list[tuple[str, str | None, list[float], float, str]]) -> pd.DataFrame:
    """Search answers as the request log holds them: (query, category, scores, latency_ms, model_version)."""
    return pd.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(len(rows))],
            "endpoint": "search",
            QUERY: [r[0] for r in rows],
            CATEGORY: [r[1] for r in rows],
            "product_ids": [list(range(len(r[2]))) for r in rows],
            "scores": [r[2] for r in rows],
            "latency_ms": [r[3] for r in rows],
            "model_version": [r[4] for r in rows],
        }
    )


def test_answer_health_engagement_and_the_current_window() -> None:
    frame = answers(
        [
            ("drill", None, [0.9, 0.5], 10.0, "3"),
            ("Drill", None, [0.8], 20.0, "3"),
            ("zorblax", "TVs", [], 30.0, "3"),
            ("paint", None, [0.2, 0.1], 40.0, "4"),
        ]
    )
    health = answer_health(frame, low_score=0.5)
    assert health["requests"] == 4 and health["distinct_queries"] == 3
    assert health["empty_rate"] == 0.25 and health["low_score_rate"] == pytest.approx(1 / 3)
    assert health["latency_p50_ms"] == 25.0 and 39.0 < health["latency_p99_ms"] <= 40.0
    ts = datetime(2026, 12, 3, 11, 30, tzinfo=UTC)
    events = pa.Table.from_pylist(
        [
            {
                "ts": ts,
                "request_id": r,
                "user_id": 1,
                "product_id": 0,
                "event_type": e,
                "event_timestamp": ts,
                "position": 0,
                "model_version": v,
            }
            for r, e, v in [
                ("r0", "click", "3"),
                ("r0", "click", "3"),
                ("r1", "add_to_cart", "3"),
                ("r3", "click", "4"),
            ]
        ],
        schema=EVENT_SCHEMA,
    )
    by_version = {e["model_version"]: e for e in engagement_by_version(frame, events)}
    assert by_version["3"] == {"model_version": "3", "searches": 3, "ctr": 1 / 3, "add_to_cart_rate": 1 / 3}
    assert by_version["4"]["ctr"] == 1.0 and by_version["4"]["add_to_cart_rate"] == 0.0
    distinct = current_window(frame, distinct=True)
    assert distinct.texts == ["drill", "zorblax", "paint"]
    assert distinct.queries[CATEGORY].tolist() == [ABSTAINED, "TVs", ABSTAINED]
    assert len(current_window(frame, distinct=False)) == 4
    assert sample_terms(["b", "a", " a ", "", "c"], 10) == ["a", "b", "c"]
    assert sample_terms([f"t{i}" for i in range(100)], 10) == sample_terms([f"t{i}" for i in range(100)], 10)


def test_window_table_and_textfile_keep_the_newest_window(tmp_path, monkeypatch) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    paths = Paths(tmp_path)
    monkeypatch.delenv(records.TEXTFILE_ENV, raising=False)
    end = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    signals = WindowSignals(
        drift={"query_text": DriftResult(0.9, True, "perc_text_content_drift", 0.95)},
        vocab_miss_ratio=0.3,
        reference_vocab_miss_ratio=0.1,
        feature_age_s={"user_activity": 100.0, "product_popularity": None},
    )
    decision = decide(signals, CFG)
    measured = {
        "health": {"requests": 50, "distinct_queries": 40, "empty_rate": 0.0, "latency_p99_ms": 12.0},
        "vocabulary": {"miss_ratio": 0.3, "unk_ratio": 0.0},
        "drift": {"query_text": {"score": 0.9, "detected": True}},
        "model_version": "7",
        "engagement": [{"model_version": "7", "searches": 50, "ctr": 0.1, "add_to_cart_rate": 0.02}],
    }
    for hours_back in (0, 1):  # the newest window first, then a backfill of the one before it
        start = end - timedelta(hours=hours_back + 1)
        row = records.window_row(
            start, end - timedelta(hours=hours_back), measured, decision, signals.feature_age_s, "run"
        )
        records.write_window(paths, row)
        written = records.write_textfile(paths, row, decision)
        assert (written is None) == (hours_back == 1)
    table = records.read_windows(paths)
    assert table.num_rows == 2 and table["window_end"][-1].as_py() == end
    assert json.loads(table["alarms"][-1].as_py())["vocabulary"] is True
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(records.textfile_path(paths).read_text())
        for s in family.samples
    }
    assert samples[("shopguide_monitor_last_success_timestamp_seconds", ())] == end.timestamp()
    assert samples[("shopguide_monitor_drift_detected", (("signal", "query_text"),))] == 1.0
    assert ("shopguide_monitor_drift_detected", (("signal", "category"),)) not in samples  # not tested: absent
    assert samples[("shopguide_monitor_vocab_miss_ratio", ())] == 0.3
    assert samples[("shopguide_monitor_vocab_miss_threshold", ())] == pytest.approx(0.15)
    assert samples[("shopguide_monitor_feature_age_seconds", (("feature_view", "user_activity"),))] == 100.0
    assert samples[("shopguide_monitor_feature_age_seconds", (("feature_view", "product_popularity"),))] == float("inf")
    table_rows = records.health_table(table.slice(1).to_pylist()[0], CFG)
    assert ("query_text drift", "0.9", "library test", "ALARM") in table_rows
    assert ("v7 CTR", "0.1", "-", "-") in table_rows
