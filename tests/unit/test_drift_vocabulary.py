"""The retrain after drift extends the served vocabulary: what shoppers searched since @champion's snapshot (clicked
or not, held-out terms left out) is frozen in the snapshot and pruned into the vocabulary, checked on queries with
known new words against the launch snapshot's vocabulary."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import DataConfig
from pipelines.data.dataset import Snapshot, is_heldout_term, snapshot_data
from pipelines.data.feedback import (
    MAX_TERM_CHARS,
    SEARCHED_COLUMNS,
    SEARCHED_TABLE,
    FeedbackSource,
    searched_terms,
)
from pipelines.runtime.logfolder import partition_name, to_batch
from pipelines.runtime.request_log import SCHEMA as REQUEST_SCHEMA
from pipelines.runtime.request_log import RequestRecord
from tests.tiny_bert import save_tiny_model

AS_OF = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SMALL = {"max_terms": 300, "max_offers": 200, "event_users": 10}
# whole words of MiniLM's vocabulary that no home-improvement term, catalog title or appliance offer uses: a new
# product line the launch vocabulary splits into pieces (checked below, not assumed)
NEW_WORDS = ["zeppelin", "banjo", "sonata", "nebula", "saxophone", "harpsichord"]
# two searches per word, none of them a held-out term (those never reach the vocabulary: below)
NEW_QUERIES = [
    q
    for w in NEW_WORDS
    for q in [t for t in (f"{w} {k}" for k in ("stand", "case", "cover", "mount")) if not is_heldout_term(t)][:2]
]
# a new word searched only in held-out terms: it must not enter the vocabulary (the test set stays a fair test)
HELD_WORD = "volcano"
HELD_QUERY = next(q for i in range(200) if is_heldout_term(q := f"{HELD_WORD} lamp {i}"))


def _answers(rows: list[tuple[str, str | None]]) -> pd.DataFrame:
    return pd.DataFrame({"endpoint": [r[0] for r in rows], "query": [r[1] for r in rows]})


def test_searched_terms_count_every_search_and_leave_the_heldout_ones_out() -> None:
    rows = [("search", "Banjo Stand"), ("search", " banjo stand "), ("search", "banjo case"), ("search", HELD_QUERY)]
    rows += [("recommend", None), ("search", None), ("search", "  "), ("search", "x" * (MAX_TERM_CHARS + 1))]
    searched = searched_terms(_answers(rows))
    assert searched.to_dict("records") == [
        {"search_term": "banjo stand", "answers": 2},
        {"search_term": "banjo case", "answers": 1},
    ]
    assert dict(searched.dtypes.astype(str)) == {c: str(pd.Series(dtype=t).dtype) for c, t in SEARCHED_COLUMNS.items()}
    empty = searched_terms(_answers([("recommend", None)]))
    assert empty.empty and list(empty.columns) == list(SEARCHED_COLUMNS)


def _log(folder: Path, queries: list[tuple[str, datetime]]) -> None:
    records = [
        RequestRecord(f"r{i}", ts, "search", "1", q, None, 3, None, [1, 2, 3], [0.3, 0.2, 0.1], False, None, None, 5.0)
        for i, (q, ts) in enumerate(queries)
    ]
    part = folder / partition_name(AS_OF.date()) / "part-test-0.parquet"
    part.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_batches([to_batch(records, REQUEST_SCHEMA)]), part)


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Snapshot, Snapshot]:
    """The launch snapshot (no traffic read) and the drift-triggered retrain's: an hour of searches for the new
    product line since the champion's snapshot, without a single click, plus one searched before it."""
    root = tmp_path_factory.mktemp("drift-vocabulary")
    since, at = AS_OF - timedelta(days=1), AS_OF - timedelta(hours=1)
    queries = [(q, at + timedelta(seconds=i)) for i, q in enumerate([*NEW_QUERIES, NEW_QUERIES[0], HELD_QUERY])]
    _log(root / "requests", [*queries, ("tuxedo stand", since - timedelta(hours=1))])
    cfg = DataConfig(**SMALL)
    launch = snapshot_data(cfg, root / "launch", AS_OF)
    drift = snapshot_data(cfg, root / "drift", AS_OF, feedback=FeedbackSource(since, root / "requests", root / "no"))
    return launch, drift


def test_the_snapshot_freezes_what_was_searched_since_the_champion(snapshots: tuple[Snapshot, Snapshot]) -> None:
    from pipelines.data.validate import validate_frame

    launch, drift = snapshots
    assert launch.table(SEARCHED_TABLE).empty
    searched = drift.table(SEARCHED_TABLE)
    assert set(searched["search_term"]) == set(NEW_QUERIES)  # not the held-out one, nor the one before `since`
    assert searched.set_index("search_term").loc[NEW_QUERIES[0], "answers"] == 2
    assert launch.hash != drift.hash
    checked = validate_frame(searched, "searched")
    assert checked.success and checked.evaluated > 0
    assert not validate_frame(pd.concat([searched, searched]), "searched").success  # one row per term


def test_vocabulary_texts_count_a_searched_term_as_often_as_it_was_searched_up_to_min_count(
    snapshots: tuple[Snapshot, Snapshot],
) -> None:
    from pipelines.compression.variants import vocabulary_texts

    launch, drift = snapshots
    assert not set(NEW_QUERIES) & set(vocabulary_texts(launch))
    once = vocabulary_texts(drift)
    assert set(NEW_QUERIES) <= set(once) and once.count(NEW_QUERIES[0]) == 1
    assert HELD_QUERY.lower() not in once
    counted = vocabulary_texts(drift, min_count=3)
    assert counted.count(NEW_QUERIES[0]) == 2 and counted.count(NEW_QUERIES[1]) == 1  # searched twice, once
    assert sorted(set(counted)) == sorted(once)


def test_the_retrained_vocabulary_holds_the_new_words(snapshots: tuple[Snapshot, Snapshot], tmp_path: Path) -> None:
    """Pruned on the launch snapshot, the new words are split into pieces (the monitor's vocabulary misses); pruned
    on the drift retrain's snapshot, each is one token of the served vocabulary and the misses are gone."""
    from transformers import AutoTokenizer

    from pipelines.compression.prune import prune_vocabulary_dir
    from pipelines.compression.variants import vocabulary_texts
    from pipelines.monitoring.vocabulary import vocabulary_stats
    from pipelines.training.finetune import ENCODER_DIR

    model = save_tiny_model(tmp_path / "model", ["a", "b"])
    stats = {}
    for snap in snapshots:
        out = tmp_path / Path(snap.path).name
        prune_vocabulary_dir(model, out, vocabulary_texts(snap), 16)
        tokenizer = AutoTokenizer.from_pretrained(out / ENCODER_DIR)
        stats[Path(snap.path).name] = vocabulary_stats(tokenizer.backend_tokenizer, NEW_QUERIES + [HELD_QUERY])
        if Path(snap.path).name == "drift":
            assert all(tokenizer.tokenize(w) == [w] for w in NEW_WORDS)
            assert tokenizer.tokenize(HELD_WORD) != [HELD_WORD]
    launch, drift = stats["launch"], stats["drift"]
    assert {w for w, _ in launch.top_missed} >= set(NEW_WORDS), launch
    assert launch.missed_words >= len(NEW_QUERIES)
    assert [w for w, _ in drift.top_missed] == [HELD_WORD], drift  # only the held-out word is still split
    assert drift.unk_tokens == launch.unk_tokens == 0  # single characters are kept: pieces, never [UNK]
