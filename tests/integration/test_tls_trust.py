"""The CA certificates the worker trusts come from the environment as requests and OpenSSL
read it (worker/settings/tls.py): a private CA — a TLS-inspecting proxy's, say — signs the
sandbox's certificate for 127.0.0.1, and reports to it over https are refused until a
variable names the CA, then accepted; a variable naming what cannot be used stops the
worker and check-config with exit 2."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import certifi
import pytest
import redis

from worker.delivery import upstream
from worker.delivery.upstream import send_report
from worker.producer import Producer
from worker.settings import load_settings
from worker.testing.processes import WorkerProcesses
from worker.testing.sandbox import Sandbox

from .clirun import run_cli
from .conftest import CLIENT_KEY, cli_env

PATH = "/reportIncorrectImageCaptcha"
TASK_ID = 424242
TRUST_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")
UNSET = dict.fromkeys(TRUST_VARIABLES, "")  # "" counts as unset (and hides the host's own)


@dataclass(frozen=True)
class PrivateCA:
    ca: Path  # the CA's certificate (PEM)
    ca_dir: Path  # a directory holding it under its hashed name (openssl rehash)
    server: ssl.SSLContext  # a server context with a certificate for 127.0.0.1 it signed


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def private_ca(tmp_path_factory: pytest.TempPathFactory) -> PrivateCA:
    """A fresh CA and a server certificate for IP 127.0.0.1 signed by it (``openssl``)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no private CA to test TLS trust with")
    d = tmp_path_factory.mktemp("ca")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=report-forwarder test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-keyout", d / "ca.key", "-out", d / "ca.pem")  # fmt: skip
    _openssl("req", *ec, "-subj", "/CN=127.0.0.1",
             "-keyout", d / "server.key", "-out", d / "server.csr")  # fmt: skip
    (d / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    )
    _openssl("x509", "-req", "-in", d / "server.csr", "-CA", d / "ca.pem",
             "-CAkey", d / "ca.key", "-CAcreateserial", "-days", "2",
             "-extfile", d / "server.ext", "-out", d / "server.pem")  # fmt: skip
    ca_dir = d / "certs"
    ca_dir.mkdir()
    shutil.copy(d / "ca.pem", ca_dir / "ca.pem")
    _openssl("rehash", ca_dir)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(d / "server.pem", d / "server.key")
    return PrivateCA(d / "ca.pem", ca_dir, context)


@pytest.fixture
def https_sandbox(private_ca: PrivateCA) -> Iterator[Sandbox]:
    with Sandbox(tls=private_ca.server) as sandbox:
        yield sandbox


@pytest.fixture
def no_trust_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """None of the trust variables set (the host running the tests may set them all)."""
    for name in TRUST_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def report(sandbox: Sandbox) -> upstream.Outcome:
    """One report through a fresh client (which reads the environment at its first call)."""
    client = upstream.Client()
    try:
        return send_report(sandbox.url + PATH, CLIENT_KEY, TASK_ID, http=client)
    finally:
        client.close()


@pytest.mark.usefixtures("no_trust_env")
@pytest.mark.parametrize(
    ("variable", "names"),
    [
        ("REQUESTS_CA_BUNDLE", "file"),
        ("REQUESTS_CA_BUNDLE", "dir"),
        ("CURL_CA_BUNDLE", "file"),
        ("SSL_CERT_FILE", "file"),
        ("SSL_CERT_DIR", "dir"),
    ],
)
def test_a_private_ca_is_trusted_once_the_environment_names_it(
    https_sandbox: Sandbox,
    private_ca: PrivateCA,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    names: str,
) -> None:
    """A report to an https server whose certificate a private CA signed is refused as
    transient (certificate verify failed, nothing arrives) with no trust variable set, and
    accepted once ``variable`` names the CA's file or hashed directory."""
    refused = report(https_sandbox)
    monkeypatch.setenv(variable, str(private_ca.ca if names == "file" else private_ca.ca_dir))
    accepted = report(https_sandbox)

    assert ("transient", "CONNECTION_ERROR") == (refused.status, refused.error_code)
    assert "certificate verify failed" in refused.detail.lower()
    assert "accepted" == accepted.status, accepted
    assert 1 == https_sandbox.count()  # only the trusting client's report arrived


@pytest.mark.usefixtures("no_trust_env")
def test_requests_ca_bundle_wins_over_ssl_cert_file(
    https_sandbox: Sandbox, private_ca: PrivateCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REQUESTS_CA_BUNDLE (here certifi's bundle) is what is trusted even when
    SSL_CERT_FILE names the private CA, as with requests: the report is refused."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    monkeypatch.setenv("SSL_CERT_FILE", str(private_ca.ca))

    outcome = report(https_sandbox)

    assert "certificate verify failed" in outcome.detail.lower()
    assert 0 == https_sandbox.count()


@pytest.mark.timeout(120)
def test_a_worker_delivers_through_the_ca_requests_ca_bundle_names(
    env: dict[str, str],
    https_sandbox: Sandbox,
    private_ca: PrivateCA,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    """A worker subprocess with REQUESTS_CA_BUNDLE naming the private CA delivers a report
    to the https sandbox, which records it as a success."""
    del redis_client  # flushed
    trust = {**UNSET, "REQUESTS_CA_BUNDLE": str(private_ca.ca)}
    environ = cli_env(env, **trust, REPORT_FORWARDER_API_URL=https_sandbox.url)
    workers = WorkerProcesses(environ, tmp_path / "logs")
    workers.spawn(concurrency=2)
    try:
        producer = Producer(load_settings(environ=environ))
        assert 1 == producer.enqueue_many([(TASK_ID, "image")]).queued
        assert https_sandbox.wait_for(1, timeout=60), workers.log_paths()[0].read_text()[-2000:]
    finally:
        workers.stop_all()
    assert [True] == [r.success for r in https_sandbox.requests()]


@pytest.mark.parametrize("command", [("check-config",), ("worker", "--concurrency", "1")])
def test_a_missing_bundle_named_by_the_environment_exits_2_naming_it(
    env: dict[str, str], tmp_path: Path, command: tuple[str, ...]
) -> None:
    """REQUESTS_CA_BUNDLE naming a file that is not there: check-config and worker exit 2
    with one line naming the variable and the path, no traceback."""
    missing = tmp_path / "corp-ca.pem"

    result = run_cli({**env, **UNSET, "REQUESTS_CA_BUNDLE": str(missing)}, *command, timeout=60)

    assert 2 == result.returncode, result.stderr
    lines = [line for line in result.stderr.splitlines() if "REQUESTS_CA_BUNDLE" in line]
    assert [f"error: REQUESTS_CA_BUNDLE='{missing}': no such file"] == [
        line.split(" (accepted")[0] for line in lines
    ]
    assert "Traceback" not in result.stderr


def test_check_config_shows_what_tls_trusts(env: dict[str, str], private_ca: PrivateCA) -> None:
    """check-config names the variable and the CA file that TLS trusts (certifi's bundle
    when none is set)."""
    named = run_cli({**env, **UNSET, "SSL_CERT_FILE": str(private_ca.ca)}, "check-config")
    default = run_cli({**env, **UNSET}, "check-config")

    assert 0 == named.returncode, named.stderr
    assert f"tls_trust: SSL_CERT_FILE={private_ca.ca}" in named.stdout.splitlines()
    assert f"tls_trust: certifi ({certifi.where()})" in default.stdout.splitlines()
