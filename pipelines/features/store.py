"""Point-in-time feature tables from the event log, and the Feast steps: apply, materialize, freshness, retrieval."""

from __future__ import annotations

import getpass
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

import pandas as pd
import yaml

from pipelines.config import FEATURE_REPO, Paths

if TYPE_CHECKING:
    import psycopg
    from feast import FeatureStore, RepoConfig

FEATURE_STORE_YAML = FEATURE_REPO / "feature_store.yaml"
log = logging.getLogger(__name__)

USER_VIEW = "user_activity"
PRODUCT_VIEW = "product_popularity"
# The user feature list serving reads and the personalisation evaluation trains/evaluates on (one name for both).
# search_v1 (without events_1d) stays registered, unchanged, for anything still pinned to it.
USER_SERVICE = "search_v2"
PRODUCT_SERVICE = "product_v1"
VIEWS = (USER_VIEW, PRODUCT_VIEW)
# The PushSource of USER_VIEW (feature_repo/definitions.py): the service's feedback events reach the online rows
# through it (pipelines.features.push).
USER_PUSH_SOURCE = "user_activity_push"
# The production switch: same code, the online store picked by the environment.
ONLINE_STORE_ENV = "SHOPGUIDE_FEAST_ONLINE_STORE"  # "sqlite" (default) or "redis"
REDIS_ENV = "SHOPGUIDE_REDIS"  # Feast connection string, "host:port[,db=0,password=...]"
# The registry switch: a SQLAlchemy URL (postgresql+psycopg2://...) puts it in a database; unset keeps the yaml's file.
REGISTRY_ENV = "SHOPGUIDE_FEAST_REGISTRY"
# The offline store switch: a PostgreSQL URL (postgresql[+driver]://user[:password]@host[:port]/database[?sslmode=...])
# puts the feature tables in that database, read through Feast's postgres offline store, so a task on any worker
# reads what another wrote; unset keeps the parquet files under the home. feature_repo/definitions.py reads it too.
OFFLINE_ENV = "SHOPGUIDE_FEAST_OFFLINE"
# One table per view in that database; definitions.py declares the same names (apply_feature_repo checks they agree).
OFFLINE_TABLES = {view: f"shopguide_{view}" for view in VIEWS}
DEFAULT_REDIS = "127.0.0.1:6379"
EVENT_COLUMNS = ("user_id", "product_id", "event_type", "event_timestamp")
USER_COLUMNS = (
    "events_1d",
    "events_7d",
    "clicks_7d",
    "purchases_30d",
    "events_30d",
    "last_event_ts",
    "recent_products",
)
PRODUCT_COLUMNS = ("views_30d", "clicks_30d", "ctr")
DAY_WINDOW = pd.Timedelta(days=1)
SHORT_WINDOW = pd.Timedelta(days=7)
LONG_WINDOW = pd.Timedelta(days=30)


# The `feast` console script with torch blocked, as in import_feast: apply never needs it (~2 s CPU, ~180 MB less).
_FEAST_CLI = "import sys; sys.modules['torch'] = None; from feast.cli.cli import cli; sys.exit(cli(prog_name='feast'))"


def import_feast() -> ModuleType:
    """Import feast without letting it import torch.

    feast.torch_wrapper imports torch eagerly (only `to_tensor` needs it): ~3 s and ~180 MB that the ONNX-only
    service never uses. Blocking the name for the duration of the import makes Feast record torch as unavailable;
    the block is lifted afterwards, so a later `import torch` elsewhere in the process still works.
    """
    if "feast" in sys.modules or "torch" in sys.modules:
        import feast

        return feast
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        import feast
        import feast.feature_store  # noqa: F401  (the heavy submodules, imported while the block holds)
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return feast


def offline_paths(paths: Paths) -> dict[str, Path]:
    """Where each feature view's offline parquet lives; feature_repo/definitions.py points its FileSources here."""
    return {view: paths.feast_dir / "data" / f"{view}.parquet" for view in VIEWS}


def offline_store_config() -> dict[str, Any]:
    """The offline store selected by SHOPGUIDE_FEAST_OFFLINE (Feast's postgres store); {} keeps the yaml's files."""
    url = os.environ.get(OFFLINE_ENV, "").strip()
    if not url:
        return {}
    parts = urlsplit(url)
    if parts.scheme.split("+", 1)[0] not in ("postgresql", "postgres"):
        raise ValueError(f"{OFFLINE_ENV}: expected a postgresql:// URL, got scheme {parts.scheme!r}")
    database = unquote(parts.path.lstrip("/"))
    query = parse_qs(parts.query)
    if not parts.hostname or not database or set(query) - {"sslmode"}:
        raise ValueError(f"{OFFLINE_ENV}: expected postgresql://user[:password]@host[:port]/database[?sslmode=...]")
    return {
        "type": "postgres",
        "host": parts.hostname,
        "port": parts.port or 5432,
        "database": database,
        "user": unquote(parts.username) if parts.username else getpass.getuser(),  # libpq's default user
        "password": unquote(parts.password or ""),
        # libpq's default, as psycopg2 gives the registry for the same URL; Feast's own default ("require") refuses
        # a server without SSL, such as a loopback one.
        "sslmode": query.get("sslmode", ["prefer"])[-1],
    }


def online_store_config(serving: bool = False) -> dict[str, Any]:
    """The online store selected by SHOPGUIDE_FEAST_ONLINE_STORE; {} keeps the yaml's SQLite default.

    With `serving`, a Redis connection string gets fail-fast defaults (100 ms timeouts, one immediate retry) for
    the keys it does not set: redis-py's own default retries with backoff for ~4 s per request when Redis is down.
    """
    kind = os.environ.get(ONLINE_STORE_ENV, "sqlite").strip().lower() or "sqlite"
    if kind == "sqlite":
        return {}
    if kind != "redis":
        raise ValueError(f"{ONLINE_STORE_ENV}={kind!r}: expected 'sqlite' or 'redis'")
    connection = os.environ.get(REDIS_ENV, DEFAULT_REDIS)
    if serving:
        given = {part.split("=", 1)[0].strip() for part in connection.split(",") if "=" in part}
        defaults = {"socket_connect_timeout": "0.1", "socket_timeout": "0.1", "retry": "null"}
        connection = ",".join([connection, *(f"{k}={v}" for k, v in defaults.items() if k not in given)])
    return {"type": "redis", "connection_string": connection}


def registry_config() -> dict[str, Any]:
    """The registry selected by SHOPGUIDE_FEAST_REGISTRY (Feast's SQL registry on that database); {} keeps the yaml's
    file registry. Every replica and worker then reads one registry, not a file on its own disk."""
    url = os.environ.get(REGISTRY_ENV, "").strip()
    if not url:
        return {}
    # pool_pre_ping: a registry connection idle across a PostgreSQL restart is replaced instead of failing a request
    return {
        "registry_type": "sql",
        "path": url,
        "cache_ttl_seconds": 60,
        "sqlalchemy_config_kwargs": {"echo": False, "pool_pre_ping": True},
    }


def _raw_repo_config(paths: Paths, serving: bool = False) -> dict[str, Any]:
    text = FEATURE_STORE_YAML.read_text().replace("${SHOPGUIDE_HOME}", str(paths.home))
    raw = yaml.safe_load(os.path.expandvars(text))
    online = online_store_config(serving)
    if online:
        raw["online_store"] = online
    registry = registry_config()
    if registry:
        raw["registry"] = registry
    offline = offline_store_config()
    if offline:
        raw["offline_store"] = offline
    return raw


def repo_config(paths: Paths, serving: bool = False) -> RepoConfig:
    """feature_repo/feature_store.yaml with ${SHOPGUIDE_HOME} set to `paths.home` and the online store switch applied.

    The yaml stays the single description of the store (the `feast` CLI reads it too); here the home comes from the
    caller instead of the process environment, so one process can drive several homes (tests, CLI --home).
    """
    feast = import_feast()
    config = feast.RepoConfig(**_raw_repo_config(paths, serving))
    # Relative paths in Feast resolve against repo_path: keep anything relative inside the home, out of the repo.
    config.repo_path = paths.feast_dir
    return config


def feature_store(paths: Paths, serving: bool = False) -> FeatureStore:
    """A FeatureStore on `paths.home` (registry, SQLite online store and offline parquet under home/feast)."""
    feast = import_feast()
    if not offline_store_config():
        (paths.feast_dir / "data").mkdir(parents=True, exist_ok=True)
    return feast.FeatureStore(config=repo_config(paths, serving))


def _as_utc(when: datetime) -> pd.Timestamp:
    ts = pd.Timestamp(when)
    if ts.tzinfo is None:
        raise ValueError(f"{when!r} is naive; feature times must be timezone-aware (UTC)")
    return ts.tz_convert("UTC")


def _check_events(events: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in EVENT_COLUMNS if c not in events.columns]
    if missing:
        raise ValueError(f"event log lacks columns {missing}")
    ts = events["event_timestamp"]
    if not isinstance(ts.dtype, pd.DatetimeTZDtype):
        raise ValueError(f"event_timestamp must be timezone-aware, got {ts.dtype}")
    out = events[list(EVENT_COLUMNS)].copy()
    out["event_timestamp"] = ts.dt.tz_convert("UTC")
    return out.astype({"user_id": "int64", "product_id": "int64", "event_type": "string"})


def snapshot_times(events: pd.DataFrame, as_of: datetime, freq: str = "1D") -> list[pd.Timestamp]:
    """Feature row times: every `freq` boundary after the first event and before `as_of`, then `as_of` itself."""
    end = _as_utc(as_of)
    if events.empty:
        return [end]
    first = events["event_timestamp"].min().tz_convert("UTC")
    grid = pd.date_range(first.floor(freq) + pd.Timedelta(freq), end, freq=freq, inclusive="left")
    return [*grid, end]


def _user_rows(window: pd.DataFrame, at: pd.Timestamp, recent_n: int) -> pd.DataFrame:
    short = window[window["event_timestamp"] > at - SHORT_WINDOW]
    by_user = window.groupby("user_id", sort=True)
    out = pd.DataFrame(
        {
            "events_30d": by_user.size(),
            "purchases_30d": (window["event_type"] == "purchase").groupby(window["user_id"]).sum(),
            "last_event_ts": by_user["event_timestamp"].max(),
        }
    )
    day = short[short["event_timestamp"] > at - DAY_WINDOW]
    out["events_1d"] = day.groupby("user_id").size().reindex(out.index, fill_value=0)
    out["events_7d"] = short.groupby("user_id").size().reindex(out.index, fill_value=0)
    out["clicks_7d"] = (short["event_type"] == "click").groupby(short["user_id"]).sum().reindex(out.index, fill_value=0)
    # Newest first; ties in time keep the log's later row first, so the order is deterministic.
    newest = window.iloc[::-1].sort_values("event_timestamp", ascending=False, kind="stable")
    distinct = newest.drop_duplicates(["user_id", "product_id"])
    recent = distinct.groupby("user_id", sort=False).head(recent_n).groupby("user_id", sort=False)["product_id"]
    out["recent_products"] = recent.agg(lambda s: [int(v) for v in s]).reindex(out.index)
    out["last_event_ts"] = out["last_event_ts"].map(lambda t: int(t.timestamp()))
    out["event_timestamp"] = at
    return out.reset_index()


def _product_rows(window: pd.DataFrame, at: pd.Timestamp) -> pd.DataFrame:
    kind = window["event_type"]
    out = pd.DataFrame(
        {
            "views_30d": (kind == "view").groupby(window["product_id"]).sum(),
            "clicks_30d": (kind == "click").groupby(window["product_id"]).sum(),
        }
    )
    views = out["views_30d"].to_numpy()
    out["ctr"] = (out["clicks_30d"] / views.clip(min=1)).where(views > 0, 0.0)
    out["event_timestamp"] = at
    return out.reset_index()


def build_feature_tables(
    events: pd.DataFrame, as_of: datetime, recent_n: int = 10, freq: str = "1D"
) -> dict[str, pd.DataFrame]:
    """Per-user and per-product feature rows, point-in-time correct, as a series of snapshots up to `as_of`.

    A row stamped t is computed only from events with event_timestamp <= t (windows are (t - 1d, t], (t - 7d, t]
    and (t - 30d, t]), so a historical join that picks the newest row <= an entity's time never sees its future.
    Rows are emitted at every `freq` boundary and at `as_of`, for the users and products active in the 30-day
    window; events after `as_of` are ignored, so a run keyed to its own as_of is reproducible.
    """
    if recent_n < 1:
        raise ValueError("recent_n must be >= 1")
    end = _as_utc(as_of)
    log = _check_events(events)
    log = log[log["event_timestamp"] <= end].sort_values("event_timestamp", kind="stable")
    users, products = [], []
    for at in snapshot_times(log, end.to_pydatetime(), freq):
        window = log[(log["event_timestamp"] > at - LONG_WINDOW) & (log["event_timestamp"] <= at)]
        if window.empty:
            continue
        users.append(_user_rows(window, at, recent_n))
        products.append(_product_rows(window, at))
    user_columns = ["user_id", "event_timestamp", *USER_COLUMNS]
    product_columns = ["product_id", "event_timestamp", *PRODUCT_COLUMNS]
    user_table = pd.concat(users, ignore_index=True) if users else pd.DataFrame(columns=user_columns)
    product_table = pd.concat(products, ignore_index=True) if products else pd.DataFrame(columns=product_columns)
    user_table = user_table.astype({c: "int64" for c in ("user_id", *USER_COLUMNS[:-1])})
    product_table = product_table.astype(
        {"product_id": "int64", "views_30d": "int64", "clicks_30d": "int64", "ctr": "float32"}
    )
    for table in (user_table, product_table):
        table["event_timestamp"] = pd.to_datetime(table["event_timestamp"], utc=True)
    return {USER_VIEW: user_table[user_columns], PRODUCT_VIEW: product_table[product_columns]}


def _arrow_schemas() -> dict[str, Any]:
    """The offline tables' column types, one definition for the parquet files and the PostgreSQL tables."""
    import pyarrow as pa

    return {
        USER_VIEW: pa.schema(
            [
                ("user_id", pa.int64()),
                ("event_timestamp", pa.timestamp("us", tz="UTC")),
                *[(c, pa.int64()) for c in USER_COLUMNS[:-1]],
                ("recent_products", pa.list_(pa.int64())),
            ]
        ),
        PRODUCT_VIEW: pa.schema(
            [
                ("product_id", pa.int64()),
                ("event_timestamp", pa.timestamp("us", tz="UTC")),
                ("views_30d", pa.int64()),
                ("clicks_30d", pa.int64()),
                ("ctr", pa.float32()),
            ]
        ),
    }


# The PostgreSQL type of each arrow type above (Feast reads bigint, bigint[], real and timestamptz back as declared).
_PG_TYPES = {
    "int64": "bigint",
    "list<item: int64>": "bigint[]",
    "float": "real",
    "timestamp[us, tz=UTC]": "timestamptz",
}


@contextmanager
def _offline_connection(offline: dict[str, Any]) -> Iterator[psycopg.Connection[Any]]:
    """A psycopg connection with the settings Feast's postgres offline store uses; commits on success."""
    import psycopg

    with psycopg.connect(
        host=offline["host"],
        port=offline["port"],
        dbname=offline["database"],
        user=offline["user"],
        password=offline["password"] or None,
        sslmode=offline["sslmode"],
        connect_timeout=10,
    ) as conn:
        yield conn


def _table_address(offline: dict[str, Any], table: str) -> str:
    """Where a table lives, for reports and XCom (never the password)."""
    return f"postgresql://{offline['host']}:{offline['port']}/{offline['database']}?table={table}"


def offline_locations(paths: Paths) -> dict[str, str]:
    """Each view's offline source as registered: its parquet path, or its table in the configured PostgreSQL."""
    if offline_store_config():
        return dict(OFFLINE_TABLES)
    return {view: str(path) for view, path in offline_paths(paths).items()}


def _write_postgres_tables(tables: dict[str, pd.DataFrame], offline: dict[str, Any]) -> dict[str, str]:
    """Replace the views' tables in one transaction: a reader sees all old tables or all new ones, never a mix.

    Each table is built (rows and index) as a new one first, then all are renamed over the old at the end, so readers
    wait only for the swap; a schema change needs no migration. An advisory lock serialises concurrent writers.
    """
    from psycopg import sql

    schemas = _arrow_schemas()
    swaps = []
    with _offline_connection(offline) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("shopguide feast offline tables",))
        for name, df in tables.items():
            table = OFFLINE_TABLES[name]
            incoming = sql.Identifier(f"{table}__incoming")
            columns = [(field.name, _PG_TYPES[str(field.type)]) for field in schemas[name]]
            typed = sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in columns)
            cur.execute(sql.SQL("CREATE TABLE {} ({})").format(incoming, typed))
            names = sql.SQL(", ").join(sql.Identifier(c) for c, _ in columns)
            with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(incoming, names)) as copy:
                for row in df[[c for c, _ in columns]].to_numpy(dtype=object).tolist():
                    copy.write_row(row)
            # The point-in-time join and the freshness probe look rows up by entity and time.
            index = sql.Identifier(f"{table}__incoming_key_ts")
            key = sql.Identifier(columns[0][0])
            cur.execute(sql.SQL("CREATE INDEX {} ON {} ({}, event_timestamp)").format(index, incoming, key))
            swaps.append((table, incoming, index))
        for table, incoming, index in swaps:
            cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
            cur.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(incoming, sql.Identifier(table)))
            cur.execute(sql.SQL("ALTER INDEX {} RENAME TO {}").format(index, sql.Identifier(f"{table}_key_ts")))
    return {name: _table_address(offline, OFFLINE_TABLES[name]) for name in tables}


def write_feature_tables(tables: dict[str, pd.DataFrame], paths: Paths) -> dict[str, str]:
    """Write each table to the configured offline store (parquet under the home, or PostgreSQL tables), atomically:
    a reader never sees half a table. Returns where each went (a path, or a postgresql:// address)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    unknown = set(tables) - set(VIEWS)
    if unknown:
        raise ValueError(f"no feature view for tables {sorted(unknown)}; known: {sorted(VIEWS)}")
    offline = offline_store_config()
    if offline:
        return _write_postgres_tables(tables, offline)
    schemas = _arrow_schemas()
    targets = offline_paths(paths)
    written = {}
    for name, df in tables.items():
        target = targets[name]
        target.parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pandas(df, schema=schemas[name], preserve_index=False, safe=False)
        partial = target.with_suffix(".parquet.tmp")
        pq.write_table(table, partial)
        os.replace(partial, target)
        written[name] = str(target)
    return written


def apply_feature_repo(paths: Paths) -> list[str]:
    """`feast apply` of feature_repo/ on `paths.home`: registers what definitions.py declares, drops the rest.

    Feast's own CLI parses the repo and diffs it against the registry, in a subprocess: definitions.py reads
    SHOPGUIDE_HOME when it is imported, and the CLI changes directory and imports the repo as a module, neither of
    which may leak into (or be cached by) the calling process. The CLI reads the configuration repo_config describes
    (home substituted, online store switched) from a private file under the home. Returns the registered names, by
    kind (entities, data sources, feature views, feature services), each kind sorted.
    """
    feast_dir = paths.feast_dir
    (feast_dir if offline_store_config() else feast_dir / "data").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SHOPGUIDE_HOME": str(paths.home)}
    # Private (0700) and removed afterwards: a Redis connection string may carry a password.
    with tempfile.TemporaryDirectory(dir=feast_dir, prefix=".apply-") as tmp:
        config_file = Path(tmp) / "feature_store.yaml"
        config_file.write_text(yaml.safe_dump(_raw_repo_config(paths)))
        command = [sys.executable, "-c", _FEAST_CLI, "--chdir", str(FEATURE_REPO)]
        command += ["--feature-store-yaml", str(config_file), "apply"]
        proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        tail = "\n".join(output.splitlines()[-40:])
        raise RuntimeError(f"feast apply exited with {proc.returncode}\n{tail}")
    log.info("feast apply for %s:\n%s", paths.home, output)
    store = feature_store(paths)
    sources = store.list_data_sources()
    # The registry, not the CLI's exit status, says what was applied (Feast reports some failures and exits 0).
    push_source = import_feast().PushSource
    found = {_source_location(s) for s in sources if not isinstance(s, push_source)}
    found |= {f"push:{s.name}" for s in sources if isinstance(s, push_source)}
    expected = {*offline_locations(paths).values(), f"push:{USER_PUSH_SOURCE}"}
    if found != expected:
        raise RuntimeError(f"feast apply registered {sorted(found)}, expected {sorted(expected)}\n{output[-2000:]}")
    kinds = (store.list_entities(), sources, store.list_feature_views(), store.list_feature_services())
    return [name for objects in kinds for name in sorted(o.name for o in objects)]


def _source_location(source: Any) -> str:
    """A registered data source's parquet path or PostgreSQL table (its name for any other kind)."""
    if getattr(source, "path", None):
        return str(source.path)
    if hasattr(source, "get_table_query_string"):
        return str(source.get_table_query_string())
    return str(source.name)


def _key(view: str) -> str:
    return "user_id" if view == USER_VIEW else "product_id"


def _postgres_table_exists(cur: psycopg.Cursor[Any], table: str) -> bool:
    cur.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))
    row = cur.fetchone()
    return bool(row and row[0])


def _postgres_source_rows(offline: dict[str, Any], view: str, start: datetime | None, end: datetime) -> dict[str, Any]:
    from psycopg import sql

    table, key = OFFLINE_TABLES[view], _key(view)
    with _offline_connection(offline) as conn, conn.cursor() as cur:
        if not _postgres_table_exists(cur, table):
            return {"rows": 0, "entities": 0, "newest_row": None}
        cur.execute(
            sql.SQL(
                "SELECT count(*), count(DISTINCT {key}), max(event_timestamp) FROM {table}"
                " WHERE event_timestamp <= %(end)s AND (%(start)s::timestamptz IS NULL OR event_timestamp >= %(start)s)"
            ).format(key=sql.Identifier(key), table=sql.Identifier(table)),
            {
                "start": _as_utc(start).to_pydatetime() if start is not None else None,
                "end": _as_utc(end).to_pydatetime(),
            },
        )
        rows, entities, newest = cur.fetchone() or (0, 0, None)
    return {
        "rows": int(rows),
        "entities": int(entities),
        "newest_row": _as_utc(newest).isoformat() if newest is not None else None,
    }


def _source_rows(paths: Paths, view: str, start: datetime | None, end: datetime) -> dict[str, Any]:
    """Rows, entities and newest row time of a view's offline source within [start, end] (what materialize pushes)."""
    offline = offline_store_config()
    if offline:
        return _postgres_source_rows(offline, view, start, end)
    source = offline_paths(paths)[view]
    if not source.is_file():
        return {"rows": 0, "entities": 0, "newest_row": None}
    key = "user_id" if view == USER_VIEW else "product_id"
    df = pd.read_parquet(source, columns=[key, "event_timestamp"])
    ts = df["event_timestamp"]
    keep = ts <= _as_utc(end)
    if start is not None:
        keep &= ts >= _as_utc(start)
    df = df[keep]
    newest = df["event_timestamp"].max() if len(df) else None
    return {
        "rows": len(df),
        "entities": int(df[key].nunique()),
        "newest_row": newest.isoformat() if newest is not None else None,
    }


def materialize(paths: Paths, end: datetime) -> dict[str, Any]:
    """Push the offline rows up to `end` into the online store; returns per view the interval pushed and its rows.

    Views already materialized go through materialize_incremental (from their last end). A view's first run covers
    (end - ttl, end]: Feast's own first incremental run starts at wall-clock now - ttl, which misses everything when
    `end` is a run's as_of in the past (a backfill or a replay). An `end` at or before the last one is a no-op.
    """
    store = feature_store(paths)
    end_utc = _as_utc(end).to_pydatetime()
    views = {fv.name: fv for fv in store.list_feature_views() if fv.name in VIEWS}
    first = sorted(name for name, fv in views.items() if fv.most_recent_end_time is None)
    later = sorted(
        name for name, fv in views.items() if fv.most_recent_end_time is not None and fv.most_recent_end_time < end_utc
    )
    for name in first:
        ttl = views[name].ttl or LONG_WINDOW.to_pytimedelta()
        store.materialize(start_date=end_utc - ttl, end_date=end_utc, feature_views=[name])
    if later:
        store.materialize_incremental(end_date=end_utc, feature_views=later)
    pushed = {}
    for name, fv in sorted(views.items()):
        if name in first:
            start: datetime | None = end_utc - (fv.ttl or LONG_WINDOW.to_pytimedelta())
        elif name in later:
            start = fv.most_recent_end_time
        else:
            pushed[name] = {
                "start": None,
                "end": None,
                "rows": 0,
                "entities": 0,
                "newest_row": None,
                "skipped": "already materialized to " + fv.most_recent_end_time.isoformat(),
            }
            continue
        pushed[name] = {
            "start": start.isoformat() if start else None,
            "end": end_utc.isoformat(),
            **_source_rows(paths, name, start, end_utc),
        }
    return {"views": sorted(views), "end": end_utc.isoformat(), "materialized": pushed}


class StaleFeaturesError(RuntimeError):
    """The online store is older than the freshness bound (or holds nothing): personalisation would serve old data."""


def _postgres_newest(offline: dict[str, Any], view: str, until: datetime) -> tuple[pd.Timestamp | None, list[int]]:
    from psycopg import sql

    table, key = OFFLINE_TABLES[view], _key(view)
    order = sql.SQL("last_event_ts DESC, {}" if view == USER_VIEW else "{}").format(sql.Identifier(key))
    with _offline_connection(offline) as conn, conn.cursor() as cur:
        if not _postgres_table_exists(cur, table):
            return None, []
        cur.execute(
            sql.SQL(
                "SELECT event_timestamp, {key} FROM {table} WHERE event_timestamp ="
                " (SELECT max(event_timestamp) FROM {table} WHERE event_timestamp <= %s) ORDER BY {order}"
            ).format(key=sql.Identifier(key), table=sql.Identifier(table), order=order),
            (_as_utc(until).to_pydatetime(),),
        )
        rows = cur.fetchall()
    if not rows:
        return None, []
    return _as_utc(rows[0][0]), [int(r[1]) for r in rows]


def _newest_offline(paths: Paths, view: str, until: datetime) -> tuple[pd.Timestamp | None, list[int]]:
    """The newest offline row time <= until of a view and the entities with a row at that time.

    User entities come newest data first (by last_event_ts), so probing the first few finds the newest event.
    """
    offline = offline_store_config()
    if offline:
        return _postgres_newest(offline, view, until)
    source = offline_paths(paths)[view]
    if not source.is_file():
        return None, []
    key = "user_id" if view == USER_VIEW else "product_id"
    columns = [key, "event_timestamp", *(["last_event_ts"] if view == USER_VIEW else [])]
    df = pd.read_parquet(source, columns=columns)
    df = df[df["event_timestamp"] <= _as_utc(until)]
    if df.empty:
        return None, []
    newest = df["event_timestamp"].max()
    at = df[df["event_timestamp"] == newest]
    at = at.sort_values(["last_event_ts", key], ascending=[False, True]) if view == USER_VIEW else at.sort_values(key)
    return newest, [int(v) for v in at[key]]


def freshness(paths: Paths, now: datetime | None = None, probe: int = 50) -> dict[str, Any]:
    """Per view: how far materialization reached and the newest row actually online, with their ages in seconds.

    `newest_row` is the newest offline row inside the materialized interval (what materialize pushed);
    `newest_online_row` is read back from the online store (event timestamps of up to `probe` entities that have a
    row at that time), so a materialization that did not reach the store shows here. For user_activity,
    `newest_event` is the newest user event those online rows were computed from (max last_event_ts): rows are
    stamped at each run's as_of, so the row age says "computed when", the event age "data up to when".
    `newest_row_age_s` is the age of the newest online row (None when nothing is online).
    """
    now_utc = _as_utc(now or datetime.now(UTC))
    store = feature_store(paths)
    out: dict[str, Any] = {}
    for fv in store.list_feature_views():
        until = fv.most_recent_end_time
        newest, keys = _newest_offline(paths, fv.name, until) if until else (None, [])
        online_ts: pd.Timestamp | None = None
        newest_event: pd.Timestamp | None = None
        online_error = None
        if keys:
            key = "user_id" if fv.name == USER_VIEW else "product_id"
            names = [f.name for f in fv.features]
            wanted = [n for n in names if n == "last_event_ts"] or names[:1]
            try:
                response = store.get_online_features(
                    features=[f"{fv.name}:{n}" for n in wanted],
                    entity_rows=[{key: k} for k in keys[:probe]],
                ).to_dict(include_event_timestamps=True)
            except Exception as exc:  # an unreadable online store is the stalest of all: report, never crash
                online_error = f"{type(exc).__name__}: {exc}"[:300]
                response = {}
            seconds = [t for t in response.get(f"{wanted[0]}__ts", []) if t]
            if seconds:
                online_ts = pd.Timestamp(max(seconds), unit="s", tz="UTC")
            events = [v for v in response.get("last_event_ts", []) if v is not None]
            if events:
                newest_event = pd.Timestamp(max(events), unit="s", tz="UTC")
        out[fv.name] = {
            "materialized_until": until.isoformat() if until else None,
            "newest_row": newest.isoformat() if newest is not None else None,
            "newest_online_row": online_ts.isoformat() if online_ts is not None else None,
            "materialized_age_s": (now_utc - _as_utc(until)).total_seconds() if until else None,
            "newest_row_age_s": (now_utc - online_ts).total_seconds() if online_ts is not None else None,
            **({"online_error": online_error} if online_error else {}),
            **(
                {
                    "newest_event": newest_event.isoformat() if newest_event is not None else None,
                    "newest_event_age_s": (now_utc - newest_event).total_seconds()
                    if newest_event is not None
                    else None,
                }
                if fv.name == USER_VIEW
                else {}
            ),
        }
    return out


def check_freshness(
    paths: Paths, max_age_s: float, now: datetime | None = None, on_stale: str = "fail", views: tuple[str, ...] = VIEWS
) -> dict[str, Any]:
    """`freshness` plus a verdict: a view is stale when its newest online row is older than `max_age_s` at `now`
    (default: the wall clock) or when nothing of it is online.

    on_stale="fail" raises StaleFeaturesError naming each stale view and its age (the DAG task fails, loudly);
    "warn" logs one WARNING line per stale view and returns the report with ok=False.
    """
    if on_stale not in ("fail", "warn"):
        raise ValueError(f"on_stale={on_stale!r}: expected 'fail' or 'warn'")
    if max_age_s <= 0:
        raise ValueError("max_age_s must be > 0")
    now_utc = _as_utc(now or datetime.now(UTC))
    report = freshness(paths, now_utc.to_pydatetime())
    problems = []
    for view in views:
        entry = report.get(view)
        age = entry["newest_row_age_s"] if entry else None
        if entry is None:
            problems.append(f"{view}: not registered (feast apply has not run)")
        elif age is None:
            why = f"; online read failed: {entry['online_error']}" if entry.get("online_error") else ""
            problems.append(f"{view}: no row online (materialized until {entry['materialized_until']}{why})")
        elif age > max_age_s:
            problems.append(
                f"{view}: newest online row {entry['newest_online_row']} is {age / 3600:.2f} h old "
                f"at {now_utc.isoformat()} (bound {max_age_s / 3600:.2f} h)"
            )
    result = {
        "now": now_utc.isoformat(),
        "max_age_s": float(max_age_s),
        "ok": not problems,
        "stale": problems,
        "views": report,
    }
    if problems:
        message = "STALE ONLINE FEATURES: " + "; ".join(problems)
        if on_stale == "fail":
            raise StaleFeaturesError(message)
        for problem in problems:
            log.warning("STALE ONLINE FEATURES: %s", problem)
    return result


def offline_entities(paths: Paths, view: str) -> set[int]:
    """The entities (user or product ids) with any row in a view's offline source, from the configured store."""
    offline = offline_store_config()
    key = _key(view)
    if not offline:
        source = offline_paths(paths)[view]
        return set(pd.read_parquet(source, columns=[key])[key].astype("int64")) if source.is_file() else set()
    from psycopg import sql

    table = OFFLINE_TABLES[view]
    with _offline_connection(offline) as conn, conn.cursor() as cur:
        if not _postgres_table_exists(cur, table):
            return set()
        cur.execute(sql.SQL("SELECT DISTINCT {} FROM {}").format(sql.Identifier(key), sql.Identifier(table)))
        return {int(r[0]) for r in cur.fetchall()}


def historical_user_features(paths: Paths, entity_df: pd.DataFrame) -> pd.DataFrame:
    """Point-in-time join of the served user features (USER_SERVICE) onto (user_id, event_timestamp) rows.

    Every entity row comes back, in order, with missing features as nulls: Feast's file (dask) store drops an entity
    row whose user has feature rows but none in [t - ttl, t] (it filters after its left join), which would silently
    bias a training set towards active users.
    """
    missing = {"user_id", "event_timestamp"} - set(entity_df.columns)
    if missing:
        raise ValueError(f"entity_df lacks columns {sorted(missing)}")
    store = feature_store(paths)
    service = store.get_feature_service(USER_SERVICE)
    rows = entity_df.reset_index(drop=True).assign(_shopguide_row=lambda d: range(len(d)))
    joined = store.get_historical_features(entity_df=rows, features=service).to_df()
    feature_columns = [c for c in joined.columns if c not in rows.columns]
    out = rows.merge(joined[["_shopguide_row", *feature_columns]], on="_shopguide_row", how="left", validate="1:1")
    return out.sort_values("_shopguide_row").drop(columns="_shopguide_row").reset_index(drop=True)


def load_events(snapshot_or_events_path: str | Path) -> pd.DataFrame:
    """The event log from a run snapshot folder (its events.parquet) or from a parquet file."""
    path = Path(snapshot_or_events_path)
    if path.is_dir():
        path = path / "events.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"no event log at {path}")
    return pd.read_parquet(path)


def refresh_features(
    snapshot_or_events_path: str | Path, as_of: datetime, recent_n: int = 10, paths: Paths | None = None
) -> dict[str, Any]:
    """The features DAG's one step: build -> write -> apply -> materialize up to `as_of`; small JSON values back."""
    paths = paths or Paths.from_env()
    as_of_utc = _as_utc(as_of).to_pydatetime()
    events = load_events(snapshot_or_events_path)
    tables = build_feature_tables(events, as_of_utc, recent_n)
    written = write_feature_tables(tables, paths)
    applied = apply_feature_repo(paths)
    result = materialize(paths, as_of_utc)
    return {
        "as_of": as_of_utc.isoformat(),
        "events": len(events),
        "tables": {name: {"path": written[name], "rows": len(df)} for name, df in tables.items()},
        "applied": applied,
        **result,
    }


__all__ = [
    "PRODUCT_SERVICE",
    "USER_PUSH_SOURCE",
    "USER_SERVICE",
    "StaleFeaturesError",
    "apply_feature_repo",
    "build_feature_tables",
    "check_freshness",
    "feature_store",
    "freshness",
    "historical_user_features",
    "import_feast",
    "load_events",
    "materialize",
    "offline_entities",
    "offline_locations",
    "refresh_features",
    "repo_config",
    "write_feature_tables",
]
