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
``{p}:msgs``           ZSET    message id -> sequence, for normal-list messages not yet started
``{p}:seq``            STRING  normal-list message sequence (INCR per message pushed)
``{p}:seen``           STRING  highest normal-list sequence a worker has started
``{p}:umsgs``, ``{p}:useq``, ``{p}:useen``  the same for the urgent list (re-queued reports)
``{p}:msgrefs``        HASH    message id -> "pushed_at|ref,ref,..."
``{p}:suspect``        HASH    message id -> when it was first seen missing
``{p}:npending``       STRING  reports enqueued and not yet at a terminal outcome

Shared:

``{p}:dead``           STREAM  dead letters, capped in length and age
``{p}:paused``         ZSET    account -> paused until (epoch seconds)
``{p}:paused:{acct}``  STRING  why it was paused (JSON), expires with the pause
``{p}:stats:{minute}`` HASH    "outcome|kind|error_code|account" -> count, kept 2 days
``{p}:plan:{acct}``    STRING  rate limiter: the account's next free planned slot
``{p}:rl:{acct}``      ZSET    rate limiter: the account's admitted requests (sliding log)
``{p}:cool:{acct}``    STRING  rate limiter: the API pushed back; no sends until this time

The Celery queue is two kombu lists (``messages.list_keys``), with kombu's ``unacked`` hash.
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

    def plan(self, account: str) -> str:
        return f"{self.prefix}:plan:{account}"

    def ratelimit(self, account: str) -> str:
        return f"{self.prefix}:rl:{account}"

    def cooldown(self, account: str) -> str:
        return f"{self.prefix}:cool:{account}"


_SIMPLE = frozenset(
    {
        "sched",
        "leases",
        "msgs",
        "umsgs",
        "msgrefs",
        "suspect",
        "seq",
        "useq",
        "seen",
        "useen",
        "npending",
        "dead",
        "paused",
    }
)


def ref(account: str, task_id: int) -> str:
    return f"{account}:{task_id}"


def split_ref(value: str | bytes) -> tuple[str, int]:
    text = value.decode() if isinstance(value, bytes) else value
    account, _, task_id = text.rpartition(":")
    return account, int(task_id)
