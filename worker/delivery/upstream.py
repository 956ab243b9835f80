"""The only module that talks HTTP: POST one report, turn the answer into an :class:`Outcome`.

Classification (docs/design.md §1). The JSON body is read first, whatever the HTTP status:

===============  ==========================================================================
accepted         ``errorId == 0``
account_fault    ERROR_KEY_DOES_NOT_EXIST, ERROR_ZERO_BALANCE, ERROR_IP_NOT_ALLOWED,
                 ERROR_IP_BANNED, ERROR_IP_BLOCKED
transient        ERROR_TOO_MUCH_REQUESTS, ERROR_NO_SLOT_AVAILABLE, CAPTCHA_NOT_READY; network
                 error, timeout; HTTP 5xx or 429 without an error code in the body; a body
                 that is not JSON (unless the status is a 4xx other than 429)
rejected         every other ERROR_* code, whatever the HTTP status (repeating a request
                 for a wrong task id is what gets accounts banned); HTTP 4xx (not 429)
                 with no usable body
===============  ==========================================================================

A provider profile may map extra codes (``error_codes`` in providers.toml). The client key
is scrubbed from every error text this module builds, in any letter case and before any
text is cut short, even when a server echoes the request (or the key upper-cased) back.

The client is urllib3 directly (the transport requests is built on, without requests' per
request work: a third of a worker's CPU went to requests, bench/README.md): one keep-alive
pool per host (per proxy, through one), shared by the process's threads; TLS verified,
connect and read timeouts, no retries or redirects, proxies from the environment as
requests reads them.
"""

from __future__ import annotations

import email.utils
import functools
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import certifi
import requests.utils
import urllib3
from urllib3.exceptions import HTTPError, NewConnectionError, URLSchemeUnknown
from urllib3.exceptions import TimeoutError as HTTPTimeoutError

from worker.settings import MAX_CONCURRENCY

Status = Literal["accepted", "rejected", "account_fault", "transient"]

ACCOUNT_FAULT_CODES = frozenset(
    {
        "ERROR_KEY_DOES_NOT_EXIST",
        "ERROR_ZERO_BALANCE",
        "ERROR_IP_NOT_ALLOWED",
        "ERROR_IP_BANNED",
        "ERROR_IP_BLOCKED",
    }
)
TRANSIENT_CODES = frozenset(
    {"ERROR_TOO_MUCH_REQUESTS", "ERROR_NO_SLOT_AVAILABLE", "CAPTCHA_NOT_READY"}
)
MAX_RETRY_AFTER_S = 3600.0
MASK = "****"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one POST came to."""

    status: Status
    http_status: int | None = None
    error_code: str = ""  # the API's code, or ours: HTTP_503, TIMEOUT, CONNECTION_ERROR, ...
    detail: str = ""
    retry_after: float | None = None
    duration_s: float = 0.0


POOL_SIZE = MAX_CONCURRENCY  # connections kept per host: at least the worker's threads
_HEADERS = {"Content-Type": "application/json", "User-Agent": "report-forwarder"}

# what a request is sent through: a host's own pool (asked for a path), or a pool manager
# (asked for a whole URL: one through a proxy, or a caller's)
Pool = urllib3.HTTPConnectionPool | urllib3.PoolManager

_pools_lock = threading.Lock()
_pools: dict[object, Pool] = {}  # by (scheme, host, port) when direct, by proxy URL else


@functools.lru_cache(maxsize=256)
def route(url: str) -> tuple[Pool, str]:
    """How this process reaches ``url``, worked out once per URL: the keep-alive pool to
    send through and what to ask it for. Direct, the pool of the URL's host and the path;
    through the proxy the environment names for the URL (:func:`proxy_for`), that proxy's
    pool and the whole URL. urllib3's pools are safe to share between threads: every
    thread of a worker uses the same ones. A pool opens connections as threads need them
    and keeps up to :data:`POOL_SIZE` per host, so no thread of a worker finds it full
    (``block=False``: it would open a connection for one request rather than wait)."""
    proxy = proxy_for(url)
    if proxy is not None:
        return _shared(proxy, lambda: new_pool(proxy)), url
    parts = urllib3.util.parse_url(url)
    scheme, host, port = parts.scheme or "http", parts.host or "", parts.port
    return _shared((scheme, host, port), lambda: _host_pool(scheme, host, port)), parts.request_uri


def _shared(key: object, make: Callable[[], Pool]) -> Pool:
    pool = _pools.get(key)
    if pool is None:
        with _pools_lock:
            pool = _pools.get(key)
            if pool is None:
                pool = _pools[key] = make()
    return pool


def _host_pool(scheme: str, host: str, port: int | None) -> urllib3.HTTPConnectionPool:
    """One host's pool, as :func:`new_pool` makes them."""
    if scheme == "https":
        return urllib3.HTTPSConnectionPool(
            host,
            port,
            maxsize=POOL_SIZE,
            block=False,
            retries=False,
            cert_reqs="CERT_REQUIRED",
            ca_certs=certifi.where(),
        )
    if scheme == "http":
        return urllib3.HTTPConnectionPool(host, port, maxsize=POOL_SIZE, block=False, retries=False)
    raise URLSchemeUnknown(scheme)


@functools.lru_cache(maxsize=256)
def proxy_for(url: str) -> str | None:
    """The proxy for ``url`` from HTTP(S)_PROXY / ALL_PROXY / NO_PROXY (either letter
    case) in the environment, read once per URL, chosen as requests chooses it (requests'
    own functions: the same NO_PROXY matching, CIDR ranges included); None: go direct."""
    proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
    if not proxy:
        return None
    return str(requests.utils.prepend_scheme_if_needed(proxy, "http"))  # type: ignore[no-untyped-call]


def new_pool(proxy: str | None = None) -> urllib3.PoolManager:
    """A pool as the shared ones are (through ``proxy`` if given): TLS verified against
    certifi's CA bundle (the one requests used), no retries and no redirects (each answer
    is classified as it comes)."""
    if proxy is None:
        return urllib3.PoolManager(
            num_pools=32,
            maxsize=POOL_SIZE,
            block=False,
            retries=False,
            cert_reqs="CERT_REQUIRED",
            ca_certs=certifi.where(),
        )
    username, password = requests.utils.get_auth_from_url(proxy)
    auth = urllib3.make_headers(proxy_basic_auth=f"{username}:{password}") if username else None
    return urllib3.ProxyManager(
        proxy,
        proxy_headers=auth,
        num_pools=32,
        maxsize=POOL_SIZE,
        block=False,
        retries=False,
        cert_reqs="CERT_REQUIRED",
        ca_certs=certifi.where(),
    )


def _forget_pools() -> None:
    """In a forked child: start with no pools (the parent's sockets are not the child's)."""
    global _pools_lock  # noqa: PLW0603  # a lock held at fork time would stay held
    _pools_lock = threading.Lock()
    _pools.clear()
    route.cache_clear()


os.register_at_fork(after_in_child=_forget_pools)


@functools.lru_cache(maxsize=64)
def _timeout(connect_s: float, read_s: float) -> urllib3.Timeout:
    return urllib3.Timeout(connect=connect_s, read=read_s)


def send_report(
    url: str,
    client_key: str,
    task_id: int,
    *,
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 10.0,
    error_codes: Mapping[str, str] | None = None,
    http: urllib3.PoolManager | None = None,
) -> Outcome:
    """POST ``{"clientKey": ..., "taskId": ...}`` to ``url`` and classify the answer.
    ``http``: a pool manager to send through, as it is (default: :func:`route`)."""
    body = json.dumps({"clientKey": client_key, "taskId": task_id}).encode()
    started = time.perf_counter()
    try:
        pool, target = (http, url) if http is not None else route(url)
        response = pool.urlopen(
            "POST",
            target,
            body=body,
            headers=_HEADERS,
            timeout=_timeout(connect_timeout_s, read_timeout_s),
            retries=False,
            redirect=False,
        )
        content = response.data
    except NewConnectionError as exc:  # a subclass of ConnectTimeoutError, but no timeout
        detail = _describe(exc, client_key)
        return Outcome("transient", None, "CONNECTION_ERROR", detail, None, _since(started))
    except HTTPTimeoutError as exc:  # connect or read timeout
        detail = _describe(exc, client_key)
        return Outcome("transient", None, "TIMEOUT", detail, None, _since(started))
    except (HTTPError, OSError, ValueError) as exc:  # refused, reset, TLS, proxy, bad URL...
        detail = _describe(exc, client_key)
        return Outcome("transient", None, "CONNECTION_ERROR", detail, None, _since(started))
    outcome = classify(response.status, content, response.headers, error_codes, secret=client_key)
    return Outcome(
        outcome.status,
        outcome.http_status,
        outcome.error_code,
        outcome.detail,
        outcome.retry_after,
        _since(started),
    )


def classify(
    http_status: int,
    content: bytes,
    headers: Mapping[str, str] | None = None,
    error_codes: Mapping[str, str] | None = None,
    *,
    secret: str = "",
) -> Outcome:
    """Classify one HTTP answer (pure: unit-tested without a server). ``secret`` (the
    request's client key) is masked, in any letter case, in the detail text."""
    retry_after = parse_retry_after((headers or {}).get("Retry-After"))
    busy = http_status >= 500 or http_status == 429
    try:
        body = json.loads(content)
    except (ValueError, RecursionError):  # not JSON, or nested too deep to parse
        body = None
    if not isinstance(body, dict) or "errorId" not in body:
        text = content[: 4 * _room(120, secret)].decode("utf-8", "replace")
        snippet = _excerpt(text, 120, secret).strip()
        code = f"HTTP_{http_status}" if http_status >= 400 else "INVALID_JSON"
        detail = scrub(f"HTTP {http_status}, body is not the API's JSON: {snippet!r}", secret)
        status: Status = "rejected" if 400 <= http_status < 500 and not busy else "transient"
        return Outcome(status, http_status, code, detail, retry_after)
    error_id = body.get("errorId")
    if error_id in (0, "0"):
        return Outcome("accepted", http_status)
    code = str(body.get("errorCode") or "")
    description = _excerpt(str(body.get("errorDescription") or ""), 300, secret)
    detail = scrub(f"{code or 'errorId ' + str(error_id)}: {description}".rstrip(": "), secret)
    mapped = (error_codes or {}).get(code)
    if mapped in ("accepted", "rejected", "account_fault", "transient"):
        return Outcome(mapped, http_status, code, detail, retry_after)  # type: ignore[arg-type]
    if code in ACCOUNT_FAULT_CODES:
        return Outcome("account_fault", http_status, code, detail, retry_after)
    if code in TRANSIENT_CODES or (busy and not code):
        return Outcome("transient", http_status, code or f"HTTP_{http_status}", detail, retry_after)
    return Outcome("rejected", http_status, code or f"ERROR_ID_{error_id}", detail, retry_after)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date), else None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, MAX_RETRY_AFTER_S)


def _since(started: float) -> float:
    return time.perf_counter() - started


def _describe(exc: BaseException, secret: str) -> str:
    return _excerpt(f"{type(exc).__name__}: {exc}", 300, secret)


def _room(limit: int, secret: str) -> int:
    """Characters to read for an excerpt of ``limit``: enough that a key starting inside
    it is read whole (as a JSON string holds it: up to 12 characters per character)."""
    return limit + 12 * len(secret)


def _excerpt(text: str, limit: int, secret: str) -> str:
    """The first ``limit`` characters of ``text``, the key masked before the cut (so a key
    that straddles the cut does not leave its first part behind)."""
    return scrub(text[: _room(limit, secret)], secret)[:limit]


def scrub(text: str, secret: str) -> str:
    """``text`` with ``secret`` masked in any letter case (a server may echo the key
    upper-cased), also as a JSON string holds it. Whole-string upper, lower and case-folded
    forms are listed besides: for a few letters (``ß`` -> ``SS``) they differ in length,
    which a case-insensitive match alone misses."""
    if not secret or not text:
        return text
    forms = {secret, secret.upper(), secret.lower(), secret.casefold()}
    forms |= {json.dumps(form)[1:-1] for form in forms}
    pattern = "|".join(map(re.escape, sorted(forms, key=len, reverse=True)))
    return re.sub(pattern, MASK, text, flags=re.IGNORECASE)
