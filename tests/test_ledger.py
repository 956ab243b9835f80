"""The ledger's scripts against a real Redis: who may act on a report, and recovery."""

from __future__ import annotations

import json
import time

import pytest
import redis

from worker.keys import UNACKED, Keys
from worker.ledger import Claim, Ledger
from worker.messages import list_keys, template
from worker.producer import Producer

from .conftest import queue_length, queued_messages, wait_until

REF = "default:7"


@pytest.fixture
def ledger(producer: Producer) -> Ledger:
    return producer.ledger


def _pop(client: redis.Redis, queue: str = "reports") -> tuple[str, list[str]]:
    """Take the next message off the queue as a worker would: (message id, refs)."""
    popped = client.brpop(list(list_keys(queue)), timeout=1)
    assert popped is not None
    message = json.loads(popped[1])
    return message["headers"]["id"], json.loads(message["body"])[0][0]


def test_only_the_message_that_queued_a_report_may_claim_it(
    producer: Producer, ledger: Ledger, redis_client: redis.Redis
) -> None:
    """A claim succeeds once, for the current message id; a second delivery is refused."""
    producer.enqueue(7, "image")
    message_id, refs = _pop(redis_client, "reports")
    assert [REF] == refs
    assert "q" == ledger.claim(REF, "rf-999", 30)  # some other (stale) message
    claim = ledger.claim(REF, message_id, 30)
    assert isinstance(claim, Claim)
    assert ("image", 0) == (claim.kind, claim.attempts)
    assert "r" == ledger.claim(REF, message_id, 30)  # redelivered copy of the same message


def test_accepted_report_is_never_claimed_again(
    producer: Producer, ledger: Ledger, redis_client: redis.Redis, keys: Keys
) -> None:
    """After acceptance, neither a redelivery nor a re-enqueue can lead to another send."""
    producer.enqueue(7, "image")
    message_id, _ = _pop(redis_client, "reports")
    assert isinstance(ledger.claim(REF, message_id, 30), Claim)
    assert ledger.finish(REF, message_id, "accepted", attempts=1, stats_field="accepted|image||x")
    assert "a" == ledger.claim(REF, message_id, 30)
    assert "duplicate" == producer.enqueue(7, "image")
    assert 0 == int(redis_client.get(keys.npending) or 0)
    assert 0 < redis_client.ttl(keys.report("default", 7)) <= 3600


def test_acceptance_is_recorded_even_after_the_lease_was_lost(
    producer: Producer, ledger: Ledger, redis_client: redis.Redis
) -> None:
    """A slow worker whose report was re-queued still records its acceptance, and the
    re-queued copy is then refused instead of being sent again."""
    producer.enqueue(7, "image")
    first, _ = _pop(redis_client, "reports")
    assert isinstance(ledger.claim(REF, first, 0.01), Claim)
    events = wait_until(lambda: ledger.sweep(lease_s=30, max_deliveries=3, lost_grace_s=30))
    assert ["lease_expired"] == [e.kind for e in events]
    second, _ = _pop(redis_client, "reports")
    assert ledger.finish(REF, first, "accepted", attempts=1, stats_field="")
    assert "a" == ledger.claim(REF, second, 30)


def test_report_whose_worker_keeps_dying_becomes_poison(
    producer: Producer, ledger: Ledger, redis_client: redis.Redis, keys: Keys
) -> None:
    """Each lost lease re-queues the report; at max_deliveries it is dead-lettered as poison."""
    producer.enqueue(7, "HCaptchaTask")
    kinds = []
    for _ in range(3):
        message_id, _ = _pop(redis_client, "reports")
        assert isinstance(ledger.claim(REF, message_id, 0.01), Claim)  # then the worker dies
        events = wait_until(lambda: ledger.sweep(lease_s=30, max_deliveries=3, lost_grace_s=30))
        kinds += [e.kind for e in events]
    assert ["lease_expired", "lease_expired", "poison"] == kinds
    ((_, fields),) = redis_client.xrange(keys.dead)
    assert (b"7", b"poison", b"HCaptchaTask", b"3") == (
        fields[b"task_id"],
        fields[b"reason"],
        fields[b"captcha_type"],
        fields[b"deliveries"],
    )
    assert 0 == redis_client.exists(keys.report("default", 7))
    assert 0 == int(redis_client.get(keys.npending) or 0)


def test_message_lost_between_pop_and_unacked_record_is_requeued(
    producer: Producer, ledger: Ledger, redis_client: redis.Redis
) -> None:
    """A message popped but never recorded in kombu's unacked hash (its worker was killed in
    between) is re-queued once a later message has started and the grace period passed."""
    producer.enqueue(7, "image")
    producer.enqueue(8, "image")
    _pop(redis_client, "reports")  # 7's message: popped, then its worker died
    later, _ = _pop(redis_client, "reports")
    assert isinstance(ledger.claim("default:8", later, 30), Claim)  # a later one started
    assert [] == ledger.sweep(lease_s=30, max_deliveries=3, lost_grace_s=0.05)  # suspect
    events = wait_until(lambda: ledger.sweep(lease_s=30, max_deliveries=3, lost_grace_s=0.05))
    assert [("lost", REF)] == [(e.kind, e.subject) for e in events]
    again, refs = _pop(redis_client, "reports")
    assert [REF] == refs
    assert isinstance(ledger.claim(REF, again, 30), Claim)


def test_message_held_by_a_worker_is_not_taken_for_lost(
    producer: Producer, ledger: Ledger, redis_client: redis.Redis
) -> None:
    """A message in kombu's unacked hash (prefetched by a live worker) is left alone."""
    producer.enqueue(7, "image")
    producer.enqueue(8, "image")
    held, _ = _pop(redis_client, "reports")
    redis_client.hset(UNACKED, held, "[]")
    later, _ = _pop(redis_client, "reports")
    ledger.claim("default:8", later, 30)
    for _ in range(3):
        assert [] == ledger.sweep(lease_s=30, max_deliveries=3, lost_grace_s=0.0)
    assert 0 == queue_length(redis_client)


def test_due_retry_is_requeued_and_not_before(
    producer: Producer, ledger: Ledger, redis_client: redis.Redis
) -> None:
    """A retry scheduled in the future stays out of the queue until it is due."""
    producer.enqueue(7, "image")
    message_id, _ = _pop(redis_client, "reports")
    ledger.claim(REF, message_id, 30)
    due = time.time() + 0.3
    assert ledger.finish(REF, message_id, "retry", attempts=1, due=due, error_code="HTTP_503")
    assert [] == ledger.sweep(lease_s=30, max_deliveries=3, lost_grace_s=30)
    events = wait_until(lambda: ledger.sweep(lease_s=30, max_deliveries=3, lost_grace_s=30))
    assert time.time() >= due
    assert ["requeued"] == [e.kind for e in events]
    again, _ = _pop(redis_client, "reports")
    claim = ledger.claim(REF, again, 30)
    assert isinstance(claim, Claim)
    assert 1 == claim.attempts


def test_pause_is_seen_by_claims_and_lifted(
    producer: Producer, ledger: Ledger, redis_client: redis.Redis
) -> None:
    """A paused account's reports are claimed with the pause; resume lifts it."""
    assert ledger.pause("default", 60, json.dumps({"error_code": "ERROR_ZERO_BALANCE"}))
    assert not ledger.pause("default", 60, "{}")  # already paused: one pause, one log line
    producer.enqueue(7, "image")
    message_id, _ = _pop(redis_client, "reports")
    claim = ledger.claim(REF, message_id, 30)
    assert isinstance(claim, Claim)
    assert claim.paused_until is not None
    assert claim.paused_until > time.time() + 50
    assert ledger.resume("default")
    assert not ledger.resume("default")


def test_replayed_dead_letter_is_removed_in_the_same_step(
    producer: Producer, ledger: Ledger, redis_client: redis.Redis, keys: Keys
) -> None:
    """Enqueueing a row that names a dead letter removes that dead letter atomically."""
    producer.enqueue(7, "image")
    message_id, _ = _pop(redis_client, "reports")
    ledger.claim(REF, message_id, 30)
    ledger.finish(REF, message_id, "dead", attempts=1, reason="rejected", error_code="E")
    ((dead_id, _),) = redis_client.xrange(keys.dead)
    assert [1] == ledger.enqueue([producer.row(7, "image", "default", dead_id.decode())])
    assert 0 == redis_client.xlen(keys.dead)
    assert 1 == queue_length(redis_client)


def test_template_is_what_the_queue_gets(producer: Producer, redis_client: redis.Redis) -> None:
    """The message pushed by the script is the template with the id and refs filled in."""
    producer.enqueue(7, "image")
    (raw,) = queued_messages(redis_client)
    message_id = json.loads(raw)["headers"]["id"]
    expected = template("reports").replace("@ID@", message_id).replace("@REFS@", '\\"default:7\\"')
    assert expected.encode() == raw
