"""Great Expectations suites for the snapshot tables and the split-leakage rules; failures raise a readable report."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipelines.data.dataset import EVENT_TYPES, SNAPSHOT_TABLES, Snapshot, normalize_term

if TYPE_CHECKING:
    from great_expectations import ExpectationSuite

# Table of a snapshot -> the suite that checks it.
TABLE_SUITES = {
    "judgments_train": "judgments",
    "judgments_heldout": "judgments",
    "catalog": "catalog",
    "offers_train": "offers",
    "offers_test": "offers",
    "events": "events",
}
TERM_COLUMN = "normalized_search_term"
# GX matches pandas dtypes against these names (numpy names, pandas extension dtype classes, or Python types that
# object columns are checked against value by value).
INT_TYPES = ["int64", "int32", "Int64Dtype", "Int32Dtype"]
FLOAT_TYPES = ["float64", "float32", "Float64Dtype"]
STRING_TYPES = ["StringDtype", "str"]
_SAMPLE = 5
_MISSING_COLUMN = re.compile(r'column "(?P<column>[^"]+)" in BatchData does not exist')


class DataValidationError(ValueError):
    """Raised when any expectation fails; `report` is the human-readable text, `failures` the structured list."""

    def __init__(self, report: str, failures: list[dict[str, Any]]) -> None:
        super().__init__(report)
        self.report = report
        self.failures = failures


@dataclass
class ValidationSummary:
    """Outcome of one suite on one frame; `name` labels the check in reports, `failures` are JSON-able dicts."""

    name: str
    suite: str
    table: str
    success: bool
    rows: int
    evaluated: int
    failures: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------- suites


def _gx() -> Any:
    # Must be set before the first import: GX 1.x releases before 1.24 send usage analytics unless it is false, and
    # the pinned range still allows them (1.24 dropped analytics, so there it is a no-op).
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    return gx


def _suite(name: str, expectations: Iterable[Any]) -> ExpectationSuite:
    gx = _gx()
    suite = gx.ExpectationSuite(name=name)
    for expectation in expectations:
        suite.add_expectation(expectation)
    return suite


def _present(columns: Iterable[str]) -> list[Any]:
    exp = _gx().expectations
    return [exp.ExpectColumnToExist(column=c) for c in columns]


def _not_null(columns: Iterable[str]) -> list[Any]:
    exp = _gx().expectations
    return [exp.ExpectColumnValuesToNotBeNull(column=c) for c in columns]


def _typed(types: dict[str, list[str]]) -> list[Any]:
    exp = _gx().expectations
    return [exp.ExpectColumnValuesToBeInTypeList(column=c, type_list=t) for c, t in types.items()]


def _non_empty_table() -> Any:
    return _gx().expectations.ExpectTableRowCountToBeBetween(min_value=1)


def judgments_suite() -> ExpectationSuite:
    """Home Depot relevance pairs: complete, typed, unique ids, non-empty texts, graded relevance in [1, 3]."""
    exp = _gx().expectations
    columns = ["id", "product_uid", "product_title", "search_term", "relevance"]
    return _suite(
        "judgments",
        [
            _non_empty_table(),
            *_present(columns),
            *_not_null(columns),
            exp.ExpectColumnValuesToBeUnique(column="id"),
            exp.ExpectColumnValueLengthsToBeBetween(column="search_term", min_value=1),
            exp.ExpectColumnValueLengthsToBeBetween(column="product_title", min_value=1),
            exp.ExpectColumnValuesToBeBetween(column="relevance", min_value=1.0, max_value=3.0),
            *_typed(
                {
                    "id": INT_TYPES,
                    "product_uid": INT_TYPES,
                    "product_title": STRING_TYPES,
                    "search_term": STRING_TYPES,
                    "relevance": FLOAT_TYPES,
                }
            ),
        ],
    )


def catalog_suite() -> ExpectationSuite:
    """Distinct products: one row per product_uid, each with a title."""
    exp = _gx().expectations
    return _suite(
        "catalog",
        [
            _non_empty_table(),
            *_present(["product_uid", "product_title"]),
            *_not_null(["product_uid", "product_title"]),
            exp.ExpectColumnValuesToBeUnique(column="product_uid"),
            exp.ExpectColumnValueLengthsToBeBetween(column="product_title", min_value=1),
            *_typed({"product_uid": INT_TYPES, "product_title": STRING_TYPES}),
        ],
    )


def offers_suite() -> ExpectationSuite:
    """PriceRunner offers: complete rows, one row per offer, every offer labelled with a category."""
    exp = _gx().expectations
    columns = [
        "product_id",
        "offer_title",
        "merchant_id",
        "cluster_id",
        "cluster_label",
        "category_id",
        "category_label",
    ]
    return _suite(
        "offers",
        [
            _non_empty_table(),
            *_present(columns),
            *_not_null(columns),
            exp.ExpectColumnValuesToBeUnique(column="product_id"),
            exp.ExpectColumnValueLengthsToBeBetween(column="offer_title", min_value=1),
            exp.ExpectColumnValueLengthsToBeBetween(column="category_label", min_value=1),
            *_typed(
                {
                    "product_id": INT_TYPES,
                    "cluster_id": INT_TYPES,
                    "category_id": INT_TYPES,
                    "offer_title": STRING_TYPES,
                    "category_label": STRING_TYPES,
                }
            ),
        ],
    )


def events_suite() -> ExpectationSuite:
    """Simulated user event log: keys and timestamps present, known event types, positive user ids."""
    exp = _gx().expectations
    required = ["user_id", "product_id", "event_type", "event_timestamp"]
    return _suite(
        "events",
        [
            _non_empty_table(),
            *_present([*required, "query"]),
            *_not_null(required),
            exp.ExpectColumnValuesToBeInSet(column="event_type", value_set=list(EVENT_TYPES)),
            exp.ExpectColumnValuesToBeBetween(column="user_id", min_value=1),
            # GX's pandas type matching cannot name a tz-aware datetime dtype, so only the integer keys are typed.
            *_typed({"user_id": INT_TYPES, "product_id": INT_TYPES}),
        ],
    )


def term_leakage_suite(heldout_terms: Iterable[str]) -> ExpectationSuite:
    """No normalised held-out search term may appear in the training judgments (split is by query, never by row)."""
    exp = _gx().expectations
    return _suite(
        "term_leakage",
        [
            exp.ExpectColumnValuesToNotBeInSet(
                column=TERM_COLUMN, value_set=sorted(set(heldout_terms)), meta={"value_set_name": "held-out terms"}
            ),
        ],
    )


def cluster_leakage_suite(test_cluster_ids: Iterable[int]) -> ExpectationSuite:
    """No PriceRunner test product cluster may appear in the training offers (split is by cluster)."""
    exp = _gx().expectations
    return _suite(
        "cluster_leakage",
        [
            exp.ExpectColumnValuesToNotBeInSet(
                column="cluster_id",
                value_set=sorted({int(c) for c in test_cluster_ids}),
                meta={"value_set_name": "test cluster ids"},
            ),
        ],
    )


SUITES: dict[str, Callable[[], ExpectationSuite]] = {
    "judgments": judgments_suite,
    "catalog": catalog_suite,
    "offers": offers_suite,
    "events": events_suite,
}


# ------------------------------------------------------------------------------------------------ running


class _Runner:
    """One ephemeral GX context per call; each frame becomes a dataframe asset with a whole-frame batch definition."""

    def __init__(self) -> None:
        gx = _gx()
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.context = gx.get_context(mode="ephemeral")
        # tqdm bars per metric would flood the Airflow task log.
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        self.source = self.context.data_sources.add_pandas(name="shopguide")

    def run(self, df: pd.DataFrame, suite: ExpectationSuite, table: str, name: str | None = None) -> ValidationSummary:
        name = name or table
        asset = self.source.add_dataframe_asset(name=f"{name}-{len(self.source.assets)}")
        batch = asset.add_batch_definition_whole_dataframe("whole").get_batch(batch_parameters={"dataframe": df})
        result = batch.validate(suite, result_format={"result_format": "SUMMARY", "partial_unexpected_count": 20})
        # GX returns results grouped by metric, not in suite order; report in the order the suite was written.
        order: dict[tuple[str, str | None], int] = {}
        for i, e in enumerate(suite.expectations):
            order.setdefault((e.expectation_type, getattr(e, "column", None)), i)
        failures = [_failure(r, suite.name, table) for r in result.results if not r.success]
        # Some expectations fail on a missing column with an unrelated error (the type check: "list index out of
        # range"); when GX itself says the column is missing, fold them into that one readable cause.
        missing = {f["missing_column"] for f in failures if f["missing_column"]}
        for f in failures:
            if f["error"] and f["column"] in missing:
                f["missing_column"], f["error"] = f["column"], None
        failures.sort(key=lambda f: order.get((f["expectation"], f["column"]), len(order)))
        return ValidationSummary(
            name=name,
            suite=suite.name,
            table=table,
            success=bool(result.success),
            rows=len(df),
            evaluated=len(result.results),
            failures=failures,
        )


def _jsonable(value: Any) -> Any:
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, datetime | date | pd.Timestamp):
        return value.isoformat()
    if hasattr(value, "item") and not isinstance(value, list | tuple | dict):
        try:
            return _jsonable(value.item())
        except (ValueError, TypeError):
            return str(value)
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _exception_message(exception_info: Any) -> str | None:
    """GX puts a flat dict here for expectation errors and a {metric id: dict} map for metric errors."""
    if not exception_info:
        return None
    infos = [exception_info] if "raised_exception" in exception_info else list(exception_info.values())
    for info in infos:
        if isinstance(info, dict) and info.get("raised_exception"):
            return str(info.get("exception_message") or "unknown error")
    return None


def _failure_dict(suite: str, table: str, expectation: str, column: str | None, **fields: Any) -> dict[str, Any]:
    """The structured form of one failed expectation (DataValidationError.failures holds a list of these)."""
    return {
        "suite": suite,
        "table": table,
        "expectation": expectation,
        "column": column,
        "kwargs": {},
        "value_set_name": None,
        "element_count": None,
        "unexpected_count": None,
        "unexpected_values": [],
        "unexpected_rows": [],
        "observed_value": None,
        "missing_column": None,
        "error": None,
        **fields,
    }


def _failure(r: Any, suite: str, table: str) -> dict[str, Any]:
    config = r.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k not in ("column", "batch_id") and v is not None}
    column = config.kwargs.get("column")
    result = r.result or {}
    counts = result.get("partial_unexpected_counts") or []
    values = (
        [c["value"] for c in counts]
        if counts
        else list(dict.fromkeys(map(_jsonable, result.get("partial_unexpected_list") or [])))
    )
    error = _exception_message(r.exception_info)
    missing = _MISSING_COLUMN.search(error or "")
    if config.type == "expect_column_to_exist":
        error = None
        missing_column = column
    else:
        missing_column = missing.group("column") if missing else None
    return _failure_dict(
        suite,
        table,
        config.type,
        column,
        kwargs=_jsonable(kwargs),
        value_set_name=(config.meta or {}).get("value_set_name"),
        element_count=result.get("element_count"),
        unexpected_count=result.get("unexpected_count"),
        unexpected_values=_jsonable(values[:_SAMPLE]),
        unexpected_rows=_jsonable((result.get("partial_unexpected_index_list") or [])[:_SAMPLE]),
        observed_value=_jsonable(result.get("observed_value")),
        missing_column=missing_column,
        error=None if missing_column else error,
    )


# ------------------------------------------------------------------------------------------------ reporting


def _args(failure: dict[str, Any]) -> str:
    parts = []
    for key, value in failure["kwargs"].items():
        if key == "value_set" and failure.get("value_set_name"):
            value = f"<{len(value)} {failure['value_set_name']}>"
        elif isinstance(value, list) and len(value) > 6:
            value = f"[{', '.join(map(repr, value[:5]))}, ... {len(value)} values]"
        parts.append(f"{key}={value}")
    return f"{failure['expectation']}({', '.join(parts)})" if parts else failure["expectation"]


def _detail(failure: dict[str, Any]) -> str:
    if failure["error"]:
        return f"could not run: {failure['error']}"
    if failure["unexpected_count"] is not None:
        text = f"{failure['unexpected_count']} of {failure['element_count']} value(s) unexpected"
        values = [v for v in failure["unexpected_values"] if v is not None]
        if values:
            text += f", e.g. {values!r}"
        if failure["unexpected_rows"]:
            text += f" (rows {failure['unexpected_rows']})"
        return text
    if failure["observed_value"] is not None:
        return f"observed {failure['observed_value']!r}"
    return "failed"


def format_report(summaries: Iterable[ValidationSummary]) -> str:
    """One header line, then one line per failing expectation; a missing column is one line naming what it blocks."""
    summaries = list(summaries)
    failed = sum(len(s.failures) for s in summaries)
    total = sum(s.evaluated for s in summaries)
    if not failed:
        return f"Data validation passed: {total} expectations on {len(summaries)} table check(s)"
    lines = [f"Data validation failed: {failed} of {total} expectations"]
    for s in summaries:
        missing: dict[str, list[str]] = {}
        for f in s.failures:
            if f["missing_column"]:
                missing.setdefault(f["missing_column"], []).append(f["expectation"])
        for column, blocked in missing.items():
            lines.append(f"- {s.name}.{column}: column {column!r} is missing (failed: {', '.join(blocked)})")
        for f in s.failures:
            if f["missing_column"]:
                continue
            where = f"{s.name}.{f['column']}" if f["column"] else s.name
            lines.append(f"- {where}: {_args(f)}: {_detail(f)}")
    return "\n".join(lines)


def _raise_for(summaries: list[ValidationSummary]) -> None:
    if any(s.failures or not s.success for s in summaries):
        failures = [f for s in summaries for f in s.failures]
        raise DataValidationError(format_report(summaries), failures)


def _counts(summaries: list[ValidationSummary]) -> dict[str, dict[str, Any]]:
    return {
        s.name: {
            "suite": s.suite,
            "table": s.table,
            "rows": s.rows,
            "expectations": s.evaluated,
            "failed": len(s.failures),
        }
        for s in summaries
    }


# ------------------------------------------------------------------------------------------------ public API


def validate_frame(df: pd.DataFrame, suite_name: str, table: str | None = None) -> ValidationSummary:
    """Run one named suite (judgments, catalog, offers, events) on a frame; never raises on data problems."""
    if suite_name not in SUITES:
        raise KeyError(f"unknown suite {suite_name!r}; known suites: {sorted(SUITES)}")
    return _Runner().run(df, SUITES[suite_name](), table or suite_name)


def validate_events(df: pd.DataFrame) -> dict[str, Any]:
    """Validate an event log on its own (the features DAG); raises DataValidationError with the report."""
    summary = validate_frame(df, "events")
    _raise_for([summary])
    return {"success": True, **_counts([summary])["events"]}


def _unrunnable(
    name: str, suite: str, table: str, column: str | None, expectation: str, error: str
) -> ValidationSummary:
    failure = _failure_dict(suite, table, expectation, column, error=error)
    return ValidationSummary(
        name=name, suite=suite, table=table, success=False, rows=0, evaluated=1, failures=[failure]
    )


def _check_leakage(runner: _Runner, frames: dict[str, pd.DataFrame]) -> list[ValidationSummary]:
    out = []
    not_in_set = "expect_column_values_to_not_be_in_set"
    train, heldout = frames.get("judgments_train"), frames.get("judgments_heldout")
    if train is not None and heldout is not None:
        if "search_term" in train and "search_term" in heldout:
            terms = pd.DataFrame({TERM_COLUMN: train["search_term"].map(normalize_term, na_action="ignore")})
            suite = term_leakage_suite(heldout["search_term"].dropna().map(normalize_term))
            out.append(runner.run(terms, suite, "judgments_train", name="term_leakage"))
        else:
            out.append(
                _unrunnable(
                    "term_leakage",
                    "term_leakage",
                    "judgments_train",
                    TERM_COLUMN,
                    not_in_set,
                    "needs column 'search_term' in judgments_train and judgments_heldout",
                )
            )
    offers_train, offers_test = frames.get("offers_train"), frames.get("offers_test")
    if offers_train is not None and offers_test is not None:
        if "cluster_id" in offers_train and "cluster_id" in offers_test:
            suite = cluster_leakage_suite(offers_test["cluster_id"].dropna())
            out.append(runner.run(offers_train[["cluster_id"]], suite, "offers_train", name="cluster_leakage"))
        else:
            out.append(
                _unrunnable(
                    "cluster_leakage",
                    "cluster_leakage",
                    "offers_train",
                    "cluster_id",
                    not_in_set,
                    "needs column 'cluster_id' in offers_train and offers_test",
                )
            )
    return out


def validate_snapshot(snapshot_dir: str | Path) -> dict[str, Any]:
    """Validate every table of a snapshot plus the split-leakage rules; raises DataValidationError listing all."""
    snapshot = Snapshot.open(snapshot_dir)
    runner = _Runner()
    frames: dict[str, pd.DataFrame] = {}
    summaries: list[ValidationSummary] = []
    for table in SNAPSHOT_TABLES:
        try:
            frames[table] = snapshot.table(table)
        except FileNotFoundError:
            summaries.append(
                _unrunnable(
                    table,
                    TABLE_SUITES[table],
                    table,
                    None,
                    "table_exists",
                    f"{table}.parquet is missing from the snapshot",
                )
            )
            continue
        summaries.append(runner.run(frames[table], SUITES[TABLE_SUITES[table]](), table))
    summaries += _check_leakage(runner, frames)
    _raise_for(summaries)
    return {
        "snapshot": str(snapshot.path),
        "hash": snapshot.hash,
        "success": True,
        "expectations": sum(s.evaluated for s in summaries),
        "checks": _counts(summaries),
    }
