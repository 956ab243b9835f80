"""``report-forwarder stats``: throughput, backlog, dead letters and accounts, once (text or
JSON) or redrawn every second (``--watch``, which shows an unreachable Redis and keeps
trying instead of exiting), and the text rendering of a snapshot."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import click

from worker.cli.app import State, current_state, main, redis_errors_translated
from worker.cli.render import echo, shown
from worker.errors import StoreError, StoreUnreachableError
from worker.store import connection as store

if TYPE_CHECKING:
    import redis


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print once as JSON and exit.")
@click.option("--watch", is_flag=True, help="Redraw every second until Ctrl-C.")
def stats(as_json: bool, watch: bool) -> None:
    """Throughput, backlog, oldest queued age, dead letters, paused accounts."""
    from worker.observability.stats import snapshot

    state = current_state()
    if as_json or not watch:
        snap = snapshot(state.client, state.settings)
        echo(json.dumps(snap, indent=2) if as_json else _render_stats(snap))
        return
    # --watch: one attempt per redraw, and an unreachable Redis is shown, not fatal
    client = store.connect(state.redis_url, retry_s=0)
    try:
        while True:
            click.clear()
            echo(_watch_frame(client, state))
            time.sleep(1)
    finally:
        client.close()


def _watch_frame(client: redis.Redis, state: State) -> str:
    """One redraw of ``stats --watch``: the numbers, or why Redis gave none this time. A
    configuration error (refused credentials, no such database) goes on to the group:
    no redraw can fix it."""
    from worker.observability.stats import snapshot

    try:
        with redis_errors_translated(state.redis_url):
            return _render_stats(snapshot(client, state.settings))
    except StoreError as error:
        now = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        if isinstance(error, StoreUnreachableError):
            where = store.describe(state.redis_url)
            cause = " ".join(str(error.__cause__ or error).split())  # redis-py's own words
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
    return "\n".join(map(shown, lines))  # names and codes from Redis, escaped
