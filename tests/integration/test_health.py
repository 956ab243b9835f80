"""A worker's /healthz and /readyz over real HTTP (docs/design.md §4.4): against worker
subprocesses and a real redis-server — through a Redis outage, with an account's key
missing, with the consumer's event loop really stuck — and against hostile bytes."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from celery.contrib.testing.worker import start_worker
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from worker.delivery.celery_app import create_app, worker_options
from worker.delivery.runtime import Runtime
from worker.observability.health import Liveness, Probes, Readiness, redis_ping
from worker.observability.metrics import Metrics
from worker.observability.serving import MAX_CONNECTIONS, MAX_PER_ADDRESS, REQUEST_TIMEOUT_S
from worker.settings import Account, Settings
from worker.testing.processes import RedisProcess, WorkerProcesses, free_port

from .conftest import CLIENT_KEY, FAST_RECOVERY, cli_env, wait_until

Answer = tuple[int, dict[str, Any]]


def probe(port: int, path: str) -> Answer | None:
    """(status, JSON body) of GET ``path``, or None while nothing answers."""
    try:
        response = requests.get(f"http://127.0.0.1:{port}{path}", timeout=5)
    except requests.RequestException:
        return None
    return response.status_code, response.json()


def answered(port: int, path: str, status: int, check: Callable[[dict[str, Any]], bool]) -> bool:
    answer = probe(port, path)
    return answer is not None and answer[0] == status and check(answer[1])


@contextlib.contextmanager
def worker_process(environ: dict[str, str], logs: Path) -> Iterator[tuple[int, WorkerProcesses]]:
    """A worker subprocess serving its metrics port (given through the environment, as
    compose and Kubernetes set it); stopped with SIGTERM afterwards."""
    port = free_port()
    workers = WorkerProcesses({**environ, "REPORT_FORWARDER_WORKER_METRICS_PORT": str(port)}, logs)
    workers.spawn(concurrency=2)
    try:
        yield port, workers
    finally:
        workers.stop_all()


def no_traceback(workers: WorkerProcesses) -> None:
    for path in workers.log_paths():
        text = path.read_text(errors="replace")
        assert "Traceback" not in text, text[-3000:]
        assert CLIENT_KEY not in text


def all_ok(body: dict[str, Any]) -> bool:
    return all(v == "ok" for v in body["checks"].values() if isinstance(v, str))


HOSTILE = [
    b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",  # request line over 64 KiB: 414
    b"GET /healthz HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n",  # too many headers: 431
    b"GET /healthz HTTP/1.1\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n",  # header too long
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),  # a TLS hello
    b"\x00\xff\xfe\r\n\r\n",
    b"POST /readyz HTTP/1.1\r\nContent-Length: 99999999\r\n\r\nxx",
    b"GET /healthz HTTP/9.9\r\n\r\n",
    b"GET\r\n\r\n",
    b"\r\n\r\n\r\n",
    b"GET /healthz\r\n",  # HTTP/0.9
    b"GET /%ff%00%0a HTTP/1.0\r\n\r\n",
]


def send_raw(port: int, data: bytes) -> bytes:
    """Send ``data``, close our side, read what comes back until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(OSError):  # the server may answer and close before all is sent
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


def status_of(raw: bytes) -> int | None:
    """The status of an HTTP answer, None for no answer (closed) or a 0.9 one (no line)."""
    if not raw.startswith(b"HTTP/"):
        return None
    return int(raw.split(b" ", 2)[1])


@pytest.mark.timeout(120)
def test_a_worker_is_alive_and_ready_and_shrugs_off_hostile_bytes(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    """A worker subprocess answers /healthz and /readyz 200 with every check "ok", still
    does after malformed requests (each a 4xx or a closed connection), and /metrics is
    still Prometheus text; nothing reaches its log as a traceback."""
    del redis_client  # flushed
    environ = cli_env(env)
    with worker_process(environ, tmp_path / "logs") as (port, workers):
        wait_until(lambda: answered(port, "/healthz", 200, all_ok), timeout=60)
        assert answered(port, "/readyz", 200, lambda b: b["ready"] and all_ok(b))
        assert {"default": "ok"} == probe(port, "/readyz")[1]["checks"]["accounts"]  # type: ignore[index]
        statuses = [status_of(send_raw(port, data)) for data in HOSTILE]
        assert all(s is None or 400 <= s < 500 for s in statuses), statuses
        assert 404 == requests.get(f"http://127.0.0.1:{port}/", timeout=5).status_code
        metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert "report_forwarder_reports_total" in metrics.text
        assert answered(port, "/healthz", 200, all_ok)
    no_traceback(workers)


@pytest.mark.timeout(180)
def test_readyz_goes_unready_while_redis_is_down_and_ready_after_healthz_stays_alive(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Redis killed under a running worker: /readyz answers 503 naming the Redis while
    /healthz keeps answering 200 (its consumer reconnecting, not stuck); with Redis back
    on the same port, /readyz is 200 again and the consumer's loop turns again."""
    server = RedisProcess(tmp_path / "redis", appendonly=False).start()
    config = tmp_path / "w.toml"
    config.write_text(FAST_RECOVERY)
    environ = cli_env(env, REDIS_URL=server.url, REPORT_FORWARDER_CONFIG=str(config))
    liveness_seen: list[int] = []

    def during(port: int, path: str, status: int, check: Callable[[dict[str, Any]], bool]) -> bool:
        """``path`` answers ``status`` and passes ``check``; records /healthz on the way."""
        health = probe(port, "/healthz")
        liveness_seen.append(health[0] if health else 0)
        return answered(port, path, status, check)

    try:
        with worker_process(environ, tmp_path / "logs") as (port, workers):
            wait_until(lambda: answered(port, "/readyz", 200, all_ok), timeout=60)
            wait_until(lambda: answered(port, "/healthz", 200, all_ok), timeout=30)
            server.kill()
            wait_until(
                lambda: during(
                    port,
                    "/readyz",
                    503,
                    lambda b: (
                        f"127.0.0.1:{server.port}" in b["checks"]["redis"]
                        and "unreachable" in b["checks"]["redis"]
                    ),
                ),
                timeout=30,
            )
            # the consumer noticed the outage and is reconnecting: still alive
            wait_until(
                lambda: during(
                    port,
                    "/healthz",
                    200,
                    lambda b: b["checks"]["consumer"].startswith("connecting to the broker"),
                ),
                timeout=60,
            )
            assert probe(port, "/readyz") is not None
            assert 503 == probe(port, "/readyz")[0]  # type: ignore[index]
            # a scrape during the outage says so, inside Prometheus's scrape timeout (not
            # after the worker's own 30-s patience, which would turn it into "target down")
            scrape = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
            assert "report_forwarder_redis_up 0.0" in scrape.text
            server.start()
            wait_until(lambda: during(port, "/readyz", 200, all_ok), timeout=60)
            wait_until(lambda: during(port, "/healthz", 200, all_ok), timeout=60)
        assert {200} == set(liveness_seen), liveness_seen
        no_traceback(workers)
    finally:
        server.stop()


def test_a_worker_without_an_accounts_key_never_runs_it_exits_2_naming_the_variable(
    env: dict[str, str], make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """The key check of /readyz is also the worker's start-up check: a worker missing an
    account's key exits 2 naming the variable and the account (so a running worker's
    /readyz never finds one missing; the in-process test below shows the answer)."""
    config = tmp_path / "two.toml"
    config.write_text(FAST_RECOVERY + TWO_ACCOUNTS)
    environ = cli_env(env, REPORT_FORWARDER_CONFIG=str(config))
    with worker_process(environ, tmp_path / "logs") as (_, workers):
        assert 2 == workers.procs[0].wait(60)
    text = workers.log_paths()[0].read_text()
    assert "SPARE_KEY (account 'spare')" in text
    assert CLIENT_KEY not in text
    del make_settings


TWO_ACCOUNTS = """
[accounts.default]
provider = "capmonster"
key_env = "CAPMONSTER_CLIENT_KEY"
rate_limit = "50/second"
[accounts.spare]
provider = "capmonster"
key_env = "SPARE_KEY"
rate_limit = "5/second"
"""


@contextlib.contextmanager
def serving(probes: Probes) -> Iterator[int]:
    """The metrics port of an in-process worker, with ``probes``, on loopback."""
    port = free_port()
    server, thread = Metrics().serve(port, "127.0.0.1", probes=probes)
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def key_from(environ: dict[str, str]) -> Callable[[Account], bool]:
    return lambda account: bool(environ.get(account.key_env))


def test_readyz_names_the_account_whose_key_is_missing(
    env: dict[str, str], make_settings: Callable[..., Settings], redis_client: redis.Redis
) -> None:
    """With the real Redis answering and one account's key unset, /readyz is 503 naming
    that account and its variable; the key that is set appears nowhere in the answer."""
    settings = make_settings(TWO_ACCOUNTS)
    readiness = Readiness(settings, redis_ping(settings.redis_url), key_from(env))
    with serving(Probes(Liveness(), readiness, lambda: False)) as port:
        response = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    assert 503 == response.status_code
    assert {
        "ready": False,
        "checks": {
            "redis": "ok",
            "accounts": {"default": "ok", "spare": "missing: SPARE_KEY is not set"},
            "worker": "ok",
        },
    } == response.json()
    assert CLIENT_KEY not in response.text
    del redis_client


def test_readyz_never_shows_the_redis_password(
    env: dict[str, str], make_settings: Callable[..., Settings]
) -> None:
    """A Redis URL with a password that nothing answers: /readyz says which Redis is
    unreachable (host and port), within the PING's short timeout, without the password."""
    port = free_port()  # nothing listens there
    url = f"redis://:hunter2-pw@127.0.0.1:{port}/0"
    settings = make_settings()
    readiness = Readiness(settings, redis_ping(url), key_from(env))
    with serving(Probes(Liveness(), readiness, lambda: False)) as http_port:
        response = requests.get(f"http://127.0.0.1:{http_port}/readyz", timeout=10)
    assert 503 == response.status_code
    assert f"127.0.0.1:{port}" in response.json()["checks"]["redis"]
    assert "unreachable" in response.json()["checks"]["redis"]
    assert "hunter2" not in response.text


@pytest.mark.timeout(120)
def test_healthz_is_503_while_the_consumers_event_loop_is_stuck(
    settings: Settings, env: dict[str, str]
) -> None:
    """A real Celery worker whose event loop is blocked (a callback on the loop that does
    not return, as a hung broker call would): /healthz turns 503 saying the loop is stuck,
    while /readyz (Redis answers) stays 200; once the loop runs again, /healthz is 200."""
    runtime = Runtime(settings, settings.redis_url, env)
    runtime.liveness = Liveness(loop_stale_s=3.0)
    app = create_app(runtime)
    readiness = Readiness(settings, redis_ping(runtime.redis_url), key_from(env))
    probes = Probes(runtime.liveness, readiness, runtime.stopping.is_set)
    entered, release = threading.Event(), threading.Event()

    def stuck() -> None:
        entered.set()
        release.wait(60)

    options = worker_options(settings.queue, 2)
    try:
        with (
            start_worker(app, perform_ping_check=False, shutdown_timeout=30, **options) as w,
            serving(probes) as port,
        ):
            wait_until(lambda: answered(port, "/healthz", 200, all_ok), timeout=30)
            hub: Any = w.hub  # the consumer's event loop (kombu's Hub)
            hub.call_soon(stuck)
            wait_until(entered.is_set, timeout=10)
            wait_until(
                lambda: answered(
                    port,
                    "/healthz",
                    503,
                    lambda b: b["checks"]["consumer"].startswith("stuck: the event loop"),
                ),
                timeout=30,
            )
            assert answered(port, "/readyz", 200, all_ok)
            release.set()
            wait_until(lambda: answered(port, "/healthz", 200, all_ok), timeout=30)
            runtime.begin_shutdown()
            assert answered(
                port, "/healthz", 503, lambda b: b["checks"]["worker"] == "shutting down"
            )
            assert answered(port, "/readyz", 503, lambda b: not b["ready"])
    finally:
        release.set()
        runtime.client.close()


@pytest.fixture
def port_with_probes(
    env: dict[str, str], make_settings: Callable[..., Settings], redis_client: redis.Redis
) -> Iterator[int]:
    """The metrics port with real probes (the real Redis answers; loops freshly marked)."""
    del redis_client
    settings = make_settings()
    liveness = Liveness()
    liveness.loop_ticked()
    liveness.heartbeat_ticked()
    readiness = Readiness(settings, redis_ping(settings.redis_url), key_from(env))
    with serving(Probes(liveness, readiness, lambda: False)) as port:
        yield port


@hsettings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    data=st.one_of(
        st.binary(max_size=3000),
        st.builds(
            lambda method, path, rest: method + b" " + path + b" HTTP/1.1\r\n" + rest,
            st.sampled_from([b"GET", b"HEAD", b"POST", b"OPTIONS", b"\xff\xfe", b""]),
            st.sampled_from([b"/healthz", b"/readyz", b"/metrics", b"", b"*", b"//x"]).flatmap(
                lambda p: st.binary(max_size=200).map(lambda tail: p + tail)
            ),
            st.binary(max_size=2000),
        ),
    )
)
def test_raw_bytes_never_break_the_port(
    port_with_probes: int, data: bytes, capfd: pytest.CaptureFixture[str]
) -> None:
    """Whatever bytes arrive, the answer is a 4xx, a probe's answer or a closed connection;
    nothing is printed (no traceback), and the port still answers /healthz."""
    status = status_of(send_raw(port_with_probes, data))
    assert status is None or status < 500 or status == 503, (status, data[:200])
    assert answered(port_with_probes, "/healthz", 200, all_ok)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err


@pytest.mark.timeout(60)
def test_connections_over_the_cap_are_closed_and_the_port_recovers(port_with_probes: int) -> None:
    """Idle connections fill the cap; one more is closed at once (not queued behind them);
    once they time out, the port answers again."""
    idle = [
        socket.create_connection(("127.0.0.1", port_with_probes)) for _ in range(MAX_CONNECTIONS)
    ]
    try:
        # the server takes them one by one; wait until an extra one is turned away
        def refused() -> bool:
            with socket.create_connection(("127.0.0.1", port_with_probes), timeout=5) as extra:
                try:
                    extra.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                    return extra.recv(100) == b""
                except ConnectionResetError:
                    return True

        wait_until(refused, timeout=20)
        # the idle ones send nothing: each is dropped when its read times out
        wait_until(lambda: answered(port_with_probes, "/healthz", 200, all_ok), timeout=30)
    finally:
        for sock in idle:
            sock.close()
    assert json.loads(requests.get(f"http://127.0.0.1:{port_with_probes}/readyz", timeout=5).text)[
        "ready"
    ]


class Crowd:
    """Connections a hostile or broken neighbour holds open on the metrics port from one
    loopback ``address``: ``idle`` that send nothing and ``slow`` that trickle a request a
    byte a second; each one the port closes is opened again at the next tick."""

    def __init__(self, port: int, address: str, *, idle: int, slow: int) -> None:
        self.port = port
        self.address = address
        self.sockets: list[tuple[bool, socket.socket | None]] = [(False, None)] * idle
        self.sockets += [(True, None)] * slow
        self.sent: dict[int, int] = {}
        self.dropped = 0  # connections the port closed after holding them
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Crowd:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.thread.join(10)
        for _, sock in self.sockets:
            if sock is not None:
                sock.close()

    def _open(self) -> socket.socket | None:
        try:
            return socket.create_connection(
                ("127.0.0.1", self.port), timeout=2, source_address=(self.address, 0)
            )
        except OSError:
            return None

    def _closed(self, sock: socket.socket) -> bool:
        try:
            return sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _tick(self) -> None:
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        for index, (slow, held) in enumerate(self.sockets):
            sock = held
            if sock is not None and self._closed(sock):
                sock.close()
                sock = None
                self.dropped += 1
            if sock is None:
                sock = self._open()
                self.sent[index] = 0
            if sock is not None and slow:
                sent = self.sent[index]
                with contextlib.suppress(OSError):
                    sock.send(request[sent % len(request) : sent % len(request) + 1])
                self.sent[index] = sent + 1
            self.sockets[index] = (slow, sock)

    def _run(self) -> None:
        while not self.stop.is_set():
            self._tick()
            self.stop.wait(1.0)  # the pace of the trickle, not a synchronisation


@pytest.mark.timeout(120)
def test_probes_answer_beside_idle_and_trickling_connections(port_with_probes: int) -> None:
    """48 connections held open from four other loopback addresses (40 idle, 8 trickling a
    request a byte a second, each reopened when the port drops it) leave /healthz and
    /metrics answering every probe within the kubelet's 3-s timeout, throughout two of the
    port's request deadlines; and the port does drop the trickling ones."""
    addresses = [f"127.0.0.{n}" for n in range(2, 6)]
    crowds = [Crowd(port_with_probes, a, idle=10, slow=2) for a in addresses]
    failures: list[str] = []
    probes = 0
    pace = threading.Event()  # never set: waits pace the probes, as a kubelet's period does
    with contextlib.ExitStack() as stack:
        for crowd in crowds:
            stack.enter_context(crowd)
        wait_until(lambda: all(s for c in crowds for _, s in c.sockets[:8]), timeout=30)
        until = time.monotonic() + 2 * REQUEST_TIMEOUT_S + 2
        while time.monotonic() < until or not all(c.dropped for c in crowds):
            for path in ("/healthz", "/metrics"):
                probes += 1
                try:
                    response = requests.get(f"http://127.0.0.1:{port_with_probes}{path}", timeout=3)
                except requests.RequestException as exc:
                    failures.append(f"{path}: {type(exc).__name__}")
                    continue
                if 200 != response.status_code:
                    failures.append(f"{path}: HTTP {response.status_code}")
            assert time.monotonic() < until + 30, "the port never dropped a held connection"
            pace.wait(0.2)
    assert [] == failures, f"{len(failures)} of {probes} probes failed: {failures[:5]}"


@pytest.mark.timeout(60)
def test_one_address_over_its_cap_is_closed_while_others_are_answered(
    port_with_probes: int,
) -> None:
    """An address holding its cap of idle connections has one more closed at once, while
    the probe from another address is answered 200."""
    held = [
        socket.create_connection(("127.0.0.1", port_with_probes), source_address=("127.0.0.7", 0))
        for _ in range(MAX_PER_ADDRESS)
    ]
    try:

        def refused() -> bool:
            with socket.create_connection(
                ("127.0.0.1", port_with_probes), timeout=5, source_address=("127.0.0.7", 0)
            ) as extra:
                try:
                    extra.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                    return extra.recv(100) == b""
                except ConnectionResetError:
                    return True

        wait_until(refused, timeout=REQUEST_TIMEOUT_S / 2)
        assert answered(port_with_probes, "/healthz", 200, all_ok)
    finally:
        for sock in held:
            sock.close()
