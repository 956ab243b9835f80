"""The worker's metrics port: ``/metrics`` (prometheus_client's own WSGI app), ``/healthz``
and ``/readyz`` (docs/design.md §4.4); any other path is a 404.

A small threaded WSGI server (stdlib ``wsgiref``), one request per connection, each on a
daemon thread of its own, with the guards a port that kubelets probe and Prometheus scrapes
from outside the pod needs (a few idle or trickling sockets must not fail the liveness
probe and get the worker restarted):

- at most ``MAX_PER_ADDRESS`` open connections from one client address and
  ``MAX_CONNECTIONS`` in all (so at most that many handler threads); a connection over
  either cap is closed at once, not queued behind the others;
- ``REQUEST_TIMEOUT_S`` from the connection's opening for its request line and headers in
  all, however they trickle (each read gets only what is left), and
  ``EXCHANGE_TIMEOUT_S`` for the whole exchange, the answer written included; a missed
  deadline closes the connection.

Whatever arrives — an oversized or garbled request line, too many headers, bytes that are
not HTTP — gets a 4xx or a closed connection, never a traceback and never a dead server.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

from worker.observability.logs import get_logger

if TYPE_CHECKING:
    from collections.abc import Iterable
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from worker.observability.health import Probes

log = get_logger("worker.health")

# A kubelet probes from its node's address, Prometheus from its own: a few connections
# each, one request at a time. The caps bound the handler threads; the deadlines free a
# held slot within seconds (a prober sends its whole request at once).
MAX_CONNECTIONS = 64
MAX_PER_ADDRESS = 8
REQUEST_TIMEOUT_S = 5.0  # the request line and headers, in all
EXCHANGE_TIMEOUT_S = 15.0  # the whole exchange (Prometheus's default scrape timeout is 10 s)
_PROBE_METHODS = ("GET", "HEAD")


def make_app(registry: CollectorRegistry, probes: Probes | None = None) -> WSGIApplication:
    """The port's WSGI app; without ``probes`` only ``/metrics`` is served."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if probes is None or path not in ("/healthz", "/readyz"):
            return _plain(
                start_response, "404 Not Found", "not found: use /metrics, /healthz or /readyz"
            )
        if environ.get("REQUEST_METHOD") not in _PROBE_METHODS:
            return _plain(
                start_response,
                "405 Method Not Allowed",
                "use GET or HEAD",
                [("Allow", ", ".join(_PROBE_METHODS))],
            )
        check = probes.alive if path == "/healthz" else probes.ready
        try:
            ok, body = check()
        except Exception:  # a defect of ours: say so, and keep serving
            log.exception("worker.probe_failed", path=path)
            return _plain(start_response, "500 Internal Server Error", "probe failed")
        return _json(start_response, ok, body, head=environ.get("REQUEST_METHOD") == "HEAD")

    return app


def _json(
    start_response: StartResponse, ok: bool, body: dict[str, Any], *, head: bool
) -> list[bytes]:
    data = json.dumps(body).encode() + b"\n"
    start_response(
        "200 OK" if ok else "503 Service Unavailable",
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
        ],
    )
    return [b""] if head else [data]


def _plain(
    start_response: StartResponse,
    status: str,
    text: str,
    extra: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    data = text.encode() + b"\n"
    start_response(
        status,
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data))),
         *(extra or [])],
    )  # fmt: skip
    return [data]


class _Reader(io.RawIOBase):
    """A connection's reads, each given only what is left before ``deadline``."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self._sock.settimeout(_left(self._deadline))
        return self._sock.recv_into(buffer)


class _Writer(io.BufferedIOBase):
    """A connection's writes, unbuffered, each given only what is left before ``deadline``."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._sock.settimeout(_left(self._deadline))
        self._sock.sendall(data)
        with memoryview(data) as view:
            return view.nbytes


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the connection's deadline passed")
    return left


class _Handler(WSGIRequestHandler):
    """One request per connection, its head within ``REQUEST_TIMEOUT_S`` and the whole
    exchange within ``EXCHANGE_TIMEOUT_S`` of the connection's opening; silent."""

    def setup(self) -> None:
        opened = time.monotonic()
        self.connection = self.request
        self.rfile = io.BufferedReader(_Reader(self.connection, opened + REQUEST_TIMEOUT_S))
        self.wfile = _Writer(self.connection, opened + EXCHANGE_TIMEOUT_S)

    def log_message(self, format: str, *args: Any) -> None:
        """No access log."""

    def get_stderr(self) -> io.StringIO:
        return io.StringIO()  # wsgiref's error output (ours is logged by the app)

    def handle(self) -> None:
        # a peer that resets, times out or closes mid-request just loses its connection
        with contextlib.suppress(OSError, ValueError):
            super().handle()


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily) -> None:
        self.address_family = family
        self._lock = threading.Lock()
        self._open = 0
        self._by_address: dict[str, int] = {}
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        peer = str(client_address[0])
        with self._lock:
            count = self._by_address.get(peer, 0)
            admitted = self._open < MAX_CONNECTIONS and count < MAX_PER_ADDRESS
            if admitted:
                self._open += 1
                self._by_address[peer] = count + 1
        if not admitted:  # over a cap: closed at once
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(peer)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(str(client_address[0]))

    def _release(self, peer: str) -> None:
        with self._lock:
            self._open -= 1
            left = self._by_address.pop(peer) - 1
            if left:
                self._by_address[peer] = left

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Nothing to print: a client's bad request is its own problem."""


def serve(
    port: int,
    addr: str,
    registry: CollectorRegistry,
    probes: Probes | None = None,
) -> tuple[WSGIServer, threading.Thread]:
    """Serve the port from a daemon thread; returns the server and its thread."""
    family, _, _, _, sockaddr = socket.getaddrinfo(
        addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    server = _Server((str(sockaddr[0]), port), family)
    server.set_app(make_app(registry, probes))
    thread = threading.Thread(
        target=server.serve_forever, name="report-forwarder-metrics", daemon=True
    )
    thread.start()
    return server, thread
