"""``report-forwarder dead-letters``: list, show, replay, purge and export the reports that
could not be delivered. The filters (--reason, --type, --account, --since) are declared
once, in :func:`filter_options`, and reach each command as one :class:`Filters`.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from worker.cli.app import EXIT_REFUSED, current_state, fail, main
from worker.cli.render import echo, shown
from worker.producer import replay
from worker.store.deadletters import REASONS, DeadLetters, Filters, check_reason, parse_age
from worker.store.keys import Keys
from worker.store.vocabulary import provider_codes

_FILTER_OPTIONS = (
    click.option("--reason", type=click.Choice(REASONS), help="Only this reason."),
    click.option("--type", "ctype", help="Only this captchaType (or kind: image, token)."),
    click.option("--account", help="Only this account."),
    click.option("--since", help="Only those that failed within AGE (90s, 15m, 2h, 1d)."),
)


def filter_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --reason, --type, --account and --since to ``command``, which receives them as
    one ``filters`` argument (built before its body runs: a bad --since is refused first)."""

    @functools.wraps(command)
    def with_filters(
        *args: Any,
        reason: str | None,
        ctype: str | None,
        account: str | None,
        since: str | None,
        **kwargs: Any,
    ) -> Any:
        filters = Filters(
            reason=check_reason(reason),
            captcha_type=ctype,
            account=account,
            since_s=parse_age(since) if since else None,
        )
        return command(*args, filters=filters, **kwargs)

    decorated: Callable[..., Any] = with_filters
    for option in reversed(_FILTER_OPTIONS):
        decorated = option(decorated)
    return decorated


def _dead() -> DeadLetters:
    state = current_state()
    codes = provider_codes(state.settings.accounts.values())
    return DeadLetters(state.client, Keys(state.settings.key_prefix), codes)


def _check_selection(ids: tuple[str, ...], everything: bool, filters: Filters) -> None:
    """IDs together with filters or --all is a usage error for replay and purge (which
    would win is not obvious, and purge cannot be undone)."""
    if ids and (everything or not filters.empty):
        raise click.UsageError(
            "give dead-letter IDs, or filters (--reason, --type, --account, --since), or "
            "--all: not IDs together with filters or --all"
        )


@main.group("dead-letters")
def dead_letters() -> None:
    """Inspect, replay and purge reports that could not be delivered."""


@dead_letters.command("list")
@filter_options
@click.option("--limit", "-n", type=click.IntRange(1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
def dl_list(filters: Filters, limit: int, as_json: bool) -> None:
    """Newest first. Exit 1 when nothing matches (with --json too: an empty list)."""
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
    for d in letters:  # every field from Redis escaped (it may hold the API's bytes)
        failed = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(d.failed_at or 0))
        code = shown(d.error_code or "-")[:26]
        echo(
            f"{d.id:<16} {failed:<19} {shown(d.account)[:10]:<10} {d.task_id:>12} "
            f"{shown(d.captcha_type)[:22]:<22} {shown(d.reason):<17} {code:<26} "
            f"{d.http_status or '-':>4} {d.attempts:>5}"
        )
    click.echo(f"{len(letters)} shown of {store_.count()} dead letters", err=True)


@dead_letters.command("show")
@click.argument("entry_id")
def dl_show(entry_id: str) -> None:
    """One dead letter, every field, as JSON."""
    letter = _dead().get(entry_id)
    if letter is None:
        fail(f"no dead letter with id {entry_id}", EXIT_REFUSED)
    click.echo(json.dumps(letter.to_json(), indent=2))


@dead_letters.command("replay")
@click.argument("ids", nargs=-1)
@filter_options
@click.option("--all", "everything", is_flag=True, help="Every dead letter.")
@click.option("--json", "as_json", is_flag=True)
def dl_replay(ids: tuple[str, ...], filters: Filters, everything: bool, as_json: bool) -> None:
    """Queue dead letters again (fresh deadline, normal path), removing them as they go."""
    _check_selection(ids, everything, filters)
    letters = _dead().select(ids, filters, everything)
    result = replay(current_state().producer, letters)
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
            echo(f"{entry_id}: kept: {shown(error)}", err=True)
        click.echo(
            f"replayed {result.replayed}, duplicates {result.duplicates}, kept {len(refused)}"
        )
    if refused:
        sys.exit(EXIT_REFUSED)


@dead_letters.command("purge")
@click.argument("ids", nargs=-1)
@filter_options
@click.option("--all", "everything", is_flag=True, help="Every dead letter.")
def dl_purge(ids: tuple[str, ...], filters: Filters, everything: bool) -> None:
    """Delete dead letters for good."""
    _check_selection(ids, everything, filters)
    store_ = _dead()
    letters = store_.select(ids, filters, everything)
    click.echo(f"purged {store_.purge(current_state().producer.ledger, letters)}")


@dead_letters.command("export")
@filter_options
def dl_export(filters: Filters) -> None:
    """Every matching dead letter as JSON lines, oldest first."""
    for letter in _dead().iter(filters, newest_first=False):
        click.echo(json.dumps(letter.to_json()))
