"""Writes that survive a failover (``redis.min_replicas_ack``, docs/design.md §8).

Redis replicates asynchronously: a write the primary answered but no replica received is
gone once Sentinel promotes a replica. A write that must survive is therefore sent as one
pipeline on one connection: the script, a marker write, then ``WAIT n timeout``. WAIT counts
the replicas that have everything this connection wrote; the marker makes sure the
connection wrote something even when the script changed nothing (a duplicate enqueue
answers "already queued" about an earlier write, which the marker's offset covers too, as
replication is in order).

When fewer replicas answer in time the script is run again rather than only waiting
again: after a failover the first run may have been lost with the old primary, and every
script that waits (enqueue, finish) is idempotent, so a second run restores what the first
would have done or changes nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio

from worker.errors import ForwarderError, StoreUnreplicatedError
from worker.settings import Settings
from worker.store import calls
from worker.store.connection import describe_client

# After a finish that too few replicas acknowledged, finishes stop waiting for this long
# (workers keep delivering while a replica is down; docs/design.md §8).
UNREPLICATED_BACKOFF_S = 10.0


@dataclass(frozen=True, slots=True)
class ReplicaAcks:
    """How many replicas must have a write (0: do not wait), how long one WAIT may block,
    and how long a caller keeps trying before it gives up."""

    replicas: int = 0
    timeout_s: float = 1.0
    budget_s: float = 5.0

    @property
    def wait(self) -> tuple[str, int, int]:
        # never WAIT n 0: a zero timeout blocks forever
        return ("WAIT", self.replicas, max(1, round(self.timeout_s * 1000)))


def replica_acks(settings: Settings, budget_s: float) -> ReplicaAcks:
    """``redis.min_replicas_ack`` as the ledger takes it; ``budget_s``: how long the caller
    keeps trying before a shortfall is an error (a producer's ``connect_retry_s``)."""
    return ReplicaAcks(
        settings.min_replicas_ack, settings.replica_ack_timeout_s, budget_s=max(0.0, budget_s)
    )


def _pipeline(
    pipe: Any, script: Any, keys: Sequence[Any], args: Sequence[Any], *, marker: str,
    acks: ReplicaAcks,
) -> None:  # fmt: skip
    pipe.evalsha(script.sha, len(keys), *keys, *args)
    pipe.set(marker, b"1")
    pipe.execute_command(*acks.wait)


def run_once(
    client: redis.Redis,
    script: Any,
    keys: Sequence[Any],
    args: Sequence[Any],
    *,
    marker: str,
    acks: ReplicaAcks,
) -> tuple[Any, int]:
    """Run ``script`` then WAIT, in one round trip on one connection: (its reply, how many
    replicas acknowledged). Loads the script first where the server lacks it (a newly
    promoted primary's script cache starts empty)."""
    for loaded in (False, True):
        pipe = client.pipeline(transaction=False)
        _pipeline(pipe, script, keys, args, marker=marker, acks=acks)
        try:
            reply, _, count = pipe.execute()
        except redis.exceptions.NoScriptError:
            if loaded:
                raise
            client.script_load(script.script)
            continue
        return reply, int(count)
    raise AssertionError("unreachable")  # pragma: no cover


async def run_once_async(
    client: redis.asyncio.Redis,
    script: Any,
    keys: Sequence[Any],
    args: Sequence[Any],
    *,
    marker: str,
    acks: ReplicaAcks,
) -> tuple[Any, int]:
    """:func:`run_once` for the intake's asyncio client."""
    for loaded in (False, True):
        pipe = client.pipeline(transaction=False)
        _pipeline(pipe, script, keys, args, marker=marker, acks=acks)
        try:
            reply, _, count = await pipe.execute()
        except redis.exceptions.NoScriptError:
            if loaded:
                raise
            await client.script_load(script.script)
            continue
        return reply, int(count)
    raise AssertionError("unreachable")  # pragma: no cover


def shortfall(acks: ReplicaAcks, count: int, where: str, doing: str) -> StoreUnreplicatedError:
    """The error for a write that fewer than ``acks.replicas`` replicas acknowledged: the
    primary has it, so it may still be delivered (an unknown outcome, not a failure)."""
    return StoreUnreplicatedError(
        f"{doing}: the write reached the Redis primary{where} but only {count} of "
        f"{acks.replicas} replica(s) acknowledged it within {acks.budget_s:g} s "
        f"(redis.min_replicas_ack = {acks.replicas}), so it could be lost in a failover; it "
        "may still be delivered. Retrying through report-forwarder is safe (it "
        "deduplicates), sending it elsewhere is not; check the replicas (INFO replication)"
    )


def either(first: list[int], again: list[int]) -> list[int]:
    """An enqueue's flags over its runs: queued if any run queued the report (a re-run
    answers as the first did, by its token, unless a failover lost the first)."""
    return [max(a, b) for a, b in zip(first, again, strict=True)]


def until_acked(
    attempt: Callable[[], tuple[Any, int]],
    acks: ReplicaAcks,
    merge: Callable[[Any, Any], Any] = lambda first, _: first,
) -> tuple[Any, int]:
    """Call ``attempt`` until ``acks.replicas`` replicas acknowledge it or ``acks.budget_s``
    has passed (at least once): (the replies merged by ``merge``, the last count)."""
    deadline = time.monotonic() + acks.budget_s
    reply, count = attempt()
    delay = 0.05
    while count < acks.replicas and time.monotonic() + delay < deadline:
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
        again, count = attempt()
        reply = merge(reply, again)
    return reply, count


async def enqueue_acked_async(
    client: redis.asyncio.Redis,
    script: Any,
    args: Sequence[Any],
    *,
    marker: str,
    acks: ReplicaAcks,
    budget_s: float,
    parse: Callable[[Any], list[int]],
) -> list[int]:
    """The intake's enqueue: :func:`run_once_async` until ``acks.replicas`` replicas have
    it or ``budget_s`` has passed (flags merged by :func:`either`); StoreUnreplicatedError
    (an unknown outcome: the primary has the write) after that."""
    deadline = time.monotonic() + budget_s
    reply, count = await run_once_async(client, script, (), args, marker=marker, acks=acks)
    flags = parse(reply)
    delay = 0.05
    while count < acks.replicas and time.monotonic() + delay < deadline:
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)
        try:
            reply, again = await run_once_async(client, script, (), args, marker=marker, acks=acks)
        except (redis.RedisError, OSError, TimeoutError, ForwarderError) as exc:
            # the first run was answered: the primary has the write (it may be delivered)
            raise shortfall(acks, count, "", "enqueue not confirmed") from exc
        count = again
        flags = either(flags, parse(reply))
    if count < acks.replicas:
        raise shortfall(acks, count, "", "enqueue not confirmed")
    return flags


class Waiter:
    """A client's scripts followed by WAIT, under ``acks``: what the ledger's enqueue and
    finish run when they must wait for replicas (docs/design.md §8)."""

    def __init__(
        self,
        client: redis.Redis,
        marker: str,
        acks: ReplicaAcks | None = None,
        on_unreplicated: Callable[[str, int], None] | None = None,
    ) -> None:
        self.client = client
        self.marker = marker
        self.acks = acks or ReplicaAcks()
        self.on_unreplicated = on_unreplicated
        self._briefly_until = 0.0  # finishes wait again after this (monotonic)

    def _attempt(
        self, script: Any, args: Sequence[Any], keys: Sequence[str]
    ) -> Callable[[], tuple[Any, int]]:
        def attempt() -> tuple[Any, int]:
            return calls.call(
                run_once, self.client, script, keys, args, marker=self.marker, acks=self.acks,
                on=self.client,
            )  # fmt: skip

        return attempt

    def enqueue(
        self, script: Any, args: Sequence[Any], parse: Callable[[Any], list[int]]
    ) -> list[int]:
        """Run the enqueue until enough replicas have it, for ``acks.budget_s``;
        StoreUnreplicatedError (naming the Redis) after that."""
        attempt = self._attempt(script, args, ())
        where = f" at {describe_client(self.client)}"
        counts: list[int] = []  # of the runs Redis answered

        def flagged() -> tuple[list[int], int]:
            try:
                reply, count = attempt()
            except ForwarderError as exc:
                if not counts:
                    raise
                # an earlier run was answered: the primary has the write, whatever this
                # run's failure says (unreachable now, it may still be delivered)
                raise shortfall(self.acks, max(counts), where, "enqueue not confirmed") from exc
            counts.append(count)
            return parse(reply), count

        flags, count = until_acked(flagged, self.acks, merge=either)
        if count < self.acks.replicas:
            raise shortfall(self.acks, count, where, "enqueue not confirmed")
        return list(flags)

    def finish(self, script: Any, args: Sequence[Any], keys: Sequence[str]) -> Any:
        """Run a finish and wait a few WAIT timeouts at most until enough replicas have
        the outcome, so that a failover cannot undo it and send the report again. If they
        do not answer, the outcome stands on the primary (the report was sent: nothing can
        undo that), ``on_unreplicated`` is told, and finishes stop waiting for
        ``UNREPLICATED_BACKOFF_S``: a lost replica slows no report for long."""
        if time.monotonic() < self._briefly_until:
            return calls.call(script, keys=keys, args=args, on=self.client)
        patience = ReplicaAcks(
            self.acks.replicas, self.acks.timeout_s, budget_s=2 * self.acks.timeout_s
        )
        reply, count = until_acked(self._attempt(script, args, keys), patience)
        if count < self.acks.replicas:
            self._briefly_until = time.monotonic() + UNREPLICATED_BACKOFF_S
            if self.on_unreplicated is not None:
                self.on_unreplicated("finish", count)
        return reply
