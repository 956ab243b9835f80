"""The deployment files, checked by the tools that read them and against the real
processes they run: every compose file passes the Compose Specification's JSON schema
(check-jsonschema ships it: no network) and, where a compose CLI is installed, its `config`
command; the healthcheck commands of docker-compose.yml and the Dockerfile, and the
Kubernetes probes, are run against a real worker and a real intake. The file-only checks
(Kubernetes schema, the key scan, cross-file agreement) are in tests/unit/."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from subprocess import Popen

import pytest
import redis
import requests
import yaml

from worker.testing.processes import free_port

from ..deploy_files import (
    KUBE,
    ROOT,
    compose_files,
    compose_healthcheck,
    compose_services,
    dockerfile_healthcheck,
    probed,
)
from .conftest import cli_env, wait_until

BROKEN_COMPOSE = """\
services:
  worker:
    image: report-forwarder
    helthcheck:
      test: ["CMD", "true"]
    ports: 9808
"""


def _schema_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("path", compose_files(), ids=lambda p: p.name)
def test_compose_file_passes_the_compose_specification_schema(path: Path) -> None:
    """`check-jsonschema --builtin-schema vendor.compose-spec` (the schema ships inside the
    package) accepts every compose file in the repository's root."""
    result = _schema_check(path)
    assert 0 == result.returncode, result.stdout + result.stderr


def test_the_compose_schema_check_refuses_a_broken_file(tmp_path: Path) -> None:
    """The schema check is real: a misspelt key and a wrong type each fail it, named."""
    path = tmp_path / "docker-compose.yml"
    path.write_text(BROKEN_COMPOSE)
    result = _schema_check(path)
    assert 1 == result.returncode
    assert "helthcheck" in result.stdout
    assert "$.services.worker.ports" in result.stdout


def _compose_cli() -> list[str] | None:
    """`docker compose` (v2) if it runs here, else Debian's `docker-compose`, else None.
    Neither needs a Docker daemon for `config`."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=30, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


COMPOSE = _compose_cli()
needs_compose = pytest.mark.skipif(
    COMPOSE is None,
    reason="no compose CLI (`docker compose`, or Debian package `docker-compose`); .ci/run "
    "installs docker-compose where apt-get runs as root",
)
REQUIRED = re.compile(r"\$\{([A-Z_][A-Z0-9_]*):?\?")


def _compose_config(path: Path, tmp_path: Path, **values: str) -> subprocess.CompletedProcess[str]:
    """`config -q` on ``path``, with an empty env file (a developer's .env is not read) and
    only ``values`` for the file's variables."""
    assert COMPOSE is not None
    (tmp_path / "empty.env").write_text("")
    return subprocess.run(
        [*COMPOSE, "--env-file", str(tmp_path / "empty.env"), "-f", str(path), "config", "-q"],
        capture_output=True, text=True, timeout=120, check=False,
        env=cli_env({}, **values), cwd=tmp_path,
    )  # fmt: skip


@needs_compose
@pytest.mark.parametrize("path", compose_files(), ids=lambda p: p.name)
def test_compose_config_accepts_every_compose_file(path: Path, tmp_path: Path) -> None:
    """The compose CLI's own check (`config -q`) accepts the file once the variables it
    requires are set (to placeholders: no key is needed to check a file)."""
    required = set(REQUIRED.findall(path.read_text()))
    result = _compose_config(path, tmp_path, **dict.fromkeys(required, "placeholder"))
    assert 0 == result.returncode, result.stderr


@needs_compose
def test_compose_config_refuses_a_broken_file_and_a_missing_key(tmp_path: Path) -> None:
    """`config` is a real check: it refuses the broken file, and docker-compose.yml without
    CAPMONSTER_CLIENT_KEY in the environment (the key is never in the file), naming it."""
    broken = tmp_path / "broken.yml"
    broken.write_text(BROKEN_COMPOSE)
    result = _compose_config(broken, tmp_path)
    assert 0 != result.returncode
    assert "helthcheck" in result.stderr
    stack = ROOT / "docker-compose.yml"
    others = set(REQUIRED.findall(stack.read_text())) - {"CAPMONSTER_CLIENT_KEY"}
    result = _compose_config(stack, tmp_path, **dict.fromkeys(others, "placeholder"))
    assert 0 != result.returncode
    assert "CAPMONSTER_CLIENT_KEY" in result.stderr


# -- the healthcheck commands and probes, against real processes ----------------------------


def _on_port(command: list[str], port: int) -> list[str]:
    """A healthcheck command as the container runs it, aimed at ``port`` on this machine
    (the image's `python` is this interpreter)."""
    _, probed_port = probed(command)
    out = [part.replace(f":{probed_port}/", f":{port}/") for part in command]
    return [sys.executable if part == "python" else part for part in out]


def _passes(command: list[str]) -> bool:
    return subprocess.run(command, capture_output=True, timeout=30, check=False).returncode == 0


def _as_run(command: list[str], port_option: str, port: int) -> list[str]:
    """A compose or manifest command run here: this interpreter for `report-forwarder`,
    ``port_option`` set to ``port``."""
    assert "report-forwarder" == command[0]
    args = list(command[1:])
    args[args.index(port_option) + 1] = str(port)
    return [sys.executable, "-m", "worker", *args]


@contextlib.contextmanager
def _running(command: list[str], environ: dict[str, str], log: Path) -> Iterator[Popen[bytes]]:
    """``command`` as a process logging to ``log``; SIGKILLed at the end if still running."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=environ, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def _ok(url: str) -> bool:
    return _answer(url) == 200


def test_worker_healthchecks_and_probes_pass_on_a_real_worker_and_fail_once_it_stops(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    """A worker started with docker-compose.yml's command (its metrics port moved to a free
    one): the compose and Dockerfile healthcheck commands fail before it is up and succeed
    once it is; the Deployment's liveness and readiness paths answer 200 on it; on SIGTERM
    it exits by itself within the grace period compose and the pods give it (not killed at
    its end), after which the healthchecks fail again."""
    del redis_client  # flushed: no report of another test for this worker
    port = free_port()
    command = _as_run(compose_services()["worker"]["command"], "--metrics-port", port)
    checks = [
        _on_port(compose_healthcheck("worker"), port),
        _on_port(dockerfile_healthcheck(), port),
    ]
    assert [False, False] == [_passes(c) for c in checks]
    deployment = yaml.safe_load((KUBE / "worker-deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    paths = [
        pod["containers"][0][p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe")
    ]
    assert ["/healthz", "/readyz"] == paths
    grace = pod["terminationGracePeriodSeconds"]
    assert f"{grace}s" == compose_services()["worker"]["stop_grace_period"]
    with _running(command, cli_env(env), tmp_path / "worker.log") as worker:
        wait_until(lambda: all(_passes(c) for c in checks), timeout=60, interval=0.25)
        for url in (f"http://127.0.0.1:{port}{path}" for path in paths):
            wait_until(functools.partial(_ok, url), timeout=30)
        worker.send_signal(signal.SIGTERM)
        assert 0 == worker.wait(timeout=grace)
    assert [False, False] == [_passes(c) for c in checks]


def _answer(url: str) -> int | None:
    """The status of a GET (None while nothing answers)."""
    try:
        return requests.get(url, timeout=5).status_code
    except requests.ConnectionError:
        return None


def test_intake_healthcheck_and_probe_pass_on_the_intake_compose_runs(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    """The intake started with docker-compose.yml's command and environment (beyond
    loopback, so with its token) passes compose's healthcheck, and answers 200 on the path
    the Kubernetes readiness probe asks; stopped, the healthcheck fails."""
    del redis_client  # flushed
    port = free_port()
    service = compose_services()["intake"]
    command = _as_run(service["command"], "--port", port)
    assert "REPORT_FORWARDER_INTAKE_TOKEN" in service["environment"]
    environ = cli_env(env, REPORT_FORWARDER_INTAKE_TOKEN=os.urandom(16).hex())
    check = _on_port(compose_healthcheck("intake"), port)
    assert not _passes(check)  # nothing answers yet: the check can fail
    with _running(command, environ, tmp_path / "intake.log"):
        wait_until(lambda: _passes(check), timeout=60, interval=0.25)
        deployment = yaml.safe_load((KUBE / "intake-deployment.yaml").read_text())
        probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
        assert _ok(f"http://127.0.0.1:{port}{probe['httpGet']['path']}")
    assert not _passes(check)
