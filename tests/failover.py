"""One failover, and the reports in flight at it, for the Sentinel test and the crash
harness: a report may reach the API twice only if it was in flight when the primary
died (docs/design.md §8), so the bound is the set of those reports, read exactly."""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from worker.store.keys import Keys
from worker.testing.processes import RedisProcess, SentinelCluster

from .redis_bytes import as_bytes


@dataclass(frozen=True)
class Failover:
    old: RedisProcess
    new: RedisProcess
    seconds: float  # SIGKILL → a majority of the Sentinels name the new primary
    in_flight: frozenset[str]  # refs ("account:taskId") leased at the kill


def fail_over(cluster: SentinelCluster, keys: Keys, lease_s: float) -> Failover:
    """SIGKILL the primary and wait for the Sentinels to promote a replica.

    In flight at the kill: every report the dying primary held leased (read with its
    writes paused, so no claim slips in between), and every report the promoted replica
    holds leased by a claim made before the kill — a finish the primary had and no
    replica got leaves its lease standing there. A lease's score is its claim's time
    plus ``lease_s``."""

    def leased(primary: redis.Redis) -> set[str]:
        return {as_bytes(ref).decode() for ref in primary.zrange(keys.leases, 0, -1)}

    old, held = cluster.kill_primary(leased)
    killed_at, began = time.time(), time.monotonic()
    new = cluster.wait_for_new_primary(old.port, timeout_s=60)
    seconds = time.monotonic() - began
    promoted = redis.Redis(port=new.port, socket_timeout=5)
    try:
        survived = promoted.zrangebyscore(keys.leases, "-inf", killed_at + lease_s)
    finally:
        promoted.close()
    held |= {as_bytes(ref).decode() for ref in survived}
    return Failover(old, new, seconds, frozenset(held))
