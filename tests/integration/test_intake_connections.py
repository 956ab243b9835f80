"""The intake's connections over real sockets on loopback: header, body and keep-alive
deadlines, the caps per client address and in all, and what each logs and counts.

Distinct client addresses are 127.0.0.x source addresses (all of 127.0.0.0/8 is loopback
on Linux). Deadlines are set short here; nothing sleeps: each test waits on the socket
(the server closing it) or polls the counter it asserts."""

from __future__ import annotations

import contextlib
import json
import resource
import select
import subprocess
import sys
import time
from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
import redis
import requests
from structlog.testing import capture_logs

from worker.intake import Intake
from worker.intake.server import FD_RESERVE, ConnectionLimits, fitted
from worker.settings import Settings

from .conftest import CLIENT_KEY, queue_length, wait_until
from .intake_support import Server, read_until_closed, request_bytes

IMAGE = "/reportIncorrectImageCaptcha"
TIMED_OUT = "report_forwarder_intake_connections_timed_out_total"
REFUSED = "report_forwarder_intake_connections_refused_total"
REQUESTS = "report_forwarder_intake_requests_total"
SHORT = ConnectionLimits(header_timeout_s=0.3, body_timeout_s=0.3, keep_alive_s=0.3)


@pytest.fixture
def make_server(settings: Settings, env: dict[str, str]) -> Iterator[Any]:
    with contextlib.ExitStack() as stack:

        def make(limits: ConnectionLimits) -> Server:
            app = Intake(settings, settings.redis_url, environ=env)
            return stack.enter_context(Server(app, limits))

        yield make


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def report_request(task_id: int, *, close: bool = False) -> bytes:
    body = json.dumps({"clientKey": CLIENT_KEY, "taskId": task_id}).encode()
    return request_bytes(IMAGE, body, close=close)


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [line for line in logs if line["event"] == name]


def test_a_client_that_never_finishes_its_headers_is_answered_408_and_closed(
    make_server: Any,
) -> None:
    """Headers that stop half-way: after the header deadline, a 408 and the connection
    closed; counted and logged as a header timeout."""
    server = make_server(SHORT)
    with capture_logs() as logs, server.connect() as sock:
        sock.sendall(b"POST /reportIncorrectImageCaptcha HTTP/1.1\r\nHost: t\r\nContent-")
        answer = read_until_closed(sock)
        wait_until(lambda: server.metric(TIMED_OUT, phase="headers") == 1)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"ERROR_REQUEST_TIMEOUT" in answer
    assert ["headers"] == [e["phase"] for e in events(logs, "intake.connections_timed_out")]


def test_headers_sent_a_byte_at_a_time_do_not_extend_the_deadline(make_server: Any) -> None:
    """A slowloris client, trickling header bytes for ever, is still closed at the header
    deadline: bytes arriving do not restart it."""
    server = make_server(SHORT)
    trickle = iter(b"GET /healthz HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 100_000)
    with server.connect() as sock:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            readable, _, _ = select.select([sock], [], [], 0.02)  # an answer, or EOF
            if readable:
                break
            try:
                sock.send(bytes([next(trickle)]))
            except OSError:  # reset: the server closed it
                break
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")
    wait_until(lambda: server.metric(TIMED_OUT, phase="headers") == 1)


def test_a_silent_connection_is_closed_without_an_answer(make_server: Any) -> None:
    """A connection that never sends a byte is closed at the header deadline, silently."""
    server = make_server(SHORT)
    with server.connect() as sock:
        assert b"" == read_until_closed(sock)
    wait_until(lambda: server.metric(TIMED_OUT, phase="headers") == 1)


def test_a_client_that_never_finishes_its_body_is_closed_and_nothing_is_queued(
    make_server: Any, redis_client: redis.Redis
) -> None:
    """A body that stops short of its Content-Length: after the body deadline, a 408 and
    the connection closed; the partial body is not read as a request, nothing is queued."""
    server = make_server(SHORT)
    lines = b'{"taskId": 1, "captchaType": "image"}\n{"taskId": 2, "captchaType": "image"}\n'
    head = request_bytes("/v1/reports", lines + b" " * 100, "application/x-ndjson")
    with capture_logs() as logs, server.connect() as sock:
        sock.sendall(head[:-100])  # all but the last 100 bytes of the body
        answer = read_until_closed(sock)
        wait_until(lambda: server.metric(TIMED_OUT, phase="body") == 1)
        wait_until(lambda: server.metric(REQUESTS, route="/v1/reports", status="gone") == 1)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert ["body"] == [e["phase"] for e in events(logs, "intake.connections_timed_out")]
    assert 0 == queue_length(redis_client)


def test_a_client_that_leaves_mid_body_queues_nothing(
    make_server: Any, redis_client: redis.Redis
) -> None:
    """A client that closes its connection part-way through a bulk body: the lines that did
    arrive are not queued (the request is dropped, not read as complete)."""
    server = make_server(ConnectionLimits())
    lines = b'{"taskId": 1, "captchaType": "image"}\n{"taskId": 2, "captchaType": "image"}\n'
    head = request_bytes("/v1/reports", lines + b" " * 100, "application/x-ndjson")
    with server.connect() as sock:
        sock.sendall(head[:-100])
    statuses = ("200", "400", "gone")
    wait_until(
        lambda: any(server.metric(REQUESTS, route="/v1/reports", status=s) for s in statuses)
    )
    assert 0 == queue_length(redis_client)
    assert 1 == server.metric(REQUESTS, route="/v1/reports", status="gone")


def test_an_idle_keep_alive_connection_is_closed(make_server: Any) -> None:
    """After a response, a keep-alive connection with no next request is closed at the
    keep-alive deadline; one that keeps sending requests is not."""
    server = make_server(SHORT)
    with server.connect() as sock:
        task_id, busy_until = 0, time.monotonic() + 1.5  # five times each deadline
        while time.monotonic() < busy_until:
            task_id += 1
            sock.sendall(report_request(task_id))
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200 "), (task_id, answer)
        assert b"" == read_until_closed(sock)
    wait_until(lambda: server.metric(TIMED_OUT, phase="keep_alive") == 1)
    assert 0 == server.metric(TIMED_OUT, phase="headers")


def test_pipelined_requests_are_all_answered(make_server: Any) -> None:
    """Requests sent back to back on one connection, before any answer, are each answered
    in order (the guarded protocol keeps uvicorn's pipelining)."""
    server = make_server(ConnectionLimits())
    with server.connect() as sock:
        sock.sendall(report_request(1) + report_request(2) + report_request(3, close=True))
        answers = read_until_closed(sock)
    assert 3 == answers.count(b"HTTP/1.1 200 ")


def test_over_its_address_cap_a_connection_is_refused_while_other_addresses_are_served(
    make_server: Any, http: requests.Session
) -> None:
    """With 5 connections open from 127.0.0.2 (its cap), a 6th from there gets a 429 and
    is closed, counted and logged; a client from another address is served."""
    server = make_server(ConnectionLimits(max_per_client=5))
    with capture_logs() as logs, contextlib.ExitStack() as stack:
        held = [stack.enter_context(server.connect("127.0.0.2")) for _ in range(5)]
        wait_until(lambda: server.guard.by_peer.get("127.0.0.2") == 5)
        extra = stack.enter_context(server.connect("127.0.0.2"))
        answer = read_until_closed(extra)
        body = {"clientKey": CLIENT_KEY, "taskId": 77}
        ok = http.post(server.url + IMAGE, json=body, timeout=10)
        assert 5 == len(held)
    assert answer.startswith(b"HTTP/1.1 429 ")
    assert b"connection: close" in answer
    assert 200 == ok.status_code
    assert 1 == server.metric(REFUSED, why="client_cap")
    (line,) = events(logs, "intake.connections_refused")
    assert ("client_cap", 1, "127.0.0.2") == (line["why"], line["count"], line["last_peer"])


def test_over_the_server_cap_a_connection_is_refused_503(make_server: Any) -> None:
    """With the server's cap of connections open, a new one from any address gets a 503 and
    is closed; once one closes, a new one is served."""
    server = make_server(ConnectionLimits(max_connections=3))
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(server.connect(f"127.0.0.{n}")) for n in (2, 3, 4)]
        wait_until(lambda: server.guard.total == 3)
        with server.connect("127.0.0.5") as extra:
            assert read_until_closed(extra).startswith(b"HTTP/1.1 503 ")
        held.pop().close()
        wait_until(lambda: server.guard.total == 2)
        with server.connect("127.0.0.5") as sock:
            sock.sendall(report_request(5))
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert 1 == server.metric(REFUSED, why="server_cap")


def test_two_thousand_idle_connections_from_one_address_do_not_starve_others(
    make_server: Any, http: requests.Session
) -> None:
    """2,000 idle connections from one address (cap 100): the ones over the cap are refused
    and closed, the refusals are counted but logged in a line or two, and a well-behaved
    client from another address is served."""
    server = make_server(ConnectionLimits(max_per_client=100))
    with capture_logs() as logs, contextlib.ExitStack() as stack:
        for _ in range(2000):
            stack.enter_context(server.connect("127.0.0.9"))
        wait_until(lambda: server.metric(REFUSED, why="client_cap") == 1900)
        body = {"clientKey": CLIENT_KEY, "taskId": 78}
        ok = http.post(server.url + IMAGE, json=body, timeout=10)
        assert 100 == server.guard.by_peer["127.0.0.9"]
    assert 200 == ok.status_code
    refusal_lines = events(logs, "intake.connections_refused")
    assert 1 <= len(refusal_lines) <= 2
    assert 1 == refusal_lines[0]["count"]


def test_the_open_file_limit_is_raised_to_its_hard_limit() -> None:
    """At `serve` start the soft RLIMIT_NOFILE is raised to the hard limit (a child with a
    lowered soft limit shows it), and a connection cap above it is lowered to fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)
    code = (
        "import resource; from worker.intake.server import raise_fd_limit; "
        "print(raise_fd_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard)),
    ).stdout.split()
    assert [str(hard), str(hard)] == out
    assert soft <= hard
    assert (
        1024 - FD_RESERVE == fitted(ConnectionLimits(max_connections=50_000), 1024).max_connections
    )
    assert 1024 - FD_RESERVE == fitted(ConnectionLimits(max_connections=0), 1024).max_connections
    assert 500 == fitted(ConnectionLimits(max_connections=500), 1024).max_connections
