"""The intake on a real uvicorn server in a thread, as `report-forwarder serve` runs it
(the same protocol with its deadlines and caps), for the intake's tests."""

from __future__ import annotations

import socket
import threading

import uvicorn

from worker.intake import Intake
from worker.intake.server import ConnectionGuard, ConnectionLimits, uvicorn_config
from worker.testing.processes import free_port

from .conftest import wait_until


class Server:
    """The intake on uvicorn (uvloop, the guarded httptools protocol) on a free loopback
    port, in a thread."""

    def __init__(self, app: Intake, limits: ConnectionLimits | None = None) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.guard = ConnectionGuard(limits or ConnectionLimits(), app.registry)
        self.server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", self.port, self.guard))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def metric(self, name: str, **labels: str) -> float:
        """A sample of the intake's own counters (not the fleet gauges, read from Redis)."""
        for counter in (self.guard.refused, self.guard.timed_out, self.app.requests):
            for family in counter.collect():
                for sample in family.samples:
                    if sample.name == name and sample.labels == labels:
                        return float(sample.value)
        return 0.0

    def connect(self, source: str = "127.0.0.1") -> socket.socket:
        """A raw connection to the intake from ``source`` (any 127.0.0.0/8 address)."""
        return socket.create_connection(
            ("127.0.0.1", self.port), timeout=10, source_address=(source, 0)
        )

    def __enter__(self) -> Server:
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    chunks: list[bytes] = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def request_bytes(
    path: str, body: bytes, content_type: str = "application/json", *, close: bool = False
) -> bytes:
    """An HTTP/1.1 POST as sent on the wire (``close``: the last on its connection)."""
    last = "Connection: close\r\n" if close else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{last}\r\n"
    ).encode() + body
