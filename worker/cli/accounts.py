"""``report-forwarder accounts``: the configured accounts (provider, limit, key set or
not, paused or not) and lifting an account's pause by hand."""

from __future__ import annotations

import json

import click

from worker.cli.app import command_logging, current_state, main
from worker.cli.render import echo, shown
from worker.observability.logs import get_logger
from worker.settings import client_key
from worker.store.keys import Keys


@main.group()
def accounts() -> None:
    """Configured accounts and their pauses."""


@accounts.command("list")
@click.option("--json", "as_json", is_flag=True)
def accounts_list(as_json: bool) -> None:
    """Accounts, their provider, limit, and whether they are paused."""
    from worker.observability.stats import snapshot

    state = current_state()
    snap = snapshot(state.client, state.settings)
    paused = {p["account"]: p for p in snap["paused_accounts"]}
    rows = []
    for name, account in sorted(state.settings.accounts.items()):
        rows.append(
            {
                "account": name,
                "provider": account.provider.name,
                "endpoint_base": account.shown_base_url,
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
        echo(
            f"{row['account']:<16} {shown(row['provider']):<12} {row['rate_limit']:<14} "
            f"{pause:<7} key {row['key_env']}{'' if row['key_set'] else ' (unset)'}"
        )


@accounts.command("resume")
@click.argument("name")
def accounts_resume(name: str) -> None:
    """Lift an account's pause now (after fixing its key or balance)."""
    from worker.store.ledger import Ledger

    state = current_state()
    state.settings.account(name)
    command_logging(state.settings)
    ledger = Ledger(state.client, Keys(state.settings.key_prefix), state.settings.queue)
    if ledger.resume(name):
        get_logger("worker.cli").info("account.resumed", account=name, by="operator")
        echo(f"resumed {shown(name)}")
    else:
        echo(f"{shown(name)} was not paused")
