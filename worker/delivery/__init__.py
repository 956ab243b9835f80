"""Delivery layer: what a worker process does with each report.

Owns the per-report runtime (claim, guard, rate limit, POST, classify, record), the
heartbeat and the sweeper beside it, the retry policy, the upstream HTTP call and its
classification, and the Celery app and task — the only place Celery is imported (besides
the demo).

May import: ``worker.observability``, ``worker.store``, ``worker.settings``,
``worker.errors``. Never ``worker.intake`` or ``worker.cli``.
"""
