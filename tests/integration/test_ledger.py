"""The ledger's scripts against a real Redis: who may act on a report, and recovery."""

from __future__ import annotations

import json
import time

import pytest
import redis

from worker.errors import StoreFullError
from worker.producer import Producer
from worker.store.keys import UNACKED, Keys
from worker.store.ledger import Ledger, enqueue_args
from worker.store.messages import list_keys, template
from worker.store.records import Claim
from worker.store.replication import ReplicaAcks

from ..redis_bytes import stream_entries
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


def test_an_enqueue_run_again_with_its_token_queues_nothing_twice(
    producer: Producer, ledger: Ledger, redis_client: redis.Redis, keys: Keys
) -> None:
    """A call that waits for replicas carries a token (docs/design.md §8): run again —
    as it is while replicas are slow — it answers what its first run answered and writes
    nothing, even though its report was dead-lettered in between (its entry deleted), so
    the report is not queued and sent again."""
    acks = ReplicaAcks(replicas=1, timeout_s=0.1, budget_s=5)
    args = enqueue_args(keys, "reports", [producer.row(7, "image")], 1, acks)
    assert "1" == ledger._run(ledger._enqueue, args).decode()
    message_id, _ = _pop(redis_client, "reports")
    assert isinstance(ledger.claim(REF, message_id, 30), Claim)
    assert ledger.finish(REF, message_id, "dead", attempts=1, reason="rejected")
    assert 0 == redis_client.exists(keys.report("default", 7))
    assert "1" == ledger._run(ledger._enqueue, args).decode()  # the first run's answer
    assert 0 == redis_client.exists(keys.report("default", 7))
    assert 0 == queue_length(redis_client)
    assert 0 < redis_client.ttl(f"{keys.prefix}:enq:{args[6]}") <= 5 + 30
    # without a token (no replicas to wait for) the same rows are a new report
    assert "1" == ledger._run(ledger._enqueue, args[:6]).decode()
    assert 1 == redis_client.exists(keys.report("default", 7))


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
    ((_, fields),) = stream_entries(redis_client, keys.dead)
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
    between) is handed to a new message once a later one was taken and the grace passed."""
    producer.enqueue(7, "image")
    producer.enqueue(8, "image")
    _pop(redis_client, "reports")  # 7's message: popped, then its worker died
    later, _ = _pop(redis_client, "reports")
    assert isinstance(ledger.claim("default:8", later, 30), Claim)  # a later one started
    assert [] == ledger.sweep(lease_s=30, max_deliveries=3, lost_grace_s=0.05)  # suspect
    events = wait_until(lambda: ledger.sweep(lease_s=30, max_deliveries=3, lost_grace_s=0.05))
    assert [("orphaned", REF)] == [(e.kind, e.subject) for e in events]
    again, refs = _pop(redis_client, "reports")
    assert [REF] == refs
    assert isinstance(ledger.claim(REF, again, 30), Claim)


def test_message_held_by_a_live_worker_is_not_taken_for_lost(
    producer: Producer, ledger: Ledger, redis_client: redis.Redis
) -> None:
    """A message a live worker's heartbeat lists (prefetched, in kombu's unacked hash) is
    left alone, however long it waits."""
    producer.enqueue(7, "image")
    producer.enqueue(8, "image")
    held, _ = _pop(redis_client, "reports")
    redis_client.hset(UNACKED, held, "[]")
    later, _ = _pop(redis_client, "reports")
    ledger.claim("default:8", later, 30, worker="w1")
    for _ in range(3):
        ledger.heartbeat("w1", [held, later])
        assert [] == ledger.sweep(lease_s=30, max_deliveries=3, lost_grace_s=0.0)
    assert 0 == queue_length(redis_client)
    assert b"[]" == redis_client.hget(UNACKED, held)


def test_last_message_popped_and_lost_is_found_without_a_later_one(
    producer: Producer, ledger: Ledger, redis_client: redis.Redis
) -> None:
    """The tail of a backlog popped and lost (kombu's unacked write refused: Redis full) is
    found too: its list is empty, so every unheld message of that list has been popped."""
    producer.enqueue_many([(7, "image"), (8, "image")])
    _pop(redis_client, "reports")  # the only message: popped, never recorded anywhere
    assert 0 == queue_length(redis_client)
    assert [] == ledger.sweep(lease_s=30, max_deliveries=3, lost_grace_s=0.05)  # suspect
    events = wait_until(lambda: ledger.sweep(lease_s=30, max_deliveries=3, lost_grace_s=0.05))
    assert {("orphaned", "default:7"), ("orphaned", "default:8")} == {
        (e.kind, e.subject) for e in events
    }
    again, refs = _pop(redis_client, "reports")
    assert ["default:7", "default:8"] == refs
    assert isinstance(ledger.claim("default:7", again, 30), Claim)


def test_started_message_given_up_by_its_worker_hands_on_its_other_reports(
    producer: Producer, ledger: Ledger, redis_client: redis.Redis
) -> None:
    """A worker that claimed a message's first report and then lost it (acked without
    finishing: a failed store write, an exception) leaves the rest queued for that message;
    once no live worker holds it, the rest go to a new message."""
    producer.enqueue_many([(7, "image"), (8, "image")])
    message_id, refs = _pop(redis_client, "reports")
    assert isinstance(ledger.claim(refs[0], message_id, 30, worker="w1"), Claim)
    ledger.heartbeat("w1", [])  # alive, but no longer holding the message
    assert [] == ledger.sweep(lease_s=30, max_deliveries=3, lost_grace_s=0.05)
    events = wait_until(lambda: ledger.sweep(lease_s=30, max_deliveries=3, lost_grace_s=0.05))
    assert [("orphaned", "default:8")] == [(e.kind, e.subject) for e in events]
    _, refs = _pop(redis_client, "reports")
    assert ["default:8"] == refs


def test_done_hands_back_the_reports_not_reached(
    producer: Producer, ledger: Ledger, redis_client: redis.Redis, keys: Keys
) -> None:
    """A worker that stops mid-message (shutdown) hands the rest back at once: one new
    message with exactly the reports it did not reach; the message is forgotten."""
    producer.enqueue_many([(7, "image"), (8, "image"), (9, "image")])
    message_id, _ = _pop(redis_client, "reports")
    ledger.claim("default:7", message_id, 30, worker="w1")
    ledger.finish("default:7", message_id, "accepted", attempts=1)
    assert 2 == ledger.done(message_id)
    again, refs = _pop(redis_client, "reports")
    assert ["default:8", "default:9"] == refs
    assert again != message_id
    assert not redis_client.hexists(keys.msgrefs, message_id)
    assert 0 == redis_client.zcard(keys.started)
    assert 2 == ledger.done(again)  # nothing of the new one was reached either


def test_dead_worker_reports_are_back_in_flight_at_once(
    producer: Producer, ledger: Ledger, redis_client: redis.Redis, keys: Keys
) -> None:
    """When a worker's heartbeat stops, the sweep re-queues the report it was sending and
    hands on the messages it held (prefetched), without waiting for leases or kombu's
    visibility timeout; a live worker's reports are untouched."""
    producer.enqueue(7, "image")
    producer.enqueue(8, "image")
    producer.enqueue(9, "image")
    running, _ = _pop(redis_client, "reports")
    prefetched, _ = _pop(redis_client, "reports")
    other, _ = _pop(redis_client, "reports")
    redis_client.hset(UNACKED, prefetched, "[]")
    assert isinstance(ledger.claim(REF, running, 600, worker="dead"), Claim)
    assert isinstance(ledger.claim("default:9", other, 600, worker="live"), Claim)
    ledger.heartbeat("dead", [running, prefetched], timeout_s=0.3)
    ledger.sweep(lease_s=600, max_deliveries=3, lost_grace_s=30, worker_timeout_s=0.3)

    def beat_and_sweep() -> list[tuple[str, str]]:
        ledger.heartbeat("live", [other], timeout_s=0.3)
        events = ledger.sweep(lease_s=600, max_deliveries=3, lost_grace_s=30, worker_timeout_s=0.3)
        return [(e.kind, e.subject) for e in events]

    events = wait_until(beat_and_sweep)
    assert {("worker_lost", REF), ("orphaned", "default:8"), ("worker_dead", "dead")} == set(events)
    assert not redis_client.hexists(UNACKED, prefetched)  # kombu will not restore it too
    assert 0 == redis_client.exists(keys.running("dead"), keys.held("dead"))
    assert b"r" == redis_client.hget(keys.report("default", 9), "s")  # the live one's
    assert 2 == queue_length(redis_client)


def test_no_worker_is_taken_for_dead_right_after_a_stall(
    producer: Producer, ledger: Ledger, redis_client: redis.Redis, keys: Keys
) -> None:
    """After a gap in the sweeps (Redis paused, the fleet stalled) stale heartbeats are given
    one more timeout: a stall is not a death."""
    producer.enqueue(7, "image")
    running, _ = _pop(redis_client, "reports")
    ledger.claim(REF, running, 600, worker="w1")
    ledger.heartbeat("w1", [running], timeout_s=0.3)
    now = float(redis_client.time()[0])
    redis_client.set(keys.prefix + ":lastsweep", f"{now - 60:.6f}")  # the last sweep: long ago
    redis_client.zadd(keys.workers, {"w1": now - 60})  # and so the last beat
    assert [] == ledger.sweep(lease_s=600, max_deliveries=3, lost_grace_s=30, worker_timeout_s=0.3)
    assert b"r" == redis_client.hget(keys.report("default", 7), "s")


def test_fleet_runs_an_account_under_the_strictest_declared_limit(
    ledger: Ledger, redis_client: redis.Redis, keys: Keys
) -> None:
    """Two workers configured differently for one account: both get the stricter limit;
    when the strict one leaves, the other's own applies again."""
    strict = ("default", 1.025 / 50, 50, 1.025)
    loose = ("default", 1.025 / 200, 200, 1.025)
    assert {"default": loose[1:]} == ledger.heartbeat("loose", [], [loose])
    assert {"default": strict[1:]} == ledger.heartbeat("strict", [], [strict])
    assert {"default": strict[1:]} == ledger.heartbeat("loose", [], [loose])
    ledger.unregister("strict", ["default"])
    assert {"default": loose[1:]} == ledger.heartbeat("loose", [], [loose])


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
    ((dead_id, _),) = stream_entries(redis_client, keys.dead)
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


def _everything(client: redis.Redis) -> dict[bytes, bytes | None]:
    return {key: client.dump(key) for key in client.scan_iter(count=1000)}


def test_every_script_writes_all_or_nothing_when_redis_is_full(
    producer: Producer, ledger: Ledger, redis_client: redis.Redis, keys: Keys
) -> None:
    """Under maxmemory with noeviction, each ledger script fails with StoreFullError before
    writing anything (no half-claimed report, no message gone from every structure), and
    works again once memory is back."""
    producer.enqueue_many([(7, "image"), (8, "image")])
    producer.enqueue(9, "image")
    message_id, _ = _pop(redis_client, "reports")
    claim = ledger.claim(REF, message_id, 30, worker="w1")
    assert isinstance(claim, Claim)
    ledger.heartbeat("w1", [message_id])
    before = _everything(redis_client)
    calls = {
        "enqueue": lambda: ledger.enqueue([producer.row(10, "image")]),
        "claim": lambda: ledger.claim("default:8", message_id, 30, worker="w1"),
        "finish accepted": lambda: ledger.finish(REF, message_id, "accepted", attempts=1),
        "finish retry": lambda: ledger.finish(REF, message_id, "retry", attempts=1, due=1.0),
        "finish dead": lambda: ledger.finish(REF, message_id, "dead", attempts=1, reason="x"),
        "done": lambda: ledger.done(message_id),
        "sweep": lambda: ledger.sweep(lease_s=30, max_deliveries=3, lost_grace_s=0.0),
        "heartbeat": lambda: ledger.heartbeat("w1", [], [("default", 0.02, 50, 1.025)]),
        "pause": lambda: ledger.pause("default", 60, "{}"),
    }
    redis_client.config_set("maxmemory-policy", "noeviction")
    redis_client.config_set("maxmemory", 1)
    try:
        for name, call in calls.items():
            with pytest.raises(StoreFullError, match="out of memory"):
                call()
            assert before == _everything(redis_client), f"{name} wrote something"
    finally:
        redis_client.config_set("maxmemory", 0)
    assert 1 == ledger.done(message_id)  # works again: 8 handed back (7 is running)


def test_stats_and_metrics_show_orphaned_reports_until_they_are_handed_on(
    producer: Producer, ledger: Ledger, redis_client: redis.Redis
) -> None:
    """Reports whose message is in no list and held by no live worker are counted as
    "orphaned" in stats and in the metrics (ops see it), and are not once handed on."""
    from prometheus_client import generate_latest

    from worker.observability.metrics import Metrics
    from worker.observability.stats import snapshot

    producer.enqueue_many([(7, "image"), (8, "image"), (9, "image")])
    _pop(redis_client, "reports")  # popped, then lost
    assert 0 == snapshot(redis_client, producer.settings)["backlog"]["orphaned"]
    assert [] == ledger.sweep(lease_s=30, max_deliveries=3, lost_grace_s=60)  # suspect now
    assert 3 == snapshot(redis_client, producer.settings)["backlog"]["orphaned"]
    metrics = Metrics()
    metrics.watch(redis_client, producer.settings)
    assert b"report_forwarder_orphaned_reports 3.0" in generate_latest(metrics.registry)
    events = ledger.sweep(lease_s=30, max_deliveries=3, lost_grace_s=0.0)
    assert 3 == len(events)
    assert 0 == snapshot(redis_client, producer.settings)["backlog"]["orphaned"]
    assert 1 == queue_length(redis_client)


def test_last_reports_finish_closes_its_message_in_the_same_round_trip(
    producer: Producer, ledger: Ledger, redis_client: redis.Redis, keys: Keys
) -> None:
    """The finish of a message's last report also does what ``done`` does: the message is
    forgotten, and a report still queued for it (not reached) goes to a new message."""
    producer.enqueue_many([(7, "image"), (8, "image")])
    message_id, _ = _pop(redis_client, "reports")
    ledger.claim("default:8", message_id, 30, worker="w1")  # 7 is never reached
    assert ledger.finish("default:8", message_id, "accepted", attempts=1, done=True)
    assert not redis_client.hexists(keys.msgrefs, message_id)
    assert 0 == redis_client.zcard(keys.started)
    _, refs = _pop(redis_client, "reports")
    assert ["default:7"] == refs


def test_scripts_are_files_with_their_interface_in_a_header() -> None:
    """Every script ships as a .lua file whose header names its KEYS and ARGV (the shared
    parts excepted), and binds ARGV to named locals before anything else runs."""
    import re
    from importlib import resources

    from worker.store import scripts

    folder = resources.files("worker.store").joinpath("lua")
    names = sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".lua"))
    assert {"prelude", "ratelimit", "enqueue", "claim", "finish", "sweep"} <= set(names)
    for name in names:
        text = folder.joinpath(f"{name}.lua").read_text()
        if name in ("prelude", "ratelimit"):
            continue
        assert "-- KEYS:" in text, name
        assert "-- ARGV:" in text, name
        body = text.split("guard()", 1)[-1] if "guard()" in text else ""
        assert not re.search(r"ARGV\[\d+\]", body), f"{name}: ARGV used past the header"
        assert scripts.source(name).endswith(text)


def test_a_redis_older_than_the_scripts_need_is_refused_clearly() -> None:
    """Redis 6.0 lacks ZRANGE … BYSCORE: the worker says so at start-up (exit 2), naming
    the version found and the one needed."""
    from worker.errors import ConfigError
    from worker.store import scripts

    scripts.require_version({"redis_version": "6.2.14"}, "redis://x")
    scripts.require_version({"redis_version": "7.0.15"}, "redis://x")
    with pytest.raises(ConfigError, match=r"version 6\.0\.9; report-forwarder needs 6\.2"):
        scripts.require_version({"redis_version": "6.0.9"}, "redis://x")
