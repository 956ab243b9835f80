"""The pending-report ledger: every state change of a report is one atomic Lua script.

A report's life (``keys.py`` lists the keys)::

    enqueue ──► queued ──claim──► running ──finish──► accepted            (kept dedup_ttl_s)
                  ▲                  │  ├────finish──► dead letter         (entry deleted)
                  │                  │  └─finish(retry|defer)─► waiting ──sweep (due)──┐
                  └──────────────────┴─────────────────────────────────────────────────┘
                  ▲   sweep: lease expired, or its worker's heartbeat stopped → queued
                  │          again, or "poison"
                  └── sweep: its message is held by no live worker and waits in no list
                             (a killed worker's prefetch, kombu's pop window, a failed
                             write) → handed to a new message

Why a ledger: kombu's Redis transport pops a message before it records it as unacked, so a
worker killed in between loses it (docs/design.md §4). The ledger is written in the same script
that pushes the message and is cleared only at a terminal outcome, so a report can always
be found and re-queued. A message names its reports and carries an id; a worker may act on
a report only if the report is ``queued`` *for that message id* — so a redelivered or
duplicated message never sends a report twice, and an accepted report is never sent again.

Two lists per queue (see ``messages.py``): new reports in the normal list, re-queued ones
(retries, deferred, recovered) in the urgent list that workers drain first. Each list is
FIFO with its own message sequence. A message is accounted for while it waits in its list
(its sequence is not older than the list's oldest) or while a live worker holds it (each
worker's heartbeat lists the messages it has received and not finished). Any other message
whose reports are still queued for it is an orphan: after ``lost_grace_s`` its reports go
to a new message. A worker whose heartbeat stops for ``worker_timeout_s`` is dead: its
reports in flight are re-queued and its messages handed on at once, so a killed worker's
reports are back in seconds, not after kombu's visibility timeout.

Out of memory: under ``maxmemory`` with ``noeviction`` Redis refuses a script's *first*
write that needs memory, and lets the rest of a script that has written once run to its
end. Every script here therefore starts with such a write (``guard``): a script either
fails before writing anything, or completes. Nothing is half-written.

Scripts take the key prefix and build key names from it (see ``keys.py``); report keys
are dynamic, so this layout targets a single Redis server or a replica set, not Cluster.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from worker.errors import ConfigError, StoreError
from worker.store import calls as guarded
from worker.store import messages, outcome, replication, scripts
from worker.store.connection import describe_client, translate
from worker.store.keys import UNACKED, UNACKED_INDEX, Keys
from worker.store.records import Claim, Claimed, Record, as_text, parse_claim, parse_taken
from worker.store.vocabulary import MAX_ERROR_CHARS, Finish

# An enqueue call's token outlives the caller's retries by this much (``enqueue_args``).
TOKEN_SLACK_S = 30

# The heartbeat: how often a worker says it is alive, and how long without one before the
# sweep (any worker's) takes it for dead and hands its reports on.
HEARTBEAT_S = 1.0
WORKER_TIMEOUT_S = 5.0

ENQUEUE_SCRIPT = scripts.source("enqueue")  # also run by the intake's async client


@dataclass(frozen=True, slots=True)
class SweepEvent:
    # requeued | lease_expired | worker_lost | orphaned | poison | worker_dead | resumed
    kind: str
    subject: str  # a ref; an account for "resumed"; a worker id for "worker_dead"
    detail: str


def enqueue_args(
    keys: Keys,
    queue: str,
    rows: Sequence[Sequence[Any]],
    per_message: int = 1,
    acks: replication.ReplicaAcks | None = None,
) -> list[Any]:
    """Arguments of ``ENQUEUE_SCRIPT`` (run by ``Ledger.enqueue`` and by the intake's async
    client). With ``acks`` to wait for, the call gets a token: run again until replicas
    have it, it answers what its first run answered instead of queueing again."""
    packed = "".join("\t".join(map(str, row)) + "\n" for row in rows)
    args: list[Any] = [
        keys.prefix,
        messages.list_key(queue, urgent=False),
        _now(),
        messages.template(queue, urgent=False),
        per_message,
        packed,
    ]
    if acks is not None and acks.replicas:
        args += [secrets.token_hex(12), math.ceil(acks.budget_s) + TOKEN_SLACK_S]
    return args


def parse_flags(reply: Any) -> list[int]:
    """The enqueue script's answer: 1 queued, 0 duplicate, per report."""
    text = reply if isinstance(reply, bytes) else str(reply).encode()
    return [1 if c == 49 else 0 for c in text]


def _now() -> str:
    return f"{time.time():.6f}"


class Ledger:
    """Python face of the scripts, bound to one Redis client, prefix and queue."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        queue: str,
        *,
        dedup_ttl_s: int = 3600,
        dead_max_entries: int = 100_000,
        dead_max_age_s: int = 7 * 86400,
        acks: replication.ReplicaAcks | None = None,
        on_unreplicated: Callable[[str, int], None] | None = None,
    ) -> None:
        self.client = client
        # enqueue and finish wait for this many replicas (docs/design.md §8); 0: no waiting
        self.acks = acks or replication.ReplicaAcks()
        self.waiter = replication.Waiter(client, keys.acked, self.acks, on_unreplicated)
        self.keys = keys
        self.queue = queue
        self.urgent_list, self.normal_list = messages.list_keys(queue)
        self.normal_template = messages.template(queue, urgent=False)
        self.urgent_template = messages.template(queue, urgent=True)
        self.dedup_ttl_s = dedup_ttl_s
        self.dead_max_entries = dead_max_entries
        self.dead_max_age_s = dead_max_age_s
        self._enqueue = client.register_script(scripts.source("enqueue"))
        self._claim = client.register_script(scripts.source("claim"))
        self._finish = client.register_script(scripts.source("finish"))
        self._sweep = client.register_script(scripts.source("sweep"))
        self._pause = client.register_script(scripts.source("pause"))
        self._resume = client.register_script(scripts.source("resume"))
        self._drop_dead = client.register_script(scripts.source("drop_dead"))
        self._done = client.register_script(scripts.source("done"))
        self._heartbeat = client.register_script(scripts.source("heartbeat"))
        self._unregister = client.register_script(scripts.source("unregister"))

    def _run(self, script: Any, args: Sequence[Any], keys: Sequence[str] = ()) -> Any:
        """Run a script; a redis-py failure becomes the project's StoreError (full,
        unreachable, other). Scripts write all or nothing, so a failed call changed nothing."""
        return guarded.call(script, keys=keys, args=args, on=self.client)

    def enqueue(self, rows: Sequence[Sequence[Any]], *, per_message: int = 1) -> list[int]:
        """Queue ``rows`` (:class:`~worker.store.vocabulary.EnqueueRow`, or any sequence of its
        fields: account, task_id, type, kind, deadline, dead-letter id or '');
        one flag per row: 1 queued, 0 duplicate."""
        if not rows:
            return []
        args = enqueue_args(self.keys, self.queue, rows, per_message, self.acks)
        with outcome.watching() as sends:
            try:
                if not self.acks.replicas:
                    return parse_flags(self._run(self._enqueue, args))
                # a re-run with the call's token answers as the first run did; if a failover
                # lost the first run (token and all), the re-run queues afresh: queued if
                # either did
                return self.waiter.enqueue(self._enqueue, args, parse_flags)
            except (StoreError, ConfigError) as exc:
                # an attempt that may have reached Redis unanswered may have queued them
                cause = exc.__cause__
                if cause is not None:
                    sends.note(cause)
                if sends.lost is None:
                    raise
                where = describe_client(self.client)
                lost = translate(cause or exc, where, "enqueue not confirmed", lost=sends.lost)
                raise lost from cause or exc

    def claim(
        self,
        ref: str,
        message_id: str,
        lease_s: float,
        limiter: Sequence[str | float | int] = (),
        *,
        worker: str = "",
    ) -> Claim | str:
        """Take ``ref`` for this delivery; a string (its state) means: do not act on it.
        With ``limiter`` (``Limiter.claim_args``: interval, amount, window) the account's
        rate limiter is asked in the same round trip. ``worker`` (the claiming worker's
        id) lets the sweep re-queue the report at once should that worker's heartbeat stop."""
        limits = ""
        if limiter:
            limits = "\t".join(map(str, (ref.rpartition(":")[0], *limiter))) + "\n"
        batch = self.claim_many([(message_id, ref)], lease_s, worker=worker, limits=limits)
        return batch.claims[0]

    def claim_many(
        self,
        rows: Sequence[tuple[str, str]],
        lease_s: float,
        *,
        worker: str = "",
        limits: str = "",
        member_prefix: str = "",
        room: int = 0,
        hold_s: float = 0.0,
    ) -> Claimed:
        """:meth:`claim` for each (message id, ref) in one round trip, each report on its
        own, as if alone; the rate limiter is asked for the accounts in ``limits``
        (``Limiter.claim_limits``). With ``room``, messages are taken off the queue's lists
        too (urgent first) until there are that many reports in all, and theirs claimed.
        With ``hold_s``, an admission may be "held": good for a send within that long."""
        now = time.time()
        args: list[Any] = [
            self.keys.prefix,
            now,
            now + lease_s,
            worker,
            limits,
            member_prefix or f"{worker}-{now}",
            room,
            hold_s,
        ]
        for message_id, ref in rows:
            args += (message_id, ref)
        claims, taken = self._run(self._claim, args, [self.urgent_list, self.normal_list])
        return Claimed([parse_claim(r) for r in claims], [parse_taken(entry) for entry in taken])

    def finish(
        self,
        ref: str,
        message_id: str,
        outcome: str,
        *,
        attempts: int,
        stats_field: str = "",
        error_code: str = "",
        http_status: int | None = None,
        error: str = "",
        due: float = 0.0,
        reason: str = "",
        planned_slot: float | None = None,
        limiter_since: float | None = None,
        done: bool = False,
    ) -> bool:
        """Record an outcome: ``accepted``, ``retry`` or ``defer`` (due at ``due``; a deferral
        keeps its reserved ``planned_slot`` and costs no attempt) or ``dead`` (``reason``).
        ``done``: this was the message's last report, so the worker is done with the message
        too (as :meth:`done`, in the same round trip)."""
        record = Record(
            ref,
            message_id,
            outcome,
            attempts,
            stats_field=stats_field,
            error_code=error_code,
            http_status=http_status,
            error=error,
            due=due,
            reason=reason,
            planned_slot=planned_slot,
            limiter_since=limiter_since,
        )
        return self.finish_many([record], close=[message_id] if done else [])[0]

    def finish_many(self, records: Sequence[Record], close: Sequence[str] = ()) -> list[bool]:
        """:meth:`finish` for each record in one round trip, each recorded on its own; then
        the worker is done with the messages in ``close`` (as :meth:`done`). One answer per
        record, in order: recorded, or False if another delivery owns the report now."""
        now = time.time()
        stamp = f"{now:.6f}"
        args: list[Any] = [
            self.keys.prefix,
            stamp,
            self.dedup_ttl_s,
            self.dead_max_entries,
            self._dead_min_id(now),
            self.urgent_template if close else "",
            ",".join(close),
        ]
        for r in records:
            timed = r.outcome in (Finish.RETRY, Finish.DEFER)
            planned = (
                ""
                if r.planned_slot is None
                else f"{r.planned_slot:.6f}|{r.limiter_since if r.limiter_since else now:.6f}"
            )
            args += (
                r.message_id,
                r.ref,
                r.outcome,
                r.attempts,
                r.error_code,
                "" if r.http_status is None else r.http_status,
                r.error[:MAX_ERROR_CHARS],
                f"{r.due:.6f}" if timed else r.reason,
                r.stats_field,
                planned,
            )
        return [bool(int(flag)) for flag in self._run_finish(args, [self.urgent_list])]

    def _run_finish(self, args: Sequence[Any], keys: Sequence[str]) -> Any:
        """The finish script, waiting briefly for replicas when ``acks`` asks for them."""
        if not self.acks.replicas:
            return self._run(self._finish, args, keys)
        return self.waiter.finish(self._finish, args, keys)

    def sweep(
        self,
        *,
        lease_s: float,
        max_deliveries: int,
        lost_grace_s: float,
        worker_timeout_s: float = WORKER_TIMEOUT_S,
        limit: int = 500,
    ) -> list[SweepEvent]:
        now = time.time()
        reply = self._run(
            self._sweep,
            [
                self.keys.prefix,
                f"{now:.6f}",
                self.urgent_template,
                max_deliveries,
                lost_grace_s,
                limit,
                self.dead_max_entries,
                self._dead_min_id(now),
                worker_timeout_s,
            ],
            keys=[self.urgent_list, self.normal_list, UNACKED, UNACKED_INDEX],
        )
        items = [as_text(v) for v in reply]
        return [SweepEvent(*items[i : i + 3]) for i in range(0, len(items), 3)]

    def pause(self, account: str, seconds: float, reason_json: str) -> bool:
        """Pause ``account`` for ``seconds``; False if it was already paused (by another worker)."""
        now = time.time()
        ttl = max(1, round(seconds))
        args: list[str | float] = [self.keys.prefix, account, now, now + seconds, reason_json, ttl]
        return bool(int(self._run(self._pause, args)))

    def resume(self, account: str) -> bool:
        """Lift a pause early; False if ``account`` was not paused."""
        return bool(int(self._run(self._resume, [self.keys.prefix, account])))

    def drop_dead(self, ids: Sequence[str]) -> int:
        """Delete dead letters by id (per-reason counts kept exact); how many there were."""
        removed = 0
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            removed += int(self._run(self._drop_dead, [self.keys.prefix, *chunk]))
        return removed

    def done(self, message_id: str) -> int:
        """The worker is done with ``message_id``: reports still queued for it (not reached,
        e.g. on shutdown) go to a new urgent message now. How many were handed back."""
        reply = self._run(
            self._done,
            [self.keys.prefix, message_id, _now(), self.urgent_template],
            keys=[self.urgent_list],
        )
        return int(reply[0])

    def heartbeat(
        self,
        worker: str,
        held: Sequence[str],
        declarations: Sequence[tuple[str, float, int, float]] = (),
        *,
        timeout_s: float = WORKER_TIMEOUT_S,
    ) -> dict[str, tuple[float, int, float]]:
        """``worker`` is alive, holds exactly ``held`` and declares these rate limits
        (account, interval, amount, window). Returns each declared account's effective
        limit (the strictest declared by a live worker) as (interval, amount, window)."""
        decls = ";".join(f"{a},{i!r},{n},{w!r}" for a, i, n, w in declarations)
        reply = self._run(
            self._heartbeat, [self.keys.prefix, worker, timeout_s, ",".join(held), decls]
        )
        items = [as_text(v) for v in reply]
        out: dict[str, tuple[float, int, float]] = {}
        for i in range(0, len(items), 2):
            interval, amount, window = items[i + 1].split(",")
            out[items[i]] = (float(interval), int(amount), float(window))
        return out

    def unregister(self, worker: str, accounts: Sequence[str]) -> None:
        """A clean stop: withdraw the worker's heartbeat, held messages and declarations."""
        self._run(self._unregister, [self.keys.prefix, worker, ",".join(accounts)])

    def _dead_min_id(self, now: float) -> str:
        return f"{int((now - self.dead_max_age_s) * 1000)}-0"
