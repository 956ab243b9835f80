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

Nothing the API sends is taken as sent (docs/design.md §1.1). An Outcome's ``error_code``
(a metric label, a stats field, a dead letter's code) is one of a bounded set: a code of
the table above or of the provider's ``error_codes``, one of ours (``HTTP_<status>``,
``INVALID_JSON``, ``TIMEOUT``, ``CONNECTION_ERROR``) or ``other``. The API's own code is
shown only at the head of ``detail``: scrubbed, characters outside ``[A-Za-z0-9_.-]`` as
``?``, at most ``MAX_CODE_CHARS``; its description follows, scrubbed, unprintable
characters escaped, at most 300 characters.

The client is libcurl, through pycurl (chosen by benchmark, bench/README.md: a sixth of
urllib3's CPU per POST, and the exchange itself — sending, waiting, parsing the answer —
runs in C without the GIL, so a worker's threads do not queue for it): keep-alive
connections shared by the process's threads; TLS verified against the CA certificates the
environment names as requests and OpenSSL read them, else certifi's bundle; a
connect timeout, a read timeout (no answer that long, in whole seconds), and the whole
exchange cut at connect + read timeout; no redirects, and no request ever sent twice (not
even one whose kept-alive connection closed before any answer); proxies from the
environment as requests reads them; answers over ``MAX_ANSWER_BYTES`` not read.
"""

from __future__ import annotations

import email.utils
import functools
import io
import json
import math
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import pycurl
import requests.utils

from worker.errors import TransientUpstreamError
from worker.settings.quoting import printable
from worker.settings.tls import Trust, trust_from
from worker.store.vocabulary import (
    ACCOUNT_FAULT_CODES,
    OTHER,
    REJECTED_CODES,
    TRANSIENT_CODES,
)

Status = Literal["accepted", "rejected", "account_fault", "transient"]

MAX_RETRY_AFTER_S = 3600.0
MASK = "****"
# An Outcome's error_code (a metric label, a stats field, a dead letter's error_code) is
# one of a bounded set (worker.store.vocabulary.known_code): a code of the tables or of the
# provider's error_codes, one we make (HTTP_<status>, INVALID_JSON, TIMEOUT,
# CONNECTION_ERROR), or OTHER. The API's own code, cut to MAX_CODE_CHARS and scrubbed, is
# kept at the head of the detail only.
MAX_CODE_CHARS = 64
_CODE_UNSAFE = re.compile(r"[^A-Za-z0-9_.*-]")  # "*": the mask's own letter


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one POST came to."""

    status: Status
    http_status: int | None = None
    # a known code (the tables, the provider's error_codes) or ours: HTTP_503, TIMEOUT,
    # CONNECTION_ERROR, INVALID_JSON; any other code of the API: OTHER (shown in detail)
    error_code: str = ""
    detail: str = ""
    retry_after: float | None = None
    duration_s: float = 0.0


# An answer of the API is a few hundred bytes; a larger one is not read (a hostile or
# broken server must not fill a worker's memory).
MAX_ANSWER_BYTES = 1 << 20
_HEADER_LINES = ["Content-Type: application/json", "User-Agent: report-forwarder", "Expect:"]
_SCHEMES = ("http", "https")
_TIMEOUT = pycurl.E_OPERATION_TIMEDOUT


class Client:
    """Keep-alive connections for reports, shared by a process's threads: libcurl easy
    handles, each keeping its own connections, lent to one request at a time — the one
    returned last goes out first, so a worker keeps about as many warm connections as it
    has reports on their way at once (a handle is never used by two threads together).

    ``proxy``: send every request through this proxy; None (the default): through the
    one the environment names for the request's URL (:func:`proxy_for`), or directly.
    ``ca_certs``: the CA bundle TLS is verified against; None (the default): what the
    environment names (REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE, SSL_CERT_FILE / SSL_CERT_DIR, as
    requests and OpenSSL read them; :func:`~worker.settings.tls.trust_from`), else
    certifi's, read at the client's first connection (a ConfigError if what it names
    cannot be used: the worker checks it at start)."""

    def __init__(self, *, proxy: str | None = None, ca_certs: str | None = None) -> None:
        self.proxy = proxy
        self.ca_certs = ca_certs
        self._trust = None if ca_certs is None else Trust(ca_certs, None, "ca_certs")
        # read once: OpenSSL loads a named bundle to check it (~35 ms for the system
        # store), and a worker's threads all make their first handle at the same moment
        self._trust_lock = threading.Lock()
        self._idle: list[pycurl.Curl] = []  # list.append and .pop are atomic

    def trust(self) -> Trust:
        """The CA certificates TLS is verified against, read from the environment once
        (ConfigError if what it names cannot be used). A worker reads it before it takes
        reports (:func:`verify_trust`), not on its threads' first requests."""
        trust = self._trust
        if trust is None:
            with self._trust_lock:
                trust = self._trust
                if trust is None:
                    trust = self._trust = trust_from(os.environ)
        return trust

    def post(
        self, url: str, body: bytes, *, connect_timeout_s: float, read_timeout_s: float
    ) -> tuple[int, bytes, bytes | None]:
        """POST ``body`` to ``url``: the HTTP status, the answer's header block and body
        (None: over ``MAX_ANSWER_BYTES``, not read); :class:`ExchangeError` if there is no
        whole answer."""
        scheme = _scheme(url)
        if scheme not in _SCHEMES:
            raise ExchangeError(f"unsupported URL scheme {scheme!r} (http and https are)")
        try:
            proxy = self.proxy if self.proxy is not None else proxy_for(url)
        except ValueError as exc:  # a URL too malformed to look its proxy up
            raise ExchangeError(f"malformed URL: {exc}") from None
        if proxy is not None and _scheme(proxy) not in _SCHEMES:
            scheme = _scheme(proxy)
            raise ExchangeError(f"unsupported proxy scheme {scheme!r} (http and https are)")
        try:
            handle = self._idle.pop()
        except IndexError:  # every handle is lent out: one more
            handle = self._new()
        head, answer = io.BytesIO(), io.BytesIO()
        try:
            handle.setopt(pycurl.URL, url)
            handle.setopt(pycurl.PROXY, proxy or "")  # "": none, not the environment's
            # read from a stream that cannot be rewound: libcurl re-sends a request whose
            # kept-alive connection closed before any answer, behind the rate limiter's
            # back; this way it gives up instead (the report is retried as any other)
            handle.setopt(pycurl.READDATA, io.BytesIO(body))
            handle.setopt(pycurl.POSTFIELDSIZE, len(body))
            handle.setopt(pycurl.CONNECTTIMEOUT_MS, max(1, round(connect_timeout_s * 1000)))
            # no answer for the read timeout (libcurl's whole seconds) after the request is
            # sent: cut; and however a server trickles it, never longer than both timeouts
            handle.setopt(pycurl.LOW_SPEED_TIME, max(1, math.ceil(read_timeout_s)))
            total_s = connect_timeout_s + read_timeout_s
            handle.setopt(pycurl.TIMEOUT_MS, max(1, round(total_s * 1000)))
            handle.setopt(pycurl.WRITEDATA, answer)
            handle.setopt(pycurl.WRITEHEADER, head)
            try:
                handle.perform()
            except pycurl.error as exc:
                if exc.args[0] == pycurl.E_FILESIZE_EXCEEDED:  # classified without it
                    return int(handle.getinfo(pycurl.RESPONSE_CODE)), head.getvalue(), None
                raise ExchangeError.from_curl(handle, exc, proxy) from None
            return int(handle.getinfo(pycurl.RESPONSE_CODE)), head.getvalue(), answer.getvalue()
        finally:
            self._idle.append(handle)

    def _new(self) -> pycurl.Curl:
        handle = pycurl.Curl()
        handle.setopt(pycurl.NOSIGNAL, 1)  # threads: no SIGALRM for name lookups
        handle.setopt(pycurl.POST, 1)
        trust = self.trust()
        for option, value in (
            (pycurl.CAINFO, trust.cafile),
            (pycurl.PROXY_CAINFO, trust.cafile),
            (pycurl.CAPATH, trust.capath),
            (pycurl.PROXY_CAPATH, trust.capath),
        ):
            if value is None:
                handle.unsetopt(option)  # none: not libcurl's compiled-in default either
            else:
                handle.setopt(option, value)
        handle.setopt(pycurl.SSL_VERIFYPEER, 1)
        handle.setopt(pycurl.SSL_VERIFYHOST, 2)
        handle.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
        handle.setopt(pycurl.FOLLOWLOCATION, 0)
        handle.setopt(pycurl.ACCEPT_ENCODING, "gzip, deflate")  # as requests asked
        handle.setopt(pycurl.HTTPHEADER, _HEADER_LINES)
        handle.setopt(pycurl.MAXFILESIZE_LARGE, MAX_ANSWER_BYTES)
        # The read timeout: below this many bytes/s for LOW_SPEED_TIME, the exchange is cut.
        # libcurl's speed counts the request's own bytes of the last ~5 s, so 1 byte/s
        # would not fire until they had left that window; an answer of the API is a few
        # hundred bytes, arriving at once, so this is "no answer for LOW_SPEED_TIME".
        handle.setopt(pycurl.LOW_SPEED_LIMIT, 1024)
        return handle

    def close(self) -> None:
        """Close the idle handles and their connections (one lent out stays open)."""
        while self._idle:
            self._idle.pop().close()


def _scheme(url: str) -> str:
    scheme, sep, _ = url.partition("://")
    return scheme.lower() if sep else ""


class ExchangeError(TransientUpstreamError):
    """No whole answer: the request could not be made, or its answer broke off (error code
    ``TIMEOUT`` or ``CONNECTION_ERROR``; :func:`send_report` turns it into a transient
    Outcome); raised by :meth:`Client.post`."""

    def __init__(self, detail: str, *, timeout: bool = False) -> None:
        super().__init__(detail, error_code="TIMEOUT" if timeout else "CONNECTION_ERROR")
        self.timeout = timeout

    @classmethod
    def from_curl(cls, handle: pycurl.Curl, exc: pycurl.error, proxy: str | None) -> ExchangeError:
        args: tuple[object, ...] = exc.args  # (libcurl's error code, its message)
        code, message = args[0], str(args[-1])
        errno = int(handle.getinfo(pycurl.OS_ERRNO) or 0)
        text = f"{message} ({os.strerror(errno)})" if errno else message
        if code in (pycurl.E_PEER_FAILED_VERIFICATION, pycurl.E_SSL_CACERT_BADFILE):
            text = f"TLS certificate verify failed: {text}"
        elif code == pycurl.E_SEND_FAIL_REWIND:
            text = "the connection closed after the request was sent, before any answer"
        if proxy is not None:  # named by host and port only: never its credentials
            where = urllib.parse.urlsplit(proxy).netloc.rpartition("@")[2]
            text = f"{text}, through proxy {where}"
        return cls(f"curl error {code}: {text}", timeout=code == _TIMEOUT)


_client = Client()


def verify_trust() -> Trust:
    """The CA certificates the process's client verifies TLS against, read now: a
    ConfigError if the environment names a bundle that cannot be used."""
    return _client.trust()


@functools.lru_cache(maxsize=256)
def proxy_for(url: str) -> str | None:
    """The proxy for ``url`` from HTTP(S)_PROXY / ALL_PROXY / NO_PROXY (either letter
    case) in the environment, read once per URL, chosen as requests chooses it (requests'
    own functions: the same NO_PROXY matching, CIDR ranges included); None: go direct."""
    proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
    if not proxy:
        return None
    return str(requests.utils.prepend_scheme_if_needed(proxy, "http"))  # type: ignore[no-untyped-call]


_forked: list[Client] = []


def _forget_connections() -> None:
    """In a forked child: start with no connections (the parent's sockets are not the
    child's). The parent's handles are kept, never closed: closing one could end the
    parent's TLS session on a socket both share."""
    global _client  # noqa: PLW0603
    _forked.append(_client)
    _client = Client()
    _client._trust = _forked[-1]._trust  # the same environment: read once is enough
    proxy_for.cache_clear()


os.register_at_fork(after_in_child=_forget_connections)


def send_report(
    url: str,
    client_key: str,
    task_id: int,
    *,
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 10.0,
    error_codes: Mapping[str, str] | None = None,
    http: Client | None = None,
) -> Outcome:
    """POST ``{"clientKey": ..., "taskId": ...}`` to ``url`` and classify the answer.
    ``http``: a client to send through (default: the process's shared one). The whole
    exchange is cut at ``connect_timeout_s + read_timeout_s``."""
    body = json.dumps({"clientKey": client_key, "taskId": task_id}).encode()
    started = time.perf_counter()
    try:
        status, head, content = (http or _client).post(
            url, body, connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s
        )
    except ExchangeError as exc:
        detail = _excerpt(str(exc), 300, client_key)
        return Outcome("transient", None, exc.error_code or "", detail, None, _since(started))
    outcome = classify(status, content or b"", _retry_after(head), error_codes, secret=client_key)
    detail = outcome.detail
    if content is None:  # classified as an answer that is not the API's JSON
        detail = f"HTTP {status}, answer over {MAX_ANSWER_BYTES} bytes, not read"
    return Outcome(
        outcome.status,
        outcome.http_status,
        outcome.error_code,
        detail,
        outcome.retry_after,
        _since(started),
    )


def _retry_after(head: bytes) -> dict[str, str]:
    """The Retry-After header of the answer's header block (the last block: one through a
    proxy's tunnel follows the proxy's own), as ``classify`` reads headers."""
    if b"retry-after" not in head.lower():
        return {}
    found: dict[str, str] = {}
    for line in head.decode("latin-1").split("\r\n"):
        if line.startswith("HTTP/"):  # a new block (a proxy's, an interim answer's)
            found.clear()
        name, colon, value = line.partition(":")
        if colon and name.strip().lower() == "retry-after":
            found["Retry-After"] = value.strip()
    return found


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
        code = _http_code(http_status) if http_status >= 400 else "INVALID_JSON"
        detail = scrub(f"HTTP {http_status}, body is not the API's JSON: {snippet!r}", secret)
        status: Status = "rejected" if 400 <= http_status < 500 and not busy else "transient"
        return Outcome(status, http_status, code, detail, retry_after)
    error_id = body.get("errorId")
    if error_id in (0, "0"):
        return Outcome("accepted", http_status)
    raw = body.get("errorCode")
    if isinstance(raw, str):
        code = raw
    else:  # a number, a list...: as text, read no further than it can be shown
        code = str(raw)[: _room(MAX_CODE_CHARS + 1, secret)] if raw else ""
    description = _excerpt(str(body.get("errorDescription") or ""), 300, secret)
    shown = _shown_code(code, secret) if code else "errorId " + _shown_code(str(error_id), secret)
    detail = scrub(f"{shown}: {description}".rstrip(": "), secret)
    mapped = (error_codes or {}).get(code)
    if mapped in ("accepted", "rejected", "account_fault", "transient"):
        return Outcome(mapped, http_status, code, detail, retry_after)  # type: ignore[arg-type]
    if code in ACCOUNT_FAULT_CODES:
        return Outcome("account_fault", http_status, code, detail, retry_after)
    if code in TRANSIENT_CODES or (busy and not code):
        label = code or _http_code(http_status)
        return Outcome("transient", http_status, label, detail, retry_after)
    label = code if code in REJECTED_CODES else OTHER
    return Outcome("rejected", http_status, label, detail, retry_after)


def _http_code(http_status: int) -> str:
    """Our code for an answer that named none: HTTP_<status> (one of 500 values)."""
    return f"HTTP_{http_status}" if 100 <= http_status <= 599 else OTHER


def _shown_code(code: str, secret: str) -> str:
    """``code`` as a person may read it: the key masked; every character outside
    ``[A-Za-z0-9_.-]`` (and the mask's ``*``) shown as ``?``, replaced, not dropped (a key
    sent with a character between each of its own would otherwise come back whole); at
    most ``MAX_CODE_CHARS``, ``...`` marking a cut."""
    text = scrub(
        _CODE_UNSAFE.sub("?", scrub(code[: _room(MAX_CODE_CHARS + 1, secret)], secret)), secret
    )
    return text if len(text) <= MAX_CODE_CHARS else text[: MAX_CODE_CHARS - 3] + "..."


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


def _room(limit: int, secret: str) -> int:
    """Characters to read for an excerpt of ``limit``: enough that a key starting inside
    it is read whole (as a JSON string holds it: up to 12 characters per character)."""
    return limit + 12 * len(secret)


def _excerpt(text: str, limit: int, secret: str) -> str:
    """The first ``limit`` characters of ``text``, the key masked before the cut (so a key
    that straddles the cut does not leave its first part behind), every character that is
    not printable (control, bidi override, lone surrogate...) shown as its escape."""
    return scrub(printable(scrub(text[: _room(limit, secret)], secret)), secret)[:limit]


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
