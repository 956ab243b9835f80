"""The sandbox API double, driven over real HTTP on loopback."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from worker.testing.sandbox import REPORT_PATHS, RecordedRequest, Rule, Sandbox

IMAGE = "/reportIncorrectImageCaptcha"
HCAPTCHA = "/reportIncorrectHcaptcha"
SUCCESS = {"errorId": 0, "status": "success"}


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox() as sb:
        yield sb


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def report(
    http: requests.Session,
    sb: Sandbox,
    task_id: object = 1,
    key: object = "k",
    path: str = IMAGE,
) -> requests.Response:
    return http.post(sb.url + path, json={"clientKey": key, "taskId": task_id}, timeout=5)


def raw_request(path: str, body: bytes, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def read_answers(sock: socket.socket, n: int) -> list[tuple[int, dict[str, str], bytes]]:
    """Read exactly n HTTP answers (Content-Length framed) from a socket."""
    buffer = b""
    answers: list[tuple[int, dict[str, str], bytes]] = []
    while len(answers) < n:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            lines = buffer[:end].decode().split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
            stop = end + 4 + int(headers["content-length"])
            if len(buffer) >= stop:
                answers.append((int(lines[0].split()[1]), headers, buffer[end + 4 : stop]))
                buffer = buffer[stop:]
                continue
        chunk = sock.recv(65536)
        assert chunk, "connection closed before all answers arrived"
        buffer += chunk
    return answers


@pytest.mark.parametrize("path", sorted(REPORT_PATHS))
def test_default_answer_is_success_on_each_endpoint(
    sandbox: Sandbox, http: requests.Session, path: str
) -> None:
    """Every report endpoint answers 200 success JSON by default."""
    r = report(http, sandbox, path=path)
    assert 200 == r.status_code
    assert "application/json" == r.headers["Content-Type"]
    assert SUCCESS == r.json()


def test_unknown_path_is_404_no_such_method(sandbox: Sandbox, http: requests.Session) -> None:
    """An unknown path answers 404 ERROR_NO_SUCH_METHOD."""
    r = report(http, sandbox, path="/reportNothing")
    assert 404 == r.status_code
    assert "ERROR_NO_SUCH_METHOD" == r.json()["errorCode"]


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"taskId": 5}', b'{"clientKey": ""}'])
def test_body_without_key_is_key_does_not_exist(
    sandbox: Sandbox, http: requests.Session, body: bytes
) -> None:
    """A body that is not a JSON object with a non-empty clientKey gets ERROR_KEY_DOES_NOT_EXIST."""
    r = http.post(sandbox.url + IMAGE, data=body, timeout=5)
    assert 200 == r.status_code
    assert {"errorId": 1, "errorCode": "ERROR_KEY_DOES_NOT_EXIST"}.items() <= r.json().items()


@pytest.mark.parametrize("task_id", [None, 0, -3, "7", True, 1.5])
def test_bad_task_id_is_no_such_captcha_id(
    sandbox: Sandbox, http: requests.Session, task_id: object
) -> None:
    """A taskId that is missing or not a positive int gets 200 ERROR_NO_SUCH_CAPCHA_ID."""
    r = report(http, sandbox, task_id=task_id)
    assert 200 == r.status_code
    assert "ERROR_NO_SUCH_CAPCHA_ID" == r.json()["errorCode"]
    assert None is sandbox.requests()[0].task_id


def test_keys_restrict_valid_client_keys(http: requests.Session) -> None:
    """With keys given, only those keys are accepted."""
    with Sandbox(keys=["good"]) as sb:
        assert SUCCESS == report(http, sb, key="good").json()
        assert "ERROR_KEY_DOES_NOT_EXIST" == report(http, sb, key="other").json()["errorCode"]


def test_rule_error_code_answers_that_error(sandbox: Sandbox, http: requests.Session) -> None:
    """A rule with error_code answers errorId 1 with that code and a description."""
    sandbox.add_rule(Rule(error_code="ERROR_ZERO_BALANCE", http_status=402))
    r = report(http, sandbox)
    assert 402 == r.status_code
    body = r.json()
    assert (1, "ERROR_ZERO_BALANCE") == (body["errorId"], body["errorCode"])
    assert body["errorDescription"]
    assert "ERROR_ZERO_BALANCE" == sandbox.requests()[0].error_code


def test_rule_http_status_alone_answers_empty_body(
    sandbox: Sandbox, http: requests.Session
) -> None:
    """A rule with only http_status answers that status with no body."""
    sandbox.add_rule(Rule(http_status=503))
    r = report(http, sandbox)
    assert (503, b"") == (r.status_code, r.content)
    assert "http_503" == sandbox.requests()[0].outcome


def test_rule_raw_body_is_sent_verbatim_as_html(sandbox: Sandbox, http: requests.Session) -> None:
    """A rule with body sends that text verbatim as text/html."""
    sandbox.add_rule(Rule(http_status=502, body="<html>502 Bad Gateway</html>"))
    r = report(http, sandbox)
    assert (502, "<html>502 Bad Gateway</html>") == (r.status_code, r.text)
    assert "text/html" == r.headers["Content-Type"]


@pytest.mark.parametrize(("seconds", "header"), [(30, "30"), (2.0, "2"), (1.5, "1.5")])
def test_rule_retry_after_sets_header(
    sandbox: Sandbox, http: requests.Session, seconds: float, header: str
) -> None:
    """A rule with retry_after adds a Retry-After header, an integer when whole."""
    sandbox.add_rule(Rule(http_status=429, retry_after=seconds))
    assert header == report(http, sandbox).headers["Retry-After"]


def test_latency_rule_and_global_latency_still_answer(
    sandbox: Sandbox, http: requests.Session
) -> None:
    """Answers are held back by the global latency, plus a matching rule's own latency on
    top, counted from when the sandbox logged the request; they still carry the right body."""
    sandbox.set_latency(40)
    sandbox.add_rule(Rule(task_id=2, latency_ms=120))
    held: dict[int, float] = {}
    for task_id in (2, 3):
        answer = report(http, sandbox, task_id=task_id)
        answered = time.monotonic()  # the answer is in: it left the sandbox before this
        assert SUCCESS == answer.json()
        (logged,) = [r for r in sandbox.requests() if r.task_id == task_id]
        held[task_id] = answered - logged.monotonic
    assert held[2] >= 0.040 + 0.120
    assert held[3] >= 0.040


def test_rule_drop_closes_without_answer(sandbox: Sandbox, http: requests.Session) -> None:
    """A drop rule closes the connection unanswered, a ConnectionError for requests."""
    sandbox.add_rule(Rule(drop=True, times=1))
    with pytest.raises(requests.ConnectionError):
        report(http, sandbox)
    assert (0, "dropped") == (sandbox.requests()[0].status, sandbox.requests()[0].outcome)
    assert SUCCESS == report(http, sandbox).json()


def test_rule_times_limits_matches(sandbox: Sandbox, http: requests.Session) -> None:
    """A rule with times=2 applies to two requests, then the default answer returns."""
    sandbox.add_rule(Rule(http_status=503, times=2))
    assert [503, 503, 200] == [report(http, sandbox).status_code for _ in range(3)]


def test_rules_match_criteria_first_wins(sandbox: Sandbox, http: requests.Session) -> None:
    """Rules match on task_id, client_key and path; the first applicable rule wins."""
    sandbox.add_rule(Rule(task_id=7, error_code="ERROR_A"))
    sandbox.add_rule(Rule(client_key="b", error_code="ERROR_B"))
    sandbox.add_rule(Rule(path=HCAPTCHA, error_code="ERROR_C"))
    sandbox.add_rule(Rule(error_code="ERROR_NEVER", task_id=7))

    def code(task_id: int, key: str, path: str) -> object:
        return report(http, sandbox, task_id=task_id, key=key, path=path).json().get("errorCode")

    assert "ERROR_A" == code(7, "b", HCAPTCHA)
    assert "ERROR_B" == code(8, "b", HCAPTCHA)
    assert "ERROR_C" == code(8, "a", HCAPTCHA)
    assert None is code(8, "a", IMAGE)
    sandbox.clear_rules()
    assert None is code(7, "b", HCAPTCHA)


def test_keep_alive_reuses_one_connection(sandbox: Sandbox, http: requests.Session) -> None:
    """Several requests on one Session go over one accepted connection."""
    for task_id in range(1, 6):
        assert 200 == report(http, sandbox, task_id=task_id).status_code
    assert 1 == sandbox.connections_accepted


def test_pipelined_requests_are_answered_in_order(sandbox: Sandbox) -> None:
    """Two requests in one send get two answers in order, even when the first is delayed."""
    sandbox.add_rule(Rule(task_id=1, latency_ms=30, error_code="ERROR_FIRST"))
    first = raw_request(IMAGE, b'{"clientKey": "k", "taskId": 1}')
    second = raw_request(IMAGE, b'{"clientKey": "k", "taskId": 2}')
    with socket.create_connection(("127.0.0.1", sandbox.port), timeout=5) as sock:
        sock.sendall(first + second)
        answers = read_answers(sock, 2)
    assert [200, 200] == [status for status, _, _ in answers]
    assert "ERROR_FIRST" == json.loads(answers[0][2])["errorCode"]
    assert SUCCESS == json.loads(answers[1][2])
    assert [1, 2] == [r.task_id for r in sandbox.requests()]


def test_connection_close_is_honoured(sandbox: Sandbox) -> None:
    """A request with Connection: close is answered and the server closes the connection."""
    request = raw_request(IMAGE, b'{"clientKey": "k", "taskId": 1}', "Connection: close\r\n")
    with socket.create_connection(("127.0.0.1", sandbox.port), timeout=5) as sock:
        sock.sendall(request)
        ((status, headers, _),) = read_answers(sock, 1)
        assert b"" == sock.recv(1)
    assert (200, "close") == (status, headers["connection"])


def test_post_without_content_length_is_411(sandbox: Sandbox) -> None:
    """A POST without Content-Length (e.g. chunked) gets 411."""
    request = f"POST {IMAGE} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", sandbox.port), timeout=5) as sock:
        sock.sendall(request.encode())
        assert 411 == read_answers(sock, 1)[0][0]


def test_oversized_body_is_413(sandbox: Sandbox, http: requests.Session) -> None:
    """A body over 64 KiB gets 413 and is not logged."""
    r = http.post(sandbox.url + IMAGE, data=b"x" * (64 * 1024 + 1), timeout=5)
    assert 413 == r.status_code
    assert 0 == sandbox.count()


def test_request_log_records_and_filters(sandbox: Sandbox, http: requests.Session) -> None:
    """The log keeps each request's fields; count filters; clear empties it."""
    sandbox.add_rule(Rule(task_id=2, error_code="ERROR_NO_SUCH_CAPCHA_ID"))
    report(http, sandbox, task_id=1)
    report(http, sandbox, task_id=2, path=HCAPTCHA)
    first = sandbox.requests()[0]
    assert isinstance(first, RecordedRequest)
    assert (IMAGE, 1, "k", 200, None) == (
        first.path,
        first.task_id,
        first.client_key,
        first.status,
        first.error_code,
    )
    assert {"clientKey": "k", "taskId": 1} == json.loads(first.body)
    assert first.monotonic <= sandbox.requests()[1].monotonic
    assert (2, 1, 1, 1) == (
        sandbox.count(),
        sandbox.count(path=HCAPTCHA),
        sandbox.count(success=True),
        sandbox.count(task_id=2, success=False),
    )
    sandbox.clear()
    assert [] == sandbox.requests()


def test_wait_for_count_predicate_and_timeout(sandbox: Sandbox, http: requests.Session) -> None:
    """wait_for returns True once the count or predicate holds, False at its deadline."""
    report(http, sandbox)
    assert sandbox.wait_for(1, timeout=1)
    assert sandbox.wait_for(lambda: sandbox.count(success=True) == 1, timeout=1)
    assert not sandbox.wait_for(2, timeout=0.05)


def test_control_api_round_trip(sandbox: Sandbox, http: requests.Session) -> None:
    """Rules, latency, the log (client key hashed, even in the body) and stats work over HTTP."""
    control = sandbox.url + "/_sandbox"
    rule = {"task_id": 9, "error_code": "ERROR_TOO_MUCH_REQUESTS", "times": 1}
    assert 200 == http.post(control + "/rules", json=rule, timeout=5).status_code
    assert 200 == http.post(control + "/latency", json={"latency_ms": 1}, timeout=5).status_code
    assert (
        "ERROR_TOO_MUCH_REQUESTS" == report(http, sandbox, task_id=9, key="s3").json()["errorCode"]
    )
    assert SUCCESS == report(http, sandbox, task_id=9, key="s3").json()

    logged = http.get(control + "/requests", timeout=5).json()
    digest = hashlib.sha256(b"s3").hexdigest()[:8]
    assert digest == logged[0]["client_key_sha256_8"]
    assert "s3" not in json.dumps(logged)
    assert {"clientKey": "sha256:" + digest, "taskId": 9} == json.loads(logged[0]["body"])
    assert ("ERROR_TOO_MUCH_REQUESTS", 9) == (logged[0]["error_code"], logged[0]["task_id"])
    assert {
        "total": 2,
        "by_path": {IMAGE: 2},
        "by_outcome": {"ERROR_TOO_MUCH_REQUESTS": 1, "success": 1},
    } == (http.get(control + "/stats", timeout=5).json())

    assert 200 == http.post(control + "/rules", json={"drop": True}, timeout=5).status_code
    assert 200 == http.delete(control + "/rules", timeout=5).status_code
    assert SUCCESS == report(http, sandbox).json()
    assert 200 == http.post(control + "/reset", timeout=5).status_code
    assert 0 == sandbox.count()


@pytest.mark.parametrize(
    ("route", "body", "status"),
    [
        ("POST /rules", {"nope": 1}, 400),
        ("POST /rules", {"drop": "yes"}, 400),
        ("POST /rules", [1], 400),
        ("POST /latency", {"latency_ms": "fast"}, 400),
        ("GET /nothing", None, 404),
    ],
)
def test_control_api_refuses_bad_calls(
    sandbox: Sandbox, http: requests.Session, route: str, body: object, status: int
) -> None:
    """Bad control bodies get 400 and unknown control paths 404, with nothing logged."""
    method, path = route.split()
    r = http.request(method, sandbox.url + "/_sandbox" + path, json=body, timeout=5)
    assert status == r.status_code
    assert 0 == sandbox.count()


def test_stop_is_idempotent() -> None:
    """stop() can be called twice and closes open keep-alive connections."""
    sb = Sandbox().start()
    with requests.Session() as http:
        assert 200 == report(http, sb).status_code
        sb.stop()
        sb.stop()
        with pytest.raises(requests.ConnectionError):
            report(http, sb)


def test_stop_aborts_delayed_answers() -> None:
    """stop() returns promptly while an answer is still delayed, failing that request."""
    sb = Sandbox(latency_ms=60_000).start()
    with requests.Session() as http, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(report, http, sb)
        assert sb.wait_for(1, timeout=5)
        sb.stop()
        with pytest.raises(requests.ConnectionError):
            pending.result(timeout=5)


def test_malformed_request_line_is_400(sandbox: Sandbox) -> None:
    """A request line that is not HTTP/1.x gets 400 and nothing is logged."""
    with socket.create_connection(("127.0.0.1", sandbox.port), timeout=5) as sock:
        sock.sendall(b"HELLO\r\n\r\n")
        assert 400 == read_answers(sock, 1)[0][0]
    assert 0 == sandbox.count()


def test_serve_runs_until_sigterm() -> None:
    """serve() prints its URL to stderr, answers, and exits cleanly on SIGTERM."""
    code = "from worker.testing.sandbox import serve; serve('127.0.0.1', 0)"
    with subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        line = proc.stderr.readline().strip()
        assert line.startswith("sandbox listening on http://127.0.0.1:")
        url = line.removeprefix("sandbox listening on ")
        with requests.Session() as http:
            r = http.post(url + IMAGE, json={"clientKey": "k", "taskId": 1}, timeout=5)
        assert SUCCESS == r.json()
        proc.send_signal(signal.SIGTERM)
        assert 0 == proc.wait(timeout=10)
