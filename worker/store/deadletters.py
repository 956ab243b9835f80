"""Dead letters: list, show, replay, purge, export.

Dead letters live in a Redis stream (``{p}:dead``), capped in length and age; each entry
holds what an operator needs to decide — taskId, type, kind, account, reason, error code,
HTTP status, attempts, enqueue and failure times, the last error — and never a key. The
stream id (``1764460800000-0``) is the dead letter's id. Replay goes through the normal
enqueue path (validation, dedup, a fresh deadline) and removes the entry in the same
atomic step, so a replayed report is never both queued and dead, nor lost between.

An entry is read as a current worker writes it (docs/design.md §1.1), whatever an older
one wrote: its error_code one of the bounded set (:func:`~worker.store.vocabulary.
known_code`, the providers' own codes included) or ``other`` — an older worker's raw API
code, 900 KB or holding the key, is not decoded; it is still readable, as the worker cut
it, at the head of ``error`` — and every text at most ``MAX_ERROR_CHARS`` characters.
list, show and export all read entries so: export stays faithful (every field, every
known code as stored) and bounded.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import redis

from worker.errors import ReportError
from worker.settings import abbreviate
from worker.store import vocabulary
from worker.store.keys import Keys
from worker.store.ledger import Ledger

REASONS = vocabulary.REASONS
MAX_TEXT_CHARS = vocabulary.MAX_ERROR_CHARS  # any text field of an entry, as read
_CODE_BYTES = 256  # a known code is a few dozen: a longer one is an older worker's raw code
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_ID = re.compile(r"^([0-9]{1,20})-([0-9]{1,20})$")
_MAX_ID_PART = 2**64 - 1  # a stream id is two unsigned 64-bit numbers
_PAGE = 500


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    task_id: int
    captcha_type: str
    kind: str
    account: str
    reason: str
    error_code: str | None
    http_status: int | None
    attempts: int
    deliveries: int
    enqueued_at: float | None
    failed_at: float | None
    error: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Filters:
    reason: str | None = None
    captcha_type: str | None = None
    account: str | None = None
    since_s: float | None = None

    def match(self, letter: DeadLetter) -> bool:
        return (
            (self.reason is None or letter.reason == self.reason)
            and (
                self.captcha_type is None
                or letter.captcha_type.lower() == self.captcha_type.lower()
                or letter.kind == self.captcha_type.lower()
            )
            and (self.account is None or letter.account == self.account)
        )

    @property
    def empty(self) -> bool:
        return self == Filters()


def parse_age(text: str) -> float:
    """'90', '90s', '15m', '2h', '1d', '1w' -> seconds (an age beyond the epoch means every
    dead letter); ReportError otherwise."""
    match = _AGE.match(text or "")
    if match is None:
        raise ReportError(f"invalid age {abbreviate(text)}: expected e.g. 90s, 15m, 2h, 1d or 1w")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def check_id(entry_id: str) -> str:
    """A dead letter's id as the stream spells it (``1764460800000-0``); ReportError otherwise."""
    match = _ID.match(entry_id)
    if match is None or max(int(match.group(1)), int(match.group(2))) > _MAX_ID_PART:
        raise ReportError(
            f"invalid dead-letter id {abbreviate(entry_id)}: expected e.g. 1764460800000-0"
        )
    return entry_id


def check_reason(reason: str | None) -> str | None:
    if reason is not None and reason not in REASONS:
        raise ReportError(f"unknown reason {abbreviate(reason)}; reasons are: {', '.join(REASONS)}")
    return reason


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _text(raw: bytes) -> str:
    """A field's text, at most ``MAX_TEXT_CHARS`` characters, decoded no further; bytes
    that are not UTF-8 (an API's, stored by an older worker) shown as \\xNN."""
    return raw[: 4 * MAX_TEXT_CHARS].decode("utf-8", "backslashreplace")[:MAX_TEXT_CHARS]


def _code(raw: bytes | None, codes: Collection[str]) -> str | None:
    """A stored error code as read: a known one, else ``other`` (not decoded if long)."""
    if not raw:
        return None
    code = raw.decode("utf-8", "replace") if len(raw) <= _CODE_BYTES else vocabulary.OTHER
    return code if vocabulary.known_code(code, codes) else vocabulary.OTHER


def _decode(entry_id: Any, fields: dict[Any, Any], codes: Collection[str] = ()) -> DeadLetter:
    f = {k.decode(): _text(v) for k, v in fields.items() if k != b"error_code"}

    def number(name: str) -> float | None:
        return float(f[name]) if f.get(name) else None

    return DeadLetter(
        id=entry_id.decode(),
        task_id=int(f.get("task_id", 0)),
        captcha_type=f.get("captcha_type", ""),
        kind=f.get("kind", ""),
        account=f.get("account", ""),
        reason=f.get("reason", ""),
        error_code=_code(fields.get(b"error_code"), codes),
        http_status=int(f["http_status"]) if f.get("http_status") else None,
        attempts=int(f.get("attempts") or 0),
        deliveries=int(f.get("deliveries") or 0),
        enqueued_at=number("enqueued_at"),
        failed_at=number("failed_at"),
        error=f.get("error", ""),
    )


class DeadLetters:
    """The dead-letter stream. ``codes``: the providers' own error codes (known codes,
    read as stored; :func:`~worker.store.vocabulary.provider_codes`)."""

    def __init__(self, client: redis.Redis, keys: Keys, codes: Collection[str] = ()) -> None:
        self.client = client
        self.keys = keys
        self.key = keys.dead
        self.codes = frozenset(codes)

    def count(self) -> int:
        return int(self.client.xlen(self.key))

    def iter(
        self, filters: Filters = Filters(), *, newest_first: bool = True
    ) -> Iterator[DeadLetter]:
        """Matching dead letters, newest first, paging through the stream."""
        low = "-"
        now = time.time()
        if filters.since_s is not None and filters.since_s < now:
            low = f"{int((now - filters.since_s) * 1000)}-0"
        high = "+"
        while True:
            page: Any
            if newest_first:
                page = self.client.xrevrange(self.key, max=high, min=low, count=_PAGE)
            else:
                page = self.client.xrange(self.key, min=low, max=high, count=_PAGE)
            for entry_id, fields in page:
                letter = _decode(entry_id, fields, self.codes)
                if filters.match(letter):
                    yield letter
            if len(page) < _PAGE:
                return
            last = page[-1][0].decode()
            if newest_first:
                high = "(" + last
            else:
                low = "(" + last

    def latest(self, filters: Filters = Filters(), limit: int | None = 100) -> list[DeadLetter]:
        """Up to ``limit`` matching dead letters, newest first."""
        out = []
        for letter in self.iter(filters):
            out.append(letter)
            if limit is not None and len(out) >= limit:
                break
        return out

    def get(self, entry_id: str) -> DeadLetter | None:
        check_id(entry_id)
        page: Any = self.client.xrange(self.key, min=entry_id, max=entry_id, count=1)
        return _decode(page[0][0], page[0][1], self.codes) if page else None

    def select(self, ids: Sequence[str], filters: Filters, everything: bool) -> list[DeadLetter]:
        """The dead letters a replay or purge acts on: ids, or filters, or ``everything``."""
        if ids:
            found = [self.get(entry_id) for entry_id in ids]
            missing = [i for i, letter in zip(ids, found, strict=True) if letter is None]
            if missing:
                more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
                raise ReportError(f"no dead letter with id {', '.join(missing[:20])}{more}")
            return [letter for letter in found if letter is not None]
        if filters.empty and not everything:
            raise ReportError(
                "say which dead letters: IDs, filters (--reason, --type, ...) or --all"
            )
        return list(self.iter(filters, newest_first=False))

    def by_reason(self) -> dict[str, int]:
        """Dead letters in the stream per reason."""
        counts: dict[Any, Any] = self.client.hgetall(self.keys.deadcount)
        return {_str(k): int(v) for k, v in counts.items() if int(v) > 0}

    def purge(self, ledger: Ledger, letters: Sequence[DeadLetter]) -> int:
        return ledger.drop_dead([letter.id for letter in letters])
