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
"""

from __future__ import annotations

import email.utils
import functools
import json
import math
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import requests

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


_sessions = threading.local()


def session() -> requests.Session:
    """This thread's keep-alive session (requests.Session is not safe to share). It does
    not read proxy and netrc settings from the environment on every request (that was a
    sixth of a worker's CPU): proxies are read once per URL by :func:`proxies_for`."""
    current: requests.Session | None = getattr(_sessions, "session", None)
    if current is None:
        current = requests.Session()
        current.headers["User-Agent"] = "report-forwarder"
        current.trust_env = False
        _sessions.session = current
    return current


@functools.lru_cache(maxsize=256)
def proxies_for(url: str) -> dict[str, str]:
    """HTTP(S)_PROXY / NO_PROXY from the environment, for ``url`` (read once)."""
    return dict(requests.utils.get_environ_proxies(url))


def send_report(
    url: str,
    client_key: str,
    task_id: int,
    *,
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 10.0,
    error_codes: Mapping[str, str] | None = None,
    http: requests.Session | None = None,
) -> Outcome:
    """POST ``{"clientKey": ..., "taskId": ...}`` to ``url`` and classify the answer."""
    body = json.dumps({"clientKey": client_key, "taskId": task_id}).encode()
    started = time.perf_counter()
    try:
        response = (http or session()).post(
            url,
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=(connect_timeout_s, read_timeout_s),
            allow_redirects=False,
            proxies=proxies_for(url),
        )
        content = response.content
    except requests.Timeout as exc:
        detail = _describe(exc, client_key)
        return Outcome("transient", None, "TIMEOUT", detail, None, _since(started))
    except requests.RequestException as exc:
        detail = _describe(exc, client_key)
        return Outcome("transient", None, "CONNECTION_ERROR", detail, None, _since(started))
    outcome = classify(
        response.status_code, content, response.headers, error_codes, secret=client_key
    )
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
