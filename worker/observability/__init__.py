"""Observability layer: the log lines, the Prometheus metrics and the fleet-wide numbers
of ``stats``.

Owns the structlog chain (JSON or key=value, keys masked), the metric families and the
collector that reads the fleet's backlog from Redis at scrape time, and the ``stats``
snapshot. The delivery runtime announces each outcome; this layer turns it into a line and
counters.

May import: ``worker.store``, ``worker.settings``, ``worker.errors``.
"""
