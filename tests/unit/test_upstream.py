"""worker.delivery.upstream: the docs/design.md §1 classification table and Retry-After.

``classify`` and ``parse_retry_after`` are pure; ``send_report`` (the HTTP layer: what it
sends, timeouts, proxies, TLS, the key never leaking from a real server's answer) is tested
over real HTTP on loopback in tests/integration/test_upstream.py.
"""

from __future__ import annotations

import email.utils
import json
import re
import time

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from tests.key_echo import FLIPS, KEYS, PADS, WHERE, assert_key_absent, echoing_answer, mangle
from worker.delivery.upstream import (
    MAX_CODE_CHARS,
    MAX_RETRY_AFTER_S,
    Outcome,
    classify,
    parse_retry_after,
)
from worker.store.vocabulary import OTHER, known_code

TASK_ID = 123456789

REJECTED_CODES = (
    "ERROR_NO_SUCH_CAPCHA_ID",
    "WRONG_CAPTCHA_ID",
    "ERROR_NO_SUCH_METHOD",
    "ERROR_CAPTCHA_UNSOLVABLE",
)
UNLISTED_CODES = ("ERROR_SOMETHING_NEW", "ERROR_WRONG_USERAGENT", "ERROR_RECAPTCHA_INVALID_DOMAIN")
ACCOUNT_FAULT_CODES = (
    "ERROR_KEY_DOES_NOT_EXIST",
    "ERROR_ZERO_BALANCE",
    "ERROR_IP_NOT_ALLOWED",
    "ERROR_IP_BANNED",
    "ERROR_IP_BLOCKED",
)
TRANSIENT_CODES = ("ERROR_TOO_MUCH_REQUESTS", "ERROR_NO_SLOT_AVAILABLE", "CAPTCHA_NOT_READY")
UNUSABLE_BODIES = (
    b"",
    b"<html><body><h1>403 Forbidden</h1></body></html>",
    b"not json at all",
    b"[]",
    b'"a JSON string"',
    b'{"error": "no errorId here"}',
    b"\xff\xfe\x00garbage",
)


def api_error(code: str, description: str = "") -> bytes:
    """The API's error answer for ``code``."""
    fields: dict[str, object] = {"errorId": 1, "errorCode": code}
    if description:
        fields["errorDescription"] = description
    return json.dumps(fields).encode()


SUCCESS = json.dumps({"errorId": 0, "status": "success"}).encode()


# --- classify: accepted ------------------------------------------------------------------


def test_classify_error_id_zero_is_accepted() -> None:
    """``{"errorId": 0, "status": "success"}`` on HTTP 200 is accepted, with no error code."""
    outcome = classify(200, SUCCESS)

    assert "accepted" == outcome.status
    assert 200 == outcome.http_status
    assert "" == outcome.error_code


def test_classify_error_id_zero_without_status_is_accepted() -> None:
    """``errorId == 0`` alone decides acceptance; the ``status`` field is not required."""
    assert "accepted" == classify(200, b'{"errorId": 0}').status


# --- classify: rejected ------------------------------------------------------------------


@pytest.mark.parametrize("code", REJECTED_CODES)
def test_classify_listed_rejected_codes(code: str) -> None:
    """Each code docs/design.md §1 lists as a permanent rejection of this report is ``rejected``."""
    outcome = classify(200, api_error(code, "whatever the API says"))

    assert "rejected" == outcome.status
    assert code == outcome.error_code
    assert 200 == outcome.http_status


@pytest.mark.parametrize("code", UNLISTED_CODES)
def test_classify_other_error_codes_are_rejected(code: str) -> None:
    """An ``ERROR_*`` code the table does not list is a permanent rejection, not a retry,
    counted as ``other``; the code itself is kept readable at the head of the detail."""
    outcome = classify(200, api_error(code, "what it means"))

    assert ("rejected", OTHER) == (outcome.status, outcome.error_code)
    assert f"{code}: what it means" == outcome.detail


def test_classify_error_id_one_without_code_is_rejected() -> None:
    """An error answer that names no code is still a rejection, with a non-empty error code."""
    outcome = classify(200, b'{"errorId": 1}')

    assert "rejected" == outcome.status
    assert "" != outcome.error_code


@pytest.mark.parametrize("content", UNUSABLE_BODIES)
@pytest.mark.parametrize("http_status", [400, 401, 402, 403, 404, 405, 413, 422])
def test_classify_4xx_without_usable_body_is_rejected(http_status: int, content: bytes) -> None:
    """An HTTP 4xx (not 429) whose body is not the API's JSON is rejected as HTTP_<status>."""
    outcome = classify(http_status, content)

    assert "rejected" == outcome.status
    assert f"HTTP_{http_status}" == outcome.error_code
    assert http_status == outcome.http_status


# --- classify: account fault -------------------------------------------------------------


@pytest.mark.parametrize("code", ACCOUNT_FAULT_CODES)
def test_classify_account_fault_codes(code: str) -> None:
    """Each code docs/design.md §1 lists as a fault of the whole key is ``account_fault``."""
    outcome = classify(200, api_error(code))

    assert "account_fault" == outcome.status
    assert code == outcome.error_code


# --- classify: transient -----------------------------------------------------------------


@pytest.mark.parametrize("code", TRANSIENT_CODES)
def test_classify_transient_codes(code: str) -> None:
    """ERROR_TOO_MUCH_REQUESTS, ERROR_NO_SLOT_AVAILABLE and CAPTCHA_NOT_READY are retried."""
    outcome = classify(200, api_error(code))

    assert "transient" == outcome.status
    assert code == outcome.error_code


@pytest.mark.parametrize("content", [*UNUSABLE_BODIES, b'{"errorId": 1}'])
@pytest.mark.parametrize("http_status", [500, 502, 503, 504, 520])
def test_classify_5xx_is_transient(http_status: int, content: bytes) -> None:
    """An HTTP 5xx without an error code of its own is transient, coded HTTP_<status>."""
    outcome = classify(http_status, content)

    assert "transient" == outcome.status
    assert f"HTTP_{http_status}" == outcome.error_code
    assert http_status == outcome.http_status


@pytest.mark.parametrize("content", [*UNUSABLE_BODIES, b'{"errorId": 1}'])
def test_classify_429_is_transient(content: bytes) -> None:
    """HTTP 429 is transient, unlike every other 4xx, whatever its (code-less) body."""
    outcome = classify(429, content)

    assert "transient" == outcome.status
    assert "HTTP_429" == outcome.error_code


@pytest.mark.parametrize(
    "content", [b"", b"<html>Service temporarily unavailable</html>", b"{trunc", b"\xff\xfe"]
)
def test_classify_non_json_body_on_success_status_is_transient(content: bytes) -> None:
    """A body that is not JSON on a non-error HTTP status is transient (worth another try)."""
    outcome = classify(200, content)

    assert "transient" == outcome.status
    assert 200 == outcome.http_status
    assert "INVALID_JSON" == outcome.error_code


@pytest.mark.parametrize("content", [b"[" * 100_000, b'{"a":' * 100_000, b"[" * 5000 + b"]" * 5000])
def test_classify_json_nested_too_deep_is_not_the_apis_json(content: bytes) -> None:
    """A body nested deeper than the JSON parser goes (a hostile or broken server) is a
    body that is not the API's JSON, never an exception."""
    outcome = classify(200, content)

    assert "transient" == outcome.status
    assert "INVALID_JSON" == outcome.error_code


# --- classify: the JSON body is read first, whatever the status ---------------------------


@pytest.mark.parametrize(
    ("http_status", "content", "status", "error_code"),
    [
        (403, api_error("ERROR_IP_BANNED"), "account_fault", "ERROR_IP_BANNED"),
        (402, api_error("ERROR_ZERO_BALANCE"), "account_fault", "ERROR_ZERO_BALANCE"),
        (401, api_error("ERROR_KEY_DOES_NOT_EXIST"), "account_fault", "ERROR_KEY_DOES_NOT_EXIST"),
        (429, api_error("ERROR_IP_BLOCKED"), "account_fault", "ERROR_IP_BLOCKED"),
        (503, api_error("ERROR_ZERO_BALANCE"), "account_fault", "ERROR_ZERO_BALANCE"),
        (429, api_error("ERROR_TOO_MUCH_REQUESTS"), "transient", "ERROR_TOO_MUCH_REQUESTS"),
        (400, api_error("ERROR_NO_SLOT_AVAILABLE"), "transient", "ERROR_NO_SLOT_AVAILABLE"),
        (404, api_error("ERROR_NO_SUCH_CAPCHA_ID"), "rejected", "ERROR_NO_SUCH_CAPCHA_ID"),
        (200, SUCCESS, "accepted", ""),
        (202, SUCCESS, "accepted", ""),
        (403, SUCCESS, "accepted", ""),
        (500, SUCCESS, "accepted", ""),
    ],
)
def test_classify_reads_json_body_before_status(
    http_status: int, content: bytes, status: str, error_code: str
) -> None:
    """The API's JSON answer decides the outcome and its code, whatever the HTTP status."""
    outcome = classify(http_status, content)

    assert status == outcome.status
    assert error_code == outcome.error_code
    assert http_status == outcome.http_status


@pytest.mark.parametrize("http_status", [429, 503])
@pytest.mark.parametrize("code", REJECTED_CODES)
def test_classify_permanent_body_code_wins_over_busy_status(http_status: int, code: str) -> None:
    """A listed rejection code in the body is ``rejected`` even on HTTP 429 or 5xx."""
    outcome = classify(http_status, api_error(code))

    assert "rejected" == outcome.status
    assert code == outcome.error_code


# --- classify: provider error_codes --------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "mapped"),
    [
        ("ERROR_NO_SUCH_CAPCHA_ID", "transient"),  # a listed rejection, retried for this provider
        ("ERROR_IP_BANNED", "rejected"),  # a listed account fault, downgraded
        ("ERROR_TOO_MUCH_REQUESTS", "account_fault"),  # a listed transient code, upgraded
        ("ERROR_PROVIDER_BUSY", "transient"),  # a code the built-in table does not know
        ("ERROR_ALREADY_REPORTED", "accepted"),
        ("ERROR_PROVIDER_KEY_EXPIRED", "account_fault"),
    ],
)
def test_classify_provider_error_codes_override_builtin_table(code: str, mapped: str) -> None:
    """A provider profile's ``error_codes`` mapping wins over the built-in classification."""
    outcome = classify(200, api_error(code), error_codes={code: mapped})

    assert mapped == outcome.status
    assert code == outcome.error_code


def test_classify_provider_error_codes_apply_only_to_named_codes() -> None:
    """Codes a provider's ``error_codes`` does not name keep their built-in classification."""
    mapping = {"ERROR_PROVIDER_BUSY": "transient"}

    assert "account_fault" == classify(200, api_error("ERROR_ZERO_BALANCE"), None, mapping).status
    assert "rejected" == classify(200, api_error("ERROR_NO_SUCH_METHOD"), None, mapping).status


def test_classify_ignores_unknown_provider_mapping_value() -> None:
    """A mapping to something that is not an outcome leaves the built-in classification."""
    outcome = classify(
        200, api_error("ERROR_ZERO_BALANCE"), error_codes={"ERROR_ZERO_BALANCE": "x"}
    )

    assert "account_fault" == outcome.status


# --- classify / parse_retry_after: Retry-After ---------------------------------------------


def test_classify_reads_retry_after_header() -> None:
    """A ``Retry-After`` header on the answer ends up in ``Outcome.retry_after`` (seconds)."""
    outcome = classify(429, b"", {"Retry-After": "12"})

    assert 12.0 == outcome.retry_after


def test_classify_without_retry_after_has_none() -> None:
    """Without a ``Retry-After`` header, ``Outcome.retry_after`` is None."""
    assert classify(503, b"").retry_after is None


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("0", 0.0), ("5", 5.0), (" 7 ", 7.0), ("2.5", 2.5), ("120", 120.0)],
)
def test_parse_retry_after_delta_seconds(value: str, seconds: float) -> None:
    """A delta-seconds ``Retry-After`` is returned as that many seconds."""
    assert seconds == parse_retry_after(value)


def test_parse_retry_after_http_date() -> None:
    """An HTTP-date ``Retry-After`` is turned into the seconds from now until that date."""
    value = email.utils.formatdate(time.time() + 90, usegmt=True)

    seconds = parse_retry_after(value)

    assert seconds is not None
    assert 85 <= seconds <= 90


def test_parse_retry_after_is_capped() -> None:
    """An absurdly long ``Retry-After`` is capped at MAX_RETRY_AFTER_S."""
    assert MAX_RETRY_AFTER_S == parse_retry_after("99999999")


@pytest.mark.parametrize(
    "value",
    [None, "", "   ", "soon", "-5", "nan", "inf", "Wed, 21 Oct 2015 07:28:00 GMT"],
)
def test_parse_retry_after_unusable_values(value: str | None) -> None:
    """Missing, garbled, negative, non-finite or past ``Retry-After`` values give None."""
    assert parse_retry_after(value) is None


# --- classify: the key never leaks into detail ---------------------------------------------


@hsettings(deadline=None, max_examples=300)
@given(
    key=KEYS,
    flips=FLIPS,
    where=WHERE,
    pad=PADS,
)
def test_classify_masks_a_case_mangled_echo_of_any_key(
    key: str, flips: list[bool], where: str, pad: int
) -> None:
    """Whatever the key, wherever an answer echoes it (an error description, an HTML page,
    the request body) and however its letters' case changed, ``detail`` holds neither the
    key nor its first half (the same over real HTTP: tests/integration/test_upstream.py)."""
    status, body = echoing_answer(key, flips, where, pad, TASK_ID)
    outcome = classify(status, body, secret=key)

    assert_key_absent(outcome.detail, key)


# --- classify: whatever the API sends, what it leaves behind is bounded --------------------

# the codes an Outcome may carry for an error answer with no provider mapping
KNOWN = {*REJECTED_CODES, *ACCOUNT_FAULT_CODES, *TRANSIENT_CODES, "INVALID_JSON", OTHER}
MAPPED = {"ERROR_PROVIDER_BUSY": "transient", "ERROR_ALREADY_REPORTED": "accepted"}
# any text: control characters, bidi overrides, lone surrogates (sent JSON-escaped) included
HOSTILE_TEXT = st.text(
    st.one_of(st.characters(), st.sampled_from(["\ud800", "\udfff", "\u202e", "\x1b", "\n"]))
)
LONG_TEXT = st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=8), st.integers(1, 120_000))
CODES = st.one_of(
    st.sampled_from(sorted(KNOWN | set(MAPPED))),
    st.from_regex(r"[A-Z0-9_]{1,100}", fullmatch=True),
    HOSTILE_TEXT,
    LONG_TEXT,
)
ERROR_IDS = st.one_of(st.integers(), HOSTILE_TEXT, LONG_TEXT, st.lists(st.integers(), max_size=3))


def _embed(text: str, echo: str, at: int) -> str:
    """``text`` with ``echo`` inserted at ``at`` (modulo its length)."""
    cut = at % (len(text) + 1)
    return text[:cut] + echo + text[cut:]


@hsettings(deadline=None, max_examples=400)
@given(
    key=KEYS,
    flips=FLIPS,
    code=CODES,
    description=st.one_of(HOSTILE_TEXT, LONG_TEXT),
    error_id=ERROR_IDS,
    where=st.sampled_from(["errorCode", "errorDescription", "errorId", "raw", "nowhere"]),
    at=st.integers(0, 1 << 20),
    http_status=st.integers(100, 599),
    raw=st.binary(max_size=4096),
)
def test_classify_bounds_and_scrubs_whatever_the_api_sends(
    key: str,
    flips: list[bool],
    code: str,
    description: str,
    error_id: object,
    where: str,
    at: int,
    http_status: int,
    raw: bytes,
) -> None:
    """Whatever the answer's errorCode, errorDescription and errorId (any length, any
    characters) or raw bytes, and wherever the key is echoed in them in any letter case,
    the error code is a known one or ``other``, and the detail is short, printable
    UTF-8 and free of the key."""

    def answer(echo: str) -> bytes:
        if where == "raw":
            cut = at % (len(raw) + 1)
            return raw[:cut] + echo.encode() + raw[cut:]
        fields = {"errorId": error_id, "errorCode": code, "errorDescription": description}
        if where in fields:
            fields[where] = _embed(str(fields[where]), echo, at)
        return json.dumps(fields).encode()

    outcome = classify(http_status, answer(mangle(key, flips)), error_codes=MAPPED, secret=key)

    http_code = re.fullmatch(r"HTTP_[1-5][0-9][0-9]", outcome.error_code)
    assert outcome.error_code in KNOWN | set(MAPPED) | {""} or http_code, outcome.error_code
    assert len(outcome.detail) <= 400
    assert outcome.detail.isprintable(), outcome.detail
    outcome.detail.encode()  # no lone surrogate: it can be written to Redis and logs
    # the key's first half may be in the answer by chance: then only the whole key is looked for
    without = classify(http_status, answer(""), error_codes=MAPPED).detail.lower()
    for text in (outcome.detail, outcome.error_code):
        if key[: len(key) // 2].lower() in without:
            assert key.lower() not in text.lower()
        else:
            assert_key_absent(text, key)


@pytest.mark.parametrize("code", ["ERROR_SOMETHING_NEW", "X" * MAX_CODE_CHARS])
def test_classify_keeps_a_plausible_unknown_code_readable_in_the_detail(code: str) -> None:
    """A short ``[A-Z0-9_]`` code the tables do not know is ``other`` as the error code, and
    kept whole at the head of the detail (where a person reads one report)."""
    outcome = classify(400, api_error(code, "no such thing"))

    assert ("rejected", OTHER) == (outcome.status, outcome.error_code)
    assert f"{code}: no such thing" == outcome.detail


def test_classify_cuts_a_long_code_and_replaces_unsafe_characters() -> None:
    """An unknown code longer than ``MAX_CODE_CHARS`` is cut (marked ``...``), and its
    characters outside ``[A-Za-z0-9_.-]`` are shown as ``?``."""
    outcome = classify(200, api_error("ERR\x1bOR <b>" + "Z" * 1000))

    shown = outcome.detail
    assert ("ERR?OR??b?" + "Z" * (MAX_CODE_CHARS - 13) + "...") == shown
    assert OTHER == outcome.error_code


def test_classify_masks_a_key_inside_the_error_code() -> None:
    """A key the API echoes inside errorCode (upper-cased) is masked in the detail, and the
    error code is ``other``."""
    key = "0123abcdef0123abcdef"
    outcome = classify(200, api_error(f"ERROR_BAD_KEY_{key.upper()}"), secret=key)

    assert (OTHER, "ERROR_BAD_KEY_****") == (outcome.error_code, outcome.detail)


def test_classify_error_id_without_code_is_bounded() -> None:
    """An error answer with no code and a huge errorId is ``other``, its errorId cut short."""
    outcome = classify(200, json.dumps({"errorId": "9" * 100_000}).encode())

    assert ("rejected", OTHER) == (outcome.status, outcome.error_code)
    assert "errorId " + "9" * (MAX_CODE_CHARS - 3) + "..." == outcome.detail


def test_outcome_is_immutable() -> None:
    """An Outcome is a frozen value: it cannot be altered after classification."""
    outcome = Outcome("accepted", 200)

    with pytest.raises(AttributeError):
        outcome.status = "rejected"  # type: ignore[misc]  # the assignment the test expects refused


@given(http_status=st.integers(0, 999), content=st.binary(max_size=64), code=CODES)
def test_every_code_classify_gives_is_a_known_code(
    http_status: int, content: bytes, code: str
) -> None:
    """Whatever the status line's number (libcurl takes any three digits) and the body, the
    error code classify gives passes ``known_code``, the predicate the readers of stats and
    dead letters apply (an answer that named no code: empty)."""
    for body in (content, json.dumps({"errorId": 1, "errorCode": code}).encode()):
        outcome = classify(http_status, body, error_codes=MAPPED)
        assert outcome.error_code == "" or known_code(outcome.error_code, MAPPED), outcome
