"""``report-forwarder``: the command line. Every option can also come from an environment
variable named ``REPORT_FORWARDER_<COMMAND>_<OPTION>`` (click's auto_envvar_prefix).

Exit status: 0 success · 1 some input refused, or nothing matched · 2 bad configuration or
usage · 3 Redis unreachable. Errors are one line on stderr naming what was wrong and what
is accepted — never a traceback.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import os
import socket
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import IO, Any, NoReturn

import click
import redis

from worker import __version__
from worker.errors import (
    ConfigError,
    ForwarderError,
    ReportError,
    StoreError,
    StoreUnreachableError,
)
from worker.observability.logs import configure as configure_logging
from worker.observability.logs import get_logger
from worker.producer import (
    BULK_PER_MESSAGE,
    Producer,
    fields,
    parse_task_id,
    refusal_reason,
    replay,
    short_error,
)
from worker.settings import MAX_CONCURRENCY, Settings, abbreviate, client_key, load_settings
from worker.store import connection as store
from worker.store import embedded
from worker.store.deadletters import REASONS, DeadLetters, Filters, check_reason, parse_age
from worker.store.keys import Keys

EXIT_REFUSED, EXIT_CONFIG, EXIT_REDIS = 1, 2, 3


class _State:
    """What a command needs, built on first use: settings, then Redis (a client that
    gives up after ``redis.connect_retry_s``, so an unreachable Redis is one line and exit
    3 within seconds), then the producer."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._settings: Settings | None = None
        self._redis_url: str | None = None
        self._client: redis.Redis | None = None
        self._producer: Producer | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_path)
        return self._settings

    @property
    def redis_url(self) -> str:
        if self._redis_url is None:
            self._redis_url = store.resolve_url(self.settings)
        return self._redis_url

    @property
    def tried_url(self) -> str | None:
        """The Redis URL, if a command has resolved it (for error messages)."""
        return self._redis_url

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = store.connect(self.redis_url, retry_s=self.settings.connect_retry_s)
        return self._client

    @property
    def producer(self) -> Producer:
        if self._producer is None:
            self._producer = Producer(self.settings, self.client)
            self._producer.redis = store.describe(self.redis_url)
        return self._producer

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = self._producer = None


def _fail(message: str, code: int) -> NoReturn:
    click.echo("error: " + " ".join(message.split()), err=True)
    sys.exit(code)


def _exit_code(exc: ForwarderError) -> int:
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG
    if isinstance(exc, StoreError):
        return EXIT_REDIS
    return EXIT_REFUSED  # a refused report, an unknown id, nothing matched


class _Group(click.Group):
    """The one place errors become one line on stderr and an exit status: ConfigError 2,
    StoreError (Redis unreachable, full or failing) 3, ReportError and the rest 1. A
    redis-py exception is translated here (store.translate), naming the Redis tried."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (redis.RedisError, ForwarderError) as exc:
            state = ctx.find_object(_State)
            error = _translated(exc, state.tried_url if state is not None else None)
            _fail(str(error), _exit_code(error))


def _translated(exc: redis.RedisError | ForwarderError, url: str | None) -> ForwarderError:
    """Our error for ``exc``; a Redis failure names the Redis tried (password masked)."""
    if isinstance(exc, redis.RedisError):
        return store.translate(exc, url)
    cause = exc.__cause__
    if url and isinstance(cause, redis.RedisError) and store.describe(url) not in str(exc):
        return store.translate(cause, url)  # translated below us, without the address
    return exc


@click.group(cls=_Group, context_settings={"auto_envvar_prefix": "REPORT_FORWARDER"})
@click.option(
    "--config",
    "config_path",
    envvar="REPORT_FORWARDER_CONFIG",
    type=click.Path(dir_okay=False),
    help="TOML file merged over the built-in defaults.",
)
@click.version_option(__version__, prog_name="report-forwarder")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """Forward "this solved captcha was wrong" reports to the captcha API, reliably."""
    ctx.obj = _State(config_path)
    ctx.call_on_close(ctx.obj.close)


def _state() -> _State:
    state: _State = click.get_current_context().find_object(_State)  # type: ignore[assignment]
    return state


def _logging(settings: Settings, level: str | None = None, *, cache: bool = False) -> None:
    """Logging for a command; only the long-running worker caches its loggers (speed)."""
    configure_logging(settings.log_format, level or settings.log_level, cache=cache)


# -- worker -------------------------------------------------------------------------------


@main.command()
@click.option(
    "--concurrency", "-c", type=click.IntRange(1, MAX_CONCURRENCY), help="Threads (default 16)."
)
@click.option("--hostname", "-n", help="Celery node name (default report-forwarder-PID@host).")
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=0,
    help="Serve Prometheus /metrics on this port (0: off).",
)
@click.option("--events", is_flag=True, help="Send Celery task events (for Flower).")
@click.option(
    "--remote-control",
    is_flag=True,
    help="Answer Celery remote control (inspect, Flower's worker views). Off by default: it "
    "holds a Redis pub/sub connection that kombu does not carry reliably across a Redis restart.",
)
def worker(
    concurrency: int | None,
    hostname: str | None,
    metrics_port: int,
    events: bool,
    remote_control: bool,
) -> None:
    """Run a worker: deliver queued reports until stopped (SIGTERM: finish in-flight ones)."""
    from worker.delivery.celery_app import create_app, worker_options
    from worker.delivery.runtime import Runtime
    from worker.observability.metrics import Metrics

    settings = _state().settings
    _logging(settings, cache=True)
    logging.captureWarnings(True)  # Celery's warnings become log lines, not raw stderr
    # We keep running tasks through a broker reconnect on purpose (the ledger re-queues
    # whatever cannot be acked); Celery warns about that default on every reconnect.
    warnings.filterwarnings("ignore", message=r"(?s).*worker_cancel_long_running_tasks")
    metrics = Metrics()
    runtime = Runtime(settings, store.resolve_url(settings), metrics=metrics)
    if metrics_port:
        metrics.watch(runtime.client, settings)
        metrics.serve(metrics_port)
    app = create_app(runtime)
    if events:
        app.conf.worker_send_task_events = True
        app.conf.task_send_sent_event = True
    if remote_control:
        app.conf.worker_enable_remote_control = True
    options = worker_options(settings.queue, concurrency or settings.concurrency)
    node = hostname or f"report-forwarder-{os.getpid()}@{socket.gethostname()}"
    celery_worker = app.Worker(
        hostname=node,
        quiet=True,
        without_mingle=True,
        without_gossip=True,
        without_heartbeat=not events,
        loglevel="WARNING",
        **options,
    )
    get_logger("worker.cli").info(
        "worker.started",
        node=node,
        queue=settings.queue,
        concurrency=options["concurrency"],
        metrics_port=metrics_port or None,
        redis=store.describe(runtime.redis_url),
        accounts=sorted(settings.accounts),
    )
    celery_worker.start()
    sys.exit(celery_worker.exitcode or 0)


# -- enqueue ------------------------------------------------------------------------------


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
    state = _state()
    if file is not None:
        if task_id is not None:
            raise click.UsageError("give either TASK_ID CAPTCHA_TYPE or --file, not both")
        _enqueue_file(state, file, account, as_json)
        return
    if task_id is None or captcha_type is None:
        raise click.UsageError("give TASK_ID and CAPTCHA_TYPE, or --file F (- for stdin)")
    _logging(state.settings, "WARNING")
    number = parse_task_id(task_id)
    result = state.producer.enqueue(number, captcha_type, account)
    if as_json:
        click.echo(json.dumps({"result": result, "task_id": number, "account": account}))
    else:
        click.echo(f"{result}: task {number} ({captcha_type}) for account {account}")


# Reading a file of reports: bytes, decoded line by line, so one bad line is one refusal;
# a line longer than MAX_LINE_BYTES is refused without being held, and only the first
# SHOWN_REFUSALS refusals are kept in full (the rest are counted by reason): memory stays
# flat whatever the file holds.
MAX_LINE_BYTES = 64 * 1024
SHOWN_REFUSALS = 100
_BOM = b"\xef\xbb\xbf"
_CSV_ALIASES = {
    "taskid": "taskId",
    "task_id": "taskId",
    "captchatype": "captchaType",
    "captcha_type": "captchaType",
    "account": "account",
}

# (line number, item or None, error or None, reason label or None)
_Line = tuple[int, dict[str, Any] | None, str | None, str | None]
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


def _read_items(file: IO[bytes], account: str) -> Iterator[_Line]:
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


def _undecodable(number: int, why: str | None) -> _Line:
    label = "not UTF-8 text" if why and why.startswith("not UTF-8") else "line too long"
    return number, None, why, label


def _json_int(digits: str) -> int | str:
    """JSON integers beyond any taskId stay text (int() refuses 4,300+ digits)."""
    return int(digits) if len(digits) <= 30 else digits


def _json_items(number: int, first: str, lines: Iterator[_Text], account: str) -> Iterator[_Line]:
    for lineno, line, why in itertools.chain([(number, first, None)], lines):
        if line is None:
            yield _undecodable(lineno, why)
            continue
        if not line.strip():
            continue
        try:
            item = json.loads(line, parse_int=_json_int)
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


def _csv_items(number: int, first: str, lines: Iterator[_Text], account: str) -> Iterator[_Line]:
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


def _enqueue_file(state: _State, file: IO[bytes], account: str, as_json: bool) -> None:
    settings = state.settings
    _logging(settings, "ERROR")
    producer = state.producer
    make_row = producer.row_maker()
    queued = duplicates = 0
    refusals = _Refusals()
    rows: list[list[Any]] = []
    progress = _Progress(file)

    def flush() -> None:
        nonlocal queued, duplicates
        flags = producer.enqueue_rows(rows, per_message=BULK_PER_MESSAGE)
        queued += sum(flags)
        duplicates += len(flags) - sum(flags)
        rows.clear()
        progress.update(queued, duplicates, refusals.total)

    for lineno, item, parse_error, parse_reason in _read_items(file, account):
        error, reason = parse_error, parse_reason
        if item is not None:
            try:
                rows.append(make_row(*fields(item)))
            except ReportError as exc:
                error, reason = short_error(exc), refusal_reason(settings, item)
        if error is not None:
            if refusals.add(lineno, error, reason or "refused") and not as_json:
                progress.clear()
                click.echo(f"line {lineno}: {error}", err=True)
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
            click.echo(f"refused by reason: {reasons}", err=True)
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


# -- dead letters -------------------------------------------------------------------------


def _filters(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--since", help="Only those that failed within AGE (90s, 15m, 2h, 1d).")(f)
    f = click.option("--account", help="Only this account.")(f)
    f = click.option("--type", "ctype", help="Only this captchaType (or kind: image, token).")(f)
    return click.option("--reason", type=click.Choice(REASONS), help="Only this reason.")(f)


def _make_filters(
    reason: str | None, ctype: str | None, account: str | None, since: str | None
) -> Filters:
    return Filters(
        reason=check_reason(reason),
        captcha_type=ctype,
        account=account,
        since_s=parse_age(since) if since else None,
    )


def _dead() -> DeadLetters:
    state = _state()
    return DeadLetters(state.client, Keys(state.settings.key_prefix))


def _selection(
    ids: tuple[str, ...],
    everything: bool,
    reason: str | None,
    ctype: str | None,
    account: str | None,
    since: str | None,
) -> Filters:
    """The filters of a replay or purge; IDs together with filters or --all is a usage
    error (which would win is not obvious, and purge cannot be undone)."""
    filters = _make_filters(reason, ctype, account, since)
    if ids and (everything or not filters.empty):
        raise click.UsageError(
            "give dead-letter IDs, or filters (--reason, --type, --account, --since), or "
            "--all: not IDs together with filters or --all"
        )
    return filters


@main.group("dead-letters")
def dead_letters() -> None:
    """Inspect, replay and purge reports that could not be delivered."""


@dead_letters.command("list")
@_filters
@click.option("--limit", "-n", type=click.IntRange(1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
def dl_list(
    reason: str | None,
    ctype: str | None,
    account: str | None,
    since: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Newest first. Exit 1 when nothing matches (with --json too: an empty list)."""
    filters = _make_filters(reason, ctype, account, since)
    store_ = _dead()
    letters = store_.latest(filters, limit)
    if as_json:
        payload = {"total": store_.count(), "dead_letters": [d.to_json() for d in letters]}
        click.echo(json.dumps(payload, indent=2))
    elif not letters:
        click.echo("no dead letters match", err=True)
    if not letters:
        sys.exit(EXIT_REFUSED)
    if as_json:
        return
    click.echo(
        f"{'ID':<16} {'FAILED (UTC)':<19} {'ACCOUNT':<10} {'TASK ID':>12} {'TYPE':<22} "
        f"{'REASON':<17} {'CODE':<26} {'HTTP':>4} {'TRIES':>5}"
    )
    for d in letters:
        failed = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(d.failed_at or 0))
        code = (d.error_code or "-")[:26]
        click.echo(
            f"{d.id:<16} {failed:<19} {d.account[:10]:<10} {d.task_id:>12} "
            f"{d.captcha_type[:22]:<22} {d.reason:<17} {code:<26} {d.http_status or '-':>4} "
            f"{d.attempts:>5}"
        )
    click.echo(f"{len(letters)} shown of {store_.count()} dead letters", err=True)


@dead_letters.command("show")
@click.argument("entry_id")
def dl_show(entry_id: str) -> None:
    """One dead letter, every field, as JSON."""
    letter = _dead().get(entry_id)
    if letter is None:
        _fail(f"no dead letter with id {entry_id}", EXIT_REFUSED)
    click.echo(json.dumps(letter.to_json(), indent=2))


@dead_letters.command("replay")
@click.argument("ids", nargs=-1)
@_filters
@click.option("--all", "everything", is_flag=True, help="Every dead letter.")
@click.option("--json", "as_json", is_flag=True)
def dl_replay(
    ids: tuple[str, ...],
    reason: str | None,
    ctype: str | None,
    account: str | None,
    since: str | None,
    everything: bool,
    as_json: bool,
) -> None:
    """Queue dead letters again (fresh deadline, normal path), removing them as they go."""
    filters = _selection(ids, everything, reason, ctype, account, since)
    letters = _dead().select(ids, filters, everything)
    result = replay(_state().producer, letters)
    refused = result.refused
    if as_json:
        click.echo(
            json.dumps(
                {
                    "replayed": result.replayed,
                    "duplicates": result.duplicates,
                    "refused": [{"id": i, "error": e} for i, e in refused],
                }
            )
        )
    else:
        for entry_id, error in refused:
            click.echo(f"{entry_id}: kept: {error}", err=True)
        click.echo(
            f"replayed {result.replayed}, duplicates {result.duplicates}, kept {len(refused)}"
        )
    if refused:
        sys.exit(EXIT_REFUSED)


@dead_letters.command("purge")
@click.argument("ids", nargs=-1)
@_filters
@click.option("--all", "everything", is_flag=True, help="Every dead letter.")
def dl_purge(
    ids: tuple[str, ...],
    reason: str | None,
    ctype: str | None,
    account: str | None,
    since: str | None,
    everything: bool,
) -> None:
    """Delete dead letters for good."""
    filters = _selection(ids, everything, reason, ctype, account, since)
    store_ = _dead()
    letters = store_.select(ids, filters, everything)
    click.echo(f"purged {store_.purge(_state().producer.ledger, letters)}")


@dead_letters.command("export")
@_filters
def dl_export(
    reason: str | None, ctype: str | None, account: str | None, since: str | None
) -> None:
    """Every matching dead letter as JSON lines, oldest first."""
    for letter in _dead().iter(_make_filters(reason, ctype, account, since), newest_first=False):
        click.echo(json.dumps(letter.to_json()))


# -- accounts -----------------------------------------------------------------------------


@main.group()
def accounts() -> None:
    """Configured accounts and their pauses."""


@accounts.command("list")
@click.option("--json", "as_json", is_flag=True)
def accounts_list(as_json: bool) -> None:
    """Accounts, their provider, limit, and whether they are paused."""
    from worker.observability.stats import snapshot

    state = _state()
    snap = snapshot(state.client, state.settings)
    paused = {p["account"]: p for p in snap["paused_accounts"]}
    rows = []
    for name, account in sorted(state.settings.accounts.items()):
        rows.append(
            {
                "account": name,
                "provider": account.provider.name,
                "endpoint_base": account.base_url,
                "rate_limit": str(account.rate_limit),
                "deadline_s": account.deadline_s,
                "key_env": account.key_env,
                "key_set": client_key(account) is not None,
                "paused_until": paused.get(name, {}).get("until"),
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        pause = "paused" if row["paused_until"] else "active"
        click.echo(
            f"{row['account']:<16} {row['provider']:<12} {row['rate_limit']:<14} "
            f"{pause:<7} key {row['key_env']}{'' if row['key_set'] else ' (unset)'}"
        )


@accounts.command("resume")
@click.argument("name")
def accounts_resume(name: str) -> None:
    """Lift an account's pause now (after fixing its key or balance)."""
    from worker.store.ledger import Ledger

    state = _state()
    state.settings.account(name)
    _logging(state.settings)
    ledger = Ledger(state.client, Keys(state.settings.key_prefix), state.settings.queue)
    if ledger.resume(name):
        get_logger("worker.cli").info("account.resumed", account=name, by="operator")
        click.echo(f"resumed {name}")
    else:
        click.echo(f"{name} was not paused")


# -- stats, config, sandbox, redis, demo ----------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print once as JSON and exit.")
@click.option("--watch", is_flag=True, help="Redraw every second until Ctrl-C.")
def stats(as_json: bool, watch: bool) -> None:
    """Throughput, backlog, oldest queued age, dead letters, paused accounts."""
    from worker.observability.stats import snapshot

    state = _state()
    if as_json or not watch:
        snap = snapshot(state.client, state.settings)
        click.echo(json.dumps(snap, indent=2) if as_json else _render_stats(snap))
        return
    # --watch: one attempt per redraw, and an unreachable Redis is shown, not fatal
    client = store.connect(state.redis_url, retry_s=0)
    try:
        while True:
            click.clear()
            click.echo(_watch_frame(client, state))
            time.sleep(1)
    finally:
        client.close()


def _watch_frame(client: redis.Redis, state: _State) -> str:
    """One redraw of ``stats --watch``: the numbers, or why Redis gave none this time."""
    from worker.observability.stats import snapshot

    try:
        return _render_stats(snapshot(client, state.settings))
    except redis.RedisError as exc:
        error, cause = store.translate(exc, state.redis_url), str(exc)
    except StoreError as exc:
        error, cause = exc, str(exc)
    if not isinstance(error, StoreError):
        raise error  # a configuration error: no redraw can fix it
    now = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    if isinstance(error, StoreUnreachableError):
        where = store.describe(state.redis_url)
        cause = " ".join(cause.split())
        return f"report-forwarder stats  {now}\nRedis unreachable ({where}: {cause}); retrying"
    return f"report-forwarder stats  {now}\n{' '.join(str(error).split())}; retrying"


_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[int]) -> str:
    """One character per value, scaled to the largest (blank where zero)."""
    top = max(values, default=0)
    if top == 0:
        return " " * len(values)
    return "".join(" " if v == 0 else _BARS[min(7, (v * 8 - 1) // top)] for v in values)


def _render_stats(snap: dict[str, Any]) -> str:
    b = snap["backlog"]
    oldest = b["oldest_queued_age_s"]
    spark = snap.get("per_second_last_60s", [])
    lines = [
        time.strftime("report-forwarder stats  %Y-%m-%d %H:%M:%S UTC", time.gmtime(snap["at"])),
        f"queue {snap['queue']}: {b['pending_reports']} pending "
        f"({b['queue_depth']} messages queued, {b['in_flight']} in flight, "
        f"{b['waiting_retry']} waiting to retry or for their slot); oldest queued "
        + ("-" if oldest is None else f"{oldest:.1f} s"),
        f"outcomes/s, last 60 s: [{sparkline(spark)}] now {spark[-1] if spark else 0}/s, "
        f"peak {max(spark, default=0)}/s",
        f"workers: {snap.get('workers', 0)} with a live heartbeat",
    ]
    if b.get("orphaned"):
        lines.append(
            f"ORPHANED {b['orphaned']}: pending reports whose message is in no queue and held "
            "by no live worker (a worker's sweeper hands them on within lost_grace_s; if this "
            "stays, no worker is sweeping)"
        )
    for window, data in snap["throughput"].items():
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(data["by_outcome"].items())) or "-"
        lines.append(f"last {window:>3}: {data['per_second']:8.2f}/s  {outcomes}")
        for kind, by in sorted(data["by_kind"].items()):
            if kind and window == "1m":
                detail = ", ".join(f"{k} {v}" for k, v in sorted(by.items()))
                lines.append(f"          {kind:>6}: {detail}")
    dead = snap["dead_letters"]
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(dead["by_reason"].items()))
    lines.append(f"dead letters: {dead['total']}" + (f" ({reasons})" if reasons else ""))
    for name, info in sorted(snap["accounts"].items()):
        state = ""
        if info.get("cooling_down_s"):
            state = f", cooling down {info['cooling_down_s']:.1f} s"
        lines.append(
            f"account {name} ({info['provider']}): limit {info['rate_limit']}"
            + (
                f" (fleet-wide; configured here {info['configured_rate_limit']})"
                if info.get("configured_rate_limit")
                else ""
            )
            + f", {info['used_in_window']} used in the last window ({info['usage']:.0%}){state}"
        )
    for p in snap["paused_accounts"]:
        lines.append(f"PAUSED {p['account']}: {p['error_code']} ({p['remaining_s']:.0f} s left)")
    return "\n".join(lines)


@main.command("check-config")
@click.option("--json", "as_json", is_flag=True)
def check_config(as_json: bool) -> None:
    """Print the effective settings (keys masked); exit 2 if anything is invalid."""
    settings = _state().settings
    doc = {
        "sources": list(settings.sources),
        "redis": (settings.redis_url and store.describe(settings.redis_url))
        or f"embedded ({embedded.url_for(settings.home)})",
        "redis_connect_retry_s": settings.connect_retry_s,
        "home": str(settings.home),
        "queue": settings.queue,
        "key_prefix": settings.key_prefix,
        "log_format": settings.log_format,
        "delivery": {
            "report_deadline_s": settings.report_deadline_s,
            "max_attempts": settings.max_attempts,
            "backoff": f"{settings.backoff_base_s:g} s * 2^n +{settings.backoff_jitter:.0%} "
            f"(cap {settings.backoff_cap_s:g} s)",
            "account_pause_s": settings.account_pause_s,
        },
        "recovery": {
            "lease_s": settings.lease_s,
            "visibility_timeout_s": settings.visibility_timeout_s,
            "max_deliveries": settings.max_deliveries,
        },
        "accounts": {
            name: {
                "provider": a.provider.name,
                "base_url": a.base_url,
                "rate_limit": str(a.rate_limit),
                "deadline_s": a.deadline_s,
                "key_env": a.key_env,
                "key": _mask(client_key(a)),
            }
            for name, a in settings.accounts.items()
        },
        "captcha_types": len(settings.captcha_types),
    }
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    for key, value in doc.items():
        if isinstance(value, dict):
            click.echo(f"{key}:")
            for sub, subvalue in value.items():
                click.echo(f"  {sub}: {subvalue}")
        else:
            click.echo(f"{key}: {value}")
    missing = [a.key_env for a in settings.accounts.values() if client_key(a) is None]
    if missing:
        click.echo(f"note: {', '.join(missing)} unset: workers will refuse to start", err=True)


def _mask(key: str | None) -> str:
    if not key:
        return "(unset)"
    return f"****{key[-4:]}" if len(key) >= 12 else "****"


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", "-p", type=click.IntRange(0, 65535), default=8088, show_default=True)
@click.option("--latency-ms", type=click.FloatRange(0), default=0.0, help="Delay every answer.")
@click.option(
    "--profile",
    type=click.Choice(["any", "capmonster", "anticaptcha", "twocaptcha"]),
    default="any",
    show_default=True,
    help="Which API to play: its paths and error shapes.",
)
def sandbox(host: str, port: int, latency_ms: float, profile: str) -> None:
    """Run the local double of the captcha API's report endpoints (for tests and demos)."""
    from worker.testing.sandbox import serve

    serve(host, port, latency_ms=latency_ms, profile=profile)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", "-p", type=click.IntRange(1, 65535), default=8089, show_default=True)
@click.option(
    "--token",
    envvar="REPORT_FORWARDER_INTAKE_TOKEN",
    help="Bearer token for /v1/*, /metrics and the status page (required off loopback).",
)
@click.option(
    "--insecure-no-token",
    is_flag=True,
    help="Allow binding beyond loopback without a token (behind a proxy that authenticates).",
)
@click.option(
    "--client-rate",
    type=click.FloatRange(1),
    default=2000.0,
    show_default=True,
    help="Requests per second allowed per client address.",
)
@click.option(
    "--header-timeout",
    type=click.FloatRange(0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds a client has to send a request's headers (from connecting, or from the "
    "request's first byte after a keep-alive pause).",
)
@click.option(
    "--body-timeout",
    type=click.FloatRange(0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds a client has, on top of --header-timeout, to send a request's body.",
)
@click.option(
    "--keep-alive-timeout",
    type=click.FloatRange(0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds an idle keep-alive connection stays open.",
)
@click.option(
    "--max-connections-per-client",
    type=click.IntRange(0),
    default=1000,
    show_default=True,
    help="Open connections allowed per client address (0: no cap; behind a proxy, every "
    "connection comes from the proxy's address).",
)
@click.option(
    "--max-connections",
    type=click.IntRange(0),
    default=10_000,
    show_default=True,
    help="Open connections allowed in all (0: as many as the open-file limit allows; a "
    "higher cap is lowered to it).",
)
def serve(
    host: str,
    port: int,
    token: str | None,
    insecure_no_token: bool,
    client_rate: float,
    header_timeout: float,
    body_timeout: float,
    keep_alive_timeout: float,
    max_connections_per_client: int,
    max_connections: int,
) -> None:
    """Run the HTTP intake: a CapMonster-compatible report endpoint, bulk JSON, health,
    metrics and a live status page."""
    from worker.intake import clean_token, is_loopback
    from worker.intake import serve as run
    from worker.intake.server import ConnectionLimits

    settings = _state().settings
    if not is_loopback(host) and clean_token(token) is None and not insecure_no_token:
        given = "is blank" if token else "is not set"
        raise click.UsageError(
            f"--host {host} is not loopback and the intake token {given}: set "
            "REPORT_FORWARDER_INTAKE_TOKEN (or --token), or pass --insecure-no-token if a "
            "proxy in front authenticates"
        )
    limits = ConnectionLimits(
        header_timeout_s=header_timeout,
        body_timeout_s=body_timeout,
        keep_alive_s=keep_alive_timeout,
        max_per_client=max_connections_per_client,
        max_connections=max_connections,
    )
    _logging(settings, cache=True)
    run(settings, host, port, token=clean_token(token), client_rate=client_rate, limits=limits)


@main.group("redis")
def redis_group() -> None:
    """The embedded Redis (used when REDIS_URL is unset)."""


@redis_group.command("status")
def redis_status() -> None:
    click.echo(json.dumps(embedded.status(_state().settings.home)))


@redis_group.command("start")
def redis_start() -> None:
    click.echo(embedded.ensure_running(_state().settings.home))


@redis_group.command("stop")
def redis_stop() -> None:
    """Stop the embedded Redis (its data stays in REPORT_FORWARDER_HOME)."""
    stopped = embedded.stop(_state().settings.home)
    click.echo("stopped" if stopped else "not running")


@main.command()
@click.option("--reports", "-n", type=click.IntRange(10, 200_000), default=3000, show_default=True)
@click.option("--concurrency", "-c", type=click.IntRange(1, 256), default=16, show_default=True)
@click.option("--verbose", "-v", is_flag=True, help="Show every outcome's log line.")
def demo(reports: int, concurrency: int, verbose: bool) -> None:
    """The whole pipeline on embedded defaults: Redis, sandbox API, worker; no key needed."""
    from worker.testing.demo import run_demo

    sys.exit(run_demo(_state().config_path, reports, concurrency, verbose))
