"""The files that ship sless: compose file, Dockerfile, setup.cfg, README and CI agree."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from sless_daemon.settings import describe

ROOT = Path(__file__).resolve().parent.parent
KNOWN_VARIABLES = {name for name, _, _ in describe()} | {"SLESS_URL"}


@pytest.fixture(scope="module")
def compose() -> dict:
    """The compose file as docker-compose itself resolves it (validation included)."""
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is not installed; scripts/setup installs it")
    done = subprocess.run(["docker-compose", "config"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def test_compose_has_the_official_images_and_the_port(compose):
    services = compose["services"]
    assert services["redis"]["image"].startswith("redis:")
    assert services["mongo"]["image"].startswith("mongo:")
    assert "127.0.0.1:3000:3000" in str(services["api"]["ports"])
    assert "appendonly" in " ".join(services["redis"]["command"])


def test_worker_service_can_be_scaled(compose):
    worker = compose["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert worker["command"][:2] == ["sless", "worker"]


def test_compose_sets_only_variables_the_code_reads(compose):
    for name, service in compose["services"].items():
        for variable in (service.get("environment") or {}):
            if variable.startswith("SLESS_"):
                assert variable in KNOWN_VARIABLES, f"{name} sets unknown {variable}"


def test_dockerfile_installs_the_package_and_runs_the_cli():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install" in dockerfile and "COPY sless_daemon" in dockerfile
    assert 'CMD ["sless", "daemon"]' in dockerfile and "EXPOSE 3000" in dockerfile
    for variable in re.findall(r"\b(SLESS_[A-Z_]+)=", dockerfile):
        assert variable in KNOWN_VARIABLES


def test_console_script_and_test_extra():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert "sless = sless.cli:main" in config["options.entry_points"]["console_scripts"]
    assert "pytest" in config["options.extras_require"]["test"]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test" in readme and "exec scripts/test" in ci
    assert "scripts/demo" in readme


def test_readme_lists_every_exit_code():
    from sless.exit_codes import ExitStatus

    readme = (ROOT / "README.md").read_text()
    for status in ExitStatus:
        assert re.search(rf"\|\s*{status.value}\s*\|", readme), f"exit code {status.value} not in README"


def test_worker_container_gets_what_the_sandbox_needs_and_no_more(compose):
    worker = compose["services"]["worker"]
    assert worker["cap_drop"] == ["ALL"] and set(worker["cap_add"]) == {"SETUID", "SETGID", "KILL"}
    assert "seccomp=unconfined" in worker["security_opt"] and "no-new-privileges:true" in worker["security_opt"]
    assert compose["services"]["api"]["cap_drop"] == ["ALL"]
    assert "bubblewrap" in (ROOT / "Dockerfile").read_text()


def test_security_doc_explains_every_denied_syscall():
    from sless_daemon.seccomp_policy import DENIED_SYSCALLS

    doc = (ROOT / "docs" / "SECURITY.md").read_text()
    for name in DENIED_SYSCALLS:
        assert f"| `{name}` |" in doc, name


def test_services_script_stops_only_what_its_own_start_started(tmp_path):
    """`scripts/services start` names the services it started; a second start, finding them
    up, names none (so scripts/test run beside a benchmark stops nothing of it); `stop NAME`
    stops that one only."""
    from stack import free_port

    env = {**os.environ, "SLESS_SERVICES_DIR": str(tmp_path), "SLESS_REDIS_PORT": str(free_port()),
           "SLESS_MONGO_PORT": str(free_port())}
    services = lambda *args: subprocess.run([str(ROOT / "scripts" / "services"), *args], env=env,  # noqa: E731
                                            capture_output=True, text=True, timeout=60)
    redis_port, mongo_port = int(env["SLESS_REDIS_PORT"]), int(env["SLESS_MONGO_PORT"])
    try:
        first = services("start")
        assert first.returncode == 0, first.stderr
        assert first.stdout.split() == ["redis", "ferretdb"]
        assert answers(redis_port) and answers(mongo_port)
        again = services("start")
        assert again.returncode == 0 and again.stdout.split() == [], again.stderr
        assert services("stop", "redis").returncode == 0
        assert not answers(redis_port) and answers(mongo_port)
    finally:
        services("stop")
    assert not answers(mongo_port)
    assert services("stop", "mongodb").returncode == 2


def answers(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0
