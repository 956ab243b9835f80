"""The sandbox's HTTP/1.1 server: connections, request framing and the writing of answers.

HTTP/1.1 is spoken directly on :class:`asyncio.Protocol` (keep-alive, pipelining,
Content-Length bodies only) so that the double is never the bottleneck of a benchmark.
What to answer is not decided here: :class:`HttpServer` hands each framed request to a
handler (the :class:`~worker.testing.sandbox.Sandbox`) and writes the :class:`Answer` it
returns, in order, after the answer's delay. A request it cannot frame or accept (no
Content-Length, an oversized head or body, a malformed request line) is refused here and
the connection closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import cast

MAX_BODY = 64 * 1024
MAX_HEAD = 16 * 1024
_MAX_DISCARD = 16 * 1024 * 1024  # read and drop a refused body up to this size, then close


@dataclass
class Answer:
    """What to write back (or ``drop``: close without a word) and how the log records it."""

    status: int
    body: bytes
    content_type: str = "application/json"
    retry_after: float | None = None
    drop: bool = False
    error_code: str | None = None
    outcome: str = "success"
    delay_s: float = 0.0


# method, path (query dropped), body, (time.time(), time.monotonic()) of its arrival
Handler = Callable[[str, str, bytes, tuple[float, float]], Answer]


def json_answer(status: int, payload: object) -> Answer:
    """``payload`` as JSON with ``status``; logged as ``http_<status>``."""
    return Answer(status, json.dumps(payload).encode(), outcome=f"http_{status}")


class _BadRequestError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _parse_head(head: bytes) -> tuple[str, str, bool, int]:
    """Method, path (query dropped), keep-alive, Content-Length from a request head."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequestError(400)
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise _BadRequestError(400)
        headers[name.strip().lower()] = value.strip()
    connection = headers.get("connection", "").lower()
    keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
    length_text = headers.get("content-length")
    if "transfer-encoding" in headers or (length_text is None and method == "POST"):
        raise _BadRequestError(411)
    if length_text is None:
        return method, target.partition("?")[0], keep_alive, 0
    if not (length_text.isascii() and length_text.isdigit()):
        raise _BadRequestError(400)
    return method, target.partition("?")[0], keep_alive, int(length_text)


def _encode(answer: Answer, keep_alive: bool) -> bytes:
    try:
        reason = HTTPStatus(answer.status).phrase
    except ValueError:
        reason = "Unknown"
    head = (
        f"HTTP/1.1 {answer.status} {reason}\r\nContent-Type: {answer.content_type}\r\n"
        f"Content-Length: {len(answer.body)}\r\n"
    )
    if answer.retry_after is not None:
        ra = answer.retry_after
        head += f"Retry-After: {int(ra) if float(ra).is_integer() else ra}\r\n"
    if not keep_alive:
        head += "Connection: close\r\n"
    return head.encode("latin-1") + b"\r\n" + answer.body


class _Connection(asyncio.Protocol):
    """One client connection: parses pipelined requests and answers them in order."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._pending: asyncio.Task[None] | None = None  # a delayed answer holds the line
        self._discard = 0
        self._closed = False
        self._received_at = (0.0, 0.0)  # time.time(), time.monotonic() of the last bytes read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._server.connections_accepted += 1
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._server.connections.discard(self)
        if self._pending is not None:
            self._pending.cancel()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._discard:
            self._discard -= min(self._discard, len(data))
            if not self._discard:
                self._close()
            return
        self._received_at = (time.time(), time.monotonic())
        self._buffer += data
        if self._pending is not None and len(self._buffer) > MAX_HEAD + MAX_BODY:
            cast(asyncio.Transport, self._transport).pause_reading()  # a flood behind a delay
        self._process()

    def _process(self) -> None:
        while self._pending is None and not self._closed:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD:
                    self._refuse(431, 0)
                return
            try:
                method, path, keep_alive, length = _parse_head(bytes(self._buffer[:end]))
            except _BadRequestError as exc:
                self._refuse(exc.status, 0)
                return
            start = end + 4
            if length > MAX_BODY:
                self._refuse(413, length - (len(self._buffer) - start))
                return
            if len(self._buffer) < start + length:
                return
            body = bytes(self._buffer[start : start + length])
            del self._buffer[: start + length]
            answer = self._server.handler(method, path, body, self._received_at)
            if answer.delay_s > 0:
                self._pending = asyncio.get_running_loop().create_task(
                    self._deliver_later(answer, keep_alive)
                )
            else:
                self._deliver(answer, keep_alive)

    async def _deliver_later(self, answer: Answer, keep_alive: bool) -> None:
        await asyncio.sleep(answer.delay_s)
        self._pending = None
        if self._transport is not None and not self._closed:
            self._transport.resume_reading()
        self._deliver(answer, keep_alive)
        self._process()

    def _deliver(self, answer: Answer, keep_alive: bool) -> None:
        if self._closed or self._transport is None:
            return
        if answer.drop:
            self._close()
            return
        self._transport.write(_encode(answer, keep_alive))
        if not keep_alive:
            self._close()

    def _refuse(self, status: int, unread_body: int) -> None:
        """Answer a request we cannot frame or accept, then close (after draining its body)."""
        if self._transport is None:
            return
        self._transport.write(
            _encode(json_answer(status, {"error": HTTPStatus(status).phrase}), False)
        )
        self._buffer.clear()
        if 0 < unread_body <= _MAX_DISCARD:
            self._discard = unread_body  # closing with unread data would reset the answer away
        else:
            self._close()

    def _close(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.close()


class HttpServer:
    """Serves ``handler``; ``start()`` runs it on its own event loop in a daemon thread,
    :meth:`serve_until_signal` in the caller's loop. With ``tls`` (a server context), over
    https."""

    def __init__(
        self, host: str, port: int, handler: Handler, tls: ssl.SSLContext | None = None
    ) -> None:
        self.host = host
        self.handler = handler
        self.tls = tls
        self._requested_port = port
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self.connections: set[_Connection] = set()
        self.connections_accepted = 0

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("sandbox already started")
        ready = threading.Event()
        failure: list[BaseException] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, args=(ready, failure), name="sandbox", daemon=True
        )
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]

    def stop(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None or not thread.is_alive():
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(loop.stop)
        thread.join()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("sandbox not started")
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = cast(asyncio.AbstractEventLoop, self._loop)
        asyncio.set_event_loop(loop)
        try:
            try:
                loop.run_until_complete(self._listen())
            except BaseException as exc:  # handed to start(), in the caller's thread
                failure.append(exc)
                return
            finally:
                ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
        finally:
            loop.close()

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), self.host, self._requested_port, backlog=1024, ssl=self.tls
        )
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.abort()
        await asyncio.sleep(0)  # let connection_lost run
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def serve_until_signal(self) -> None:
        """Run in the current event loop until SIGINT/SIGTERM."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        await self._listen()
        stopping = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):  # Windows: Ctrl-C still interrupts
                loop.add_signal_handler(signum, stopping.set)
        print(f"sandbox listening on {self.url}", file=sys.stderr, flush=True)
        try:
            await stopping.wait()
        finally:
            await self._shutdown()
