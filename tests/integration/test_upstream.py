"""worker.delivery.upstream over real HTTP on loopback: what is sent, what comes back and how
it is classified, timeouts, refused and broken connections, redirects, keep-alive, proxies
from the environment, TLS verification, the key never leaking, hostile answers. The servers
are in tests/integration/upstream_support.py (and the project's sandbox); the pure
classification table is tested in tests/unit/test_upstream.py."""

from __future__ import annotations

import base64
import email.utils
import gzip
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from tests.integration.upstream_support import (
    RawServer,
    Reply,
    Seen,
    answer,
    forward,
    full_accept_queue,
    self_signed_context,
)
from tests.key_echo import FLIPS, KEYS, PADS, WHERE, assert_key_absent, echoing_answer
from worker.delivery import upstream
from worker.delivery.upstream import MASK, send_report
from worker.testing.sandbox import Rule, Sandbox

CLIENT_KEY = "ck-5e1b7d0a9c3f4e2b8a6d-do-not-leak"
TASK_ID = 123456789
PATH = "/reportIncorrectImageCaptcha"
SUCCESS = json.dumps({"errorId": 0, "status": "success"}).encode()
PROXY_VARIABLES = [
    *(f"{kind}_proxy" for kind in ("http", "https", "all", "no")),
    *(f"{kind}_PROXY" for kind in ("HTTP", "HTTPS", "ALL", "NO")),
]
STATUSES = {"accepted", "rejected", "account_fault", "transient"}


def api_error(code: str, description: str = "") -> bytes:
    fields: dict[str, object] = {"errorId": 1, "errorCode": code}
    if description:
        fields["errorDescription"] = description
    return json.dumps(fields).encode()


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No proxy variable from the machine running the tests; each test's own are read
    afresh (the proxy and the route to a URL are worked out once per URL)."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    upstream.proxy_for.cache_clear()
    yield
    upstream.proxy_for.cache_clear()


def serve(reply: Reply, *, close: bool = False) -> RawServer:
    return RawServer(reply, close=close)


def always(data: bytes) -> Reply:
    return lambda seen: data


# --- what is sent ---------------------------------------------------------------------------


def test_send_report_posts_exact_json_body_and_headers() -> None:
    """One POST to the URL's path, the body exactly ``{"clientKey": key, "taskId": <int>}``
    as application/json, from User-Agent ``report-forwarder``."""
    with serve(always(answer(200, SUCCESS))) as server:
        outcome = send_report(server.url + PATH, CLIENT_KEY, TASK_ID)

    assert "accepted" == outcome.status
    assert 1 == len(server.seen)
    seen = server.seen[0]
    assert f"POST {PATH} HTTP/1.1" == seen.request_line
    assert "application/json" == seen.headers["content-type"]
    assert "report-forwarder" == seen.headers["user-agent"]
    assert f"127.0.0.1:{server.port}" == seen.headers["host"]
    payload = json.loads(seen.body)
    assert {"clientKey": CLIENT_KEY, "taskId": TASK_ID} == payload
    assert type(payload["taskId"]) is int


def test_send_report_duration_spans_the_round_trip(sandbox: Sandbox) -> None:
    """``duration_s`` covers the whole round trip: at least the time a real server (the
    sandbox on loopback) held the answer back, at most the call's own time."""
    sandbox.add_rule(Rule(latency_ms=80))

    before = time.perf_counter()
    outcome = send_report(sandbox.url + PATH, CLIENT_KEY, TASK_ID)
    elapsed = time.perf_counter() - before

    assert "accepted" == outcome.status
    assert 0.080 <= outcome.duration_s <= elapsed


# --- what comes back ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("http_status", "content", "status", "error_code"),
    [
        (200, SUCCESS, "accepted", ""),
        (403, api_error("ERROR_IP_BANNED"), "account_fault", "ERROR_IP_BANNED"),
        (200, api_error("ERROR_NO_SUCH_CAPCHA_ID"), "rejected", "ERROR_NO_SUCH_CAPCHA_ID"),
        (503, api_error("ERROR_TOO_MUCH_REQUESTS"), "transient", "ERROR_TOO_MUCH_REQUESTS"),
        (502, b"<html>Bad Gateway</html>", "transient", "HTTP_502"),
        (429, b"", "transient", "HTTP_429"),
        (404, b"Not Found", "rejected", "HTTP_404"),
        (200, b"oops", "transient", "INVALID_JSON"),
    ],
)
def test_send_report_classifies_the_answer(
    http_status: int, content: bytes, status: str, error_code: str
) -> None:
    """``send_report`` returns the real answer classified by the table, with its HTTP
    status and a duration measured within the call."""
    with serve(always(answer(http_status, content))) as server:
        before = time.perf_counter()
        outcome = send_report(server.url + PATH, CLIENT_KEY, TASK_ID)
        elapsed = time.perf_counter() - before

    assert status == outcome.status
    assert error_code == outcome.error_code
    assert http_status == outcome.http_status
    assert 0.0 < outcome.duration_s <= elapsed


def test_send_report_passes_provider_error_codes() -> None:
    """The provider's ``error_codes`` mapping is applied to the answer."""
    with serve(always(answer(200, api_error("ERROR_PROVIDER_BUSY")))) as server:
        plain = send_report(server.url + PATH, CLIENT_KEY, TASK_ID)
        mapped = send_report(
            server.url + PATH,
            CLIENT_KEY,
            TASK_ID,
            error_codes={"ERROR_PROVIDER_BUSY": "transient"},
        )

    assert "rejected" == plain.status
    assert "transient" == mapped.status


@pytest.mark.parametrize("header", ["Retry-After", "retry-after", "RETRY-AFTER"])
def test_send_report_reads_retry_after_seconds(header: str) -> None:
    """A delta-seconds ``Retry-After`` header (any casing on the wire) is returned in seconds."""
    with serve(always(answer(429, b"", {header: "17"}))) as server:
        outcome = send_report(server.url + PATH, CLIENT_KEY, TASK_ID)

    assert "transient" == outcome.status
    assert 17.0 == outcome.retry_after


def test_send_report_reads_retry_after_http_date() -> None:
    """An HTTP-date ``Retry-After`` header is returned as seconds from now."""
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    with serve(always(answer(503, b"busy", {"Retry-After": when}))) as server:
        outcome = send_report(server.url + PATH, CLIENT_KEY, TASK_ID)

    assert "transient" == outcome.status
    assert outcome.retry_after is not None
    assert 115 <= outcome.retry_after <= 120


def test_send_report_reads_a_chunked_gzipped_answer() -> None:
    """An answer sent chunked and gzip-encoded is read whole and decoded, as requests did."""
    packed = gzip.compress(api_error("ERROR_ZERO_BALANCE"))
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (packed[:7], packed[7:]))
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip\r\n\r\n"
        + chunks
        + b"0\r\n\r\n"
    )
    with serve(always(raw)) as server:
        outcome = send_report(server.url + PATH, CLIENT_KEY, TASK_ID)

    assert "account_fault" == outcome.status
    assert "ERROR_ZERO_BALANCE" == outcome.error_code


def test_send_report_does_not_follow_redirects() -> None:
    """A 3xx answer is classified as it is (transient, not the API's JSON), its Location
    never requested."""

    def reply(seen: Seen) -> bytes:
        if seen.target == PATH:
            return answer(302, b"", {"Location": "/elsewhere"})
        return answer(200, SUCCESS)

    with serve(reply) as server:
        outcome = send_report(server.url + PATH, CLIENT_KEY, TASK_ID)

    assert [PATH] == [seen.target for seen in server.seen]
    assert 302 == outcome.http_status
    assert "transient" == outcome.status
    assert "INVALID_JSON" == outcome.error_code


# --- timeouts and broken connections --------------------------------------------------------


def test_send_report_read_timeout_is_transient() -> None:
    """A server that takes the request and never answers: a transient ``TIMEOUT`` once
    the exchange has run the connect and read timeouts, with no HTTP status."""
    with serve(lambda seen: None) as server:
        outcome = send_report(
            server.url + PATH, CLIENT_KEY, TASK_ID, connect_timeout_s=0.2, read_timeout_s=0.2
        )

    assert 1 == len(server.seen)
    assert "transient" == outcome.status
    assert "TIMEOUT" == outcome.error_code
    assert outcome.http_status is None
    assert 0.2 <= outcome.duration_s


def test_a_server_silent_for_the_read_timeout_is_cut_before_connect_plus_read() -> None:
    """A server that takes the request and stays silent is cut by the read timeout (a
    whole second here), not only once connect + read timeout have gone by."""
    with serve(lambda seen: None) as server:
        outcome = send_report(
            server.url + PATH, CLIENT_KEY, TASK_ID, connect_timeout_s=5.0, read_timeout_s=1.0
        )

    assert "TIMEOUT" == outcome.error_code
    assert outcome.duration_s < 5.0 + 1.0


def test_an_answer_trickled_forever_is_cut_at_connect_plus_read_timeout() -> None:
    """A server that answers a header line every 50 ms, never finishing (each read comes
    well within the read timeout): the exchange is cut all the same, a transient
    ``TIMEOUT`` — a report's HTTP call never outlives connect + read timeout, which is
    what its lease is sized for."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    done = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            while not done.wait(0.05):
                try:
                    conn.sendall(b"X-Slow: yes\r\n")
                except OSError:
                    return

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        outcome = send_report(
            f"http://127.0.0.1:{port}{PATH}", CLIENT_KEY, TASK_ID,
            connect_timeout_s=0.2, read_timeout_s=0.3,
        )  # fmt: skip
    finally:
        done.set()
        listener.close()
        thread.join(5)

    assert "transient" == outcome.status
    assert "TIMEOUT" == outcome.error_code
    assert outcome.http_status is None


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_answer_over_the_cap_is_classified_unread(chunked: bool) -> None:
    """An answer longer than ``MAX_ANSWER_BYTES`` (announced, or sent chunked) is not read
    into memory: classified by its status as an answer that is not the API's JSON, the
    detail saying so."""
    body = b"x" * (upstream.MAX_ANSWER_BYTES + 1)
    if chunked:
        raw = b"HTTP/1.1 403 X\r\nTransfer-Encoding: chunked\r\n\r\n"
        raw += b"".join(
            b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:65536], body[65536:])
        )
        raw += b"0\r\n\r\n"
    else:
        raw = answer(403, body)
    with serve(always(raw), close=True) as server:
        outcome = send_report(server.url + PATH, CLIENT_KEY, TASK_ID)

    assert 403 == outcome.http_status
    assert ("rejected", "HTTP_403") == (outcome.status, outcome.error_code)
    assert f"over {upstream.MAX_ANSWER_BYTES} bytes" in outcome.detail


def test_send_report_connect_timeout_is_transient() -> None:
    """A server that never completes the TCP handshake: a transient ``TIMEOUT`` after the
    connect timeout, with no HTTP status."""
    with full_accept_queue() as port:
        outcome = send_report(
            f"http://127.0.0.1:{port}{PATH}", CLIENT_KEY, TASK_ID, connect_timeout_s=0.2
        )

    assert "transient" == outcome.status
    assert "TIMEOUT" == outcome.error_code
    assert outcome.http_status is None


def test_send_report_connection_refused_is_a_connection_error() -> None:
    """Nothing listening: a transient ``CONNECTION_ERROR`` (not a timeout), saying why."""
    with serve(always(b"")) as server:
        url = server.url + PATH  # a port that was just free, closed again below
    outcome = send_report(url, CLIENT_KEY, TASK_ID)

    assert "transient" == outcome.status
    assert "CONNECTION_ERROR" == outcome.error_code
    assert outcome.http_status is None
    assert "refused" in outcome.detail.lower()


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:9/report", "http://[::1/report", "http://"])
def test_send_report_to_an_unusable_url_is_a_connection_error(url: str) -> None:
    """A URL no request can be made to (unknown scheme, malformed, no host): a transient
    ``CONNECTION_ERROR``, never an exception."""
    outcome = send_report(url, CLIENT_KEY, TASK_ID)

    assert "transient" == outcome.status
    assert "CONNECTION_ERROR" == outcome.error_code
    assert outcome.http_status is None


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="closed-without-answer"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{", id="cut-mid-body"),
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", id="not-http"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\nnope",
            id="bad-gzip",
        ),
    ],
)
def test_send_report_broken_answer_is_a_connection_error(raw: bytes) -> None:
    """An answer that breaks off or is not HTTP: a transient ``CONNECTION_ERROR``."""
    with serve(always(raw), close=True) as server:
        outcome = send_report(server.url + PATH, CLIENT_KEY, TASK_ID)

    assert 1 == len(server.seen)
    assert "transient" == outcome.status
    assert "CONNECTION_ERROR" == outcome.error_code
    assert outcome.http_status is None
    assert "" != outcome.detail


def test_a_request_dropped_unanswered_on_a_kept_alive_connection_is_not_resent() -> None:
    """The server answers a first report, then closes the kept-alive connection on the
    second without a byte of answer: a transient ``CONNECTION_ERROR``, the request not
    re-sent on a new connection (libcurl would, behind the rate limiter's back: the
    report is retried after its backoff like any other)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    requests_seen: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    requests_seen.append(data)
                    if len(requests_seen) >= 2:
                        break  # the second (and any later) request: closed unanswered
                    conn.sendall(answer(200, SUCCESS))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}{PATH}"
        first = send_report(url, CLIENT_KEY, TASK_ID)
        second = send_report(url, CLIENT_KEY, TASK_ID + 1)
    finally:
        listener.close()
        thread.join(5)

    assert "accepted" == first.status
    assert ("transient", "CONNECTION_ERROR") == (second.status, second.error_code)
    assert "before any answer" in second.detail
    assert 2 == len(requests_seen)


# --- keep-alive: one pool per process, shared by its threads --------------------------------


def test_send_report_keeps_the_connection_alive() -> None:
    """Reports sent one after another travel on one kept-alive connection."""
    with serve(always(answer(200, SUCCESS))) as server:
        outcomes = [send_report(server.url + PATH, CLIENT_KEY, n) for n in range(5)]

    assert ["accepted"] * 5 == [outcome.status for outcome in outcomes]
    assert 5 == len(server.seen)
    assert 1 == server.connections


def test_threads_share_the_pool_without_running_it_dry() -> None:
    """Eight threads sending 20 reports each open at most eight connections between them:
    every connection goes back to the shared pool for the next report (none thrown away
    for a pool too small)."""
    threads, each = 8, 20
    with serve(always(answer(200, SUCCESS))) as server:
        url = server.url + PATH
        statuses: list[str] = []
        lock = threading.Lock()

        def loop(offset: int) -> None:
            for n in range(each):
                outcome = send_report(url, CLIENT_KEY, offset + n)
                with lock:
                    statuses.append(outcome.status)

        pool = [threading.Thread(target=loop, args=(i * each,)) for i in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join(60)

    assert ["accepted"] * threads * each == statuses
    assert threads * each == len(server.seen)
    assert 1 <= server.connections <= threads


# --- proxies from the environment -----------------------------------------------------------


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
def test_send_report_goes_through_the_environments_proxy(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """With HTTP_PROXY (either case, or ALL_PROXY) set, an http:// report goes to the proxy
    in absolute form and the proxy's answer (the API's, forwarded) is classified."""
    with (
        serve(always(answer(200, api_error("ERROR_ZERO_BALANCE")))) as api,
        serve(forward) as proxy,
    ):
        monkeypatch.setenv(variable, f"127.0.0.1:{proxy.port}")  # no scheme: http:// assumed
        outcome = send_report(api.url + PATH, CLIENT_KEY, TASK_ID)

    assert [f"POST {api.url}{PATH} HTTP/1.1"] == [seen.request_line for seen in proxy.seen]
    assert 1 == len(api.seen)
    assert {"clientKey": CLIENT_KEY, "taskId": TASK_ID} == json.loads(api.seen[0].body)
    assert "account_fault" == outcome.status


def test_send_report_sends_the_proxys_credentials_to_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials in the proxy's URL go to the proxy as Basic Proxy-Authorization (and
    no further)."""
    with serve(always(answer(200, SUCCESS))) as api, serve(forward) as proxy:
        monkeypatch.setenv("HTTP_PROXY", f"http://fwd%40user:s3cr%3At@127.0.0.1:{proxy.port}")
        outcome = send_report(api.url + PATH, CLIENT_KEY, TASK_ID)

    assert "accepted" == outcome.status
    expected = "Basic " + base64.b64encode(b"fwd@user:s3cr:t").decode()
    assert expected == proxy.seen[0].headers["proxy-authorization"]
    assert "proxy-authorization" not in api.seen[0].headers


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "127.0.0.0/8", "localhost,127.0.0.1"])
def test_no_proxy_bypasses_the_proxy(monkeypatch: pytest.MonkeyPatch, no_proxy: str) -> None:
    """A host NO_PROXY names (by address, or in a CIDR range as requests reads it) is
    reached directly, the proxy never asked."""
    with serve(always(answer(200, SUCCESS))) as api, serve(forward) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", no_proxy)
        outcome = send_report(api.url + PATH, CLIENT_KEY, TASK_ID)

    assert "accepted" == outcome.status
    assert [] == proxy.seen
    assert 1 == len(api.seen)


def test_an_unreachable_proxy_is_a_connection_error_without_its_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A proxy that refuses connections: a transient ``CONNECTION_ERROR``; the password
    in the proxy's URL is not in the detail."""
    with serve(always(b"")) as gone:
        port = gone.port
    monkeypatch.setenv("HTTP_PROXY", f"http://user:pr0xy-pa55word@127.0.0.1:{port}")

    outcome = send_report(f"http://127.0.0.1:9{PATH}", CLIENT_KEY, TASK_ID)

    assert "transient" == outcome.status
    assert "CONNECTION_ERROR" == outcome.error_code
    assert "proxy" in outcome.detail.lower()
    assert "pr0xy-pa55word" not in repr(outcome)


def test_an_unsupported_proxy_scheme_is_a_connection_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A socks:// proxy (not supported, as with requests without PySocks): a transient
    ``CONNECTION_ERROR`` naming the scheme, never an exception."""
    monkeypatch.setenv("HTTP_PROXY", "socks5://127.0.0.1:1080")

    outcome = send_report(f"http://127.0.0.1:9{PATH}", CLIENT_KEY, TASK_ID)

    assert "CONNECTION_ERROR" == outcome.error_code
    assert "socks5" in outcome.detail


def test_send_report_uses_the_given_pool() -> None:
    """A caller-provided pool is the one that sends the report (here: one through a proxy,
    with no proxy in the environment)."""
    with serve(always(answer(200, SUCCESS))) as api, serve(forward) as proxy:
        http = upstream.Client(proxy=proxy.url)
        outcome = send_report(api.url + PATH, CLIENT_KEY, TASK_ID, http=http)
        http.close()

    assert "accepted" == outcome.status
    assert 1 == len(proxy.seen)


# --- TLS ------------------------------------------------------------------------------------


def test_a_self_signed_certificate_is_refused(tmp_path: Path) -> None:
    """TLS is verified: an https:// server with a self-signed certificate gets no report
    (a transient ``CONNECTION_ERROR`` saying why), though it answers one when trusted."""
    context, cert = self_signed_context(tmp_path)
    with RawServer(always(answer(200, SUCCESS)), tls=context) as server:
        refused = send_report(server.url + PATH, CLIENT_KEY, TASK_ID)
        trusting = upstream.Client(ca_certs=str(cert))
        trusted = send_report(server.url + PATH, CLIENT_KEY, TASK_ID, http=trusting)
        trusting.close()

    assert "transient" == refused.status
    assert "CONNECTION_ERROR" == refused.error_code
    assert "certificate verify failed" in refused.detail.lower()
    assert 1 == len(server.seen)  # only the trusted pool's report arrived
    assert "accepted" == trusted.status


# --- the client key never leaks into Outcome ------------------------------------------------


def echo(status: int, template: str, case: Callable[[str], str] = str) -> Reply:
    """A server that answers ``template`` with the request body and the key filled in,
    both passed through ``case`` (a server may upper-case what it echoes)."""

    def reply(seen: Seen) -> bytes:
        text = template.replace("{body}", case(seen.body.decode()))
        return answer(status, text.replace("{key}", case(CLIENT_KEY)).encode())

    return reply


KEY_UNKNOWN = (
    json.dumps({"errorId": 1, "errorCode": "ERROR_KEY_DOES_NOT_EXIST"})[:-1]
    + ', "errorDescription": "Account key {key} does not exist"}'
)
NON_ECHOING: dict[str, Reply] = {
    "success": always(answer(200, SUCCESS)),
    "api-error": always(answer(200, api_error("ERROR_NO_SUCH_CAPCHA_ID", "Task not found"))),
    "account-fault": always(answer(403, api_error("ERROR_KEY_DOES_NOT_EXIST", "Key not found"))),
    "5xx-html": always(answer(502, b"<html><body>502 Bad Gateway</body></html>")),
    "4xx-text": always(answer(400, b"Bad Request")),
    "invalid-json": always(answer(200, b"{not json")),
    "timeout": lambda seen: None,
    "cut-mid-body": always(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n{"),
}
ECHOING: dict[str, Reply] = {
    "4xx-echoes-raw-body": echo(400, "{body}"),
    "4xx-html-echoes-body": echo(400, "<html><pre>Bad request: {body}</pre></html>"),
    "5xx-echoes-body": echo(500, "Internal error while handling {body}"),
    "200-not-json-echoes-body": echo(200, "received {body}"),
    "error-description-echoes-key": echo(200, KEY_UNKNOWN),
    "error-description-echoes-key-upper-cased": echo(200, KEY_UNKNOWN, str.upper),
    "error-description-echoes-key-swapcased": echo(200, KEY_UNKNOWN, str.swapcase),
    "5xx-echoes-body-upper-cased": echo(502, "BAD GATEWAY: {body}", str.upper),
    "4xx-echoes-key-title-cased": echo(400, "<h1>Bad key {key}</h1>", str.title),
    # the key straddles the point where the detail's excerpt of the body is cut
    "key-across-the-excerpt-cut": echo(400, "x" * 110 + "{key}", str.upper),
    "key-across-the-description-cut": echo(200, KEY_UNKNOWN.replace("Account", "a" * 270)),
}


@pytest.mark.parametrize("reply", NON_ECHOING.values(), ids=NON_ECHOING.keys())
def test_send_report_detail_never_contains_client_key(reply: Reply) -> None:
    """Whatever the answer or failure, the client key appears nowhere in the Outcome."""
    with serve(reply, close=True) as server:
        outcome = send_report(
            server.url + PATH, CLIENT_KEY, TASK_ID, connect_timeout_s=0.2, read_timeout_s=0.2
        )

    assert 1 == len(server.seen)
    assert CLIENT_KEY.lower() not in repr(outcome).lower()


@pytest.mark.parametrize("reply", ECHOING.values(), ids=ECHOING.keys())
def test_send_report_detail_never_contains_echoed_client_key(reply: Reply) -> None:
    """A server echoing the request body or the key back, in any letter case, does not
    leak the key (nor the part of it before an excerpt's cut) into Outcome: it is masked."""
    with serve(reply) as server:
        outcome = send_report(server.url + PATH, CLIENT_KEY, TASK_ID)

    assert CLIENT_KEY[:8].lower() not in repr(outcome).lower()
    assert MASK in outcome.detail


Scripted = tuple[RawServer, list[bytes]]


@pytest.fixture(scope="module")
def scripted() -> Iterator[Scripted]:
    """One keep-alive server for many hypothesis examples: it answers what the example
    puts in the list (hypothesis runs every example within one call of the test)."""
    script = [b""]
    with serve(lambda seen: script[0]) as server:
        yield server, script


@pytest.fixture(scope="module")
def scripted_closing() -> Iterator[Scripted]:
    """The same, closing the connection after each answer (a hostile answer may leave
    the connection in any state)."""
    script = [b""]
    with serve(lambda seen: script[0], close=True) as server:
        yield server, script


@hsettings(
    deadline=None, max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    key=KEYS,
    flips=FLIPS,
    where=WHERE,
    pad=PADS,
)
def test_a_case_mangled_echo_of_any_key_is_masked_in_detail(
    scripted: Scripted, key: str, flips: list[bool], where: str, pad: int
) -> None:
    """Whatever the key, wherever a real server echoes it (an error description, an HTML
    page, the request body) and however it changed the case of its letters, ``detail``
    holds neither the key nor its first half."""
    server, script = scripted
    status, body = echoing_answer(key, flips, where, pad, TASK_ID)
    script[0] = answer(status, body)

    outcome = send_report(server.url + PATH, key, TASK_ID)

    assert status == outcome.http_status  # the scripted answer is the one classified
    assert_key_absent(outcome.detail, key)


# --- hostile answers: classified, never raised ----------------------------------------------

STATUS_LINES = st.one_of(
    st.builds(
        lambda code, reason: f"HTTP/1.1 {code} {reason}".encode(),
        st.integers(100, 999),
        st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
    ),
    st.sampled_from(
        [b"HTTP/1.1 200", b"HTTP/1.0 200 OK", b"HTTP/2 200 OK", b"HTTP/1.1 99 Low", b"HTTP/1.1"]
    ),
    st.binary(max_size=40).filter(lambda line: b"\n" not in line),
)
HEADERS = st.lists(
    st.sampled_from(
        [
            b"Content-Length: 0",
            b"Content-Length: 5",
            b"Content-Length: 100000",
            b"Content-Length: -1",
            b"Content-Length: lots",
            b"Transfer-Encoding: chunked",
            b"Content-Encoding: gzip",
            b"Content-Encoding: br",
            b"Retry-After: soon",
            b"Retry-After: 1e999",
            b"Content-Type: text/html; charset=utf-7",
            b"X-Nul: \x00\xff",
            b"no colon in this header",
        ]
    ),
    max_size=4,
)
# large bodies by name (so that a failing example prints short)
NAMED_BODIES = {
    "empty": b"",
    "success": SUCCESS,
    "api-error": api_error("ERROR_IP_BANNED"),
    "cut-json": b'{"errorId": 0',
    "nan": b'{"errorId": NaN}',
    "odd-types": b'{"errorId": [1], "errorCode": {"a": 1}}',
    "nuls": b"\x00" * 1000,
    "nested-100k": b"[" * 100_000,  # deeper than a JSON parser goes
    "3-MB": b"x" * 3_000_000,  # far larger than any answer of the API
}
BODIES = st.one_of(st.binary(max_size=2000), st.sampled_from(sorted(NAMED_BODIES)))


@hsettings(
    deadline=None, max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(status_line=STATUS_LINES, headers=HEADERS, body=BODIES)
def test_hostile_answers_are_classified_never_raised(
    scripted_closing: Scripted, status_line: bytes, headers: list[bytes], body: bytes | str
) -> None:
    """Whatever a server writes back (odd status lines, lying lengths, broken encodings,
    binary, empty or huge bodies), ``send_report`` returns an Outcome: with an HTTP
    status when the answer was HTTP, else a transient network error; never the key."""
    server, script = scripted_closing
    content = NAMED_BODIES[body] if isinstance(body, str) else body
    script[0] = b"\r\n".join([status_line, *headers]) + b"\r\n\r\n" + content
    before = len(server.seen)
    client = upstream.Client()  # a fresh connection for each answer

    outcome = send_report(
        server.url + PATH, CLIENT_KEY, TASK_ID, connect_timeout_s=1.0, read_timeout_s=1.0,
        http=client,
    )  # fmt: skip
    client.close()

    assert before + 1 == len(server.seen)
    assert outcome.status in STATUSES
    if outcome.http_status is None:
        assert "transient" == outcome.status
        assert outcome.error_code in {"CONNECTION_ERROR", "TIMEOUT"}
    else:
        assert 100 <= outcome.http_status <= 999
    assert CLIENT_KEY.lower() not in repr(outcome).lower()
