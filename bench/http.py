"""Which HTTP client for the worker's POST: CPU per POST and POSTs/s, the bare job, one run.

Each candidate POSTs the report JSON (``{"clientKey": ..., "taskId": ...}``) to the sandbox
(its own process, loopback) from N threads over keep-alive connections, the same number
of requests each, and reads the whole answer:

=========  ===============================================================================
requests   a ``requests.Session`` per thread, as ``worker/delivery/upstream.py`` does today:
           ``trust_env`` off, the environment's proxies looked up once and passed
           explicitly, ``(connect, read)`` timeouts, no redirects
urllib3    one shared ``urllib3.PoolManager`` (thread-safe; ``maxsize`` = threads, so every
           thread keeps its connection), ``urllib3.Timeout(connect, read)``,
           ``retries=False``, ``preload_content=True``; a ``ProxyManager`` instead when
           the environment names a proxy for the URL (:func:`urllib3_pool`)
httpx      one shared ``httpx.Client`` (HTTP/1.1), ``httpx.Timeout(read, connect=...)``
http       ``http.client.HTTPConnection`` per thread: the floor (no pooling across
           threads, one timeout for connect and read, no proxy support)
pycurl     the worker's client (``worker.delivery.upstream.Client``): libcurl easy handles
           shared by the threads, one request at a time each, proxies as requests reads them
=========  ===============================================================================

CPU is the benchmark process's own (psutil), taken while only the posting threads run;
the candidates are timed in alternating rounds (A B C D, A B C D, ...) so a change in the
machine's load hits all of them, and each figure is the median over the rounds. Ratios
are against ``requests`` in the same round. :func:`support` checks, with real sockets on
loopback, what each candidate does by default with a self-signed certificate and with
``HTTP(S)_PROXY`` / ``NO_PROXY``.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import psutil
import requests
import urllib3

from worker.testing.processes import free_port

from .perf import KEY, _api_saw, stack

CONNECT_S = 5.0
READ_S = 10.0
JSON = {"Content-Type": "application/json", "User-Agent": "report-forwarder"}
PATH = "/reportIncorrectImageCaptcha"

Post = Callable[[int], int]  # taskId -> HTTP status


def _body(task_id: int) -> bytes:
    return json.dumps({"clientKey": KEY, "taskId": task_id}).encode()


class Candidate(Protocol):
    """A client under test: ``poster()`` is called once in each posting thread."""

    def poster(self) -> Post: ...
    def close(self) -> None: ...


class RequestsClient:
    """Today's path: a Session per thread (a Session is not safe to share)."""

    def __init__(self, url: str, threads: int) -> None:
        self.url = url + PATH
        self.proxies = dict(requests.utils.get_environ_proxies(self.url))
        self.sessions: list[requests.Session] = []
        self.lock = threading.Lock()

    def poster(self) -> Post:
        session = requests.Session()
        session.trust_env = False
        session.headers["User-Agent"] = JSON["User-Agent"]
        with self.lock:
            self.sessions.append(session)
        url, proxies = self.url, self.proxies

        def post(task_id: int) -> int:
            response = session.post(
                url,
                data=_body(task_id),
                headers={"Content-Type": "application/json"},
                timeout=(CONNECT_S, READ_S),
                allow_redirects=False,
                proxies=proxies,
            )
            _ = response.content
            return response.status_code

        return post

    def close(self) -> None:
        for session in self.sessions:
            session.close()


def urllib3_pool(url: str, maxsize: int) -> urllib3.PoolManager:
    """A pool for ``url`` that honours HTTP(S)_PROXY / NO_PROXY exactly as requests does
    (urllib3 itself reads no environment), read once: requests' own reading, since the
    stdlib's ``proxy_bypass`` ignores NO_PROXY's CIDR entries (``10.0.0.0/8``).
    ``maxsize`` must be the number of threads: urllib3's default of 1 connection per host
    would close and reopen the others' connections on every request."""
    options: dict[str, Any] = {
        "maxsize": maxsize,
        "block": False,
        "retries": False,
        "timeout": urllib3.Timeout(connect=CONNECT_S, read=READ_S),
    }
    proxy = requests.utils.get_environ_proxies(url).get(urllib.parse.urlsplit(url).scheme)
    if proxy:
        return urllib3.ProxyManager(proxy, **options)
    return urllib3.PoolManager(**options)


class Urllib3Client:
    """One PoolManager shared by every thread (it is thread-safe)."""

    def __init__(self, url: str, threads: int) -> None:
        self.url = url + PATH
        self.pool = urllib3_pool(self.url, threads)

    def poster(self) -> Post:
        url, pool = self.url, self.pool

        def post(task_id: int) -> int:
            response = pool.request(
                "POST",
                url,
                body=_body(task_id),
                headers=JSON,
                redirect=False,
                preload_content=True,
            )
            _ = response.data
            return response.status

        return post

    def close(self) -> None:
        self.pool.clear()


class HttpxClient:
    """One httpx.Client shared by every thread (it is thread-safe), HTTP/1.1."""

    def __init__(self, url: str, threads: int) -> None:
        import httpx

        self.url = url + PATH
        self.client = httpx.Client(
            http1=True,
            http2=False,
            timeout=httpx.Timeout(READ_S, connect=CONNECT_S),
            limits=httpx.Limits(max_connections=threads, max_keepalive_connections=threads),
            headers={"User-Agent": JSON["User-Agent"]},
            follow_redirects=False,
        )

    def poster(self) -> Post:
        url, client = self.url, self.client

        def post(task_id: int) -> int:
            response = client.post(
                url, content=_body(task_id), headers={"Content-Type": "application/json"}
            )
            _ = response.content
            return response.status_code

        return post

    def close(self) -> None:
        self.client.close()


class StdlibClient:
    """The floor: one http.client.HTTPConnection per thread, kept alive."""

    def __init__(self, url: str, threads: int) -> None:
        parts = urllib.parse.urlsplit(url + PATH)
        self.scheme, self.host, self.port = parts.scheme, parts.hostname or "", parts.port
        self.path = parts.path
        self.connections: list[http.client.HTTPConnection] = []
        self.lock = threading.Lock()

    def poster(self) -> Post:
        kind = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        connection = kind(self.host, self.port, timeout=READ_S)
        with self.lock:
            self.connections.append(connection)
        path = self.path

        def post(task_id: int) -> int:
            connection.request("POST", path, body=_body(task_id), headers=JSON)
            response = connection.getresponse()
            response.read()
            return response.status

        return post

    def close(self) -> None:
        for connection in self.connections:
            connection.close()


class PycurlClient:
    """The worker's own client (``upstream.Client``: libcurl handles lent to one thread at
    a time, proxies chosen as requests chooses them), one shared by every thread."""

    def __init__(self, url: str, threads: int) -> None:
        from worker.delivery.upstream import Client

        self.url = url + PATH
        self.client = Client()

    def poster(self) -> Post:
        url, post_ = self.url, self.client.post

        def post(task_id: int) -> int:
            status, _, _ = post_(url, _body(task_id), connect_timeout_s=CONNECT_S,
                                 read_timeout_s=READ_S)  # fmt: skip
            return status

        return post

    def close(self) -> None:
        self.client.close()


CANDIDATES: dict[str, Callable[[str, int], Candidate]] = {
    "requests": RequestsClient,
    "urllib3": Urllib3Client,
    "httpx": HttpxClient,
    "http.client": StdlibClient,
    "pycurl": PycurlClient,
}


def post_loop(name: str, url: str, n: int, threads: int) -> dict[str, Any]:
    """``n`` POSTs (``n // threads`` per thread) with candidate ``name``: CPU-ms per POST
    and POSTs/s, CPU read from this process only while the threads post."""
    per = n // threads
    candidate = CANDIDATES[name](url, threads)
    ready = threading.Barrier(threads + 1)
    failures: list[int] = []

    def loop(first: int) -> None:
        post = candidate.poster()
        ready.wait()
        for task_id in range(first, first + per):
            status = post(task_id)
            if status != 200:
                failures.append(status)

    pool = [threading.Thread(target=loop, args=(1 + i * per,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    me = psutil.Process()
    ready.wait()
    cpu0, t = me.cpu_times(), time.perf_counter()
    for thread in pool:
        thread.join()
    elapsed, cpu1 = time.perf_counter() - t, me.cpu_times()
    candidate.close()
    if failures:
        raise RuntimeError(f"{name}: {len(failures)} POSTs answered {sorted(set(failures))}")
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    return {
        "posts_per_s": round(per * threads / elapsed),
        "cpu_ms_per_post": round(cpu * 1000 / (per * threads), 3),
        "api_received": _api_saw(url, per * threads),
    }


def compare(n: int = 4800, threads: int = 16, rounds: int = 3) -> dict[str, Any]:
    """Every candidate, alternating rounds against one sandbox; medians and same-round
    ratios against requests."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CANDIDATES}
    with stack() as s:
        url = s["sandbox_url"]
        for _ in range(rounds):
            for name in CANDIDATES:
                requests.post(url + "/_sandbox/reset", timeout=30)
                runs[name].append(post_loop(name, url, n, threads))
    out: dict[str, Any] = {"threads": threads, "posts": n // threads * threads, "rounds": rounds}
    base = runs["requests"]
    for name, results in runs.items():
        cpu = [r["cpu_ms_per_post"] for r in results]
        rate = [r["posts_per_s"] for r in results]
        out[name] = {
            "cpu_ms_per_post": statistics.median(cpu),
            "posts_per_s": statistics.median(rate),
            "cpu_vs_requests": round(
                statistics.median(
                    r["cpu_ms_per_post"] / b["cpu_ms_per_post"]
                    for r, b in zip(results, base, strict=True)
                ),
                3,
            ),
            "rate_vs_requests": round(
                statistics.median(
                    r["posts_per_s"] / b["posts_per_s"] for r, b in zip(results, base, strict=True)
                ),
                3,
            ),
            "rounds": results,
        }
    out["support"] = support()
    return out


# -- what each client does by default: TLS verification, proxies from the environment ------


@contextmanager
def _env(**values: str) -> Iterator[None]:
    names = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    os.environ.update(values)
    try:
        yield
    finally:
        for name in names:
            os.environ.pop(name, None)
        os.environ.update(saved)


class _Listener:
    """A TCP listener on loopback that records the first line of each request it gets and
    answers each with ``answer`` (bytes), or closes it (``answer`` None)."""

    def __init__(self, answer: bytes | None, tls: ssl.SSLContext | None = None) -> None:
        self.answer, self.tls = answer, tls
        self.lines: list[str] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                if self.tls is not None:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                conn.settimeout(5)
                head = conn.recv(65536).decode("latin-1")
                self.lines.append(head.split("\r\n", 1)[0])
                if self.answer is not None:
                    conn.sendall(self.answer)
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

    def close(self) -> None:
        self.sock.close()


OK_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n"
    b'Connection: close\r\n\r\n{"errorId":0}'
)


def _try(name: str, base: str) -> str:
    """One POST to ``base`` with candidate ``name``, made under the current environment:
    'ok' or the exception's class name."""
    candidate = CANDIDATES[name](base, 1)
    try:
        candidate.poster()(1)
    except Exception as exc:  # the class is the answer
        chain: BaseException | None = exc
        while chain is not None:
            if "certificate verify failed" in str(chain).lower():
                return f"{type(exc).__name__}: CERTIFICATE_VERIFY_FAILED"
            chain = chain.__cause__ or chain.__context__
        return type(exc).__name__
    finally:
        candidate.close()
    return "ok"


def support() -> dict[str, dict[str, Any]]:
    """For each candidate: does it refuse a self-signed certificate by default; does it
    send through HTTP_PROXY / HTTPS_PROXY (a CONNECT for https); does NO_PROXY bypass it,
    by host name and by CIDR block."""
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="rf-tls-") as tmp:
        cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        tls = _Listener(OK_ANSWER, context)
        proxy = _Listener(None)
        plain = _Listener(OK_ANSWER)
        closed = free_port()
        try:
            for name in CANDIDATES:
                row: dict[str, Any] = {}
                with _env():
                    row["self_signed_cert"] = _try(name, f"https://127.0.0.1:{tls.port}")
                before = len(proxy.lines)
                with _env(HTTPS_PROXY=f"http://127.0.0.1:{proxy.port}"):
                    _try(name, f"https://127.0.0.1:{closed}")
                row["https_proxy_used"] = any(
                    line.startswith("CONNECT ") for line in proxy.lines[before:]
                )
                before = len(proxy.lines)
                with _env(HTTP_PROXY=f"http://127.0.0.1:{proxy.port}"):
                    _try(name, f"http://127.0.0.1:{closed}")
                row["http_proxy_used"] = len(proxy.lines) > before
                before, direct = len(proxy.lines), len(plain.lines)
                with _env(
                    HTTP_PROXY=f"http://127.0.0.1:{proxy.port}",
                    NO_PROXY="127.0.0.1",
                ):
                    row["no_proxy_direct"] = _try(name, f"http://127.0.0.1:{plain.port}")
                row["no_proxy_honoured"] = len(proxy.lines) == before and len(plain.lines) > direct
                before, direct = len(proxy.lines), len(plain.lines)
                with _env(
                    HTTP_PROXY=f"http://127.0.0.1:{proxy.port}",
                    NO_PROXY="127.0.0.0/8",
                ):
                    _try(name, f"http://127.0.0.1:{plain.port}")
                row["no_proxy_cidr_honoured"] = (
                    len(proxy.lines) == before and len(plain.lines) > direct
                )
                out[name] = row
        finally:
            tls.close()
            proxy.close()
            plain.close()
    return out
