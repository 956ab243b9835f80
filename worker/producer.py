"""Validate, dedup and enqueue reports: one Redis round trip per report, or per chunk in bulk.

Nothing invalid is queued: a bad taskId, an unknown captchaType, an unknown account, or a
type the account's provider cannot report is refused with a :class:`ReportError` naming
what was wrong and what is accepted. A report already pending or accepted for the same
(account, taskId) is a ``duplicate``: not an error, and not queued twice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import redis

from worker.errors import ForwarderError, ReportError, StoreOutcomeUnknownError
from worker.observability.logs import LibraryLogger
from worker.settings import Settings, abbreviate, load_settings
from worker.store import connection as store
from worker.store.deadletters import DeadLetter
from worker.store.keys import Keys
from worker.store.ledger import Ledger
from worker.store.replication import replica_acks
from worker.store.vocabulary import EnqueueRow

log = LibraryLogger("worker.producer")

Result = Literal["queued", "duplicate"]
MAX_TASK_ID = 2**63 - 1
_MAX_DIGITS = len(str(MAX_TASK_ID))
MAX_ERROR_CHARS = 2000  # a refusal's message is cut here (it may quote a huge input)
CHUNK = 1000
# Reports per Celery message on the bulk path: Celery's per-task cost (about a millisecond
# of CPU) is paid once for them; each report keeps its own claim, outcome and log line.
BULK_PER_MESSAGE = 20


@dataclass(frozen=True, slots=True)
class Refused:
    """A bulk item that was not queued, with its position (0-based) and the reason."""

    index: int
    error: str


@dataclass(slots=True)
class BulkResult:
    queued: int = 0
    duplicates: int = 0
    refused: list[Refused] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.refused


def parse_task_id(value: object) -> int:
    """A positive integer taskId from an int or a string of ASCII digits; ReportError for
    anything else (bool, float, bytes, a negative or huge number, a nested value...)."""
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        digits = value.strip()
        if digits.isascii() and digits.isdigit():
            significant = digits.lstrip("0") or "0"
            # never int() a string beyond the range: Python refuses 4,300+ digits (ValueError)
            if len(significant) <= _MAX_DIGITS:
                number = int(significant)
    if number is None or not 0 < number <= MAX_TASK_ID:
        raise ReportError(
            f"invalid taskId {abbreviate(value)}: expected a positive integer (1 to {MAX_TASK_ID})"
        )
    return number


def validate(
    settings: Settings,
    task_id: object,
    captcha_type: object,
    account: object = "default",
    dead_id: str = "",
) -> EnqueueRow:
    """One report as the ledger's enqueue row, or :class:`ReportError` naming what is wrong."""
    number = parse_task_id(task_id)
    acct_name, type_name, kind, deadline_s = resolve(settings, captcha_type, account)
    deadline = time.time() + deadline_s
    return EnqueueRow(acct_name, number, type_name, kind, f"{deadline:.3f}", dead_id)


def resolve(
    settings: Settings, captcha_type: object, account: object
) -> tuple[str, str, str, float]:
    """(account, canonical type, kind, deadline seconds) of a report, or ReportError (also
    for a type the account's provider cannot report)."""
    ctype = settings.captcha_types.resolve(captcha_type)
    acct = settings.account(account)
    acct.endpoint_for(ctype)
    return acct.name, ctype.name, ctype.kind, acct.deadline_s


def fields(item: Any) -> tuple[object, object, object]:
    """(task_id, captcha_type, account) of a bulk item; ReportError if it has none."""
    return _fields(item)


def refusal_reason(settings: Settings, item: Any) -> str:
    """A short, stable label for why a bulk item is refused (counts by reason), following
    the order of :func:`validate`: not a report, taskId, type, account, endpoint."""
    try:
        task_id, ctype, account = _fields(item)
    except ReportError:
        return "not a report (missing taskId or captchaType)"
    checks: tuple[tuple[str, Callable[[], object]], ...] = (
        ("invalid taskId", lambda: parse_task_id(task_id)),
        ("unknown captchaType", lambda: settings.captcha_types.resolve(ctype)),
        ("unknown account", lambda: settings.account(account)),
        ("captchaType not reportable on the account", lambda: resolve(settings, ctype, account)),
    )
    for label, check in checks:
        try:
            check()
        except ReportError:
            return label
    return "refused"


def short_error(exc: Exception) -> str:
    """The message of a refusal, cut to MAX_ERROR_CHARS."""
    text = str(exc)
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


class Producer:
    """Enqueues reports for one configuration. Thread-safe; reuse one per process."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        if client is None:
            # a producer waits for an unreachable Redis at most connect_retry_s, then raises
            url = store.resolve_url(settings)
            client = store.connect(url, retry_s=settings.connect_retry_s)
            self.redis = store.describe(url)
        else:
            self.redis = store.describe_client(client)
        self.client = client  # self.redis names it in messages, password masked
        self.ledger = Ledger(
            self.client,
            Keys(settings.key_prefix),
            settings.queue,
            dedup_ttl_s=settings.dedup_ttl_s,
            dead_max_entries=settings.dead_letter_max_entries,
            dead_max_age_s=settings.dead_letter_max_age_s,
            # a report is "queued" only once enough replicas have it (docs/design.md §8)
            acks=replica_acks(settings, settings.connect_retry_s),
        )

    def row(
        self, task_id: object, captcha_type: object, account: object = "default", dead_id: str = ""
    ) -> EnqueueRow:
        """Validate one report into the ledger's enqueue row; ReportError if invalid."""
        return validate(self.settings, task_id, captcha_type, account, dead_id)

    def row_maker(self) -> Callable[[object, object, object], EnqueueRow]:
        """``row`` for a bulk call: type and account resolved once per distinct pair, one
        clock reading for the whole call."""
        now = time.time()
        new_row: Callable[[type[EnqueueRow], tuple[Any, ...]], EnqueueRow] = tuple.__new__
        resolved: dict[tuple[object, object], tuple[str, str, str, float]] = {}
        settings = self.settings

        def make(task_id: object, captcha_type: object, account: object) -> EnqueueRow:
            key = (captcha_type, account)
            cacheable = isinstance(captcha_type, str) and isinstance(account, str)
            found = resolved.get(key) if cacheable else None
            if found is None:
                found = resolve(settings, captcha_type, account)
                if cacheable:
                    resolved[key] = found
            if type(task_id) is int and 0 < task_id <= MAX_TASK_ID:
                number = task_id
            else:
                number = parse_task_id(task_id)
            # tuple.__new__ directly: a third of EnqueueRow()'s cost, on the bulk hot path
            return new_row(
                EnqueueRow, (found[0], number, found[1], found[2], f"{now + found[3]:.3f}", "")
            )

        return make

    def enqueue(self, task_id: object, captcha_type: object, account: object = "default") -> Result:
        row = self.row(task_id, captcha_type, account)
        flags = self.enqueue_rows([row])
        return self._note(row, flags[0])

    def enqueue_many(
        self, items: Iterable[Any], *, chunk: int = CHUNK, per_message: int = BULK_PER_MESSAGE
    ) -> BulkResult:
        """Queue many reports: one round trip per ``chunk``, ``per_message`` reports per
        Celery message (so a worker pays Celery's per-task cost once for them; each report
        still has its own outcome, retry, dead letter and log line). Invalid items are
        refused (listed in the result with their index, and logged); valid ones are queued."""
        result = BulkResult()
        rows: list[EnqueueRow] = []
        rows_for = self.row_maker()
        for index, item in enumerate(items):
            try:
                rows.append(rows_for(*_fields(item)))
            except ReportError as exc:
                error = short_error(exc)
                result.refused.append(Refused(index, error))
                log.warning("report.refused", index=index, error=error)
                continue
            if len(rows) >= chunk:
                self._flush(rows, result, per_message)
                rows = []
        if rows:
            self._flush(rows, result, per_message)
        return result

    def _flush(self, rows: list[EnqueueRow], result: BulkResult, per_message: int) -> None:
        flags = self.enqueue_rows(rows, per_message)
        queued = sum(flags)
        result.queued += queued
        result.duplicates += len(flags) - queued
        if queued != len(flags) or log.debug_enabled():
            for row, flag in zip(rows, flags, strict=True):
                self._note(row, flag)

    def enqueue_rows(self, rows: Sequence[EnqueueRow], per_message: int = 1) -> list[int]:
        """Queue validated rows (:meth:`row`) in one round trip; one flag each (1 queued,
        0 duplicate). A Redis failure is a StoreError (or ConfigError) naming the Redis; a
        write that may have reached Redis unanswered, a StoreOutcomeUnknownError."""
        try:
            return self.ledger.enqueue(rows, per_message=per_message)
        except redis.RedisError as exc:
            raise store.translate(exc, self.redis, "could not enqueue") from exc
        except StoreOutcomeUnknownError:
            raise  # named by the ledger; translated again it would read "nothing accepted"
        except ForwarderError as exc:  # translated below us, without the address
            cause = exc.__cause__
            if not isinstance(cause, redis.RedisError) or self.redis in str(exc):
                raise
            raise store.translate(cause, self.redis, "could not enqueue") from cause

    @staticmethod
    def _note(row: EnqueueRow, flag: int) -> Result:
        fields = {
            "task_id": row.task_id,
            "captcha_type": row.captcha_type,
            "kind": row.kind,
            "account": row.account,
        }
        if flag:
            log.debug("report.enqueued", **fields)
            return "queued"
        log.info("report.duplicate", **fields)
        return "duplicate"


def _fields(item: Any) -> tuple[object, object, object]:
    """(task_id, captcha_type, account) from a mapping (``taskId``/``captchaType``/``account``,
    snake_case also accepted) or a 2- or 3-tuple."""
    if isinstance(item, Mapping):
        task_id = item.get("taskId", item.get("task_id"))
        ctype = item.get("captchaType", item.get("captcha_type"))
        account = item.get("account") or "default"
        if task_id is None or ctype is None:
            raise ReportError(
                f"missing {'taskId' if task_id is None else 'captchaType'}: expected "
                '{"taskId": <positive int>, "captchaType": <type>, "account": <name, optional>}'
            )
        return task_id, ctype, account
    if isinstance(item, tuple | list) and len(item) in (2, 3):
        return item[0], item[1], item[2] if len(item) == 3 else "default"
    raise ReportError(
        f"cannot read a report from {abbreviate(item)}: expected a mapping with taskId and "
        "captchaType or a (task_id, captcha_type[, account]) tuple"
    )


_default: Producer | None = None
_default_lock = threading.Lock()


def default_producer() -> Producer:
    """The process-wide producer, configured from the environment on first use."""
    global _default  # noqa: PLW0603 - one lazily built producer per process
    with _default_lock:
        if _default is None:
            _default = Producer(load_settings())
        return _default


def enqueue_report(task_id: int, captcha_type: str, account: str = "default") -> Result:
    """Queue one report; returns ``"queued"`` or ``"duplicate"``. ReportError if invalid."""
    return default_producer().enqueue(task_id, captcha_type, account)


def enqueue_reports(items: Iterable[Any], *, chunk: int = CHUNK) -> BulkResult:
    """Queue many reports (mappings or tuples), one Redis round trip per ``chunk``."""
    return default_producer().enqueue_many(items, chunk=chunk)


@dataclass(slots=True)
class ReplayResult:
    replayed: int = 0
    duplicates: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)  # (id, why kept)


def replay(producer: Producer, letters: Sequence[DeadLetter], chunk: int = 500) -> ReplayResult:
    """Queue ``letters`` again with a fresh deadline; each entry is removed as it is queued.
    A letter that no longer validates (type or account removed) stays, and is reported."""
    result = ReplayResult()
    rows = []
    for letter in letters:
        try:
            rows.append(
                producer.row(letter.task_id, letter.captcha_type, letter.account, letter.id)
            )
        except ReportError as exc:
            result.refused.append((letter.id, str(exc)))
    for start in range(0, len(rows), chunk):
        flags = producer.enqueue_rows(rows[start : start + chunk])
        result.replayed += sum(flags)
        result.duplicates += len(flags) - sum(flags)
    return result
