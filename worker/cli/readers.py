"""Reading a file of reports (JSON lines, or CSV with a header) into items for the
producer: bytes, decoded line by line, so one bad line is one refusal; a line longer
than MAX_LINE_BYTES is refused without being held. Memory stays flat whatever the file
holds. No click here: ``enqueue --file`` turns what these yield into output.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Iterator
from typing import IO, Any

from worker.settings import abbreviate

MAX_LINE_BYTES = 64 * 1024
_BOM = b"\xef\xbb\xbf"
_CSV_ALIASES = {
    "taskid": "taskId",
    "task_id": "taskId",
    "captchatype": "captchaType",
    "captcha_type": "captchaType",
    "account": "account",
}

# (line number, item or None, error or None, reason label or None)
Line = tuple[int, dict[str, Any] | None, str | None, str | None]
# (line number, text or None, why there is no text)
_Text = tuple[int, str | None, str | None]


def _text_lines(file: IO[bytes]) -> Iterator[_Text]:
    """(line number, text or None, why not) for each line: a UTF-8 BOM at the very start is
    skipped; a line that is not UTF-8, or longer than MAX_LINE_BYTES, has no text."""
    number = 0
    while True:
        raw = file.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        number += 1
        if number == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while True:  # skip the rest of the line, a bounded chunk at a time
                rest = file.readline(MAX_LINE_BYTES)
                if not rest or rest.endswith(b"\n"):
                    break
            yield number, None, f"longer than {MAX_LINE_BYTES} bytes"
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield (
                number,
                None,
                f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})",
            )
            continue
        yield number, text, None


def read_items(file: IO[bytes], account: str) -> Iterator[Line]:
    """Each data line of JSON lines or CSV (with a header) as an item, or why it is not
    one. The first non-blank line decides the format."""
    lines = _text_lines(file)
    first = ""
    for number, text, why in lines:
        if text is None:
            yield _undecodable(number, why)
            continue
        if text.strip():
            first = text
            break
    if not first:
        return
    if first.lstrip().startswith("{"):
        yield from _json_items(number, first, lines, account)
    else:
        yield from _csv_items(number, first, lines, account)


def _undecodable(number: int, why: str | None) -> Line:
    label = "not UTF-8 text" if why and why.startswith("not UTF-8") else "line too long"
    return number, None, why, label


def _json_int(digits: str) -> int | str:
    """JSON integers beyond any taskId stay text (int() refuses 4,300+ digits)."""
    return int(digits) if len(digits) <= 30 else digits


# one decoder for the whole file (json.loads with an argument builds a new one per line)
_DECODER = json.JSONDecoder(parse_int=_json_int)


def _json_items(number: int, first: str, lines: Iterator[_Text], account: str) -> Iterator[Line]:
    for lineno, line, why in itertools.chain([(number, first, None)], lines):
        if line is None:
            yield _undecodable(lineno, why)
            continue
        if not line.strip():
            continue
        try:
            item = _DECODER.decode(line)
        except ValueError as exc:
            detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            yield lineno, None, f"not JSON ({detail})", "not JSON"
            continue
        except RecursionError:
            yield lineno, None, "not JSON (nested too deeply)", "not JSON"
            continue
        if not isinstance(item, dict):
            error = 'expected an object like {"taskId": 1, "captchaType": "image"}'
            yield lineno, None, error, "not a JSON object"
            continue
        if item.get("account") is None:  # absent or null: the default, as in Python and HTTP
            item["account"] = account
        yield lineno, item, None, None


def _csv_items(number: int, first: str, lines: Iterator[_Text], account: str) -> Iterator[Line]:
    try:
        header = [h.strip() for h in next(csv.reader([first]))]
    except (csv.Error, StopIteration):
        header = []
    columns = [_CSV_ALIASES.get(h.lower(), h) for h in header]
    if "taskId" not in columns or "captchaType" not in columns:
        error = (
            f"CSV header {abbreviate(header, 200)} lacks taskId and captchaType columns "
            "(expected e.g. 'taskId,captchaType[,account]'; or give JSON lines)"
        )
        yield number, None, error, "no CSV header"
        return
    for lineno, line, why in lines:
        if line is None:
            yield _undecodable(lineno, why)
            continue
        if not line.strip():
            continue
        try:
            values = next(csv.reader([line]))
        except (csv.Error, StopIteration) as exc:
            yield lineno, None, f"not CSV ({exc})", "not CSV"
            continue
        if len(values) != len(columns):
            error = f"expected {len(columns)} columns ({','.join(header)[:200]})"
            yield lineno, None, error, "wrong number of columns"
            continue
        item = dict(zip(columns, (v.strip() for v in values), strict=True))
        item["account"] = item.get("account") or account
        yield lineno, item, None, None
