"""The intake against hostile input, over real HTTP: numbers of thousands of digits, deep
nesting, bytes that are not text, empty bodies — always a 4xx JSON answer, never a 5xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import requests
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from worker.intake import Intake
from worker.settings import Settings

from .conftest import CLIENT_KEY, queue_length
from .intake_support import Server

IMAGE = "/reportIncorrectImageCaptcha"
REPORT_ROUTES = [IMAGE, "/reportIncorrectTokenCaptcha", "/reportIncorrectHcaptcha"]
JSON = {"Content-Type": "application/json"}
NDJSON = {"Content-Type": "application/x-ndjson"}


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


@pytest.fixture
def intake(settings: Settings, env: dict[str, str]) -> Iterator[Server]:
    with Server(Intake(settings, settings.redis_url, environ=env)) as server:
        yield server


def report(task_id: str) -> str:
    """A report body with ``task_id`` written as is (a JSON value's text)."""
    return f'{{"clientKey": "{CLIENT_KEY}", "taskId": {task_id}}}'


def nested(depth: int, opener: str = "[", closed: bool = True) -> str:
    closer = {"[": "]", '{"a":': "}"}[opener]
    return opener * depth + "1" + (closer * depth if closed else "")


def check_answer(response: requests.Response) -> dict[str, Any]:
    """No 5xx, a JSON object, and for a 4xx the API's error shape."""
    assert response.status_code < 500, response.text[:300]
    assert response.headers["content-type"].startswith("application/json")
    doc = response.json()
    assert isinstance(doc, dict)
    if response.status_code >= 400:
        assert 1 == doc["errorId"]
        assert isinstance(doc["errorCode"], str)
        assert len(doc["errorDescription"]) < 1000
    return doc


@pytest.mark.parametrize(
    "task_id",
    ['"' + "7" * 5000 + '"', "7" * 5000, "-" + "7" * 5000, '"  ' + "7" * 9000 + '  "'],
    ids=["string", "number", "negative", "padded-string"],
)
def test_a_5000_digit_task_id_is_refused_as_an_invalid_id(
    intake: Server, http: requests.Session, redis_client: redis.Redis, task_id: str
) -> None:
    """A taskId of thousands of digits (as a string or a number) is a 400
    ERROR_NO_SUCH_CAPCHA_ID with a short description, not a 500."""
    response = http.post(intake.url + IMAGE, data=report(task_id), headers=JSON, timeout=10)
    doc = check_answer(response)
    assert (400, "ERROR_NO_SUCH_CAPCHA_ID") == (response.status_code, doc["errorCode"])
    assert "characters" in str(doc["errorDescription"])
    assert 0 == queue_length(redis_client)


@pytest.mark.parametrize(
    ("path", "body", "headers"),
    [
        (IMAGE, nested(5000), JSON),
        (IMAGE, nested(5000, closed=False), JSON),
        (IMAGE, '{"a": ' + nested(5000) + "}", JSON),
        (IMAGE, nested(2500, '{"a":'), JSON),
        ("/v1/reports", nested(5000), JSON),
        ("/v1/reports", "[" + nested(5000, '{"a":') + "]", JSON),
        ("/v1/reports", '{"a": ' + nested(5000) + "}", NDJSON),
    ],
    ids=["array", "unclosed", "in-object", "objects", "bulk-array", "bulk-objects", "bulk-line"],
)
def test_deep_nesting_is_a_400_on_both_routes(
    intake: Server, http: requests.Session, path: str, body: str, headers: dict[str, str]
) -> None:
    """JSON nested 5,000 deep (arrays, objects, closed or not) is a 400 ERROR_INVALID_JSON
    saying so, on the report routes and the bulk route alike."""
    response = http.post(intake.url + path, data=body, headers=headers, timeout=10)
    doc = check_answer(response)
    assert (400, "ERROR_INVALID_JSON") == (response.status_code, doc["errorCode"])
    assert "nested too deeply" in str(doc["errorDescription"])


def test_a_long_unknown_path_is_a_short_404(intake: Server, http: requests.Session) -> None:
    """A 10,000-character unknown path gets a 404 whose description quotes it cut short."""
    response = http.post(intake.url + "/" + "x" * 10_000, data="{}", headers=JSON, timeout=10)
    doc = check_answer(response)
    assert (404, "ERROR_NO_SUCH_METHOD") == (response.status_code, doc["errorCode"])
    assert len(response.content) < 400


def test_deep_values_and_huge_numbers_in_bulk_refuse_only_their_item(
    intake: Server, http: requests.Session, redis_client: redis.Redis
) -> None:
    """In a bulk request, a deeply nested line, a deeply nested taskId or captchaType and
    a 5,000-digit taskId each refuse their own item; the good ones are queued."""
    lines = [
        json.dumps({"taskId": 1, "captchaType": "image"}),
        '{"taskId": ' + nested(5000) + ', "captchaType": "image"}',
        '{"taskId": ' + nested(800) + ', "captchaType": "image"}',
        '{"taskId": 3, "captchaType": ' + nested(800) + "}",
        '{"taskId": "' + "9" * 5000 + '", "captchaType": "image"}',
        '{"taskId": ' + "9" * 5000 + ', "captchaType": "image"}',
        '{"taskId": 1e999999, "captchaType": "image"}',
        json.dumps({"taskId": 2, "captchaType": "token"}),
    ]
    response = http.post(
        intake.url + "/v1/reports", data="\n".join(lines), headers=NDJSON, timeout=10
    )
    doc = check_answer(response)
    assert 200 == response.status_code
    assert 2 == doc["queued"]
    assert [1, 2, 3, 4, 5, 6] == [r["index"] for r in doc["refused"]]
    assert {"invalid_json": 1, "invalid_task_id": 4, "unknown_captcha_type": 1} == doc[
        "refused_by_reason"
    ]
    assert len(response.content) < 5000
    assert 2 == queue_length(redis_client)


# -- generated hostile input ---------------------------------------------------------------

digits = st.integers(min_value=1, max_value=12_000).map(lambda n: "7" * n)
huge_numbers = st.one_of(
    digits,
    digits.map(lambda d: "-" + d),
    digits.map(lambda d: d + "." + d[:50]),
    digits.map(lambda d: f'"{d}"'),
    st.sampled_from(
        [
            "1e999999",
            "-1e999999",
            "1e-999999",
            "1E+99999999999999999999",
            "0.0000000001e-400",
            "NaN",
            "Infinity",
            "-Infinity",
            "9223372036854775808",
            "18446744073709551616",
        ]
    ),
    st.tuples(st.integers(1, 30), st.integers(-(10**6), 10**6)).map(
        lambda t: f"{'9' * t[0]}e{t[1]}"
    ),
)
deep = st.builds(
    nested,
    st.integers(min_value=1, max_value=7_000),
    st.sampled_from(["[", '{"a":']),
    st.booleans(),
)
surrogates = st.integers(0xD800, 0xDFFF).map(chr)
odd_strings = st.one_of(
    st.text(max_size=40).map(json.dumps),
    surrogates.map(json.dumps),  # a lone surrogate as a JSON escape, "\ud800"
    surrogates.map(lambda c: f'"{c}"'),  # ... and as raw (invalid UTF-8) bytes
    st.text(max_size=20).map(lambda t: json.dumps(t + "\u0000" + t)),
)
hostile_value = st.one_of(huge_numbers, deep, odd_strings)
report_bodies = st.one_of(
    st.builds(report, hostile_value),
    hostile_value.map(lambda v: f'{{"clientKey": {v}, "taskId": 5}}'),
    hostile_value,
    st.binary(max_size=2_000).map(lambda b: b.decode("latin-1")),
    st.sampled_from(["", " ", "\n", "\x00", "{}", "[]", "null", '"', "{", "\ufeff{}"]),
)
bulk_lines = st.lists(
    st.one_of(
        st.builds(
            lambda t, c, a: f'{{"taskId": {t}, "captchaType": {c}, "account": {a}}}',
            hostile_value | st.integers(1, 10**6).map(str),
            hostile_value | st.just('"image"'),
            hostile_value | st.just('"default"'),
        ),
        hostile_value,
        st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
        st.just(""),
    ),
    max_size=8,
)


@hsettings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(path=st.sampled_from(REPORT_ROUTES), body=report_bodies)
def test_generated_hostile_reports_get_a_json_4xx_never_a_5xx(
    intake: Server, http: requests.Session, path: str, body: str
) -> None:
    """Generated report bodies — huge numbers, deep nesting, lone surrogates, binary, empty
    — always get a JSON answer and never a 5xx."""
    data = body.encode("utf-8", "surrogatepass")
    check_answer(http.post(intake.url + path, data=data, headers=JSON, timeout=10))


@hsettings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lines=bulk_lines,
    as_array=st.booleans(),
    content_type=st.sampled_from(["application/json", "application/x-ndjson"]),
)
def test_generated_hostile_bulk_requests_get_a_json_answer_never_a_5xx(
    intake: Server, http: requests.Session, lines: list[str], as_array: bool, content_type: str
) -> None:
    """Generated bulk bodies (as an array or as lines) with hostile items always get a
    JSON answer and never a 5xx; when accepted, every item is queued, a duplicate or
    refused with its index."""
    body = ("[" + ",".join(lines) + "]") if as_array else "\n".join(lines)
    data = body.encode("utf-8", "surrogatepass")
    response = http.post(
        intake.url + "/v1/reports", data=data, headers={"Content-Type": content_type}, timeout=10
    )
    doc = check_answer(response)
    if response.status_code == 200:
        refused = doc["refused"]
        assert isinstance(refused, list)
        assert all(isinstance(r["index"], int) and r["error"] for r in refused)
