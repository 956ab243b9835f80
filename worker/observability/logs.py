"""Logging: one structlog chain for our lines and for Celery's and redis-py's records.

JSON lines when stdout is not a terminal (production), key=value on a terminal; forced by
``REPORT_FORWARDER_LOG_FORMAT``. Event names are ``noun.past_verb`` with stable keys
(docs/logging.md). A redaction processor masks any configured API key that reaches a line,
in any letter case, as a second line of defence (keys are never logged on purpose).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import structlog

from worker.settings.quoting import printable

REDACTED = "****"
_FOREIGN_LEVEL = logging.WARNING


class _Secrets:
    """The registered secrets and one pattern that masks them all, rebuilt on each
    registration and swapped in whole, so the processor reads it without the lock."""

    def __init__(self) -> None:
        self.values: frozenset[str] = frozenset()
        self.masker: re.Pattern[str] | None = None
        self._lock = threading.Lock()

    def add(self, value: str) -> None:
        with self._lock:
            if value not in self.values:
                self.values |= {value}
                self.masker = _case_blind(self.values)


_registry = _Secrets()


def register_secret(value: str | None) -> None:
    """Mask ``value`` wherever it would appear in a log line from now on, in any letter
    case (``ABC-KEY`` and ``abc-Key`` are masked for ``abc-key``)."""
    if value and len(value) >= 4:
        _registry.add(value)


def _case_blind(secrets: frozenset[str]) -> re.Pattern[str]:
    """One pattern matching each of ``secrets`` in any letter case, also inside JSON text.
    The whole-string upper, lower and case-folded forms are listed too: for a few letters
    (``ß`` -> ``SS``) they differ in length, which a case-insensitive match alone misses."""
    forms = {f for s in secrets for f in (s, s.upper(), s.lower(), s.casefold())}
    forms |= {json.dumps(f)[1:-1] for f in forms}  # as a JSON string holds it
    ordered = sorted(forms, key=len, reverse=True)  # the longest wins where two overlap
    return re.compile("|".join(map(re.escape, ordered)), re.IGNORECASE)


def mask_secrets(text: str) -> str:
    """``text`` with every registered secret masked as in log lines (any letter case, also
    as a JSON string holds it): for answers that quote what a client sent."""
    masker = _registry.masker
    return text if masker is None else masker.sub(REDACTED, text)


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: replace registered secrets, in any letter case, inside any
    string value."""
    masker = _registry.masker
    if masker is None:
        return event
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = masker.sub(REDACTED, value)
    return event


def _renderer(fmt: str, stream: Any) -> Any:
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    if fmt == "console":
        console = structlog.dev.ConsoleRenderer(colors=stream.isatty(), sort_keys=False)
        return lambda logger, method, event: console(logger, method, _printable(event))
    return structlog.processors.JSONRenderer()  # json.dumps escapes what is not printable


def _printable(event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The console's key=value text writes strings raw: a control character an API put in
    an error code would reach the terminal. Escaped as the JSON lines escape it (a
    traceback's line breaks kept)."""
    for key, value in event.items():
        if isinstance(value, str) and not value.isprintable():
            if key in ("exception", "stack"):
                event[key] = "\n".join(map(printable, value.split("\n")))
            else:
                event[key] = printable(value)
    return event


class _Lines:
    """Where our lines go: written and flushed one by one, except on a thread inside
    :func:`together`, whose lines wait and go out in one write when it ends."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self._local = threading.local()

    def write(self, text: str) -> None:
        waiting = getattr(self._local, "waiting", None)
        if waiting is None:
            self.stream.write(text)
        else:
            waiting.append(text)

    def flush(self) -> None:
        if getattr(self._local, "waiting", None) is None:
            self.stream.flush()

    @contextmanager
    def together(self) -> Iterator[None]:
        if getattr(self._local, "waiting", None) is not None:  # nested: the outer one writes
            yield
            return
        self._local.waiting = []
        try:
            yield
        finally:
            text = "".join(self._local.waiting)
            self._local.waiting = None
            if text:
                self.stream.write(text)
                self.stream.flush()


_lines = _Lines(sys.stdout)  # its stream is set by configure()


@contextmanager
def together() -> Iterator[None]:
    """This thread's lines in the block written at its end, in one write: a batch's
    outcome lines cost one system call, not one each (docs/design.md §3.4)."""
    with _lines.together():
        yield


def configure(
    fmt: str = "auto", level: str = "INFO", *, stream: Any = None, cache: bool = True
) -> None:
    """Our lines: structlog's own fast path (a level-filtering logger writing rendered lines
    to ``stream``). Everyone else's stdlib records (Celery, kombu, redis-py, warnings): the
    root logger, rendered by the same processors, so every line has one format."""
    stream = stream or sys.stdout
    renderer = _renderer(fmt, stream)
    _lines.stream = stream
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _logger_key,
            stamp,
            redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        logger_factory=structlog.WriteLoggerFactory(file=_lines),  # type: ignore[arg-type]
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        cache_logger_on_first_use=cache,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            stamp,
            redact,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
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
    logging.getLogger("worker").setLevel(level.upper())  # for LibraryLogger.debug_enabled
    for name in ("celery", "kombu", "redis", "urllib3", "amqp"):
        logging.getLogger(name).setLevel(_FOREIGN_LEVEL)


def get_logger(name: str) -> Any:
    """A structlog logger whose lines carry ``logger=name``."""
    return structlog.get_logger(logger_name=name)


def _logger_key(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Any:
    """``logger_name`` (bound by :func:`get_logger`) is rendered as ``logger``, like the
    stdlib records' key."""
    if "logger_name" in event:
        event["logger"] = event.pop("logger_name")
    return event


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
