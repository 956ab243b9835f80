"""report-forwarder: forwards "this solved captcha was wrong" reports to the captcha API.

Producers call :func:`enqueue_report` / :func:`enqueue_reports`; Celery workers
(``report-forwarder worker``) deliver each report within the account's rate limit,
retrying what can be retried and dead-lettering what cannot.
"""

from __future__ import annotations

__version__ = "0.1.0"

from worker.errors import (
    AccountFaultError,
    ConfigError,
    ForwarderError,
    PermanentUpstreamError,
    ReportError,
    StoreError,
    StoreFullError,
    StoreOutcomeUnknownError,
    StoreUnreachableError,
    StoreUnreplicatedError,
    TransientUpstreamError,
    UpstreamError,
)
from worker.producer import BulkResult, Producer, Refused, enqueue_report, enqueue_reports

__all__ = [
    "AccountFaultError",
    "BulkResult",
    "ConfigError",
    "ForwarderError",
    "PermanentUpstreamError",
    "Producer",
    "Refused",
    "ReportError",
    "StoreError",
    "StoreFullError",
    "StoreOutcomeUnknownError",
    "StoreUnreachableError",
    "StoreUnreplicatedError",
    "TransientUpstreamError",
    "UpstreamError",
    "__version__",
    "enqueue_report",
    "enqueue_reports",
]
