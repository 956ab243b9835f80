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
``{p}:umsgs``, ``{p}:useq``  the same for the urgent list (re-queued reports)
``{p}:started``        ZSET    message id -> when a worker claimed its first report; until the
                               worker says it is done with the message
``{p}:msgrefs``        HASH    message id -> "pushed_at|ref,ref,..." (until the message is done)
``{p}:suspect``        HASH    message id -> when it was first seen held by no live worker
                               and waiting in no list (an orphan after the grace period)
``{p}:npending``       STRING  reports enqueued and not yet at a terminal outcome

Workers (each worker process has an id; its heartbeat thread beats every second):

``{p}:workers``        ZSET    worker id -> its last heartbeat (Redis's clock)
``{p}:held:{worker}``  SET     message ids the worker has received and not finished
``{p}:running:{worker}`` SET   refs the worker has claimed and not finished
``{p}:decl:{acct}``    HASH    worker id -> the rate limit it is configured with
``{p}:limit:{acct}``   STRING  the account's effective limit: the strictest a live worker declares
``{p}:lastsweep``, ``{p}:stallguard``  when the last sweep ran; a stall in sweeps suspends
                               dead-worker detection for one timeout
``{p}:oom``            STRING  written (SETNX) first by every script: see ``ledger.py``
``{p}:acked``          STRING  rewritten after each write that waits for replicas, so that
                               WAIT always covers it (see ``replication.py``)
``{p}:enq:{token}``    STRING  what an enqueue call that waits for replicas answered, kept
                               while it may be retried (``redis.connect_retry_s`` + 30 s)

Shared:

``{p}:dead``           STREAM  dead letters, capped in length and age
``{p}:deadcount``      HASH    reason -> dead letters in the stream (kept exact by the scripts)
``{p}:tput:{second}``  STRING  terminal outcomes in that second (kept 3 minutes)
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
UNACKED_INDEX = "unacked_index"  # ... and its unacked_index_key
STATS_TTL_S = 2 * 86400


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "rf"

    def report(self, account: str, task_id: int) -> str:
        return f"{self.prefix}:r:{account}:{task_id}"

    @property
    def acked(self) -> str:
        return f"{self.prefix}:acked"

    @property
    def sched(self) -> str:
        return f"{self.prefix}:sched"

    @property
    def leases(self) -> str:
        return f"{self.prefix}:leases"

    @property
    def msgs(self) -> str:
        return f"{self.prefix}:msgs"

    @property
    def umsgs(self) -> str:
        return f"{self.prefix}:umsgs"

    @property
    def msgrefs(self) -> str:
        return f"{self.prefix}:msgrefs"

    @property
    def suspect(self) -> str:
        return f"{self.prefix}:suspect"

    @property
    def seq(self) -> str:
        return f"{self.prefix}:seq"

    @property
    def useq(self) -> str:
        return f"{self.prefix}:useq"

    @property
    def started(self) -> str:
        return f"{self.prefix}:started"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def held(self, worker: str) -> str:
        return f"{self.prefix}:held:{worker}"

    def running(self, worker: str) -> str:
        return f"{self.prefix}:running:{worker}"

    def limit(self, account: str) -> str:
        return f"{self.prefix}:limit:{account}"

    @property
    def npending(self) -> str:
        return f"{self.prefix}:npending"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def deadcount(self) -> str:
        return f"{self.prefix}:deadcount"

    @property
    def paused(self) -> str:
        return f"{self.prefix}:paused"

    def paused_reason(self, account: str) -> str:
        return f"{self.prefix}:paused:{account}"

    def stats(self, minute: int) -> str:
        return f"{self.prefix}:stats:{minute}"

    def throughput(self, second: int) -> str:
        return f"{self.prefix}:tput:{second}"

    def plan(self, account: str) -> str:
        return f"{self.prefix}:plan:{account}"

    def ratelimit(self, account: str) -> str:
        return f"{self.prefix}:rl:{account}"

    def cooldown(self, account: str) -> str:
        return f"{self.prefix}:cool:{account}"


def ref(account: str, task_id: int) -> str:
    return f"{account}:{task_id}"


def split_ref(value: str | bytes) -> tuple[str, int]:
    text = value.decode() if isinstance(value, bytes) else value
    account, _, task_id = text.rpartition(":")
    return account, int(task_id)
