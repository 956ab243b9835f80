"""Loopback servers for tests/integration/test_upstream.py: a server that writes exactly the
bytes a test scripts (odd status lines, lying lengths, echoes), over TLS if asked; a
forwarding HTTP proxy; a port whose accept queue is full (connect timeouts)."""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import pytest


@dataclass(frozen=True)
class Seen:
    """One request as it arrived: on which connection (a number from 1), the request line,
    the headers (names lower-cased) and the body."""

    connection: int
    request_line: str
    headers: dict[str, str]
    body: bytes

    @property
    def method(self) -> str:
        return self.request_line.split(" ")[0]

    @property
    def target(self) -> str:
        return self.request_line.split(" ")[1]


# the bytes to write back, or None: never answer (the connection is held until the server stops)
Reply = Callable[[Seen], bytes | None]


def answer(
    status: int, body: bytes = b"", headers: dict[str, str] | None = None, reason: str = "X"
) -> bytes:
    """A well-formed HTTP/1.1 answer (keep-alive: it has a Content-Length)."""
    head = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body)}"]
    head += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class RawServer:
    """An HTTP/1.1 server on loopback that answers each request with what ``reply`` returns,
    byte for byte, keeping the connection for the next request unless ``close`` (then it
    closes after each answer). With ``tls``, it speaks TLS with that context."""

    reply: Reply
    close: bool = False
    tls: ssl.SSLContext | None = None
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    handshake_failures: int = 0
    _listener: socket.socket = field(init=False)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _sockets: list[socket.socket] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    port: int = 0  # set on entering

    def __repr__(self) -> str:  # short, in a failing hypothesis example
        return f"RawServer({self.url}, {len(self.seen)} requests seen)"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def __enter__(self) -> RawServer:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._listener.settimeout(0.05)  # so that the accept loop sees a stop
        self._spawn(self._accept_loop)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(10)
        self._listener.close()

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
                self._sockets.append(sock)
            self._spawn(self._serve, sock, number)

    def _serve(self, sock: socket.socket, number: int) -> None:
        try:
            sock.settimeout(None)
            if self.tls is not None:
                raw = sock
                try:
                    sock = self.tls.wrap_socket(raw, server_side=True)
                except (ssl.SSLError, OSError):
                    with self._lock:
                        self.handshake_failures += 1
                    return
                with self._lock:  # the wrapped socket is the one to shut down at the end
                    self._sockets[self._sockets.index(raw)] = sock
            stream = sock.makefile("rb")
            while not self._stop.is_set():
                seen = _read_request(stream, number)
                if seen is None:
                    return
                with self._lock:
                    self.seen.append(seen)
                data = self.reply(seen)
                if data is None:
                    self._stop.wait()
                    return
                sock.sendall(data)
                if self.close:
                    return
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                sock.close()


def _read_request(stream: BinaryIO, number: int) -> Seen | None:
    readline = stream.readline
    line = readline(65537)
    if not line:
        return None
    headers: dict[str, str] = {}
    while True:
        header = readline(65537)
        if header in (b"\r\n", b"\n", b""):
            break
        name, _, value = header.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = stream.read(int(headers.get("content-length", "0")))
    return Seen(number, line.decode("latin-1").rstrip("\r\n"), headers, body)


def forward(seen: Seen) -> bytes:
    """What a plain HTTP proxy does with an absolute-form request (``POST http://host:port/path``):
    send it on to that server and hand its answer back."""
    target = urlsplit(seen.target)
    assert target.hostname is not None, f"not a proxy request: {seen.request_line}"
    upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
    try:
        hop = {"proxy-authorization", "proxy-connection", "connection", "host"}
        headers = {name: value for name, value in seen.headers.items() if name not in hop}
        upstream.request(seen.method, target.path or "/", body=seen.body, headers=headers)
        got = upstream.getresponse()
        body = got.read()
        return answer(got.status, body, {"Content-Type": got.getheader("Content-Type") or ""})
    finally:
        upstream.close()


@contextlib.contextmanager
def full_accept_queue() -> Iterator[int]:
    """A loopback port whose listener never accepts and whose accept queue is full: a new
    connection's SYN is dropped, so connecting to it times out. Skips when the kernel does
    not behave so."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        for _ in range(16):
            filler = socket.socket()
            fillers.append(filler)
            filler.settimeout(0.3)
            try:
                filler.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        else:
            pytest.skip("this kernel accepts connections past a full accept queue")
        yield port
    finally:
        for sock in [*fillers, listener]:
            sock.close()


def self_signed_context(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A server TLS context with a fresh self-signed certificate for 127.0.0.1, and the
    certificate's path (to trust it on purpose). Made with ``openssl``; skips without it."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    command = [
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=127.0.0.1",
        "-addext",
        "subjectAltName=IP:127.0.0.1",
        "-keyout",
        str(key),
        "-out",
        str(cert),
    ]
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("openssl is not installed: no self-signed certificate to test TLS with")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context, cert
