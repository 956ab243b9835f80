"""The producer: validation, dedup, and one round trip per report or per bulk chunk."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as run_settings
from hypothesis import strategies as st

from worker.errors import ReportError
from worker.producer import Producer
from worker.settings import Settings
from worker.store.keys import Keys

from ..unit.test_producer import HUGE, hostile_ids, json_leaves
from .conftest import queue_length

BAD_IDS = [0, -1, "-5", "abc", "", " ", 1.5, "1.5", True, None, 2**63, "１２"]


@pytest.mark.parametrize("task_id", BAD_IDS, ids=repr)
def test_invalid_task_id_is_refused_and_nothing_reaches_redis(
    producer: Producer, redis_client: redis.Redis, task_id: object
) -> None:
    """A taskId that is not a positive integer is refused with the accepted range; Redis
    stays empty."""
    with pytest.raises(ReportError, match="expected a positive integer"):
        producer.enqueue(task_id, "image")
    assert [] == redis_client.keys("*")


def test_unknown_type_is_refused_listing_accepted_names_and_nothing_reaches_redis(
    producer: Producer, redis_client: redis.Redis
) -> None:
    """An unknown captchaType is refused with the accepted names; nothing is queued."""
    with pytest.raises(ReportError) as info:
        producer.enqueue(5, "SuperCaptchaTask")
    message = str(info.value)
    assert "SuperCaptchaTask" in message
    for name in ("ImageToTextTask", "TurnstileTask", "recaptcha"):
        assert name in message
    assert [] == redis_client.keys("*")


def test_unknown_account_is_refused_naming_the_configured_ones(
    producer: Producer, redis_client: redis.Redis
) -> None:
    """A report for an account that is not configured is refused, naming the known ones."""
    with pytest.raises(ReportError, match=r"unknown account 'nope'.*default"):
        producer.enqueue(5, "image", "nope")
    assert [] == redis_client.keys("*")


def test_string_digits_are_accepted_as_task_id(
    producer: Producer, redis_client: redis.Redis, settings: Settings, keys: Keys
) -> None:
    """A taskId given as a string of digits (from a CLI or CSV) is queued as that integer."""
    assert "queued" == producer.enqueue("42", "image")
    assert b"q" == redis_client.hget(keys.report("default", 42), "s")
    assert 1 == queue_length(redis_client, settings.queue)


def test_duplicate_is_not_queued_twice(
    producer: Producer, redis_client: redis.Redis, settings: Settings
) -> None:
    """The same (account, taskId) while pending is a duplicate: one message only."""
    assert "queued" == producer.enqueue(7, "image")
    assert "duplicate" == producer.enqueue(7, "token")
    assert 1 == queue_length(redis_client, settings.queue)


class CountingRedis(redis.Redis):
    """A real client that counts the commands it sends (round trips, for these tests)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[str] = []

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent.append(str(args[0]).upper())
        return super().execute_command(*args, **options)


def test_single_enqueue_is_one_round_trip(settings: Settings) -> None:
    """Enqueueing one report is one Redis command (a script), whatever it writes."""
    client = CountingRedis.from_url(settings.redis_url)
    assert isinstance(client, CountingRedis)
    producer = Producer(settings, client)
    producer.enqueue(1, "image")  # loads the script
    client.sent.clear()
    producer.enqueue(2, "image")
    assert ["EVALSHA"] == client.sent


def test_bulk_enqueue_is_one_round_trip_per_chunk(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """2,500 reports in chunks of 1,000 cost three script calls, not one per report."""
    client = CountingRedis.from_url(settings.redis_url)
    assert isinstance(client, CountingRedis)
    producer = Producer(settings, client)
    producer.enqueue(1, "image")
    client.sent.clear()
    result = producer.enqueue_many(
        [{"taskId": n, "captchaType": "image"} for n in range(10, 2510)], chunk=1000
    )
    assert (2500, 0) == (result.queued, result.duplicates)
    assert ["EVALSHA"] * 3 == client.sent
    assert b"2501" == redis_client.get("rf:npending")
    # 20 reports per message on the bulk path: 1 + 2,500 / 20 messages
    assert 126 == queue_length(redis_client, settings.queue)


def test_bulk_refuses_invalid_items_with_their_index_and_queues_the_rest(
    producer: Producer, settings: Settings, redis_client: redis.Redis
) -> None:
    """Invalid items are listed with their position and reason; valid ones are queued."""
    items = [
        {"taskId": 1, "captchaType": "image"},
        {"taskId": -1, "captchaType": "image"},
        {"taskId": 2, "captchaType": "nope"},
        (3, "token"),
        (4, "token", "default"),
        {"captchaType": "image"},
        "garbage",
    ]
    result = producer.enqueue_many(items)
    assert 3 == result.queued
    assert [1, 2, 5, 6] == [r.index for r in result.refused]
    assert "invalid taskId -1" in result.refused[0].error
    assert "unknown captchaType 'nope'" in result.refused[1].error
    assert "missing taskId" in result.refused[2].error
    assert b"3" == redis_client.get("rf:npending")  # in one bulk message


def test_library_use_without_logging_setup(settings: Settings, redis_client: redis.Redis) -> None:
    """In a producer's own program (structlog not configured), the public API queues and
    reports duplicates without printing anything, and its lines go to stdlib logging."""
    import subprocess
    import sys

    from worker.testing.processes import service_env

    code = (
        "import logging, worker\n"
        "assert worker.enqueue_reports([(1, 'image'), (2, 'image')]).queued == 2\n"
        "r = worker.enqueue_reports([(1, 'image'), (3, 'token')])\n"
        "assert (r.queued, r.duplicates) == (1, 1), r\n"
        "assert worker.enqueue_report(2, 'image') == 'duplicate'\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "worker.enqueue_report(2, 'image')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=service_env(REDIS_URL=settings.redis_url),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert 0 == result.returncode, result.stderr
    assert "" == result.stdout
    assert ["INFO:worker.producer:report.duplicate"] == [
        line.split(" ")[0] for line in result.stderr.splitlines()
    ]
    assert b"3" == redis_client.get("rf:npending")


# --- hostile taskIds (hypothesis) -------------------------------------------------------------


def test_a_5000_digit_task_id_is_a_report_error_from_the_public_api(
    settings: Settings, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`worker.enqueue_report` with a 5,000-digit taskId (beyond int()'s digit limit) raises
    ReportError naming the limit, as a string or as an int, and queues nothing."""
    import worker
    from worker import producer as producer_module

    monkeypatch.setenv("REDIS_URL", settings.redis_url)
    monkeypatch.setattr(producer_module, "_default", None)
    for task_id in (HUGE, 10**5000 - 1, "-" + HUGE, " " + HUGE + " "):
        with pytest.raises(ReportError, match="expected a positive integer") as info:
            worker.enqueue_report(task_id, "image")  # type: ignore[arg-type]  # strings on purpose
        assert len(str(info.value)) < 300
    result = worker.enqueue_reports([{"taskId": HUGE, "captchaType": "image"}, (1, "image")])
    assert (1, [0]) == (result.queued, [r.index for r in result.refused])
    assert b"1" == redis_client.get("rf:npending")
    producer_module.default_producer().client.close()


hostile_items = st.one_of(
    hostile_ids.map(lambda t: {"taskId": t, "captchaType": "image"}),
    hostile_ids.map(lambda t: (t, "token")),
    st.one_of(json_leaves, st.text(max_size=20), st.lists(json_leaves, max_size=4)).filter(
        lambda v: not isinstance(v, list) or len(v) not in (2, 3)
    ),
    json_leaves.filter(lambda v: not (isinstance(v, str) and v.strip().lower() == "image")).map(
        lambda c: {"taskId": 5, "captchaType": c}
    ),
    json_leaves.filter(lambda a: bool(a) and a != "default").map(
        lambda a: {"taskId": 5, "captchaType": "image", "account": a}
    ),
)


@given(plan=st.lists(st.one_of(st.just("valid"), hostile_items), min_size=1, max_size=30))
@run_settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_bulk_refuses_exactly_the_invalid_items_and_queues_every_valid_one(
    producer: Producer, redis_client: redis.Redis, plan: list[object]
) -> None:
    """In a generated batch mixing valid reports with hostile items, every hostile item is
    refused with its index and every valid one is queued: nothing aborts the batch."""
    redis_client.flushall()
    items = [
        {"taskId": index + 1, "captchaType": "image"} if entry == "valid" else entry
        for index, entry in enumerate(plan)
    ]
    result = producer.enqueue_many(items, chunk=7)
    valid = [i for i, entry in enumerate(plan) if entry == "valid"]
    assert len(valid) == result.queued
    assert 0 == result.duplicates
    assert sorted(set(range(len(plan))) - set(valid)) == [r.index for r in result.refused]
    assert all(len(r.error) <= 2000 for r in result.refused)
    assert str(len(valid)).encode() == (redis_client.get("rf:npending") or b"0")
