"""``report-forwarder enqueue``: one report from the arguments, or many from a file
(``--file``, read by :mod:`worker.cli.readers`) with a progress line on a terminal. Of the
refused lines only the first SHOWN_REFUSALS are kept in full; the rest are counted by
reason, so memory stays flat whatever the file holds.

Keep this module's imports light: enqueue runs once per report in scripts, and must
start without Celery.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from collections import Counter
from typing import IO

import click

from worker.cli.app import EXIT_REFUSED, State, command_logging, current_state, main
from worker.cli.readers import read_items
from worker.cli.render import echo, shown
from worker.errors import ReportError
from worker.producer import BULK_PER_MESSAGE, fields, parse_task_id, refusal_reason, short_error
from worker.store.vocabulary import EnqueueRow

SHOWN_REFUSALS = 100


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("task_id", required=False)
@click.argument("captcha_type", required=False)
@click.option("--file", "-f", "file", type=click.File("rb"), help="JSON lines or CSV; - = stdin.")
@click.option("--account", "-a", default="default", show_default=True, help="Account name.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def enqueue(
    task_id: str | None,
    captcha_type: str | None,
    file: IO[bytes] | None,
    account: str,
    as_json: bool,
) -> None:
    """Queue one report (TASK_ID CAPTCHA_TYPE) or many (--file)."""
    state = current_state()
    if file is not None:
        if task_id is not None:
            raise click.UsageError("give either TASK_ID CAPTCHA_TYPE or --file, not both")
        _enqueue_file(state, file, account, as_json)
        return
    if task_id is None or captcha_type is None:
        raise click.UsageError("give TASK_ID and CAPTCHA_TYPE, or --file F (- for stdin)")
    command_logging(state.settings, "WARNING")
    number = parse_task_id(task_id)
    result = state.producer.enqueue(number, captcha_type, account)
    if as_json:
        click.echo(json.dumps({"result": result, "task_id": number, "account": account}))
    else:
        echo(f"{result}: task {number} ({shown(captcha_type)}) for account {shown(account)}")


class _Refusals:
    """Refused lines: the first SHOWN_REFUSALS in full, every one counted by reason."""

    def __init__(self) -> None:
        self.shown: list[tuple[int, str]] = []
        self.by_reason: Counter[str] = Counter()
        self.total = 0

    def add(self, lineno: int, error: str, reason: str) -> bool:
        """Count one refusal; True if it is among those shown in full."""
        self.total += 1
        self.by_reason[reason] += 1
        if len(self.shown) < SHOWN_REFUSALS:
            self.shown.append((lineno, error))
            return True
        return False


def _enqueue_file(state: State, file: IO[bytes], account: str, as_json: bool) -> None:
    settings = state.settings
    command_logging(settings, "ERROR")
    producer = state.producer
    make_row = producer.row_maker()
    queued = duplicates = 0
    refusals = _Refusals()
    rows: list[EnqueueRow] = []
    progress = _Progress(file)

    def flush() -> None:
        nonlocal queued, duplicates
        flags = producer.enqueue_rows(rows, per_message=BULK_PER_MESSAGE)
        queued += sum(flags)
        duplicates += len(flags) - sum(flags)
        rows.clear()
        progress.update(queued, duplicates, refusals.total)

    for lineno, item, parse_error, parse_reason in read_items(file, account):
        error, reason = parse_error, parse_reason
        if item is not None:
            try:
                rows.append(make_row(*fields(item)))
            except ReportError as exc:
                error, reason = short_error(exc), refusal_reason(settings, item)
        if error is not None:
            if refusals.add(lineno, error, reason or "refused") and not as_json:
                progress.clear()
                echo(f"line {lineno}: {shown(error)}", err=True)
            elif refusals.total == SHOWN_REFUSALS + 1 and not as_json:
                progress.clear()
                click.echo(
                    f"(more than {SHOWN_REFUSALS} lines refused: the rest are counted by "
                    "reason below)",
                    err=True,
                )
        if len(rows) >= 1000:
            flush()
    if rows:
        flush()
    progress.done()
    if as_json:
        doc = {
            "queued": queued,
            "duplicates": duplicates,
            "refused": [{"line": n, "error": e} for n, e in refusals.shown],
            "refused_total": refusals.total,
            "refused_by_reason": dict(refusals.by_reason.most_common()),
        }
        click.echo(json.dumps(doc))
    else:
        if refusals.total:
            reasons = ", ".join(f"{r} {n}" for r, n in refusals.by_reason.most_common())
            echo(f"refused by reason: {shown(reasons)}", err=True)
        click.echo(f"queued {queued}, duplicates {duplicates}, refused {refusals.total}", err=True)
    if refusals.total:
        sys.exit(EXIT_REFUSED)


class _Progress:
    """A one-line counter on stderr when it is a terminal; silent otherwise."""

    def __init__(self, file: IO[bytes]) -> None:
        self.enabled = sys.stderr.isatty()
        self.started = time.monotonic()
        self.total = None
        if self.enabled and file not in (sys.stdin, getattr(sys.stdin, "buffer", None)):
            try:
                self.total = os.fstat(file.fileno()).st_size
            except (OSError, io.UnsupportedOperation):
                self.total = None
        self.file = file

    def update(self, queued: int, duplicates: int, refused: int) -> None:
        if not self.enabled:
            return
        rate = queued / max(time.monotonic() - self.started, 1e-6)
        share = ""
        if self.total:
            try:
                share = f" {100 * self.file.tell() / self.total:5.1f}%"
            except (OSError, io.UnsupportedOperation):
                share = ""
        click.echo(
            f"\r{share} queued {queued}  duplicates {duplicates}  refused {refused}  "
            f"({rate:,.0f}/s)",
            err=True,
            nl=False,
        )

    def clear(self) -> None:
        if self.enabled:
            click.echo("\r\033[K", err=True, nl=False)

    def done(self) -> None:
        if self.enabled:
            click.echo("", err=True)
