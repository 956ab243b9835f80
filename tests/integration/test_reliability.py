"""Outcomes, retries, deadlines and the account guard, end to end through a real worker."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, MutableMapping
from typing import Any

import pytest
import redis
import structlog

from worker.delivery import report as runtime  # the per-report steps call next_step
from worker.delivery.retries import LAST_CHANCE_MARGIN_S, Step, next_step
from worker.delivery.upstream import Outcome
from worker.settings import MIN_BACKOFF_S, Settings
from worker.store.keys import Keys
from worker.store.messages import list_key
from worker.store.vocabulary import OTHER
from worker.testing.sandbox import Rule, Sandbox

from ..redis_bytes import stream_entries
from .conftest import (
    CLIENT_KEY,
    FAST_RECOVERY,
    Service,
    all_redis_bytes,
    queue_length,
    queued_messages,
    running_worker,
    wait_until,
)

# a read timeout short enough to test, long enough that a loaded CI machine's normal
# answers do not hit it
SHORT_TIMEOUT = FAST_RECOVERY + "\n[worker]\nread_timeout_s = 1.5\n"


def _dead(client: redis.Redis, keys: Keys) -> dict[int, dict[str, str]]:
    return {
        int(f[b"task_id"]): {k.decode(): v.decode() for k, v in f.items()}
        for _, f in stream_entries(client, keys.dead)
    }


def _task_ids(lines: list[MutableMapping[str, Any]], event: str) -> list[int]:
    """The task ids of the captured ``event`` lines, sorted (repeats kept)."""
    return sorted(x["task_id"] for x in list(lines) if x["event"] == event)


REJECTED = [
    "ERROR_NO_SUCH_CAPCHA_ID",
    "WRONG_CAPTCHA_ID",
    "ERROR_NO_SUCH_METHOD",
    "ERROR_CAPTCHA_UNSOLVABLE",
    "ERROR_SOMETHING_NEW",
]


def test_permanent_errors_cost_exactly_one_call(service: Service, sandbox: Sandbox) -> None:
    """Each rejection code (and a 4xx without the API's JSON) is dead-lettered as rejected
    after exactly one API call."""
    cases = {100 + n: Rule(task_id=100 + n, error_code=code) for n, code in enumerate(REJECTED)}
    cases[200] = Rule(task_id=200, http_status=404, body="<html>nope</html>")
    cases[201] = Rule(task_id=201, http_status=403, error_code="ERROR_NO_SUCH_CAPCHA_ID")
    for rule in cases.values():
        sandbox.add_rule(rule)
    for task_id in cases:
        service.producer.enqueue(task_id, "image")
    keys = Keys(service.settings.key_prefix)
    wait_until(lambda: len(_dead(service.runtime.client, keys)) == len(cases))
    dead = _dead(service.runtime.client, keys)
    for task_id, rule in cases.items():
        assert 1 == sandbox.count(task_id=task_id), task_id
        assert "rejected" == dead[task_id]["reason"]
        code = rule.error_code or "HTTP_404"
        # a code the tables do not know is counted as "other", shown at the error's head
        assert (OTHER if code == "ERROR_SOMETHING_NEW" else code) == dead[task_id]["error_code"]
        assert dead[task_id]["error"].startswith(code if rule.error_code else "HTTP 404")
        assert "1" == dead[task_id]["attempts"]


TRANSIENT = {
    301: Rule(task_id=301, http_status=503, times=1),
    302: Rule(task_id=302, http_status=429, times=1),
    303: Rule(task_id=303, error_code="ERROR_TOO_MUCH_REQUESTS", times=1),
    304: Rule(task_id=304, error_code="ERROR_NO_SLOT_AVAILABLE", times=1),
    305: Rule(task_id=305, error_code="CAPTCHA_NOT_READY", times=1),
    306: Rule(task_id=306, body="<html>bad gateway</html>", times=1),
    307: Rule(task_id=307, drop=True, times=1),
    308: Rule(task_id=308, latency_ms=4000, times=1),  # read timeout is 1.5 s here
}


def test_transient_faults_are_retried_with_backoff_then_accepted(
    make_settings: Callable[..., Settings],
    env: dict[str, str],
    sandbox: Sandbox,
    redis_client: redis.Redis,
) -> None:
    """5xx, 429, busy codes, non-JSON bodies, dropped connections and timeouts are retried
    no sooner than 2 s later and then accepted."""
    del redis_client
    settings = make_settings(SHORT_TIMEOUT)
    for rule in TRANSIENT.values():
        sandbox.add_rule(rule)
    every = sorted(TRANSIENT)
    with structlog.testing.capture_logs() as lines, running_worker(settings, env) as svc:
        for task_id in TRANSIENT:
            svc.producer.enqueue(task_id, "token")
        wait_until(
            lambda: (
                every == _task_ids(lines, "report.accepted") == _task_ids(lines, "report.retrying")
            ),
            timeout=30,
        )
    assert every == _task_ids(lines, "report.accepted")
    for task_id in TRANSIENT:
        arrivals = [r.monotonic for r in sandbox.requests() if r.task_id == task_id]
        assert 2 == len(arrivals), (task_id, [x for x in lines if x.get("task_id") == task_id])
        assert arrivals[1] - arrivals[0] >= 2.0, task_id
    retrying = [x for x in lines if x["event"] == "report.retrying"]
    assert every == _task_ids(lines, "report.retrying")
    assert {"TIMEOUT", "CONNECTION_ERROR", "HTTP_503", "HTTP_429", "INVALID_JSON"} <= {
        x["error_code"] for x in retrying
    }


def test_retry_after_longer_than_backoff_wins(service: Service, sandbox: Sandbox) -> None:
    """A 429 with Retry-After: 3 is retried no sooner than 3 s later."""
    sandbox.add_rule(Rule(task_id=5, http_status=429, retry_after=3, times=1))
    service.producer.enqueue(5, "image")
    wait_until(lambda: sandbox.count(task_id=5, success=True) == 1, timeout=15)
    first, second = (r.monotonic for r in sandbox.requests() if r.task_id == 5)
    assert second - first >= 3.0


def test_deadline_bounds_retries_then_expired(
    make_settings: Callable[..., Settings],
    env: dict[str, str],
    sandbox: Sandbox,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A report that keeps failing is retried only at times before its deadline (at the
    latest just before it), given up as expired only when no further try fits before it,
    and never sent again after that."""
    settings = make_settings(FAST_RECOVERY, REPORT_FORWARDER_REPORT_DEADLINE_S="7")
    sandbox.add_rule(Rule(task_id=9, http_status=503))
    keys = Keys(settings.key_prefix)
    decided: list[tuple[float, float, Step]] = []  # the worker's (now, deadline, step)

    def recorded(outcome: Outcome, **kwargs: Any) -> Step:
        step = next_step(outcome, **kwargs)
        decided.append((kwargs["now"], kwargs["deadline"], step))
        return step

    monkeypatch.setattr(runtime, "next_step", recorded)  # a spy: the worker's own decisions
    with running_worker(settings, env) as svc:
        svc.producer.enqueue(9, "image")
        stored = redis_client.hget(keys.report("default", 9), "d")
        assert stored is not None
        deadline = float(stored)
        wait_until(lambda: 9 in _dead(redis_client, keys), timeout=20)
    letter = _dead(redis_client, keys)[9]
    assert "expired" == letter["reason"]
    arrivals = [r.at for r in sandbox.requests() if r.task_id == 9]
    assert 2 <= len(arrivals) == len(decided) == int(letter["attempts"])
    assert {deadline} == {d for _, d, _ in decided}
    retries = [step for _, _, step in decided if step.action == "retry"]
    assert all(step.due <= deadline - LAST_CHANCE_MARGIN_S for step in retries)
    if len(retries) == len(decided):
        # the last retry, scheduled before the deadline, was taken up after it (a loaded
        # machine): given up when it was taken up, without a call
        assert "deadline passed before it could be sent" == letter["error"]
    else:
        assert len(decided) - 1 == len(retries)
        gave_up_at, _, last = decided[-1]
        assert ("dead", "expired") == (last.action, last.reason)
        # given up only when even a last try just before the deadline no longer fitted
        assert gave_up_at > deadline - LAST_CHANCE_MARGIN_S - MIN_BACKOFF_S
    assert max(arrivals) <= float(letter["failed_at"])  # no call after it was given up
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert min(gaps) >= 2.0


def test_attempt_budget_then_retries_exhausted(
    make_settings: Callable[..., Settings],
    env: dict[str, str],
    sandbox: Sandbox,
    redis_client: redis.Redis,
) -> None:
    """With max_attempts = 2, a report failing transiently twice is dead-lettered as
    retries_exhausted after exactly two calls."""
    settings = make_settings(FAST_RECOVERY + "\n[delivery]\nmax_attempts = 2\n")
    sandbox.add_rule(Rule(task_id=4, error_code="ERROR_NO_SLOT_AVAILABLE"))
    keys = Keys(settings.key_prefix)
    with running_worker(settings, env) as svc:
        svc.producer.enqueue(4, "image")
        wait_until(lambda: 4 in _dead(redis_client, keys), timeout=15)
    assert "retries_exhausted" == _dead(redis_client, keys)[4]["reason"]
    assert 2 == sandbox.count(task_id=4)


@pytest.mark.parametrize(
    "code",
    [
        "ERROR_KEY_DOES_NOT_EXIST",
        "ERROR_ZERO_BALANCE",
        "ERROR_IP_NOT_ALLOWED",
        "ERROR_IP_BANNED",
        "ERROR_IP_BLOCKED",
    ],
)
def test_account_fault_pauses_the_account_after_one_call(
    settings: Settings,
    env: dict[str, str],
    sandbox: Sandbox,
    redis_client: redis.Redis,
    code: str,
) -> None:
    """An account fault dead-letters the report, pauses the account (one account.paused
    line) and every later report of it is dead-lettered as account_paused without a call."""
    sandbox.add_rule(Rule(client_key=CLIENT_KEY, error_code=code))
    keys = Keys(settings.key_prefix)
    with structlog.testing.capture_logs() as lines, running_worker(settings, env) as svc:
        svc.producer.enqueue(1, "image")
        wait_until(lambda: 1 in _dead(redis_client, keys))
        for task_id in range(2, 22):
            svc.producer.enqueue(task_id, "image")
        wait_until(lambda: list(range(1, 22)) == _task_ids(lines, "report.dead_lettered"))
    dead = _dead(redis_client, keys)
    assert ("account_fault", code) == (dead[1]["reason"], dead[1]["error_code"])
    assert {"account_paused"} == {dead[t]["reason"] for t in range(2, 22)}
    assert 1 == sandbox.count()
    assert 1 == sum(1 for x in lines if x["event"] == "account.paused")
    assert list(range(1, 22)) == _task_ids(lines, "report.dead_lettered")


def test_redelivered_message_never_reports_twice(
    settings: Settings, env: dict[str, str], sandbox: Sandbox, redis_client: redis.Redis
) -> None:
    """The same Celery message delivered three times (as after a redelivery) reaches the API
    once."""
    from worker.producer import Producer

    producer = Producer(settings)
    producer.enqueue(11, "image")
    (raw,) = queued_messages(redis_client, settings.queue)
    redis_client.lpush(list_key(settings.queue, urgent=False), raw, raw)
    producer.client.close()
    with running_worker(settings, env):
        wait_until(lambda: queue_length(redis_client, settings.queue) == 0)
        wait_until(lambda: sandbox.count(task_id=11) >= 1)
        wait_until(lambda: not redis_client.hlen("unacked"))
    assert 1 == sandbox.count(task_id=11)


def test_key_is_in_no_log_line_no_redis_value_no_dead_letter(
    settings: Settings, env: dict[str, str], sandbox: Sandbox, redis_client: redis.Redis
) -> None:
    """Across accepted, rejected and transient outcomes — including an API
    that echoes the request back in its error page, or the key upper-cased or with its
    case swapped — the key appears nowhere, in any letter case."""
    upper_echo = json.dumps(
        {
            "errorId": 1,
            "errorCode": "ERROR_NO_SUCH_CAPCHA_ID",
            "errorDescription": f"no such task for key {CLIENT_KEY.upper()}",
        }
    )
    sandbox.add_rule(Rule(task_id=2, error_code="ERROR_NO_SUCH_CAPCHA_ID"))
    sandbox.add_rule(Rule(task_id=3, http_status=502, body=f"echo: {CLIENT_KEY}", times=1))
    sandbox.add_rule(Rule(task_id=4, http_status=400, body=f"bad request {CLIENT_KEY}"))
    sandbox.add_rule(Rule(task_id=5, body=upper_echo))
    sandbox.add_rule(Rule(task_id=6, http_status=502, body=CLIENT_KEY.swapcase(), times=1))
    with structlog.testing.capture_logs() as lines, running_worker(settings, env) as svc:
        for task_id in (1, 2, 3, 4, 5, 6):
            svc.producer.enqueue(task_id, "image")
        wait_until(
            lambda: (
                [1, 3, 6] == _task_ids(lines, "report.accepted")
                and [2, 4, 5] == _task_ids(lines, "report.dead_lettered")
            ),
            timeout=15,
        )
    assert [3, 6] == _task_ids(lines, "report.retrying")
    assert CLIENT_KEY.lower() not in json.dumps(lines, default=str).lower()
    stored = all_redis_bytes(redis_client)
    assert CLIENT_KEY.lower().encode() not in stored.lower()
    dead = _dead(redis_client, Keys(settings.key_prefix))
    assert "ERROR_NO_SUCH_CAPCHA_ID: no such task for key ****" == dead[5]["error"]
    assert "****" in dead[4]["error"]  # the echo was scrubbed, not dropped
