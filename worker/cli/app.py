"""``report-forwarder``: the click group every command registers on, the state the
commands share, and the one error boundary. Every option can also come from an
environment variable named ``REPORT_FORWARDER_<COMMAND>_<OPTION>`` (click's
auto_envvar_prefix).

Exit status: 0 success · 1 some input refused, or nothing matched · 2 bad configuration or
usage · 3 Redis unreachable (nothing was accepted) · 4 outcome unknown: the report may be
queued (too few replicas confirmed it), retrying here is safe. Errors are one line on
stderr naming what was wrong and what is accepted — never a traceback. Commands raise the
project's errors (or let redis-py's through); only :class:`_Group` turns them into a line
and a status.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import click
import redis

from worker import __version__
from worker.errors import ConfigError, ForwarderError, StoreError, StoreOutcomeUnknownError
from worker.observability.logs import configure as configure_logging
from worker.producer import Producer
from worker.settings import Settings, load_settings
from worker.store import connection as store

EXIT_REFUSED, EXIT_CONFIG, EXIT_REDIS = 1, 2, 3
# may be queued (StoreOutcomeUnknownError): retry through report-forwarder, never elsewhere
EXIT_OUTCOME_UNKNOWN = 4


class State:
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


def fail(message: str, code: int) -> NoReturn:
    """One line on stderr, ``error: ...``, and exit with ``code`` (what is not printable
    in ``message``, a control character it quotes, escaped: worker.cli.render)."""
    from worker.cli.render import shown

    click.echo("error: " + shown(" ".join(message.split())), err=True)
    sys.exit(code)


def _exit_code(exc: ForwarderError) -> int:
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG
    if isinstance(exc, StoreError):
        return EXIT_REDIS
    if isinstance(exc, StoreOutcomeUnknownError):
        return EXIT_OUTCOME_UNKNOWN
    return EXIT_REFUSED  # a refused report, an unknown id, nothing matched


class _Group(click.Group):
    """The one place errors become one line on stderr and an exit status: ConfigError 2,
    StoreError (Redis unreachable, full or failing) 3, StoreOutcomeUnknownError (may be
    queued) 4, ReportError and the rest 1. A
    redis-py exception is translated here (store.translate), naming the Redis tried."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (redis.RedisError, ForwarderError) as exc:
            state = ctx.find_object(State)
            error = _translated(exc, state.tried_url if state is not None else None)
            fail(str(error), _exit_code(error))


def _translated(exc: redis.RedisError | ForwarderError, url: str | None) -> ForwarderError:
    """Our error for ``exc``; a Redis failure names the Redis tried (password masked)."""
    if isinstance(exc, redis.RedisError):
        return store.translate(exc, url)
    if isinstance(exc, StoreOutcomeUnknownError):
        return exc  # translated again from its cause, it would read "nothing accepted"
    cause = exc.__cause__
    if url and isinstance(cause, redis.RedisError) and store.describe(url) not in str(exc):
        return store.translate(cause, url)  # translated below us, without the address
    return exc


@contextmanager
def redis_errors_translated(url: str) -> Iterator[None]:
    """A redis-py failure inside becomes the project's error (store.translate), raised
    from it: for a command that handles a Redis failure itself instead of exiting."""
    try:
        yield
    except redis.RedisError as exc:
        raise store.translate(exc, url) from exc


@click.group(cls=_Group, context_settings={"auto_envvar_prefix": "REPORT_FORWARDER"})
@click.option(
    "--config",
    "config_path",
    envvar="REPORT_FORWARDER_CONFIG",
    type=click.Path(),  # what it must be, the settings loader checks (one line, exit 2)
    help="TOML file merged over the built-in defaults.",
)
@click.version_option(__version__, prog_name="report-forwarder")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """Forward "this solved captcha was wrong" reports to the captcha API, reliably."""
    ctx.obj = State(config_path)
    ctx.call_on_close(ctx.obj.close)


def current_state() -> State:
    """The running command's :class:`State`."""
    state: State = click.get_current_context().find_object(State)  # type: ignore[assignment]
    return state


def command_logging(settings: Settings, level: str | None = None, *, cache: bool = False) -> None:
    """Logging for a command; only the long-running worker caches its loggers (speed)."""
    configure_logging(settings.log_format, level or settings.log_level, cache=cache)
