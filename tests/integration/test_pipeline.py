"""End to end: enqueue -> Redis -> in-process Celery worker -> the sandbox API over HTTP."""

from __future__ import annotations

import json

import pytest
import redis
import structlog

from worker.settings import Settings
from worker.testing.sandbox import Sandbox

from ..unit.test_captcha_types import IMAGE_NAMES, TOKEN_NAMES
from .conftest import CLIENT_KEY, Service, all_redis_bytes, queued_messages, wait_until

IMAGE_TYPES = list(IMAGE_NAMES)  # docs/design.md §7, kept once in test_captcha_types
TOKEN_TYPES = list(TOKEN_NAMES)


def test_every_type_name_reaches_its_endpoint_with_exactly_the_documented_body(
    service: Service, sandbox: Sandbox
) -> None:
    """Each docs/design.md §7 name, in odd casing, is POSTed to the image or token endpoint with
    exactly {"clientKey": <key>, "taskId": <int>} as JSON."""
    expected = {}
    for n, name in enumerate(IMAGE_TYPES + TOKEN_TYPES, start=1001):
        casing = name.upper() if n % 2 else name.lower()
        assert "queued" == service.producer.enqueue(n, casing)
        kind = "Image" if name in IMAGE_TYPES else "Token"
        expected[n] = f"/reportIncorrect{kind}Captcha"
    wait_until(lambda: sandbox.count() >= len(expected))
    seen = {r.task_id: r for r in sandbox.requests()}
    assert set(expected) == set(seen)
    for task_id, path in expected.items():
        request = seen[task_id]
        assert path == request.path
        assert {"clientKey": CLIENT_KEY, "taskId": task_id} == json.loads(request.body)
        assert isinstance(json.loads(request.body)["taskId"], int)


def test_accepted_report_logs_one_line_with_the_stable_keys(
    service: Service, sandbox: Sandbox
) -> None:
    """An accepted report produces exactly one report.accepted line with docs/logging.md keys."""
    with structlog.testing.capture_logs() as lines:
        service.producer.enqueue(77, "HCaptchaTask")
        wait_until(lambda: any(x["event"] == "report.accepted" for x in lines))
    accepted = [x for x in lines if x["event"] == "report.accepted"]
    assert 1 == len(accepted)
    line = accepted[0]
    for key in (
        "task_id",
        "captcha_type",
        "kind",
        "account",
        "endpoint",
        "attempt",
        "http_status",
        "duration_ms",
        "queue_ms",
    ):
        assert key in line, key
    assert (77, "HCaptchaTask", "token", "default", 1, 200) == (
        line["task_id"],
        line["captcha_type"],
        line["kind"],
        line["account"],
        line["attempt"],
        line["http_status"],
    )
    assert sandbox.url + "/reportIncorrectTokenCaptcha" == line["endpoint"]


def test_error_answer_is_logged_with_its_code(service: Service, sandbox: Sandbox) -> None:
    """A report the API refuses is logged as dead-lettered with the API's error code."""
    from worker.testing.sandbox import Rule

    sandbox.add_rule(Rule(task_id=5, error_code="ERROR_NO_SUCH_CAPCHA_ID"))
    with structlog.testing.capture_logs() as lines:
        service.producer.enqueue(5, "image")
        wait_until(lambda: any(x["event"] == "report.dead_lettered" for x in lines))
    (line,) = [x for x in lines if x["event"] == "report.dead_lettered"]
    assert ("ERROR_NO_SUCH_CAPCHA_ID", "rejected", 5) == (
        line["error_code"],
        line["reason"],
        line["task_id"],
    )


def test_bulk_enqueue_of_a_thousand_reports_all_reach_the_api(
    service: Service, sandbox: Sandbox
) -> None:
    """1,000 reports queued in bulk are each POSTed once."""
    result = service.producer.enqueue_many(
        {"taskId": n, "captchaType": "token"} for n in range(1, 1001)
    )
    assert (1000, 0, []) == (result.queued, result.duplicates, result.refused)
    wait_until(lambda: sandbox.count() >= 1000, timeout=60)
    assert set(range(1, 1001)) == {r.task_id for r in sandbox.requests()}
    assert 1000 == sandbox.count()


def test_messages_are_json_and_carry_no_key(
    settings: Settings, producer: object, redis_client: redis.Redis
) -> None:
    """What the producer writes to the Celery queue is JSON naming the account, not the key."""
    from worker.producer import Producer

    assert isinstance(producer, Producer)
    producer.enqueue(9, "image")
    (raw,) = queued_messages(redis_client, settings.queue)
    message = json.loads(raw)
    assert "application/json" == message["content-type"]
    assert [["default:9"]] == json.loads(message["body"])[0]  # args: (refs,)
    assert CLIENT_KEY.encode() not in all_redis_bytes(redis_client)


@pytest.mark.parametrize("concurrency", [1, 8])
def test_duplicate_enqueue_while_pending_or_accepted_is_sent_once(
    settings: Settings, env: dict[str, str], sandbox: Sandbox, concurrency: int
) -> None:
    """The same (account, taskId) enqueued again while pending, then after acceptance, is
    reported as duplicate and reaches the API once."""
    from .conftest import running_worker

    with running_worker(settings, env, concurrency) as svc:
        assert "queued" == svc.producer.enqueue(31, "image")
        assert "duplicate" == svc.producer.enqueue(31, "ImageToTextTask")
        wait_until(lambda: sandbox.count(task_id=31) >= 1)
        wait_until(
            lambda: svc.runtime.client.hget(svc.runtime.keys.report("default", 31), "s") == b"a"
        )
        assert "duplicate" == svc.producer.enqueue(31, "image")
        assert "queued" == svc.producer.enqueue(32, "image")
        wait_until(lambda: sandbox.count(task_id=32) >= 1)
    assert 1 == sandbox.count(task_id=31)
