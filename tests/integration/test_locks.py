"""The PostgreSQL advisory lock around @champion moves (SHOPGUIDE_LOCK_URL): exclusive across processes, a timeout
that says where, and released by a holder that dies."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pipelines.config import REPO_ROOT, Paths
from pipelines.registry.locks import LockTimeout, PostgresAdvisoryLock, named_lock

HOLDER = """
import sys, time
from pipelines.registry.locks import PostgresAdvisoryLock
with PostgresAdvisoryLock(sys.argv[1], "shopguide:champion.test", timeout=5):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_held_advisory_lock_times_out_and_a_dead_holder_releases_it(postgres_database: str, tmp_path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, postgres_database], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LockTimeout, match=r"PostgreSQL advisory lock \d+ \(shopguide:champion.test\) held for"):
            PostgresAdvisoryLock(postgres_database, "shopguide:champion.test", timeout=1).__enter__()
        holder.kill()  # no unlock, no clean close: the server ends its session and the lock with it
        holder.wait(timeout=10)
        started = time.monotonic()
        with PostgresAdvisoryLock(postgres_database, "shopguide:champion.test", timeout=10):
            waited = time.monotonic() - started
        assert waited < 5, waited
    finally:
        holder.kill()


def test_the_lock_kind_follows_shopguide_lock_url(postgres_database: str, tmp_path, monkeypatch) -> None:
    paths = Paths(tmp_path)
    monkeypatch.delenv("SHOPGUIDE_LOCK_URL", raising=False)
    monkeypatch.delenv("SHOPGUIDE_LOCK_DIR", raising=False)
    assert named_lock(paths, "champion.m", 1).where == str(tmp_path / "locks" / "champion.m.lock")
    monkeypatch.setenv("SHOPGUIDE_LOCK_URL", postgres_database)
    with named_lock(paths, "champion.m", 1) as lock:
        assert isinstance(lock, PostgresAdvisoryLock)
    monkeypatch.setenv("SHOPGUIDE_LOCK_URL", "redis://127.0.0.1:6379/0")
    with pytest.raises(ValueError, match="must be a postgresql:// URL"):
        named_lock(paths, "champion.m", 1)
