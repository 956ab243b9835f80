"""What the intake reads from a client, and every way it can be wrong.

Bodies are read within a size limit, decoded as JSON with guards for what a client can
send on purpose or by mistake — numbers of thousands of digits (Python's int conversion
limit would raise), nesting deep enough to exhaust the parser's recursion, bytes that are
not UTF-8 — and each is answered as the client's fault: a 4xx :class:`Refusal`, or one
refused item of a bulk request (:class:`ItemRefusal`, with a :class:`Reason`). No value a
client sent is ever put whole into an answer: descriptions show a bounded excerpt, with
every registered secret (the accounts' keys, the intake token) masked before it is cut,
so a client that sends its key as a taskId or a path is never shown the key.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from enum import StrEnum
from typing import Any
from urllib.parse import unquote, unquote_plus

from worker.errors import ForwarderError, ReportError
from worker.observability.logs import mask_secrets
from worker.producer import MAX_TASK_ID, fields, parse_task_id, validate
from worker.settings import Settings
from worker.store.vocabulary import EnqueueRow

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

MAX_NUMBER_DIGITS = 40  # a taskId has at most 19; longer numbers are never converted
MAX_SHOWN = 120  # characters of a client's value shown in an error description
JSON_TYPES = (b"application/json", b"application/x-ndjson", b"application/jsonl")


class Refusal(ForwarderError):
    """The whole request is refused: an ``errorId: 1`` answer with this status and code."""

    def __init__(self, status: int, code: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.code = code
        self.description = description


class ClientGoneError(ForwarderError):
    """The client closed the connection (or missed a deadline) before its body was in:
    raised by :func:`read_body`, answered with nothing by the intake's app."""


class Reason(StrEnum):
    """Why one item of a bulk request was refused."""

    INVALID_JSON = "invalid_json"
    INVALID_ITEM = "invalid_item"
    INVALID_TASK_ID = "invalid_task_id"
    UNKNOWN_CAPTCHA_TYPE = "unknown_captcha_type"
    UNKNOWN_ACCOUNT = "unknown_account"
    UNSUPPORTED_TYPE = "unsupported_type"


class ItemRefusal(ForwarderError):
    """One report is refused (the rest of its request is not)."""

    def __init__(self, reason: Reason, error: str) -> None:
        super().__init__(error)
        self.reason = reason
        self.error = error


class LongNumber:
    """A JSON number of more than ``MAX_NUMBER_DIGITS`` characters, kept unconverted."""

    __slots__ = ("length",)

    def __init__(self, length: int) -> None:
        self.length = length

    def __repr__(self) -> str:
        return f"<a number of {self.length} characters>"


def _int(text: str) -> int | LongNumber:
    return int(text) if len(text) <= MAX_NUMBER_DIGITS else LongNumber(len(text))


_DECODER = json.JSONDecoder(parse_int=_int)


def decode_json(raw: bytes) -> Any:
    """``json.loads`` of ``raw`` with long numbers kept unconverted; ValueError (also for
    bytes that are not text) or RecursionError (nesting deeper than the parser's stack)."""
    text = raw.decode(json.detect_encoding(raw), "surrogatepass")
    if text.startswith("\ufeff"):
        raise ValueError("unexpected byte order mark")
    return _DECODER.decode(text)


def show(value: object) -> str:
    """A bounded description of a client's value for an error text, secrets masked."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        masked = mask_secrets(value)  # before the cut: no first half of a key is left
        if len(masked) > MAX_SHOWN:
            return f"{masked[:MAX_SHOWN]!r}… ({len(value)} characters)"
        return repr(masked)
    return mask_secrets(repr(value))


def shorten(text: str, limit: int = 300) -> str:
    """``text`` for an answer: secrets masked, then cut to ``limit`` characters."""
    text = mask_secrets(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def task_id(value: object) -> int:
    """A valid taskId, or :class:`ItemRefusal` (never another exception, whatever ``value``)."""
    if type(value) is int and 0 < value <= MAX_TASK_ID:
        return value
    readable = isinstance(value, int) or (
        isinstance(value, str) and len(value) <= MAX_NUMBER_DIGITS
    )
    if readable and not isinstance(value, bool):
        try:
            return parse_task_id(value)
        except (ReportError, ValueError):
            pass
    raise ItemRefusal(
        Reason.INVALID_TASK_ID,
        f"invalid taskId {show(value)}: expected a positive integer (1 to {MAX_TASK_ID})",
    )


async def read_body(scope: MutableMapping[str, Any], receive: Receive, limit: int) -> bytes:
    """The request's body: 415 unless JSON, 413 over ``limit`` bytes; ClientGoneError if
    the client left before the end."""
    content_type, declared, given = b"", None, b""
    for name, value in scope.get("headers") or ():
        if name == b"content-type":
            given = value
            content_type = value.split(b";")[0].strip().lower()
        elif name == b"content-length":
            declared = value
    if content_type not in JSON_TYPES:
        shown = show(given.decode("latin-1").strip()) if given else "none"
        raise Refusal(
            415, "ERROR_UNSUPPORTED_CONTENT_TYPE", f"content type {shown}: send application/json"
        )
    if (
        declared is not None
        and declared.isdigit()
        and (len(declared) > 18 or int(declared) > limit)
    ):
        raise Refusal(413, "ERROR_BODY_TOO_LARGE", f"body over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGoneError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise Refusal(413, "ERROR_BODY_TOO_LARGE", f"body over {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _invalid_json(exc: Exception, what: str) -> str:
    if isinstance(exc, RecursionError):
        return f"{what} is nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return f"{what} is not UTF-8 text"
    return f"{what} is not valid JSON"


def json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 ``ERROR_INVALID_JSON`` saying what is wrong."""
    try:
        doc = decode_json(body)
    except (ValueError, RecursionError) as exc:
        raise Refusal(400, "ERROR_INVALID_JSON", _invalid_json(exc, "the body")) from exc
    if not isinstance(doc, dict):
        raise Refusal(400, "ERROR_INVALID_JSON", 'expected an object {"clientKey", "taskId"}')
    return doc


def bulk_items(body: bytes, max_items: int) -> list[Any]:
    """The items of a bulk body — a JSON array (valid as a whole, or a 400), or JSON lines,
    where a line that is not JSON becomes an :class:`ItemRefusal` in its place (unless no
    line at all is JSON: then the body is not JSON lines, a 400)."""
    text = body.strip()
    if text.startswith(b"["):
        try:
            items = decode_json(text)
        except (ValueError, RecursionError) as exc:
            raise Refusal(400, "ERROR_INVALID_JSON", _invalid_json(exc, "the array")) from exc
        if not isinstance(items, list):  # pragma: no cover - "[" starts an array or an error
            raise Refusal(400, "ERROR_INVALID_JSON", "expected a JSON array of reports")
    else:
        items = list(_lines(text))
        if items and all(isinstance(item, ItemRefusal) for item in items):
            raise Refusal(
                400,
                "ERROR_INVALID_JSON",
                f"expected a JSON array or JSON lines, and no line is JSON ({items[0]})",
            )
    if len(items) > max_items:
        raise Refusal(413, "ERROR_BODY_TOO_LARGE", f"more than {max_items} reports")
    return items


def _lines(text: bytes) -> Iterator[Any]:
    for line in text.splitlines():
        if line.strip():
            try:
                yield decode_json(line)
            except (ValueError, RecursionError) as exc:
                yield ItemRefusal(Reason.INVALID_JSON, _invalid_json(exc, "the line"))


def bulk_row(settings: Settings, item: Any) -> EnqueueRow:
    """One bulk item as an enqueue row, or :class:`ItemRefusal` naming what failed."""
    if not (isinstance(item, dict) or (isinstance(item, list) and len(item) in (2, 3))):
        raise ItemRefusal(
            Reason.INVALID_ITEM,
            f"cannot read a report from {show(item)[:60]}: expected "
            '{"taskId": <positive int>, "captchaType": <type>, "account": <name, optional>}',
        )
    try:
        raw_id, ctype, account = fields(item)
    except ReportError as exc:
        raise ItemRefusal(Reason.INVALID_ITEM, shorten(str(exc))) from exc
    number = task_id(raw_id)
    if not isinstance(ctype, str):  # nothing else is a type name (nor safe to repr whole)
        raise ItemRefusal(
            Reason.UNKNOWN_CAPTCHA_TYPE, f"invalid captchaType {show(ctype)}: expected a name"
        )
    if not isinstance(account, str):
        raise ItemRefusal(
            Reason.UNKNOWN_ACCOUNT, f"invalid account {show(account)}: expected a name"
        )
    try:
        return validate(settings, number, ctype, account)
    except ReportError as exc:
        raise _classify(settings, exc, ctype, account) from exc


def _classify(settings: Settings, exc: ReportError, ctype: object, account: object) -> ItemRefusal:
    """Which check refused a report whose taskId is valid: its type, its account, or
    its account's provider (by what fails again, not by the message's text)."""
    try:
        settings.captcha_types.resolve(ctype)
    except ReportError:
        return ItemRefusal(
            Reason.UNKNOWN_CAPTCHA_TYPE,
            f"unknown captchaType {show(ctype)}; the accepted names (case-insensitive) "
            "are in accepted_captcha_types",
        )
    try:
        settings.account(account)
    except ReportError:
        known = ", ".join(sorted(settings.accounts))
        error = f"unknown account {show(account)}; configured accounts: {known}"
        return ItemRefusal(Reason.UNKNOWN_ACCOUNT, shorten(error))
    return ItemRefusal(Reason.UNSUPPORTED_TYPE, shorten(str(exc)))


def query_values(query: bytes, name: bytes) -> list[bytes]:
    """The values of ``name`` in a query string, percent-decoded (``+`` read both as itself
    and as a space, as forms send it)."""
    values: list[bytes] = []
    for part in query.split(b"&"):
        key, sep, raw = part.partition(b"=")
        if sep and unquote(key.decode("latin-1")) == name.decode():
            text = raw.decode("latin-1")
            for decoded in {unquote(text), unquote_plus(text)}:
                values.append(decoded.encode("utf-8", "surrogatepass"))
    return values
