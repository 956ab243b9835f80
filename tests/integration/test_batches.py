"""A message's reports as one batch (docs/design.md §3.4): claimed in one round trip, sent
side by side, recorded in one, each report exactly as if alone; single-report messages
taken several per Celery task. Real Redis, real Celery worker threads, the sandbox over
HTTP."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from typing import Any

import redis
import structlog
from celery.signals import task_prerun
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.delivery.batch import RECORD_EVERY_S, Batch, Concluded, Job, Recorder
from worker.producer import Producer
from worker.settings import Settings
from worker.store.keys import Keys
from worker.store.ledger import Ledger
from worker.store.messages import list_keys
from worker.store.records import Claim, Record
from worker.store.vocabulary import Finish
from worker.testing.sandbox import Sandbox

from ..redis_bytes import as_bytes, scored_members, stream_entries
from .conftest import running_worker, wait_until
from .test_ledger import _pop

_prefixes = itertools.count()


def test_a_bulk_messages_reports_are_at_the_api_together(
    settings: Settings, env: dict[str, str], sandbox: Sandbox, redis_client: redis.Redis
) -> None:
    """Behind a slow API, every report of a 5-report message reaches it before the first
    could have been answered (one after another, the fifth would come four answers
    later) — on a worker of 5 threads, its budget of reports at once; each then gets its
    own outcome and its own log line."""
    latency_s = 3.0  # under the test lease (5 s): one send per report
    sandbox.set_latency(latency_s * 1000)
    keys = Keys(settings.key_prefix)
    with (
        structlog.testing.capture_logs() as lines,
        running_worker(settings, env, concurrency=5) as svc,
    ):
        assert svc.producer.enqueue_many([(n, "image") for n in range(1, 6)]).queued == 5
        wait_until(lambda: sandbox.count() == 5, timeout=30)
        states = [redis_client.hget(keys.report("default", n), "s") for n in range(1, 6)]
        arrivals = [r.monotonic for r in sandbox.requests()]
        wait_until(lambda: all(redis_client.hget(keys.report("default", n), "s") == b"a"
                               for n in range(1, 6)), timeout=60)  # fmt: skip
    assert states == [b"r"] * 5  # all five in flight, none answered yet
    assert max(arrivals) - min(arrivals) < latency_s
    accepted = Counter(x["task_id"] for x in lines if x["event"] == "report.accepted")
    assert accepted == {n: 1 for n in range(1, 6)}


def test_single_report_messages_are_taken_several_per_celery_task(
    settings: Settings, env: dict[str, str], sandbox: Sandbox, redis_client: redis.Redis
) -> None:
    """A backlog of 60 single-report messages costs far fewer than 60 Celery tasks: a
    task's claim takes more messages off the queue with its own. Every report is sent
    once, every message is closed, nothing is left pending or running."""
    tasks: list[str] = []

    def count(task_id: str, **_: Any) -> None:
        tasks.append(task_id)

    producer = Producer(settings)
    result = producer.enqueue_many([(n, "image") for n in range(1, 61)], per_message=1)
    assert result.queued == 60
    task_prerun.connect(count, weak=False)
    try:
        with running_worker(settings, env, concurrency=2):
            wait_until(lambda: sandbox.count(success=True) >= 60, timeout=60)
            keys = Keys(settings.key_prefix)
            wait_until(lambda: int(redis_client.get(keys.npending) or 0) == 0, timeout=30)
            wait_until(lambda: redis_client.hlen(keys.msgrefs) == 0, timeout=30)
    finally:
        task_prerun.disconnect(count)
    assert Counter(r.task_id for r in sandbox.requests()) == {n: 1 for n in range(1, 61)}
    assert 0 < len(tasks) <= 15, f"{len(tasks)} Celery tasks for 60 messages"
    assert redis_client.zcard(keys.started) == 0
    assert redis_client.zcard(keys.leases) == 0
    assert sum(int(redis_client.llen(k)) for k in list_keys(settings.queue)) == 0
    producer.client.close()


def test_a_claim_takes_messages_urgent_first_and_leaves_a_foreign_one_for_kombu(
    producer: Producer, redis_client: redis.Redis
) -> None:
    """Room to fill: messages come off the urgent list first, then the normal one, oldest
    first, each with its reports claimed; an entry that is not one of ours goes back
    where it was and ends the taking."""
    ledger = producer.ledger
    urgent, normal = list_keys("reports")
    producer.enqueue_many([(n, "image") for n in (1, 2, 3)], per_message=1)
    own_id, own_refs = _pop(redis_client)
    redis_client.lpush(urgent, b'{"not": "ours"}')
    taken = ledger.claim_many([(own_id, ref) for ref in own_refs], 30, room=20)
    assert isinstance(taken.claims[0], Claim)
    assert taken.taken == []  # the foreign entry, oldest in the urgent list, stopped it
    assert redis_client.lrange(urgent, 0, -1) == [b'{"not": "ours"}']
    redis_client.delete(urgent)
    taken = ledger.claim_many([], 30, room=1)
    assert [refs[0][0] for _, refs in taken.taken] == ["default:2"]  # room for one
    assert isinstance(taken.taken[0][1][0][1], Claim)
    producer.enqueue_many([(9, "image")], per_message=1)
    redis_client.lpush(urgent, as_bytes(redis_client.lpop(normal)))  # report 9 made urgent
    taken = ledger.claim_many([], 30, room=5)
    assert [refs[0][0] for _, refs in taken.taken] == ["default:9", "default:3"]
    assert int(redis_client.llen(normal)) == 0


_text = st.one_of(
    st.text(max_size=600),
    st.binary(max_size=600).map(lambda b: b.decode("latin-1")),
    st.sampled_from(["", "\t\n\x00", "a\tb\nc", "x" * 5000]),
)
_outcome = st.tuples(
    st.sampled_from([Finish.ACCEPTED, Finish.RETRY, Finish.DEFER, Finish.DEAD, Finish.RELEASE]),
    _text,  # error text
    st.sampled_from(["", "ERROR_X", "ERROR_\t\n"]),  # error code
    st.one_of(st.none(), st.integers(100, 599)),
)


@given(outcomes=st.lists(_outcome, min_size=1, max_size=20))
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_a_batch_records_each_outcome_exactly_as_if_recorded_alone(
    producer: Producer, redis_client: redis.Redis, outcomes: list[tuple[Any, ...]]
) -> None:
    """One finish round trip for a message's outcomes (any mix; hostile error texts) leaves
    Redis as one finish per report would: the same states, fields, schedules, dead
    letters and counts — and reports released unsent in one new urgent message."""
    n = next(_prefixes)
    alone = _one_message(producer, redis_client, f"bt{n}a", len(outcomes))
    batch = _one_message(producer, redis_client, f"bt{n}b", len(outcomes))
    now = time.time()

    def record(ledger: Ledger, message_id: str, ref: str, spec: tuple[Any, ...]) -> Record:
        outcome, error, code, status = spec
        return Record(ref, message_id, outcome, 1, error_code=code, http_status=status,
                      error=error, due=now + 60, reason="rejected")  # fmt: skip

    ledger, message_id, refs = alone
    for i, (ref, spec) in enumerate(zip(refs, outcomes, strict=True)):
        close = [message_id] if i == len(refs) - 1 else []
        assert ledger.finish_many([record(ledger, message_id, ref, spec)], close) == [True]
    ledger, message_id, refs = batch
    records = [record(ledger, message_id, r, s) for r, s in zip(refs, outcomes, strict=True)]
    assert ledger.finish_many(records, [message_id]) == [True] * len(refs)
    assert _state(redis_client, alone[0]) == _state(redis_client, batch[0])


def _one_message(
    producer: Producer, client: redis.Redis, prefix: str, size: int
) -> tuple[Ledger, str, list[str]]:
    """A ledger of its own (prefix and queue), one message of ``size`` reports, claimed."""
    ledger = Ledger(client, Keys(prefix), prefix)
    rows = [producer.row(t, "image") for t in range(1, size + 1)]
    assert ledger.enqueue(rows, per_message=size) == [1] * size
    message_id, refs = _pop(client, prefix)
    claimed = ledger.claim_many([(message_id, ref) for ref in refs], 30, worker="w")
    assert all(isinstance(c, Claim) for c in claimed.claims)
    return ledger, message_id, refs


def _state(client: redis.Redis, ledger: Ledger) -> dict[str, Any]:
    """What a finish leaves, without the times and names that differ between two runs."""
    keys = ledger.keys
    reports = {}
    for key in client.scan_iter(f"{keys.prefix}:r:*"):
        fields = {as_bytes(k): as_bytes(v) for k, v in client.hgetall(key).items()}
        for moving in (b"e", b"q", b"d", b"m"):
            fields.pop(moving, None)
        reports[as_bytes(key).decode().split(":r:", 1)[1]] = fields
    dead = [
        {k: v for k, v in fields.items() if k not in (b"failed_at", b"enqueued_at")}
        for _, fields in stream_entries(client, keys.dead)
    ]
    urgent, normal = list_keys(ledger.queue)
    return {
        "reports": reports,
        "sched": [as_bytes(m) for m in client.zrange(keys.sched, 0, -1)],
        "leases": [as_bytes(m) for m in client.zrange(keys.leases, 0, -1)],
        "running": sorted(as_bytes(m) for m in client.smembers(f"{keys.prefix}:running:w")),
        "npending": client.get(keys.npending),
        "dead": dead,
        "deadcount": client.hgetall(keys.deadcount),
        "urgent": int(client.llen(urgent)),
        "normal": int(client.llen(normal)),
        "messages": client.hlen(keys.msgrefs),
    }


def test_a_claim_holds_admissions_only_while_the_log_is_at_most_half_full(
    producer: Producer, redis_client: redis.Redis, keys: Keys
) -> None:
    """An admission made in a batch's claim is "held" — logged hold seconds ahead, so it
    covers a send until then and every later admission counts it — only while the
    account's sliding log is at most half full; nearer the limit it is logged now
    ("go"), and a full log gives no admission (docs/design.md §5)."""
    producer.enqueue_many([(n, "image") for n in range(1, 8)], per_message=7)
    message_id, refs = _pop(redis_client)
    limits = "default\t0.000001\t4\t1.025\n"  # 4 per window, slots not spaced apart
    before = float(redis_client.time()[0])
    claimed = producer.ledger.claim_many(
        [(message_id, ref) for ref in refs], 30, limits=limits, hold_s=2.0
    )
    answers = [c.limiter for c in claimed.claims if isinstance(c, Claim)]
    assert answers[:4] == ["held", "held", "go", "go"]
    assert all(float(a) >= before for a in answers[4:])  # full: a slot, to wait for
    log = scored_members(redis_client, keys.ratelimit("default"))
    stamps = sorted(score for _, score in log)
    assert len(stamps) == 4
    assert stamps[2] - stamps[0] >= 1.9  # the two held ones were logged 2 s ahead


def test_a_report_too_late_for_its_lease_goes_back_unsent_and_is_sent_once(
    settings: Settings, env: dict[str, str], sandbox: Sandbox, redis_client: redis.Redis
) -> None:
    """One thread, a 1.5-s API and a 5-s lease (shorter than a report's longest path): a
    batch's report that would start after the first second behind the others is not
    sent on a lease the sweep could take back meanwhile — it is released and handed to a
    new message, and every report reaches the API exactly once."""
    sandbox.set_latency(1500)
    keys = Keys(settings.key_prefix)
    with (
        structlog.testing.capture_logs() as lines,
        running_worker(settings, env, concurrency=1) as svc,
    ):
        assert svc.producer.enqueue_many([(n, "image") for n in range(1, 4)]).queued == 3
        wait_until(lambda: int(redis_client.get(keys.npending) or 0) == 0, timeout=60)
    assert Counter(r.task_id for r in sandbox.requests()) == {1: 1, 2: 1, 3: 1}
    released = [x["task_id"] for x in lines if x["event"] == "report.released"]
    assert released, "no report was released"
    assert any(x["event"] == "message.handed_back" for x in lines)


def test_a_report_released_after_its_message_closed_is_handed_on_at_once(
    producer: Producer, redis_client: redis.Redis
) -> None:
    """A report released unsent is handed on when its message closes; one whose release
    is recorded after that close (a slow thread of the batch) goes into a new urgent
    message in the same round trip, never left queued for a message nobody will close."""
    ledger, message_id, refs = _one_message(producer, redis_client, "late-release", 3)
    urgent, _ = list_keys(ledger.queue)

    def release(ref: str) -> Record:
        return Record(ref, message_id, Finish.RELEASE, 0)

    assert ledger.finish_many([release(refs[0])], [message_id]) == [True]
    assert ledger.finish_many([release(refs[1])], []) == [True]  # after the close

    assert 2 == redis_client.llen(urgent)  # one message at the close, one after
    moved = {as_bytes(redis_client.hget(f"late-release:r:{ref}", "m")).decode() for ref in refs[:2]}
    assert message_id not in moved
    assert all(redis_client.hexists(ledger.keys.msgrefs, m) for m in moved)


class _SlowHandOver(Recorder):
    """A recorder that takes its time over every outcome but a batch's last, so that a
    thread handing one over late is overtaken by the one that closes the batch — unless
    the batch keeps them in order. Records nothing: notes what each round trip carried."""

    def __init__(self) -> None:
        super().__init__(self._note)
        self.trips: list[tuple[list[str], list[str]]] = []

    def add(self, outcome: Concluded | None, closing: Batch | None) -> None:
        if closing is None:  # longer than the recorder waits to gather a round trip
            time.sleep(RECORD_EVERY_S * 2.5)
        super().add(outcome, closing)

    def _note(self, outcomes: list[Concluded], close: list[str]) -> None:
        self.trips.append(([record.ref for record, _ in outcomes], close))


def test_a_batch_hands_its_close_to_the_recorder_after_every_outcome() -> None:
    """Eight threads conclude a batch's reports at once: the round trip that closes its
    message carries the last of its outcomes, none comes after (a release recorded after
    its message's close would be queued for a message nobody closes)."""
    claim = Claim("image", "image", 0.0, 9e9, 0, 0, 0.0, None, None, None)
    refs = [f"default:{n}" for n in range(1, 9)]
    recorder = _SlowHandOver()
    for _ in range(5):
        recorder.trips.clear()
        batch = Batch(time.time(), time.time() + 60, time.time())
        batch.add("m1", [(ref, claim) for ref in refs])
        start = threading.Barrier(len(refs))

        def conclude(batch: Batch, job: Job, start: threading.Barrier) -> None:
            start.wait()
            batch.conclude(recorder, (Record(job.ref, "m1", Finish.RELEASE, 0), lambda _: None))

        threads = [
            threading.Thread(target=conclude, args=(batch, job, start)) for job in batch.jobs
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert batch.closed.wait(10)
        closing = [i for i, (_, close) in enumerate(recorder.trips) if close == ["m1"]]
        assert 1 == len(closing)
        after = [ref for outcomes, _ in recorder.trips[closing[0] + 1 :] for ref in outcomes]
        assert [] == after
        assert sorted(refs) == sorted(r for outcomes, _ in recorder.trips for r in outcomes)
    recorder.stop()
