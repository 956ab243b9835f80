"""The intake never echoes an API key: a client that sends a configured key (its own) as
the taskId, in the path, in the content type or in a bulk item gets an answer that
quotes its value with the key masked, in any letter case and wherever the answer's
excerpt is cut. Over real HTTP, with python-anticaptcha and with raw requests; the keys
are generated (tests/key_echo.py)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from worker.intake import Intake
from worker.settings import Settings

from ..key_echo import FLIPS, KEYS, PADS, assert_key_absent, mangle
from .intake_support import Server

IMAGE = "/reportIncorrectImageCaptcha"
# keys with a start no answer's own text has (the test looks for the key's first half:
# hypothesis found "INVALI000000", whose half is in "INVALID"), so never digits only,
# which would be a valid taskId (queued, not echoed): not the case tested here
NAMED_KEYS = KEYS.map(lambda key: "Zq9" + key)
WHERE = st.sampled_from(
    ["task_id", "path", "content_type", "bulk_task_id", "bulk_type", "bulk_account"]
)


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def _answer_text(response: requests.Response) -> str:
    """Everything a client reads of an answer: status line, headers, the body as sent and
    as JSON decodes it."""
    text = f"{response.status_code} {response.reason}\n"
    text += "\n".join(f"{name}: {value}" for name, value in response.headers.items())
    text += "\n" + response.text
    with contextlib.suppress(ValueError):
        text += "\n" + json.dumps(response.json(), ensure_ascii=False)
    return text


def _ask(http: requests.Session, url: str, key: str, value: str, where: str) -> requests.Response:
    """A request carrying ``value`` (the key, padded, its case changed) at ``where``."""
    json_type = {"Content-Type": "application/json"}
    if where == "task_id":
        body = json.dumps({"clientKey": key, "taskId": value})
        return http.post(url + IMAGE, data=body, headers=json_type, timeout=10)
    if where == "path":
        return http.post(url + "/" + quote(value, safe=""), json={}, timeout=10)
    if where == "content_type":
        headers = {"Content-Type": "application/" + value}
        return http.post(url + IMAGE, data=b"{}", headers=headers, timeout=10)
    item: dict[str, object] = {"taskId": 7, "captchaType": "image", "account": "default"}
    item[{"bulk_task_id": "taskId", "bulk_type": "captchaType"}.get(where, "account")] = value
    return http.post(url + "/v1/reports", json=[item], timeout=10)


@hsettings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(key=NAMED_KEYS, flips=FLIPS, pad=PADS, where=WHERE)
def test_a_key_sent_anywhere_in_a_request_is_never_in_the_answer(
    settings: Settings,
    env: dict[str, str],
    http: requests.Session,
    key: str,
    flips: list[bool],
    pad: int,
    where: str,
) -> None:
    """A configured key sent back as the taskId, the path, the content type or a bulk
    item's taskId, captchaType or account — after any padding, in any letter case — is
    in no answer's body or headers, nor is its first half."""
    environ = {**env, "CAPMONSTER_CLIENT_KEY": key}
    value = " " * pad + mangle(key, flips)
    with Server(Intake(settings, settings.redis_url, environ=environ)) as server:
        response = _ask(http, server.url, key, value, where)
    if where.startswith("bulk_"):  # a bulk answer refuses the item, by its index
        assert (200, [0]) == (
            response.status_code,
            [r["index"] for r in response.json()["refused"]],
        )
    else:
        assert 400 <= response.status_code < 500, response.text[:300]
    assert_key_absent(_answer_text(response), key)


@hsettings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(key=NAMED_KEYS)
def test_a_published_client_reporting_its_key_as_the_task_id_is_not_told_the_key(
    settings: Settings, env: dict[str, str], key: str
) -> None:
    """python-anticaptcha, given its key where the taskId goes, gets an error whose code
    and description do not hold the key."""
    from python_anticaptcha import AnticaptchaClient, AnticaptchaException

    environ = {**env, "CAPMONSTER_CLIENT_KEY": key}
    with Server(Intake(settings, settings.redis_url, environ=environ)) as server:
        client = AnticaptchaClient(key, host=f"127.0.0.1:{server.port}", use_ssl=False)
        with client, pytest.raises(AnticaptchaException) as caught:
            client.reportIncorrectImage(key)  # type: ignore[arg-type]  # the mistake tested
    error = caught.value
    assert "ERROR_NO_SUCH_CAPCHA_ID" == error.error_code
    assert_key_absent(f"{error} {error.error_code} {error.error_description}", key)
