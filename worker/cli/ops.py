"""The operator's other commands: ``check-config`` (the effective settings, keys masked),
``serve`` (the HTTP intake), ``sandbox`` (the local double of the captcha API), ``redis``
(the embedded Redis) and ``demo`` (the whole pipeline on embedded defaults). serve, sandbox
and demo import what they run inside the command (demo brings Celery)."""

from __future__ import annotations

import json
import os
import sys

import click

from worker.cli.app import command_logging, current_state, main
from worker.cli.render import echo, shown
from worker.errors import StoreError
from worker.settings import client_key
from worker.settings.redis_url import is_sentinel, parse_sentinel
from worker.settings.tls import trust_from
from worker.store import connection as store
from worker.store import embedded


@main.command("check-config")
@click.option("--json", "as_json", is_flag=True)
def check_config(as_json: bool) -> None:
    """Print the effective settings (keys masked); exit 2 if anything is invalid."""
    settings = current_state().settings
    doc = {
        "sources": list(settings.sources),
        "redis": (settings.redis_url and store.describe(settings.redis_url))
        or f"embedded ({embedded.url_for(settings.home)})",
        "redis_connect_retry_s": settings.connect_retry_s,
        "redis_min_replicas_ack": settings.min_replicas_ack,
        **_sentinel_view(settings.redis_url),
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
                "base_url": a.shown_base_url,
                "rate_limit": str(a.rate_limit),
                "deadline_s": a.deadline_s,
                "key_env": a.key_env,
                "key": _mask(client_key(a)),
            }
            for name, a in settings.accounts.items()
        },
        "captcha_types": len(settings.captcha_types),
        "tls_trust": trust_from(os.environ).describe(),
    }
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    for key, value in doc.items():  # values from the config file and env, escaped
        if isinstance(value, dict):
            echo(f"{key}:")
            for sub, subvalue in value.items():
                echo(f"  {shown(sub)}: {shown(subvalue)}")
        else:
            echo(f"{key}: {shown(value)}")
    missing = [a.key_env for a in settings.accounts.values() if client_key(a) is None]
    if missing:
        click.echo(f"note: {', '.join(missing)} unset: workers will refuse to start", err=True)


def _sentinel_view(url: str) -> dict[str, object]:
    """For a Sentinel URL: the Sentinels, the master's name, and the primary they name now
    (asked at once, so ops see where writes go; "unknown: ..." when none answers)."""
    if not is_sentinel(url):
        return {}
    target = parse_sentinel(url)
    try:
        host, port = store.primary_address(url)
        primary = f"{host}:{port}"
    except StoreError as exc:
        primary = f"unknown: {exc}"
    return {
        "sentinel": {
            "sentinels": ", ".join(f"{h}:{p}" for h, p in target.sentinels),
            "master_name": target.master_name,
            "primary": primary,
            "sentinel_password": "(set)" if target.sentinel_password else "(none)",
            "tls": target.tls,
        }
    }


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
    type=click.Choice(["any", "capmonster", "anticaptcha", "twocaptcha", "rucaptcha"]),
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

    settings = current_state().settings
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
    command_logging(settings, cache=True)
    run(settings, host, port, token=clean_token(token), client_rate=client_rate, limits=limits)


@main.group("redis")
def redis_group() -> None:
    """The embedded Redis (used when REDIS_URL is unset)."""


@redis_group.command("status")
def redis_status() -> None:
    click.echo(json.dumps(embedded.status(current_state().settings.home)))


@redis_group.command("start")
def redis_start() -> None:
    echo(embedded.ensure_running(current_state().settings.home))


@redis_group.command("stop")
def redis_stop() -> None:
    """Stop the embedded Redis (its data stays in REPORT_FORWARDER_HOME)."""
    stopped = embedded.stop(current_state().settings.home)
    click.echo("stopped" if stopped else "not running")


@main.command()
@click.option("--reports", "-n", type=click.IntRange(10, 200_000), default=3000, show_default=True)
@click.option("--concurrency", "-c", type=click.IntRange(1, 256), default=16, show_default=True)
@click.option("--verbose", "-v", is_flag=True, help="Show every outcome's log line.")
def demo(reports: int, concurrency: int, verbose: bool) -> None:
    """The whole pipeline on embedded defaults: Redis, sandbox API, worker; no key needed."""
    from worker.testing.demo import run_demo

    sys.exit(run_demo(current_state().config_path, reports, concurrency, verbose))
