"""Great Expectations validation: the shipped data passes, broken inputs fail with a short report naming the rule,
and every snapshot run leaves Data Docs (logged to MLflow by the retrain step, failed runs too)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from pipelines.config import REPO_ROOT, DataConfig
from pipelines.data.dataset import HOMEDEPOT_FILE, SNAPSHOT_TABLES, Snapshot, normalize_term, snapshot_data
from pipelines.data.validate import (
    DOCS_SAMPLE_VALUES,
    MAX_TERM_CHARS,
    SAMPLE_VALUES,
    VALUE_CHARS,
    DataValidationError,
    validate_events,
    validate_frame,
    validate_snapshot,
)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    cfg = DataConfig(max_terms=300, max_offers=2000, event_users=50)
    return snapshot_data(cfg, tmp_path_factory.mktemp("snapshot"), as_of=datetime(2026, 1, 1, tzinfo=UTC))


def broken(snapshot: Snapshot, tmp_path: Path, table: str, mutate: Callable[[pd.DataFrame], pd.DataFrame]) -> Path:
    """A copy of the snapshot with one table rewritten by `mutate`."""
    out = tmp_path / "broken"
    shutil.copytree(snapshot.path, out)
    mutate(snapshot.table(table)).to_parquet(out / f"{table}.parquet", index=False)
    return out


def failure_report(path: Path) -> DataValidationError:
    with pytest.raises(DataValidationError) as info:
        validate_snapshot(path)
    return info.value


def set_value(column: str, row: int, value: object) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def mutate(df: pd.DataFrame) -> pd.DataFrame:
        df.loc[row, column] = value
        return df

    return mutate


def test_shipped_snapshot_passes(snapshot: Snapshot) -> None:
    summary = validate_snapshot(snapshot.path)
    assert summary["success"] is True
    assert summary["hash"] == snapshot.hash
    assert set(summary["checks"]) == {
        *SNAPSHOT_TABLES,
        "term_leakage",
        "feedback_term_leakage",
        "searched_term_leakage",
        "cluster_leakage",
    }
    assert all(check["failed"] == 0 for check in summary["checks"].values())
    assert summary["checks"]["judgments_train"]["rows"] == len(snapshot.table("judgments_train"))
    assert summary["expectations"] == sum(check["expectations"] for check in summary["checks"].values()) > 50
    assert Path(summary["data_docs"]).is_file()
    json.dumps(summary)  # small JSON values for an Airflow XCom


def test_data_docs_are_built_in_the_run_folder_and_replaced_on_a_rerun(snapshot: Snapshot, tmp_path: Path) -> None:
    for _ in range(2):  # a retried task: the second run must neither fail on the first's project nor list it
        index = Path(validate_snapshot(snapshot.path, tmp_path / "validation")["data_docs"])
    assert index.name == "index.html" and index.is_relative_to(tmp_path / "validation")
    html = index.read_text()
    assert all(suite in html for suite in ("judgments", "offers", "events", "term_leakage", "cluster_leakage"))
    pages = list(index.parent.glob("validations/**/*.html"))
    assert len(pages) == len(SNAPSHOT_TABLES) + 4  # one page per table and per leakage rule, this run's only


def test_missing_column_is_one_readable_line(snapshot: Snapshot, tmp_path: Path) -> None:
    error = failure_report(broken(snapshot, tmp_path, "judgments_train", lambda df: df.drop(columns="relevance")))
    lines = [line for line in error.report.splitlines() if "judgments_train.relevance" in line]
    assert len(lines) == 1
    assert "column 'relevance' is missing" in lines[0]
    assert "expect_column_to_exist" in lines[0] and "expect_column_values_to_be_between" in lines[0]
    assert "Traceback" not in error.report and "BatchData" not in error.report
    assert {f["missing_column"] for f in error.failures} == {"relevance"}
    # the failing run still has its Data Docs, and the report says where
    assert error.data_docs and Path(error.data_docs).is_file()
    assert error.report.endswith(f"Data Docs: {error.data_docs}")


def test_leakage_rule_without_its_column_is_left_to_the_table_suite(snapshot: Snapshot, tmp_path: Path) -> None:
    error = failure_report(broken(snapshot, tmp_path, "judgments_train", lambda df: df.drop(columns="search_term")))
    assert "- judgments_train.search_term: column 'search_term' is missing" in error.report
    assert "term_leakage" not in error.report


def test_null_search_term(snapshot: Snapshot, tmp_path: Path) -> None:
    error = failure_report(broken(snapshot, tmp_path, "judgments_heldout", set_value("search_term", 3, pd.NA)))
    n_rows = len(snapshot.table("judgments_heldout"))
    assert (
        f"- judgments_heldout.search_term: expect_column_values_to_not_be_null (suite judgments): 1 of {n_rows} "
        "rows failed\n"
    ) in error.report
    (failure,) = error.failures
    assert failure["suite"] == "judgments" and failure["column"] == "search_term"
    assert failure["unexpected_count"] == 1


def test_empty_search_term(snapshot: Snapshot, tmp_path: Path) -> None:
    error = failure_report(broken(snapshot, tmp_path, "judgments_train", set_value("search_term", 0, "")))
    assert "- judgments_train.search_term: expect_column_value_lengths_to_be_between (suite judgments): 1 of " in (
        error.report
    )
    assert "e.g. ['']" in error.report


def test_relevance_outside_grades(snapshot: Snapshot, tmp_path: Path) -> None:
    error = failure_report(broken(snapshot, tmp_path, "judgments_train", set_value("relevance", 5, 7.0)))
    assert error.report.startswith("Data validation failed: 1 of ")
    line = error.report.splitlines()[1]
    n_rows = len(snapshot.table("judgments_train"))
    assert line == (
        f"- judgments_train.relevance: expect_column_values_to_be_between (suite judgments): 1 of {n_rows} rows "
        "failed, e.g. [7.0]"
    )
    assert error.failures[0]["unexpected_values"] == ["7.0"]


def test_duplicate_id(snapshot: Snapshot, tmp_path: Path) -> None:
    def duplicate(df: pd.DataFrame) -> pd.DataFrame:
        df.loc[1, "id"] = df.loc[0, "id"]
        return df

    error = failure_report(broken(snapshot, tmp_path, "judgments_train", duplicate))
    first_id = int(snapshot.table("judgments_train").loc[0, "id"])
    assert "- judgments_train.id: expect_column_values_to_be_unique (suite judgments): 2 of " in error.report
    assert f"e.g. [{first_id}]" in error.report


def test_unknown_event_type(snapshot: Snapshot) -> None:
    events = snapshot.table("events")
    events.loc[2, "event_type"] = "refund"
    with pytest.raises(DataValidationError) as info:
        validate_events(events)
    assert "- events.event_type: expect_column_values_to_be_in_set (suite events): 1 of " in info.value.report
    assert "e.g. ['refund']" in info.value.report
    assert info.value.failures[0]["expectation"] == "expect_column_values_to_be_in_set"


def test_events_alone_pass_and_bad_user_id(snapshot: Snapshot) -> None:
    events = snapshot.table("events")
    assert validate_events(events)["failed"] == 0
    events.loc[0, "user_id"] = 0
    with pytest.raises(DataValidationError, match=r"events\.user_id: expect_column_values_to_be_between"):
        validate_events(events)


def test_heldout_term_injected_into_training(snapshot: Snapshot, tmp_path: Path) -> None:
    held = snapshot.table("judgments_heldout").iloc[[0]]
    term = normalize_term(held["search_term"].iloc[0])

    def inject(df: pd.DataFrame) -> pd.DataFrame:
        # Case and padding differ, the normalised term is the same query: still a leak.
        leak = held.assign(id=int(df["id"].max()) + 1, search_term=f"  {term.upper()} ")
        return pd.concat([df, leak], ignore_index=True)

    error = failure_report(broken(snapshot, tmp_path, "judgments_train", inject))
    expected = "- term_leakage.normalized_search_term: expect_column_values_to_not_be_in_set (suite term_leakage): "
    assert expected + f"1 of {len(snapshot.table('judgments_train')) + 1} rows failed" in error.report
    assert f"e.g. [{term!r}]" in error.report
    assert [f["suite"] for f in error.failures] == ["term_leakage"]


def test_test_cluster_in_training_offers(snapshot: Snapshot, tmp_path: Path) -> None:
    test_offer = snapshot.table("offers_test").iloc[[0]]
    error = failure_report(broken(snapshot, tmp_path, "offers_train", lambda df: pd.concat([df, test_offer])))
    assert "- cluster_leakage.cluster_id: expect_column_values_to_not_be_in_set (suite cluster_leakage): " in (
        error.report
    )
    assert f"e.g. [{int(test_offer['cluster_id'].iloc[0])}]" in error.report


def test_report_lists_all_failures_of_all_suites(snapshot: Snapshot, tmp_path: Path) -> None:
    path = broken(snapshot, tmp_path, "judgments_train", set_value("relevance", 0, 0.5))
    set_value("product_title", 0, None)(snapshot.table("catalog")).to_parquet(path / "catalog.parquet", index=False)
    (path / "events.parquet").unlink()
    error = failure_report(path)
    assert error.report.startswith("Data validation failed: 3 of ")
    assert "judgments_train.relevance" in error.report
    assert "catalog.product_title: expect_column_values_to_not_be_null" in error.report
    assert "- events: events.parquet is missing from the snapshot" in error.report
    json.dumps(error.failures)


def test_validate_frame_reports_without_raising(snapshot: Snapshot) -> None:
    catalog = snapshot.table("catalog")
    ok = validate_frame(catalog, "catalog")
    assert ok.success and ok.failures == [] and ok.evaluated > 0
    bad = validate_frame(pd.concat([catalog, catalog.iloc[[0]]], ignore_index=True), "catalog")
    assert not bad.success
    assert [(f["column"], f["expectation"]) for f in bad.failures] == [
        ("product_uid", "expect_column_values_to_be_unique")
    ]
    with pytest.raises(KeyError, match="unknown suite"):
        validate_frame(catalog, "nope")


def test_wrong_dtype_is_reported(snapshot: Snapshot) -> None:
    judgments = snapshot.table("judgments_train").astype({"relevance": "string"})
    summary = validate_frame(judgments, "judgments")
    type_failures = [f for f in summary.failures if f["expectation"] == "expect_column_values_to_be_in_type_list"]
    assert [(f["column"], f["observed_value"]) for f in type_failures] == [("relevance", "str")]


def _echoes(project: Path, filler: str) -> dict[str, int]:
    """Over every file GX wrote (stored results, suites, Data Docs): the longest run of the hostile value's filler
    character, how many raw `<script>` tags and how many HTML-escaped ones."""
    texts = [
        f.read_text(errors="replace") for f in project.rglob("*") if f.is_file() and f.suffix in {".html", ".json"}
    ]
    assert texts, f"no GX files under {project}"
    runs = [len(m) for text in texts for m in re.findall(f"(?i){re.escape(filler)}+", text)]
    return {
        "longest_run": max(runs, default=0),
        "raw_script": sum(text.lower().count("<script>alert") for text in texts),
        "escaped_script": sum(text.lower().count("&lt;script&gt;alert") for text in texts),
    }


def test_a_hostile_value_is_never_echoed_whole(snapshot: Snapshot, tmp_path: Path) -> None:
    events = snapshot.table("events")
    hostile = "<script>alert(1)</script>\n" + "x" * 100_000
    # more distinct bad values than any sample shows, each far longer than the cut
    events.loc[0:24, "event_type"] = [f"{i}{hostile}" for i in range(25)]
    with pytest.raises(DataValidationError) as info:
        validate_events(events, tmp_path)
    message = str(info.value)
    header, line, docs = message.splitlines()  # newlines in the data stay escaped: one line per failure
    assert header.startswith("Data validation failed: 1 of ") and docs.startswith("Data Docs: ")
    assert line.startswith("- events.event_type: expect_column_values_to_be_in_set (suite events): 25 of ")
    (failure,) = info.value.failures
    assert len(failure["unexpected_values"]) == SAMPLE_VALUES
    assert all(len(v) <= VALUE_CHARS for v in failure["unexpected_values"])
    assert "x" * VALUE_CHARS not in message and len(message) < 600 + len(docs)
    # GX's stored result and its Data Docs: at most DOCS_SAMPLE_VALUES values, each cut, and escaped in the page
    # (GX 1.x writes its sampled unexpected values into the HTML unescaped: a <script> there runs on opening it)
    echoes = _echoes(tmp_path, "x")
    assert echoes["longest_run"] == VALUE_CHARS - 3 - len("0<script>alert(1)</script>\n")  # the cut sample
    assert echoes["raw_script"] == 0
    assert 0 < echoes["escaped_script"] <= 3 * DOCS_SAMPLE_VALUES  # the stored list, its counts, the page's table
    (result_json,) = tmp_path.glob("gx/uncommitted/validations/events/**/*.json")
    (details,) = [r["result"] for r in json.loads(result_json.read_text())["results"] if not r["success"]]
    assert len(details["partial_unexpected_list"]) == DOCS_SAMPLE_VALUES
    assert all(len(v) <= 2 * VALUE_CHARS for v in details["partial_unexpected_list"])  # cut, then escaped
    assert Path(info.value.data_docs).is_file()


def test_a_hostile_search_term_in_a_landed_csv_is_reported_as_a_short_sample(tmp_path: Path) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    df = pd.read_csv(HOMEDEPOT_FILE, encoding="latin-1", nrows=250)
    hostile = "<script>alert(document.cookie)</script>" + "q" * 9_960  # 10,000 characters
    df.loc[3, "search_term"] = hostile
    df.to_csv(landing / "judgments.csv", index=False)
    cfg = DataConfig(judgments_path="judgments.csv", max_offers=500, event_users=20)
    snap = snapshot_data(cfg, tmp_path / "snapshot", datetime(2026, 1, 1, tzinfo=UTC), landing=landing)
    with pytest.raises(DataValidationError) as info:
        validate_snapshot(snap.path, tmp_path / "validation")
    report = info.value.report
    table = "judgments_heldout" if is_heldout(hostile) else "judgments_train"
    assert f"- {table}.search_term: expect_column_value_lengths_to_be_between (suite judgments): 1 of " in report
    # the report holds the short sample only: one value cut to VALUE_CHARS
    assert "q" * VALUE_CHARS not in report and report.count("<script>") == 1
    assert len(report) < 800 + len(str(info.value.data_docs))
    # and so does every file GX wrote, the leakage rule's value set included (overlong terms stay out of it)
    echoes = _echoes(tmp_path / "validation", "q")
    assert echoes["longest_run"] < VALUE_CHARS and echoes["raw_script"] == 0 and echoes["escaped_script"] >= 1
    assert len(hostile) > MAX_TERM_CHARS


def is_heldout(term: str) -> bool:
    from pipelines.data.dataset import is_heldout_term

    return is_heldout_term(term)


def test_retrain_step_logs_data_docs_to_mlflow_also_when_validation_fails(snapshot: Snapshot, tmp_path: Path) -> None:
    from pipelines.config import Paths
    from pipelines.registry import mlflow_client as registry
    from pipelines.steps import retrain

    paths = Paths.from_env()
    client = registry.client(paths)
    good_run = registry.start_run(paths, "test_validate_good", {})
    good = retrain.validate({"snapshot_dir": str(snapshot.path), "mlflow_run_id": good_run, "run_key": "good"})
    assert good["success"] and Path(good["data_docs"]).is_relative_to(paths.run_dir("good"))
    bad_run = registry.start_run(paths, "test_validate_bad", {})
    path = broken(snapshot, tmp_path, "judgments_train", set_value("relevance", 0, 9.0))
    with pytest.raises(DataValidationError, match="expect_column_values_to_be_between"):
        retrain.validate({"snapshot_dir": str(path), "mlflow_run_id": bad_run, "run_key": "bad"})
    for run_id in (good_run, bad_run):
        run = client.get_run(run_id)
        assert run.data.tags["data_docs"] == f"{run.info.artifact_uri}/data_docs/index.html"
        assert "index.html" in {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, "data_docs")}
    assert client.get_run(bad_run).info.status == "FAILED"
    assert client.get_run(bad_run).data.tags["validation"] == "failed"


def test_module_import_is_cheap() -> None:
    code = "import sys, pipelines.data.validate; print('great_expectations' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
