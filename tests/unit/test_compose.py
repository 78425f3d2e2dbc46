"""docker/ (compose.yaml, haproxy.cfg, initdb.sql, Dockerfile) against the production profile it mirrors, the one
`shopguide prod up` runs and tests (pipelines/prod.py): the files and the profile's own functions, no Docker engine."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.airflow_env import DAGS_FOLDER
from pipelines.config import CONFIG_DIR, DATA_DIR, FEATURE_REPO, REPO_ROOT, Paths
from pipelines.prod import (
    DATABASES,
    ENV_FILE,
    ProdConfig,
    Program,
    ensure_secrets,
    environment,
    programs,
    read_env_file,
    render_haproxy,
)

DOCKER = REPO_ROOT / "docker"
IMAGE_HOME = "/var/lib/shopguide"  # SHOPGUIDE_HOME in the image
IMAGE_APP = "/app"  # the checkout in the image (REPO_ROOT there)
# docker/prod.env's hosts as compose names them (everything else in prod.env holds as it is).
HOSTS = {"SHOPGUIDE_PG_HOST": "postgres", "SHOPGUIDE_REDIS_HOST": "redis"}
# environment()'s loopback addresses (one machine) and the compose service behind each.
LOOPBACK = {
    "MLFLOW_TRACKING_URI": "mlflow",
    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": "airflow-api-server",
    "AIRFLOW__API__HOST": "0.0.0.0",  # a bind address: every interface of the container
}
MACHINE_VARIABLES = {"PATH"}  # the venv's bin folder there, the image's PATH here
MACHINE_PROGRAM_VARIABLES = {"SHOPGUIDE_WORKER_HOSTNAME"}  # a worker's name on its host; the container's here
MACHINE_FLAGS = {"--host", "--port", "-f", "--celery-hostname"}
SERVICE_VERB = ["uvicorn", "serving.app:app"]
# A published port of compose (host side) for each port of the process profile that clients use.
PUBLISHED = {"airflow-api-server": "airflow api-server", "mlflow": "mlflow", "haproxy": "haproxy"}


def _interpolate(value: str) -> str:
    """Compose's ${NAME:-default} / ${NAME-default} / ${NAME} with NAME unset (what the file says by default)."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DOCKER / "compose.yaml").read_text()))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


@pytest.fixture(scope="module")
def cfg() -> ProdConfig:
    """docker/prod.env as the image reads it: the home of the image, the stack's host names, nothing of this shell."""
    return ProdConfig.load(Paths(Path(IMAGE_HOME)), environ=HOSTS)


@pytest.fixture(scope="module")
def secret(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The secrets `shopguide prod up` generates, in a temporary SHOPGUIDE_HOME."""
    return ensure_secrets(ProdConfig.load(Paths(tmp_path_factory.mktemp("home")), environ=HOSTS))


@pytest.fixture(scope="module")
def progs(cfg: ProdConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Program]]:
    # programs() looks haproxy up on PATH; a stand-in keeps this test independent of the machine's packages
    bin_dir = tmp_path_factory.mktemp("bin")
    (bin_dir / "haproxy").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "haproxy").chmod(0o755)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
        yield programs(cfg)


def _shopguide_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Services of the shopguide image that run Airflow or shopguide code (MLflow's server runs from it too)."""
    image = services["init"]["image"]
    return {name: s for name, s in services.items() if s.get("image") == image and name != "mlflow"}


def _service_of(program: str, services: dict[str, Any]) -> str:
    """replica-1 -> replica-1; airflow-worker-1 -> airflow-worker (one service, scaled)."""
    return program if program in services else re.sub(r"-\d+$", "", program)


def _argv(command: list[str]) -> list[str]:
    """A program's command without the interpreter (`python -m mlflow server` is `mlflow server`)."""
    args = [_interpolate(str(a)) for a in command]
    if args and Path(args[0]).name.startswith("python") and args[1:2] == ["-m"]:
        args = args[2:]
    return [Path(args[0]).name, *args[1:]]


def _verb(argv: list[str]) -> list[str]:
    """The words before the first option: ['airflow', 'celery', 'worker'], ['uvicorn', 'serving.app:app']."""
    words = []
    for a in argv:
        if a.startswith("-"):
            break
        words.append(a)
    return words


def _options(argv: list[str]) -> dict[str, str | None]:
    return {
        a: (argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") else None)
        for i, a in enumerate(argv)
        if a.startswith("-")
    }


def test_every_program_runs_as_a_service_with_its_command(
    progs: list[Program], services: dict[str, dict[str, Any]]
) -> None:
    for program in progs:
        name = _service_of(program.name, services)
        assert name in services, f"program {program.name} of `shopguide prod up` has no compose service"
        service = services[name]
        want, got = _argv(program.command), _argv(service["command"])
        assert _verb(got) == _verb(want), f"{name}: {got} does not run {want}"
        want_opts, got_opts = _options(want), _options(got)
        for flag, value in want_opts.items():
            assert flag in got_opts, f"{name}: {flag} missing ({program.name} runs {want})"
            if flag not in MACHINE_FLAGS:
                assert got_opts[flag] == value, f"{name}: {flag} {got_opts[flag]!r}, the profile: {value!r}"
        env = service.get("environment") or {}
        for key, value in program.env.items():
            if key not in MACHINE_PROGRAM_VARIABLES:
                assert env.get(key) == value, f"{name}: {key}={env.get(key)!r}, {program.name} has {value!r}"
        assert service.get("stop_grace_period") == f"{program.stop_seconds}s", f"{name}: stop_grace_period"
        assert service.get("restart") in {"always", "unless-stopped"}, f"{name}: not restarted (autorestart)"


def test_workers_as_many_as_the_profile_runs(cfg: ProdConfig, services: dict[str, dict[str, Any]]) -> None:
    replicas = services["airflow-worker"].get("deploy", {}).get("replicas", 1)
    assert replicas == len(cfg.workers) == cfg.number("SHOPGUIDE_CELERY_WORKERS")


def _expected_environment(cfg: ProdConfig, secret: dict[str, str]) -> dict[str, str]:
    """environment() with the image's folders and the compose hosts; secrets and machine variables left out."""
    expected = {}
    for key, value in environment(cfg, secret, base={}).items():
        if key in MACHINE_VARIABLES or key in secret:
            continue
        value = value.replace(str(REPO_ROOT), IMAGE_APP)
        if key in LOOPBACK:
            value = value.replace("127.0.0.1", LOOPBACK[key])
        assert "127.0.0.1" not in value and "localhost" not in value, (
            f"environment() has a new loopback address {key}={value}: name its compose service in LOOPBACK"
        )
        expected[key] = value
    return expected


def test_every_process_gets_the_profile_environment(
    cfg: ProdConfig, secret: dict[str, str], services: dict[str, dict[str, Any]]
) -> None:
    expected = _expected_environment(cfg, secret)
    found = _shopguide_services(services)
    assert {"init", "airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-worker"} <= set(found)
    for name, service in found.items():
        env = service.get("environment") or {}
        assert all(isinstance(v, str) for v in env.values()), f"{name}: unquoted values (compose wants strings)"
        missing = sorted(set(expected) - set(env))
        assert not missing, f"{name} lacks {missing} of pipelines.prod.environment()"
        differ = {k: (env[k], v) for k, v in expected.items() if _interpolate(env[k]) != v}
        assert not differ, f"{name}: (compose, profile) differ: {differ}"
        for key, value in env.items():
            assert "127.0.0.1" not in value and "localhost" not in value, f"{name}: {key}={value} is the container"


def test_the_profile_switches(cfg: ProdConfig, secret: dict[str, str], services: dict[str, dict[str, Any]]) -> None:
    profile = environment(cfg, secret, base={})
    for name, service in _shopguide_services(services).items():
        env = service["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == profile["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["SHOPGUIDE_RUN_STORE"] == profile["SHOPGUIDE_RUN_STORE"] == "mlflow-artifacts:/runs", name
        assert env["SHOPGUIDE_DEPLOYMENT"] == profile["SHOPGUIDE_DEPLOYMENT"] == "production", name
        # the logs' parts go to a store the replicas and the workers share, not a replica's own log folder
        store = _interpolate(env["SHOPGUIDE_LOG_STORE"])
        assert store == profile["SHOPGUIDE_LOG_STORE"] == f"file://{IMAGE_HOME}/prod/log-store", name
        if name.startswith(("replica", "airflow-worker")):
            assert f"log-store:{IMAGE_HOME}/prod/log-store" in services[name]["volumes"], name


def test_secrets_come_from_the_profile_secrets_file(
    secret: dict[str, str], services: dict[str, dict[str, Any]], compose: dict[str, Any]
) -> None:
    # the file `shopguide prod up` writes under the default SHOPGUIDE_HOME, named relative to compose.yaml
    default = ProdConfig.load(Paths(REPO_ROOT / ".shopguide"), environ={}).secrets_file
    for name, service in _shopguide_services(services).items():
        files = [_interpolate(f) for f in service.get("env_file", [])]
        assert [(DOCKER / f).resolve() for f in files] == [default.resolve()], f"{name}: env_file {files}"
        hard_coded = sorted(set(secret) & set(service.get("environment") or {}))
        assert not hard_coded, f"{name}: {hard_coded} written in compose.yaml"
    text = (DOCKER / "compose.yaml").read_text()
    assert not any(value in text for value in secret.values())


def test_readme_command_writes_every_secret(secret: dict[str, str], tmp_path: Path) -> None:
    """The one-line command docker/README.md gives writes the keys `shopguide prod up` would, and keeps a file
    that is there."""
    if shutil.which("python3") is None:
        pytest.skip("no python3 on PATH")
    readme = (DOCKER / "README.md").read_text()
    command = next(line.strip() for line in readme.splitlines() if "umask 077" in line and "python3 -c" in line)

    def run() -> None:
        subprocess.run(["bash", "-c", command], cwd=tmp_path, check=True, timeout=30)

    run()
    written = tmp_path / ".shopguide" / "prod" / "secrets.env"
    first = read_env_file(written)
    assert set(first) == set(secret) and all(first.values())
    assert written.stat().st_mode & 0o077 == 0
    run()
    assert read_env_file(written) == first


def test_databases_as_prod_env_names_them(cfg: ProdConfig, services: dict[str, dict[str, Any]]) -> None:
    created = set(re.findall(r"(?im)^\s*CREATE DATABASE\s+(\w+)", (DOCKER / "initdb.sql").read_text()))
    assert created == {cfg.database(name) for name in DATABASES}
    assert services["postgres"]["environment"]["POSTGRES_USER"] == cfg.get("SHOPGUIDE_PG_USER")


def test_nothing_starts_before_the_stores_are_prepared(services: dict[str, dict[str, Any]]) -> None:
    init = services["init"]
    assert "prepare_stores" in " ".join(init["command"])
    assert init["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
    }
    for name, service in services.items():
        if service.get("image") == init["image"] and name != "init":
            assert service["depends_on"]["init"] == {"condition": "service_completed_successfully"}, name


def test_published_ports_are_the_profile_ports(cfg: ProdConfig, services: dict[str, dict[str, Any]]) -> None:
    ports = cfg.ports()
    for name, what in PUBLISHED.items():
        host_ports = {int(p.split(":")[-2]) for p in services[name]["ports"]}
        assert ports[what] in host_ports, f"{name}: publishes {host_ports}, the profile listens on {ports[what]}"
    host_ports = {int(p.split(":")[-2]) for p in services["haproxy"]["ports"]}
    assert ports["haproxy stats"] in host_ports


def _config_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_haproxy_cfg_is_the_rendered_one(cfg: ProdConfig, services: dict[str, dict[str, Any]]) -> None:
    rendered = _config_lines(render_haproxy(cfg))
    ours = _config_lines((DOCKER / "haproxy.cfg").read_text())
    # every rendered line but addresses, in the same order (compose's file adds Docker's DNS resolver)
    common = [line for line in rendered if not line.startswith(("bind ", "server "))]
    at = 0
    for line in common:
        assert line in ours[at:], f"docker/haproxy.cfg lacks render_haproxy's {line!r} (after line {at} of it)"
        at = ours.index(line, at) + 1
    # a server per replica service, on the port its uvicorn listens on, checked as the profile checks
    check = re.search(r"^server replica-1 \S+ (.*)$", "\n".join(rendered), re.M)
    assert check is not None
    servers = {}
    for line in ours:
        if line.startswith("server "):
            _, name, address, *rest = line.split()
            assert " ".join(rest) == check.group(1), line
            servers[name] = address
    replicas = {n: s for n, s in services.items() if _verb(_argv(s.get("command", [""]))) == SERVICE_VERB}
    assert set(servers) == set(replicas) == {f"replica-{i}" for i in range(1, len(cfg.replica_ports) + 1)}
    for name, address in servers.items():
        assert address == f"{name}:{_options(_argv(replicas[name]['command']))['--port']}"
    binds = [line.split()[1] for line in ours if line.startswith("bind ")]
    published = {p.split(":")[-1] for p in services["haproxy"]["ports"]}
    assert {b.rsplit(":", 1)[-1] for b in binds} == published


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
def test_haproxy_accepts_the_config() -> None:
    proc = subprocess.run(
        ["haproxy", "-c", "-f", str(DOCKER / "haproxy.cfg")], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _torch_pins(path: Path) -> set[str]:
    return set(re.findall(r"torch==([0-9][\w.+]*)", path.read_text()))


def test_dockerfile_pins_and_layout() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    pins = {name: _torch_pins(REPO_ROOT / name) for name in ("docker/Dockerfile", "Makefile", "pyproject.toml")}
    assert all(len(p) == 1 for p in pins.values()) and len(set().union(*pins.values())) == 1, pins
    assert "--index-url https://download.pytorch.org/whl/cpu" in dockerfile
    # editable: REPO_ROOT (configs/, data/, dags/, feature_repo/) stays the checkout, not site-packages
    assert re.search(r"pip install -e \.(\s|$)", dockerfile)
    assert not re.search(r"pip install \.(\s|$)", dockerfile)
    copied = {src for line in re.findall(r"(?m)^COPY\s+(.+)$", dockerfile) for src in line.split()[:-1]}
    for needed in (CONFIG_DIR, DATA_DIR, FEATURE_REPO, DAGS_FOLDER, ENV_FILE):
        assert str(needed.relative_to(REPO_ROOT)) in copied, f"the image lacks {needed.relative_to(REPO_ROOT)}"
    # the build context holds only what the Dockerfile copies (docker/Dockerfile.dockerignore lets nothing else in)
    allowed = set(re.findall(r"(?m)^!(\S+)$", (DOCKER / "Dockerfile.dockerignore").read_text()))
    assert copied <= allowed, f"COPY of {sorted(copied - allowed)}: not in the build context"
    assert re.search(r"\bHF_HUB_OFFLINE=1\b", dockerfile)
    assert re.search(rf"\bSHOPGUIDE_HOME={IMAGE_HOME}\b", dockerfile)
