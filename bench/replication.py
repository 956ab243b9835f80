"""What ``redis.min_replicas_ack = 1`` costs a producer (docs/design.md §8): enqueue
latency and bulk throughput with and without waiting for a replica, measured against the
same primary and replica in alternating rounds, so the machine's drift hits both alike.

A primary and one replica, both with AOF and ``appendfsync always`` (production
settings), on loopback. The only difference between the two producers is the setting.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from worker.producer import Producer
from worker.settings import load_settings
from worker.testing.processes import SentinelCluster, service_env


def _producer(url: str, home: Path, acks: int) -> Producer:
    env = service_env(
        REDIS_URL=url,
        REPORT_FORWARDER_HOME=str(home),
        REPORT_FORWARDER_MIN_REPLICAS_ACK=str(acks),
        CAPMONSTER_CLIENT_KEY="bench-replication",
    )
    return Producer(load_settings(environ=env))


def _single(producer: Producer, first: int, n: int) -> list[float]:
    took = []
    for task_id in range(first, first + n):
        t = time.perf_counter()
        producer.enqueue(task_id, "image")
        took.append(time.perf_counter() - t)
    return took


def _bulk(producer: Producer, first: int, n: int) -> float:
    items = [(task_id, "image") for task_id in range(first, first + n)]
    t = time.perf_counter()
    result = producer.enqueue_many(items)
    elapsed = time.perf_counter() - t
    assert result.queued == n
    return n / elapsed


def run(rounds: int = 3, single: int = 2000, bulk: int = 50_000) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="rf-repl-") as tmp:
        base = Path(tmp)
        cluster = SentinelCluster(base, replicas=1).start()
        try:
            primary = cluster.nodes[0]
            producers = {acks: _producer(primary.url, base / "home", acks) for acks in (0, 1)}
            sentinel_producer = _producer(cluster.url, base / "home", 1)
            lat: dict[int, list[float]] = {0: [], 1: []}
            rate: dict[int, list[float]] = {0: [], 1: []}
            via_sentinel: list[float] = []
            next_id = 1
            for _ in range(rounds):
                for acks in (0, 1):
                    lat[acks] += _single(producers[acks], next_id, single)
                    next_id += single
                    rate[acks].append(_bulk(producers[acks], next_id, bulk))
                    next_id += bulk
                    primary_client = producers[0].client
                    primary_client.flushdb()  # each round starts from the same size
                via_sentinel += _single(sentinel_producer, next_id, single)
                next_id += single
            for producer in (*producers.values(), sentinel_producer):
                producer.client.close()
        finally:
            cluster.stop()
    p50 = {acks: statistics.median(lat[acks]) for acks in (0, 1)}
    bulk_rate = {acks: statistics.median(rate[acks]) for acks in (0, 1)}
    return {
        "rounds": rounds,
        "enqueue_p50_us": {str(a): round(p50[a] * 1e6, 1) for a in (0, 1)},
        "enqueue_p50_ratio_ack1_to_ack0": round(p50[1] / p50[0], 2),
        "enqueue_p50_via_sentinel_ack1_us": round(statistics.median(via_sentinel) * 1e6, 1),
        "bulk_reports_per_s": {str(a): round(bulk_rate[a]) for a in (0, 1)},
        "bulk_ratio_ack1_to_ack0": round(bulk_rate[1] / bulk_rate[0], 3),
    }
