"""The lock every move of @champion holds: a file lock on one host, a PostgreSQL advisory lock across hosts.

MLflow has no conditional alias update, so promote / rollback re-read, check and move @champion inside this lock
(mlflow_client._move). SHOPGUIDE_LOCK_URL picks the kind:
- unset: `filelock` under SHOPGUIDE_LOCK_DIR (default SHOPGUIDE_HOME/locks): every promoter sharing that folder
  (CLI, `airflow dags test`, LocalExecutor workers on one host);
- `postgresql://user@host:port/db`: pg_advisory_lock on that database (the production profile uses Airflow's
  metadata database, which every worker already reaches): every promoter on every host. The lock belongs to the
  session, so a promoter that dies releases it with its connection.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from pathlib import Path
from types import TracebackType
from typing import Any

from pipelines.config import Paths, safe_name

log = logging.getLogger(__name__)


class LockTimeout(TimeoutError):
    """The lock was held by another promoter for longer than the timeout; nothing was done."""


class PostgresAdvisoryLock:
    """A session-level advisory lock, polled with pg_try_advisory_lock until `timeout` seconds have passed."""

    def __init__(self, url: str, name: str, timeout: float, poll: float = 0.2) -> None:
        self.url, self.name, self.timeout, self.poll = url, name, timeout, poll
        # a stable 63-bit key of the name (Python's hash() is salted per process)
        self.key = zlib.crc32(name.encode()) | (zlib.adler32(name.encode()) << 31)
        self._conn: Any = None

    @property
    def where(self) -> str:
        return f"PostgreSQL advisory lock {self.key} ({self.name})"

    def __enter__(self) -> PostgresAdvisoryLock:
        import psycopg2

        conn = psycopg2.connect(self.url.replace("postgresql+psycopg2://", "postgresql://"), connect_timeout=10)
        conn.autocommit = True
        deadline = time.monotonic() + self.timeout
        with conn.cursor() as cur:
            while True:
                cur.execute("SELECT pg_try_advisory_lock(%s)", (self.key,))
                if cur.fetchone()[0]:
                    break
                log.debug("%s not acquired, waiting", self.where)
                if time.monotonic() > deadline:
                    conn.close()
                    raise LockTimeout(f"{self.where} held for over {self.timeout:.0f} s")
                time.sleep(self.poll)
        self._conn = conn
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        conn, self._conn = self._conn, None
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
        finally:
            conn.close()  # closing ends the session, which releases the lock even if the unlock failed


class FolderLock:
    """filelock's FileLock with the same timeout error and a `where` for messages."""

    def __init__(self, path: Path, timeout: float) -> None:
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(path, timeout=timeout)
        self.timeout = timeout

    @property
    def where(self) -> str:
        return str(self._lock.lock_file)

    def __enter__(self) -> FolderLock:
        from filelock import Timeout

        try:
            self._lock.acquire()
        except Timeout as err:
            raise LockTimeout(f"{self.where} held for over {self.timeout:.0f} s") from err
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._lock.release()


def named_lock(paths: Paths, name: str, timeout: float) -> PostgresAdvisoryLock | FolderLock:
    """The lock called `name`, of the kind SHOPGUIDE_LOCK_URL selects (see the module docstring)."""
    url = os.environ.get("SHOPGUIDE_LOCK_URL", "")
    if url.startswith(("postgresql://", "postgresql+psycopg2://", "postgres://")):
        return PostgresAdvisoryLock(url, f"shopguide:{name}", timeout)
    if url:
        raise ValueError(f"SHOPGUIDE_LOCK_URL must be a postgresql:// URL or empty, not {url!r}")
    folder = Path(os.environ.get("SHOPGUIDE_LOCK_DIR") or paths.home / "locks")
    return FolderLock(folder / f"{safe_name(name)}.lock", timeout)
