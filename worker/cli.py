"""``report-forwarder``: the command line. Every option can also come from an environment
variable named ``REPORT_FORWARDER_<COMMAND>_<OPTION>`` (click's auto_envvar_prefix).

Exit status: 0 success · 1 some input refused, or nothing matched · 2 bad configuration or
usage · 3 Redis unreachable. Errors are one line on stderr naming what was wrong and what
is accepted — never a traceback.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import IO, Any, NoReturn

import click

from . import __version__, embedded, store
from .config import Settings, client_key, load_settings
from .deadletter import REASONS, DeadLetters, Filters, check_reason, parse_age, replay
from .errors import ConfigError, ForwarderError, ReportError, StoreError
from .keys import Keys
from .logs import configure as configure_logging
from .logs import get_logger
from .producer import BULK_PER_MESSAGE, Producer

EXIT_REFUSED, EXIT_CONFIG, EXIT_REDIS = 1, 2, 3


class _State:
    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._settings: Settings | None = None
        self._producer: Producer | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_path)
        return self._settings

    @property
    def producer(self) -> Producer:
        if self._producer is None:
            self._producer = Producer(self.settings)
        return self._producer

    def close(self) -> None:
        if self._producer is not None:
            self._producer.client.close()
            self._producer = None


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class _Group(click.Group):
    """Turns our errors into one line and an exit status, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            _fail(str(exc), EXIT_CONFIG)
        except StoreError as exc:
            _fail(str(exc), EXIT_REDIS)
        except ReportError as exc:
            _fail(str(exc), EXIT_REFUSED)
        except ForwarderError as exc:
            _fail(str(exc), EXIT_REFUSED)
        except OSError as exc:
            if type(exc).__module__.startswith("redis"):
                _fail(f"Redis is unreachable: {exc}", EXIT_REDIS)
            raise


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
@click.option("--concurrency", "-c", type=click.IntRange(1, 1024), help="Threads (default 16).")
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
    from .celery_app import create_app, worker_options
    from .metrics import Metrics
    from .runtime import Runtime

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
@click.option("--file", "-f", "file", type=click.File("r"), help="JSON lines or CSV; - = stdin.")
@click.option("--account", "-a", default="default", show_default=True, help="Account name.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def enqueue(
    task_id: str | None,
    captcha_type: str | None,
    file: IO[str] | None,
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
    producer = state.producer
    result = producer.enqueue(task_id, captcha_type, account)
    if as_json:
        click.echo(json.dumps({"result": result, "task_id": int(task_id), "account": account}))
    else:
        click.echo(f"{result}: task {task_id} ({captcha_type}) for account {account}")


def _read_items(
    file: IO[str], account: str
) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line number, item or None, error or None) for each data line of JSON lines or CSV."""
    first = ""
    lines = iter(file)
    number = 0
    for line in lines:
        number += 1
        if line.strip():
            first = line
            break
    if not first:
        return
    if first.lstrip().startswith("{"):
        for lineno, line in _chain_lines(number, first, lines):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                yield lineno, None, f"not JSON ({exc.msg})"
                continue
            if not isinstance(item, dict):
                yield lineno, None, 'expected an object like {"taskId": 1, "captchaType": "image"}'
                continue
            item.setdefault("account", account)
            yield lineno, item, None
        return
    header = [h.strip() for h in next(csv.reader([first]))]
    aliases = {
        "taskid": "taskId",
        "task_id": "taskId",
        "captchatype": "captchaType",
        "captcha_type": "captchaType",
        "account": "account",
    }
    columns = [aliases.get(h.lower(), h) for h in header]
    if "taskId" not in columns or "captchaType" not in columns:
        yield (
            number,
            None,
            (
                f"CSV header {header!r} lacks taskId and captchaType columns "
                "(expected e.g. 'taskId,captchaType[,account]'; or give JSON lines)"
            ),
        )
        return
    for lineno, line in _chain_lines(number + 1, None, lines):
        if not line.strip():
            continue
        values = next(csv.reader([line]))
        if len(values) != len(columns):
            yield lineno, None, f"expected {len(columns)} columns ({','.join(header)})"
            continue
        item = dict(zip(columns, (v.strip() for v in values), strict=True))
        item["account"] = item.get("account") or account
        yield lineno, item, None


def _chain_lines(start: int, first: str | None, rest: Iterator[str]) -> Iterator[tuple[int, str]]:
    number = start
    if first is not None:
        yield number, first
        number += 1
    for line in rest:
        yield number, line
        number += 1


def _enqueue_file(state: _State, file: IO[str], account: str, as_json: bool) -> None:
    _logging(state.settings, "ERROR")
    producer = state.producer
    queued = duplicates = 0
    refused: list[tuple[int, str]] = []
    rows: list[list[Any]] = []
    progress = _Progress(file)

    def flush() -> None:
        nonlocal queued, duplicates
        flags = producer.ledger.enqueue(rows, per_message=BULK_PER_MESSAGE)
        queued += sum(flags)
        duplicates += len(flags) - sum(flags)
        rows.clear()
        progress.update(queued, duplicates, len(refused))

    for lineno, item, parse_error in _read_items(file, account):
        error = parse_error
        if item is not None:
            try:
                rows.append(
                    producer.row(item.get("taskId"), item.get("captchaType"), item.get("account"))
                )
            except ReportError as exc:
                error = str(exc)
        if error is not None:
            refused.append((lineno, error))
            if not as_json:
                progress.clear()
                click.echo(f"line {lineno}: {error}", err=True)
        if len(rows) >= 1000:
            flush()
    if rows:
        flush()
    progress.done()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "queued": queued,
                    "duplicates": duplicates,
                    "refused": [{"line": n, "error": e} for n, e in refused],
                }
            )
        )
    else:
        click.echo(f"queued {queued}, duplicates {duplicates}, refused {len(refused)}", err=True)
    if refused:
        sys.exit(EXIT_REFUSED)


class _Progress:
    """A one-line counter on stderr when it is a terminal; silent otherwise."""

    def __init__(self, file: IO[str]) -> None:
        self.enabled = sys.stderr.isatty()
        self.started = time.monotonic()
        self.total = None
        if self.enabled and file is not sys.stdin:
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
    return DeadLetters(state.producer.client, Keys(state.settings.key_prefix))


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
    """Newest first."""
    store_ = _dead()
    letters = store_.latest(_make_filters(reason, ctype, account, since), limit)
    if as_json:
        payload = {"total": store_.count(), "dead_letters": [d.to_json() for d in letters]}
        click.echo(json.dumps(payload, indent=2))
        return
    if not letters:
        click.echo("no dead letters match", err=True)
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
    letters = _dead().select(ids, _make_filters(reason, ctype, account, since), everything)
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
    store_ = _dead()
    letters = store_.select(ids, _make_filters(reason, ctype, account, since), everything)
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
    from .stats import snapshot

    state = _state()
    snap = snapshot(state.producer.client, state.settings)
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
    from .ledger import Ledger

    state = _state()
    state.settings.account(name)
    _logging(state.settings)
    ledger = Ledger(state.producer.client, Keys(state.settings.key_prefix), state.settings.queue)
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
    from .stats import snapshot

    state = _state()
    client = state.producer.client
    if as_json:
        click.echo(json.dumps(snapshot(client, state.settings), indent=2))
        return
    while True:
        text = _render_stats(snapshot(client, state.settings))
        if watch:
            click.clear()
        click.echo(text)
        if not watch:
            return
        time.sleep(1)


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
    ]
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
            f"account {name} ({info['provider']}): limit {info['rate_limit']}, "
            f"{info['used_in_window']} used in the last window ({info['usage']:.0%}){state}"
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
    from .sandbox import serve

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
def serve(
    host: str, port: int, token: str | None, insecure_no_token: bool, client_rate: float
) -> None:
    """Run the HTTP intake: a CapMonster-compatible report endpoint, bulk JSON, health,
    metrics and a live status page."""
    from .intake import is_loopback
    from .intake import serve as run

    settings = _state().settings
    if not is_loopback(host) and not token and not insecure_no_token:
        raise click.UsageError(
            f"--host {host} is not loopback: set REPORT_FORWARDER_INTAKE_TOKEN (or --token), or "
            "pass --insecure-no-token if a proxy in front authenticates"
        )
    _logging(settings, cache=True)
    run(settings, host, port, token=token or None, client_rate=client_rate)


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
    from .demo import run_demo

    sys.exit(run_demo(_state().config_path, reports, concurrency, verbose))
