"""The intake's two small engines: the batcher that queues reports arriving together in one
Redis round trip without delaying a lone one, and the per-client request limiter."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from worker.errors import ForwarderError, StoreOutcomeUnknownError
from worker.store import outcome, replication
from worker.store.connection import translate
from worker.store.keys import Keys
from worker.store.ledger import enqueue_args, parse_flags
from worker.store.retrying import transient
from worker.store.vocabulary import EnqueueRow

ROUND_TRIP_TIMEOUT_S = 10.0


class Batcher:
    """Queues rows in as few round trips as possible without delaying a lone report: the
    first row goes at once; rows arriving while a round trip is in flight gather for the
    next one, and all their requests wait on that one round trip's answer."""

    def __init__(
        self,
        script: Any,
        keys: Keys,
        queue: str,
        acks: replication.ReplicaAcks | None = None,
        retry_s: float = 0.0,
    ) -> None:
        self.script = script
        # a round trip that loses its connection (a Redis restart, a Sentinel failover) is
        # made again for this long (bounded by the round trip's timeout), so a request
        # rides through a failover of a few seconds instead of getting a 503
        self.retry_s = min(retry_s, ROUND_TRIP_TIMEOUT_S - 1)
        self.keys = keys
        self.queue = queue
        # with replicas to wait for, a request is answered only once they have its reports
        # (within the round trip's timeout; else 503, never a success that could be lost)
        self.acks = acks or replication.ReplicaAcks()
        self.rows: list[EnqueueRow] = []
        self.waiter: asyncio.Future[list[int]] | None = None
        self.running = False
        self._task: asyncio.Task[None] | None = None  # held so it is not collected mid-run

    async def submit(self, rows: list[EnqueueRow]) -> list[int]:
        """Queue ``rows`` (at most ``BATCH``); one flag each: 1 queued, 0 duplicate."""
        loop = asyncio.get_running_loop()
        if self.waiter is None:
            self.waiter = loop.create_future()
        waiter, start = self.waiter, len(self.rows)
        self.rows.extend(rows)
        if not self.running:
            self.running = True
            self._task = loop.create_task(self._drain())
        flags = await waiter
        return flags[start : start + len(rows)]

    async def _drain(self) -> None:
        try:
            while self.rows:
                rows, waiter = self.rows, self.waiter
                self.rows, self.waiter = [], None
                assert waiter is not None
                try:
                    args = enqueue_args(self.keys, self.queue, rows, acks=self.acks)
                    with outcome.watching() as sends:
                        try:
                            # one timeout per round trip (cheaper than a socket timeout
                            # per command)
                            async with asyncio.timeout(ROUND_TRIP_TIMEOUT_S):
                                flags = await self._round_trip(args)
                        except Exception as exc:
                            unknown = _unknown_if_lost(exc, sends)
                            if unknown is None:
                                raise
                            raise unknown from exc
                except Exception as exc:  # every request of this batch gets the failure
                    waiter.set_exception(exc)
                    waiter.exception()  # retrieved: no "never retrieved" warning if all left
                    continue
                waiter.set_result(flags)
        finally:
            self.running = False

    async def _round_trip(self, args: list[Any]) -> list[int]:
        """The enqueue, made again while its failure is transient and ``retry_s`` lasts.
        Made again, an enqueue that waits for replicas answers as its first run did (its
        token); one that does not could queue a report twice only if the first run's
        reply was lost and the report finished in between (milliseconds)."""
        deadline = time.monotonic() + self.retry_s
        delay = 0.05
        while True:
            try:
                if self.acks.replicas:
                    return await self._acked(args)
                return parse_flags(await self.script(args=args))
            except Exception as exc:
                outcome.note(exc)  # it may have run: a retry answers "duplicate" then
                if not transient(exc) or time.monotonic() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _acked(self, args: list[Any]) -> list[int]:
        """The enqueue then WAIT, run again until enough replicas acknowledge it (at most
        the replica budget, inside the round trip's timeout); StoreUnreplicatedError
        after that."""
        return await replication.enqueue_acked_async(
            self.script.registered_client,
            self.script,
            args,
            marker=self.keys.acked,
            acks=self.acks,
            budget_s=min(self.acks.budget_s, ROUND_TRIP_TIMEOUT_S - 1),
            parse=parse_flags,
        )


def _unknown_if_lost(exc: Exception, sends: outcome.Sends) -> ForwarderError | None:
    """A StoreOutcomeUnknownError if this or an earlier attempt of the round trip that
    failed with ``exc`` may have reached Redis unanswered (its reports may be queued);
    None if none did (or ``exc`` says so already)."""
    sends.note(exc)
    if sends.lost is None or isinstance(exc, StoreOutcomeUnknownError):
        return None
    return translate(exc, None, "enqueue not confirmed", lost=sends.lost)


class ClientLimiter:
    """Requests per second per client address (token bucket), so one client cannot flood
    the intake; over it: 429 ``ERROR_TOO_MUCH_REQUESTS``."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.buckets: dict[str, tuple[float, float]] = {}

    def allow(self, client: str, cost: float = 1.0) -> bool:
        now = time.monotonic()
        tokens, last = self.buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < cost:
            self.buckets[client] = (tokens, now)
            return False
        self.buckets[client] = (tokens - cost, now)
        if len(self.buckets) > 10_000:  # forget idle clients
            cutoff = now - 60
            self.buckets = {k: v for k, v in self.buckets.items() if v[1] > cutoff}
        return True
