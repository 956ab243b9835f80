"""Logging: one structlog chain for our lines and for Celery's and redis-py's records.

JSON lines when stdout is not a terminal (production), key=value on a terminal; forced by
``REPORT_FORWARDER_LOG_FORMAT``. Event names are ``noun.past_verb`` with stable keys
(docs/logging.md). A redaction processor masks any configured API key that reaches a line,
as a second line of defence (keys are never logged on purpose).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import MutableMapping
from typing import Any

import structlog

_secrets: set[str] = set()
_lock = threading.Lock()
REDACTED = "****"
_FOREIGN_LEVEL = logging.WARNING


def register_secret(value: str | None) -> None:
    """Mask ``value`` wherever it would appear in a log line from now on."""
    if value and len(value) >= 4:
        with _lock:
            _secrets.add(value)


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: replace registered secrets inside any string value."""
    if not _secrets:
        return event
    for key, value in event.items():
        if isinstance(value, str):
            text = value
            for secret in _secrets:
                if secret in text:
                    text = text.replace(secret, REDACTED)
            event[key] = text
    return event


def _renderer(fmt: str, stream: Any) -> Any:
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    if fmt == "console":
        return structlog.dev.ConsoleRenderer(colors=stream.isatty(), sort_keys=False)
    return structlog.processors.JSONRenderer()


def configure(
    fmt: str = "auto", level: str = "INFO", *, stream: Any = None, cache: bool = True
) -> None:
    """Set up structlog and the stdlib root logger to render through one chain."""
    stream = stream or sys.stdout
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=cache,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _renderer(fmt, stream),
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.set_name("report-forwarder")
    root = logging.getLogger()
    for existing in list(root.handlers):
        if existing.get_name() == "report-forwarder":
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(_FOREIGN_LEVEL)
    logging.getLogger("worker").setLevel(level.upper())
    for name in ("celery", "kombu", "redis", "urllib3", "amqp"):
        logging.getLogger(name).setLevel(_FOREIGN_LEVEL)


def get_logger(name: str) -> Any:
    return structlog.stdlib.get_logger(name)


class _StdlibEvents:
    """``log.info("event", key=value)`` on a plain stdlib logger: what a library's lines
    should be when the host application has not configured structlog."""

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)

    def _log(self, level: int, event: str, **fields: Any) -> None:
        if self._logger.isEnabledFor(level):
            detail = " ".join(f"{k}={v!r}" for k, v in fields.items())
            self._logger.log(level, "%s %s", event, redact(None, "", {"x": detail})["x"])

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, **fields)


class LibraryLogger:
    """For code that also runs inside a producer's application (``worker.enqueue_*``):
    structlog when it is configured (our CLI and workers), else the stdlib ``logging``
    tree, so the host application's logging configuration decides what is shown."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._structlog = get_logger(name)
        self._stdlib = _StdlibEvents(name)

    def _target(self) -> Any:
        return self._structlog if structlog.is_configured() else self._stdlib

    def debug_enabled(self) -> bool:
        return logging.getLogger(self.name).isEnabledFor(logging.DEBUG)

    def debug(self, event: str, **fields: Any) -> None:
        self._target().debug(event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._target().info(event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._target().warning(event, **fields)
