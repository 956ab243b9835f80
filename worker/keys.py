"""Every Redis key report-forwarder owns, in one place. ``{p}`` is ``redis.key_prefix``
(one prefix per queue: a prefix's reports all travel on one Celery queue).

Per report — ``{ref}`` is ``{account}:{task_id}``:

``{p}:r:{ref}``        HASH    the ledger entry: state (queued, running, waiting, accepted),
                               type, kind, enqueued/queued times, deadline, attempts,
                               deliveries, current message id and sequence, last error

Ledger indexes (the Lua scripts in ``ledger.py`` keep them in step with the entries):

``{p}:sched``          ZSET    ref -> when its retry is due
``{p}:leases``         ZSET    ref -> when its worker's lease expires (a killed worker's
                               report is re-queued after this)
``{p}:msgs``           ZSET    message id -> sequence, for messages not yet started
``{p}:msgrefs``        HASH    message id -> "pushed_at|ref,ref,..."
``{p}:suspect``        HASH    message id -> when it was first seen missing
``{p}:seq``            STRING  message sequence (INCR per message pushed)
``{p}:seen``           STRING  highest sequence a worker has started
``{p}:npending``       STRING  reports enqueued and not yet at a terminal outcome

Shared:

``{p}:dead``           STREAM  dead letters, capped in length and age
``{p}:paused``         ZSET    account -> paused until (epoch seconds)
``{p}:paused:{acct}``  STRING  why it was paused (JSON), expires with the pause
``{p}:stats:{minute}`` HASH    "outcome|kind|error_code|account" -> count, kept 2 days

The Celery queue is kombu's list named after the queue, with kombu's ``unacked`` hash.
"""

from __future__ import annotations

from dataclasses import dataclass

UNACKED = "unacked"  # kombu's redis transport default unacked_key
STATS_TTL_S = 2 * 86400


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "rf"

    def report(self, account: str, task_id: int) -> str:
        return f"{self.prefix}:r:{account}:{task_id}"

    def __getattr__(self, name: str) -> str:
        if name in _SIMPLE:
            return f"{self.prefix}:{name}"
        raise AttributeError(name)

    def paused_reason(self, account: str) -> str:
        return f"{self.prefix}:paused:{account}"

    def stats(self, minute: int) -> str:
        return f"{self.prefix}:stats:{minute}"


_SIMPLE = frozenset(
    {"sched", "leases", "msgs", "msgrefs", "suspect", "seq", "seen", "npending", "dead", "paused"}
)


def ref(account: str, task_id: int) -> str:
    return f"{account}:{task_id}"


def split_ref(value: str | bytes) -> tuple[str, int]:
    text = value.decode() if isinstance(value, bytes) else value
    account, _, task_id = text.rpartition(":")
    return account, int(task_id)
