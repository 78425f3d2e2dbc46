"""Great Expectations suites for the snapshot tables and the split-leakage rules, run in a per-run GX project."""

from __future__ import annotations

import html
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import pandas as pd

from pipelines.data.dataset import EVENT_TYPES, SNAPSHOT_TABLES, Snapshot, normalize_term
from pipelines.data.feedback import COLUMNS as FEEDBACK_COLUMNS
from pipelines.data.feedback import LABELS as FEEDBACK_LABELS
from pipelines.data.feedback import SEARCHED_COLUMNS

if TYPE_CHECKING:
    from great_expectations import ExpectationSuite
    from great_expectations.core import ExpectationSuiteValidationResult

# Table of a snapshot -> the suite that checks it.
TABLE_SUITES = {
    "judgments_train": "judgments",
    "judgments_heldout": "judgments",
    "catalog": "catalog",
    "offers_train": "offers",
    "offers_test": "offers",
    "events": "events",
    "feedback_pairs": "feedback",
    "searched_terms": "searched",
}
TERM_COLUMN = "normalized_search_term"
# GX matches pandas dtypes against these names (numpy names, pandas extension dtype classes, or Python types that
# object columns are checked against value by value).
INT_TYPES = ["int64", "int32", "Int64Dtype", "Int32Dtype"]
FLOAT_TYPES = ["float64", "float32", "Float64Dtype"]
STRING_TYPES = ["StringDtype", "str"]
# The exception message echoes data: a few values, each cut short, so a hostile value never lands in a log whole.
SAMPLE_VALUES = 3
VALUE_CHARS = 80
# GX keeps this many unexpected values of each expectation in its stored results and Data Docs (its default is 20),
# each cut to VALUE_CHARS and HTML-escaped before it is stored (see _redact).
DOCS_SAMPLE_VALUES = 10
RESULT_FORMAT = {"result_format": "SUMMARY", "partial_unexpected_count": DOCS_SAMPLE_VALUES}
# A search term longer than the service accepts as a query (serving's SHOPGUIDE_MAX_QUERY_CHARS default, 256) is
# no query anyone typed; the shipped terms are at most 60 characters.
MAX_TERM_CHARS = 256


class DataValidationError(ValueError):
    """Raised when any expectation fails: `report` is a short summary, `failures` the structured list, `data_docs`
    the index.html of the run's Data Docs (None when none were built)."""

    def __init__(self, report: str, failures: list[dict[str, Any]], data_docs: str | None = None) -> None:
        super().__init__(report)
        self.report = report
        self.failures = failures
        self.data_docs = data_docs


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
    return _gx().ExpectationSuite(name=name, expectations=list(expectations))


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
            exp.ExpectColumnValueLengthsToBeBetween(column="search_term", min_value=1, max_value=MAX_TERM_CHARS),
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
    """Distinct products: one row per product_uid, each with a title that is more than white space."""
    exp = _gx().expectations
    return _suite(
        "catalog",
        [
            _non_empty_table(),
            *_present(["product_uid", "product_title"]),
            *_not_null(["product_uid", "product_title"]),
            exp.ExpectColumnValuesToBeUnique(column="product_uid"),
            exp.ExpectColumnValueLengthsToBeBetween(column="product_title", min_value=1),
            # a title of blanks embeds as the empty text: a product no query could find, in every answer's tail
            exp.ExpectColumnValuesToMatchRegex(column="product_title", regex=r"\S"),
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


def feedback_suite() -> ExpectationSuite:
    """Feedback pairs from the logged traffic (pipelines.data.feedback): complete, typed, one row per (term,
    product), a known label backed by at least one answer. Empty is valid: a shop without traffic yet."""
    exp = _gx().expectations
    return _suite(
        "feedback",
        [
            *_present(FEEDBACK_COLUMNS),
            *_not_null(FEEDBACK_COLUMNS),
            exp.ExpectCompoundColumnsToBeUnique(column_list=["search_term", "product_uid"]),
            exp.ExpectColumnValueLengthsToBeBetween(column="search_term", min_value=1, max_value=MAX_TERM_CHARS),
            exp.ExpectColumnValueLengthsToBeBetween(column="product_title", min_value=1),
            exp.ExpectColumnValuesToBeInSet(column="label", value_set=list(FEEDBACK_LABELS)),
            exp.ExpectColumnValuesToBeBetween(column="answers", min_value=1),
            *_typed(
                {
                    "product_uid": INT_TYPES,
                    "answers": INT_TYPES,
                    "search_term": STRING_TYPES,
                    "product_title": STRING_TYPES,
                    "label": STRING_TYPES,
                }
            ),
        ],
    )


def searched_suite() -> ExpectationSuite:
    """What shoppers searched since @champion's snapshot (pipelines.data.feedback.searched_terms): one row per
    term, each searched at least once. Empty is valid: no traffic yet."""
    exp = _gx().expectations
    columns = list(SEARCHED_COLUMNS)
    return _suite(
        "searched",
        [
            *_present(columns),
            *_not_null(columns),
            exp.ExpectColumnValuesToBeUnique(column="search_term"),
            exp.ExpectColumnValueLengthsToBeBetween(column="search_term", min_value=1, max_value=MAX_TERM_CHARS),
            exp.ExpectColumnValuesToBeBetween(column="answers", min_value=1),
            *_typed({"search_term": STRING_TYPES, "answers": INT_TYPES}),
        ],
    )


def term_leakage_suite(heldout_terms: Iterable[str]) -> ExpectationSuite:
    """No normalised held-out search term may appear in the training judgments (split is by query, never by row).

    Terms longer than MAX_TERM_CHARS stay out of the value set, which GX stores and renders whole: the judgments
    suite rejects them on its own, and a hostile term must not reach the report through the leakage rule.
    """
    exp = _gx().expectations
    return _suite(
        "term_leakage",
        [
            exp.ExpectColumnValuesToNotBeInSet(
                column=TERM_COLUMN,
                value_set=sorted({t for t in heldout_terms if len(t) <= MAX_TERM_CHARS}),
                notes="The value set is the normalised held-out search terms: none may appear in training.",
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
                notes="The value set is the test product clusters: none may appear in the training offers.",
            ),
        ],
    )


SUITES: dict[str, Callable[[], ExpectationSuite]] = {
    "judgments": judgments_suite,
    "catalog": catalog_suite,
    "offers": offers_suite,
    "events": events_suite,
    "feedback": feedback_suite,
    "searched": searched_suite,
}


# ------------------------------------------------------------------------------------------------ running


class _Project:
    """One GX Data Context per call: file-backed under `project_dir` (results kept, Data Docs built) or in memory.
    Each frame becomes a dataframe asset with a whole-frame batch definition and a validation definition."""

    def __init__(self, project_dir: str | Path | None) -> None:
        gx = _gx()
        from great_expectations.data_context.types.base import ProgressBarsConfig

        if project_dir is None:
            self.context = gx.get_context(mode="ephemeral")
        else:
            # A retried step replaces the project: its Data Docs show this attempt only, never an older one beside it.
            shutil.rmtree(Path(project_dir) / "gx", ignore_errors=True)
            self.context = gx.get_context(mode="file", project_root_dir=Path(project_dir))
        # tqdm bars per metric would flood the Airflow task log.
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        self.source = self.context.data_sources.add_pandas(name="shopguide")
        self.file_backed = project_dir is not None
        self.suites: dict[str, ExpectationSuite] = {}

    def run(self, df: pd.DataFrame, suite: ExpectationSuite, table: str, name: str | None = None) -> ValidationSummary:
        gx = _gx()
        name = name or table
        if suite.name not in self.suites:  # the two judgments tables share one stored suite
            self.suites[suite.name] = self.context.suites.add(suite)
        batch = self.source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe("whole")
        definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=self.suites[suite.name])
        )
        # No Checkpoint: its batch parameters (the frame) are shared by all its definitions, so each table would
        # need its own, and an UpdateDataDocsAction per table re-renders the site each time; docs() builds it once.
        result = definition.run(batch_parameters={"dataframe": df}, result_format=RESULT_FORMAT)
        summary = ValidationSummary(
            name=name,
            suite=suite.name,
            table=table,
            success=bool(result.success),
            rows=len(df),
            evaluated=len(result.results),
            failures=_failures(result, name, table),
        )
        if self.file_backed and _redact(result):
            self._store_again(result, suite.name)
        return summary

    def _store_again(self, result: ExpectationSuiteValidationResult, suite_name: str) -> None:
        """Overwrite the result ValidationDefinition.run stored (whole values) with `result`, under the same key
        (run() builds it from the suite, the run id and the batch id), so Data Docs render the redacted one."""
        from great_expectations.data_context.types.resource_identifiers import (
            ExpectationSuiteIdentifier,
            ValidationResultIdentifier,
        )

        key = ValidationResultIdentifier(
            expectation_suite_identifier=ExpectationSuiteIdentifier(name=suite_name),
            run_id=result.meta["run_id"],
            batch_identifier=result.batch_id,
        )
        self.context.validation_results_store.set(key, result)

    def docs(self) -> str | None:
        """Build the Data Docs site from every stored result; the path of its index.html."""
        if not self.file_backed:
            return None
        (index_url,) = self.context.build_data_docs().values()  # the project's one site, local_site
        return url2pathname(urlparse(index_url).path)


# ------------------------------------------------------------------------------------------------ summary


def _clip(text: str) -> str:
    return text if len(text) <= VALUE_CHARS else f"{text[: VALUE_CHARS - 3]}..."


def _shown(value: Any) -> Any:
    """A data value as GX may keep it: numbers, booleans and nulls as they are, anything else cut to VALUE_CHARS and
    HTML-escaped (GX 1.x's Data Docs write sampled unexpected values into the page unescaped)."""
    if value is None or isinstance(value, bool | int | float):
        return value
    return html.escape(_clip(value if isinstance(value, str) else repr(value)))


def _redact(result: ExpectationSuiteValidationResult) -> bool:
    """Cut and escape, in place, every data value GX echoes in `result` (the sampled unexpected values, a string
    observed value); True when anything changed. GX stores values whole and renders the sample table of its Data
    Docs without escaping: a 10,000-character `<script>` value would be kept whole and run when the page opens."""
    changed = False
    for r in result.results:
        details = r.result or {}
        for key in ("partial_unexpected_list", "unexpected_list"):
            if details.get(key):
                details[key] = [_shown(v) for v in details[key]]
                changed = True
        if details.get("partial_unexpected_counts"):
            details["partial_unexpected_counts"] = [
                {**c, "value": _shown(c.get("value"))} for c in details["partial_unexpected_counts"]
            ]
            changed = True
        if isinstance(details.get("observed_value"), str) and details["observed_value"] != _shown(
            details["observed_value"]
        ):
            details["observed_value"] = _shown(details["observed_value"])
            changed = True
    return changed


def _sample(result: dict[str, Any]) -> list[str]:
    counts = result.get("partial_unexpected_counts")
    values = [c["value"] for c in counts] if counts else result.get("partial_unexpected_list") or []
    # numpy scalars -> Python ones, so a value reads 7.0, not np.float64(7.0); nulls say nothing a count does not
    values = [v.item() if hasattr(v, "item") else v for v in values]
    values = [v for v in values if not (pd.api.types.is_scalar(v) and pd.isna(v))]
    return [_clip(repr(v)) for v in dict.fromkeys(values)][:SAMPLE_VALUES]


def _error(info: dict[str, Any] | None) -> str | None:
    # GX puts a flat dict here for expectation errors and a {metric id: dict} map for metric errors.
    infos = [info] if info and "raised_exception" in info else list((info or {}).values())
    messages = [str(i.get("exception_message")) for i in infos if isinstance(i, dict) and i.get("raised_exception")]
    return _clip(messages[0]) if messages else None


def _failure(check: str, suite: str, table: str, **fields: Any) -> dict[str, Any]:
    """The JSON-able form of one failure (DataValidationError.failures is a list of these)."""
    keys = ["expectation", "column", "element_count", "unexpected_count", "observed_value", "missing_column", "error"]
    return {"check": check, "suite": suite, "table": table, **dict.fromkeys(keys), "unexpected_values": [], **fields}


def _failures(result: ExpectationSuiteValidationResult, check: str, table: str) -> list[dict[str, Any]]:
    # Any: GX types expectation_config as optional, yet a suite's result always carries it
    failed: list[Any] = [r for r in result.results if not r.success]
    # A missing column fails every expectation on it, most with an unrelated error: they all get that one cause.
    missing = {
        r.expectation_config.kwargs["column"] for r in failed if r.expectation_config.type == "expect_column_to_exist"
    }
    out = []
    for r in failed:
        config, details = r.expectation_config, r.result or {}
        column, observed = config.kwargs.get("column"), details.get("observed_value")
        out.append(
            _failure(
                check,
                result.suite_name,
                table,
                expectation=config.type,
                column=column,
                element_count=details.get("element_count"),
                unexpected_count=details.get("unexpected_count"),
                unexpected_values=_sample(details),
                observed_value=None if observed is None else _clip(str(observed)),
                missing_column=column if column in missing else None,
                error=None if column in missing else _error(r.exception_info),
            )
        )
    return out


def _not_run(check: str, suite: str, table: str, error: str) -> ValidationSummary:
    failure = _failure(check, suite, table, error=error)
    return ValidationSummary(check, suite, table, success=False, rows=0, evaluated=1, failures=[failure])


def _line(f: dict[str, Any]) -> str:
    where = f"{f['check']}.{f['column']}" if f["column"] else f["check"]
    if f["expectation"] is None:
        return f"- {where}: {f['error']}"
    text = f"- {where}: {f['expectation']} (suite {f['suite']}): "
    if f["error"]:
        return text + f"could not run: {f['error']}"
    if f["unexpected_count"] is not None:
        text += f"{f['unexpected_count']} of {f['element_count']} rows failed"
        return text + (f", e.g. [{', '.join(f['unexpected_values'])}]" if f["unexpected_values"] else "")
    return text + (f"observed {f['observed_value']}" if f["observed_value"] is not None else "failed")


def _report(summaries: list[ValidationSummary], data_docs: str | None) -> str:
    """A header, one line per failure (one per missing column), and where the full Data Docs report is."""
    failures = [f for s in summaries for f in s.failures]
    lines = [f"Data validation failed: {len(failures)} of {sum(s.evaluated for s in summaries)} expectations"]
    blocked: dict[tuple[str, str], list[str]] = {}
    for f in failures:
        if f["missing_column"]:
            blocked.setdefault((f["check"], f["missing_column"]), []).append(f["expectation"])
    for (check, column), expectations in blocked.items():
        lines.append(f"- {check}.{column}: column {column!r} is missing (failed: {', '.join(expectations)})")
    lines += [_line(f) for f in failures if not f["missing_column"]]
    if data_docs:
        lines.append(f"Data Docs: {data_docs}")
    return "\n".join(lines)


def _raise_for(summaries: list[ValidationSummary], data_docs: str | None = None) -> None:
    if any(s.failures or not s.success for s in summaries):
        failures = [f for s in summaries for f in s.failures]
        raise DataValidationError(_report(summaries, data_docs), failures, data_docs)


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
    return _Project(None).run(df, SUITES[suite_name](), table or suite_name)


def validate_events(df: pd.DataFrame, project_dir: str | Path | None = None) -> dict[str, Any]:
    """Validate an event log on its own (the features DAG); raises DataValidationError with the summary. With a
    `project_dir` the GX project and its Data Docs are kept there."""
    project = _Project(project_dir)
    summary = project.run(df, events_suite(), "events")
    data_docs = project.docs()
    _raise_for([summary], data_docs)
    return {"success": True, **_counts([summary])["events"], "data_docs": data_docs}


def validate_catalog(df: pd.DataFrame, project_dir: str | Path | None = None) -> dict[str, Any]:
    """Validate a landed catalog (the catalog DAG) with the snapshot's catalog suite; raises DataValidationError with
    the summary (duplicate ids, empty titles, ...). With a `project_dir` the GX project and its Data Docs are kept
    there."""
    project = _Project(project_dir)
    summary = project.run(df, catalog_suite(), "catalog")
    data_docs = project.docs()
    _raise_for([summary], data_docs)
    return {"success": True, **_counts([summary])["catalog"], "data_docs": data_docs}


def _check_leakage(project: _Project, frames: dict[str, pd.DataFrame]) -> list[ValidationSummary]:
    # A rule whose column or table is missing is skipped: its table's own suite (or the missing-table check)
    # has already failed the run for that cause.
    out = []
    if all("search_term" in frames.get(t, ()) for t in ("judgments_train", "judgments_heldout")):
        train, heldout = frames["judgments_train"], frames["judgments_heldout"]
        terms = pd.DataFrame({TERM_COLUMN: train["search_term"].map(normalize_term, na_action="ignore")})
        suite = term_leakage_suite(heldout["search_term"].dropna().map(normalize_term))
        out.append(project.run(terms, suite, "judgments_train", name="term_leakage"))
        if "search_term" in frames.get("feedback_pairs", ()):  # the logged traffic must not bring a test term back
            feedback = frames["feedback_pairs"]
            terms = pd.DataFrame({TERM_COLUMN: feedback["search_term"].map(normalize_term, na_action="ignore")})
            out.append(project.run(terms, suite, "feedback_pairs", name="feedback_term_leakage"))
        if "search_term" in frames.get("searched_terms", ()):  # nor the searched terms the vocabulary is pruned to
            searched = frames["searched_terms"]
            terms = pd.DataFrame({TERM_COLUMN: searched["search_term"].map(normalize_term, na_action="ignore")})
            out.append(project.run(terms, suite, "searched_terms", name="searched_term_leakage"))
    if all("cluster_id" in frames.get(t, ()) for t in ("offers_train", "offers_test")):
        suite = cluster_leakage_suite(frames["offers_test"]["cluster_id"].dropna())
        out.append(project.run(frames["offers_train"][["cluster_id"]], suite, "offers_train", name="cluster_leakage"))
    return out


def validate_snapshot(snapshot_dir: str | Path, project_dir: str | Path | None = None) -> dict[str, Any]:
    """Validate every table of a snapshot plus the split-leakage rules in a GX project at `project_dir` (default:
    a `validation` folder beside the snapshot), build its Data Docs, and raise DataValidationError listing every
    failure. The result's `data_docs` is the site's index.html."""
    snapshot = Snapshot.open(snapshot_dir)
    project = _Project(project_dir if project_dir is not None else snapshot.path.parent / "validation")
    frames: dict[str, pd.DataFrame] = {}
    summaries: list[ValidationSummary] = []
    for table in SNAPSHOT_TABLES:
        try:
            frames[table] = snapshot.table(table)
        except FileNotFoundError:
            summaries.append(
                _not_run(table, TABLE_SUITES[table], table, f"{table}.parquet is missing from the snapshot")
            )
            continue
        summaries.append(project.run(frames[table], SUITES[TABLE_SUITES[table]](), table))
    summaries += _check_leakage(project, frames)
    data_docs = project.docs()
    _raise_for(summaries, data_docs)
    return {
        "snapshot": str(snapshot.path),
        "hash": snapshot.hash,
        "success": True,
        "expectations": sum(s.evaluated for s in summaries),
        "checks": _counts(summaries),
        "data_docs": data_docs,
    }
