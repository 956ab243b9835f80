"""Outcome announcements: the delivery runtime says once what became of a report, and the
listeners here turn that into its log line and its metric updates (the shape of dramatiq's
middleware and its Prometheus middleware). Adding an exporter is one more listener: the
per-report code does not change.

Events (docs/logging.md): ``report.accepted``, ``report.retrying``,
``report.dead_lettered`` (with ``reason``), ``report.recovered`` (with ``why``). Their
fields are the stable log keys; the timings among them (``queue_ms``,
``ratelimit_wait_ms``, ``duration_ms``) feed the histograms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from worker.observability.logs import get_logger
from worker.observability.metrics import Metrics
from worker.store.vocabulary import Outcome

Listener = Callable[[str, Mapping[str, Any]], None]

_LEVELS = {
    "report.accepted": "info",
    "report.retrying": "info",
    "report.dead_lettered": "warning",
    "report.recovered": "warning",
}


class Announcer:
    """Hands each announcement to every listener, in order."""

    def __init__(self, listeners: Iterable[Listener]) -> None:
        self.listeners = list(listeners)

    def __call__(self, event: str, **fields: Any) -> None:
        for listener in self.listeners:
            listener(event, fields)


class LogLines:
    """One structured log line per announcement, at the event's level."""

    def __init__(self, logger_name: str = "worker.runtime") -> None:
        self.log = get_logger(logger_name)

    def __call__(self, event: str, fields: Mapping[str, Any]) -> None:
        getattr(self.log, _LEVELS.get(event, "info"))(event, **fields)


class MetricUpdates:
    """The Prometheus counters and histograms of this process, from the announcements."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def __call__(self, event: str, fields: Mapping[str, Any]) -> None:
        m = self.metrics
        kind = str(fields.get("kind") or "")
        if event == "report.recovered":
            m.recovered.labels(str(fields.get("why", ""))).inc()
            return
        if event == "report.accepted":  # a code only when a provider's code means done
            m.outcome(Outcome.ACCEPTED, kind, fields.get("error_code"))
        elif event == "report.retrying":
            m.outcome(Outcome.RETRYING, kind, fields.get("error_code"))
        elif event == "report.dead_lettered":
            m.outcome(str(fields.get("reason", "")), kind, fields.get("error_code"))
        if fields.get("queue_ms") is not None:
            m.queue_seconds.observe(float(fields["queue_ms"]) / 1000)
        if fields.get("ratelimit_wait_ms") is not None:
            m.ratelimit_wait_seconds.labels(str(fields.get("account", ""))).observe(
                float(fields["ratelimit_wait_ms"]) / 1000
            )
        if fields.get("duration_ms") is not None:
            m.request_seconds.labels(kind).observe(float(fields["duration_ms"]) / 1000)


def standard(metrics: Metrics) -> Announcer:
    """The runtime's announcer: log lines, then metrics."""
    return Announcer([LogLines(), MetricUpdates(metrics)])
