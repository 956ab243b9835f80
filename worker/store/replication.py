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

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio

from worker.errors import StoreUnreplicatedError


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
    """The error for a write that fewer than ``acks.replicas`` replicas acknowledged."""
    return StoreUnreplicatedError(
        f"{doing}: the write reached the Redis primary{where} but only {count} of "
        f"{acks.replicas} replica(s) acknowledged it within {acks.budget_s:g} s "
        f"(redis.min_replicas_ack = {acks.replicas}); it could be lost in a failover, so it "
        "is not reported as done. Retry; check the replicas (INFO replication)"
    )


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
