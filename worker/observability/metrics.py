"""Prometheus metrics: counters and histograms of this process's outcomes, and gauges of
the whole fleet's backlog read from Redis at scrape time.

Each worker serves ``/metrics`` (and its health probes, ``/healthz`` and ``/readyz``)
when given a port (``worker --metrics-port`` or ``REPORT_FORWARDER_WORKER_METRICS_PORT``);
``rate(report_forwarder_reports_total[1m])`` summed over workers is the fleet's throughput.
Labels stay few and bounded: outcome, kind, error code, account — never a task id.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from worker.settings import Settings

if TYPE_CHECKING:
    from worker.observability.health import Probes

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0)
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                 120.0, 300.0)  # fmt: skip


class Metrics:
    """This process's metrics, in their own registry (tests read values from it)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.reports = Counter(
            "report_forwarder_reports",
            "Reports by outcome: accepted, retrying, or the dead-letter reason.",
            ["outcome", "kind", "error_code"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "report_forwarder_request_seconds",
            "Duration of each POST to the captcha API.",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "report_forwarder_queue_seconds",
            "Time a report waited in the queue before a worker took it.",
            buckets=_WAIT_BUCKETS,
            registry=self.registry,
        )
        self.ratelimit_wait_seconds = Histogram(
            "report_forwarder_ratelimit_wait_seconds",
            "Time a report waited for its account's rate limiter.",
            ["account"],
            buckets=_WAIT_BUCKETS,
            registry=self.registry,
        )

        self.recovered = Counter(
            "report_forwarder_recovered",
            "Reports the sweeper put back in flight, by why (worker lost mid-flight, worker "
            "lost, message orphaned, lease expired).",
            ["why"],
            registry=self.registry,
        )

    def outcome(self, outcome: str, kind: str, error_code: str | None) -> None:
        self.reports.labels(outcome, kind or "", error_code or "").inc()

    def watch(self, client: redis.Redis, settings: Settings) -> None:
        """Add the fleet-wide gauges, read from Redis at each scrape."""
        self.registry.register(_FleetCollector(client, settings))

    def serve(
        self,
        port: int,
        addr: str = "0.0.0.0",  # noqa: S104 - scraped from outside
        probes: Probes | None = None,
    ) -> Any:
        """Serve ``/metrics`` on ``port`` from a daemon thread, and with ``probes`` also
        ``/healthz`` and ``/readyz`` (:mod:`worker.observability.serving`). Returns the
        server and its thread."""
        from worker.observability.serving import serve

        return serve(port, addr, self.registry, probes)


class _FleetCollector(Collector):
    """Gauges every worker agrees on: backlog, oldest queued age, dead letters, pauses."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from worker.observability.stats import snapshot

        up = GaugeMetricFamily("report_forwarder_redis_up", "Whether Redis answered the scrape.")
        try:
            snap = snapshot(self.client, self.settings)
        except redis.RedisError:
            logging.getLogger("worker.metrics").warning("metrics: Redis unreachable at scrape")
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        backlog = snap["backlog"]
        for name, key, text in (
            ("report_forwarder_queue_depth", "queue_depth", "Messages waiting in the queue."),
            ("report_forwarder_pending_reports", "pending_reports",
             "Reports queued and not yet at a terminal outcome (queued, in flight, waiting)."),
            ("report_forwarder_waiting_retry_reports", "waiting_retry",
             "Reports waiting for a retry or their rate-limit slot."),
            ("report_forwarder_orphaned_reports", "orphaned",
             "Pending reports whose message is in no queue and held by no live worker (the "
             "sweeper hands them on after a grace period; above 0 for long: see the runbook)."),
        ):  # fmt: skip
            gauge = GaugeMetricFamily(name, text)
            gauge.add_metric([], backlog[key])
            yield gauge
        workers = GaugeMetricFamily(
            "report_forwarder_workers", "Worker processes with a live heartbeat (fleet-wide)."
        )
        workers.add_metric([], snap["workers"])
        yield workers
        oldest = GaugeMetricFamily(
            "report_forwarder_oldest_queued_age_seconds", "Age of the oldest queued message."
        )
        oldest.add_metric([], backlog["oldest_queued_age_s"] or 0.0)
        yield oldest
        dead = GaugeMetricFamily(
            "report_forwarder_dead_letters", "Dead letters held, by reason.", labels=["reason"]
        )
        for reason, count in snap["dead_letters"]["by_reason"].items():
            dead.add_metric([reason], count)
        yield dead
        paused = GaugeMetricFamily("report_forwarder_paused_accounts", "Accounts paused now.")
        paused.add_metric([], len(snap["paused_accounts"]))
        yield paused
        usage = GaugeMetricFamily(
            "report_forwarder_ratelimit_usage_ratio",
            "Share of the account's rate limit used in the last window.",
            labels=["account"],
        )
        for account, info in snap["accounts"].items():
            usage.add_metric([account], info["usage"])
        yield usage
