"""The service as a child process of a command (`shopguide run`, `shopguide loop`): start, wait until ready, stop."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ServiceError(RuntimeError):
    """The child service exited, or did not become ready (or serve a version) in time."""


@dataclass(frozen=True)
class ServiceProcess:
    url: str
    proc: subprocess.Popen[bytes]

    def ready(self) -> dict[str, Any] | None:
        """/readyz's body when it answers 200, else None; raises ServiceError when the process is gone."""
        import httpx

        if self.proc.poll() is not None:
            raise ServiceError(f"the service exited with {self.proc.returncode}")
        try:
            r = httpx.get(f"{self.url}/readyz", timeout=2)
        except httpx.HTTPError:
            return None
        return dict(r.json()) if r.status_code == 200 else None

    def wait_ready(self, timeout: float = 120, version: str | None = None, every: float = 0.5) -> dict[str, Any]:
        """/readyz's body once the service is ready (and, given `version`, reports that model version)."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            last = self.ready()
            if last is not None and (version is None or str(last.get("model_version")) == str(version)):
                return last
            time.sleep(every)
        serving = f"; it serves {last.get('model_version')}" if last else ""
        want = f"serving version {version}" if version is not None else "ready"
        raise ServiceError(f"the service at {self.url} was not {want} within {timeout:g} s{serving}")


@contextlib.contextmanager
def service_process(
    host: str = "127.0.0.1",
    port: int = 8000,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    stop_timeout: float = 30,
) -> Iterator[ServiceProcess]:
    """`uvicorn serving.app:app` on host:port with this process's environment plus `env`, its output appended to
    `log` (None: this terminal's); terminated on leaving (a clean shutdown: the service flushes its logs)."""
    command = [sys.executable, "-m", "uvicorn", "serving.app:app", "--host", host, "--port", str(port)]
    with contextlib.ExitStack() as files:
        out = None
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            out = files.enter_context(log.open("ab"))
        proc = subprocess.Popen(
            [*command, "--log-level", "warning"], env={**os.environ, **(env or {})}, stdout=out, stderr=out
        )
    try:
        yield ServiceProcess(f"http://{host}:{port}", proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
