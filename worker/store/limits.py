"""The rate limiter's Redis side: its scripts (timed by Redis's clock) and what ``stats``
reads of it. The policy that waits, defers and logs is ``worker.delivery.ratelimit``; the
ledger's claim runs the same Lua to plan and admit in the claim's round trip. See
docs/design.md §5."""

from __future__ import annotations

import time

import redis

from worker.settings import Account, RateLimit
from worker.store import scripts
from worker.store.keys import Keys

LUA = scripts.source("ratelimit")  # the helpers; the ledger's claim script includes them
PLAN = scripts.source("plan")
ADMIT = scripts.source("admit")
COOL = scripts.source("cool")


def effective(configured: RateLimit, stored: bytes | str | None, margin_s: float) -> RateLimit:
    """The limit the fleet runs an account under: the stricter of ``configured`` and the one
    the live workers' heartbeats agreed on (``stored``, "interval,amount,window")."""
    if not stored:
        return configured
    text = stored.decode() if isinstance(stored, bytes) else stored
    _, amount, window = text.split(",")
    fleet = RateLimit(int(amount), round(float(window) - margin_s, 6))
    if fleet.amount / fleet.period_s < configured.amount / configured.period_s:
        return fleet
    return configured


def usage(
    client: redis.Redis, keys: Keys, account: Account, margin_s: float
) -> dict[str, float | int | str]:
    """Requests admitted in the account's last window, against its fleet-wide limit."""
    configured = account.rate_limit
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.get(keys.limit(account.name))
    pipe.get(keys.plan(account.name))
    pipe.get(keys.cooldown(account.name))
    stored, tat, cool = pipe.execute()
    limit = effective(configured, stored, margin_s)
    used = client.zcount(keys.ratelimit(account.name), now - limit.period_s, "+inf")
    ahead = max(0.0, float(tat) - now) if tat else 0.0
    extra: dict[str, str] = {}
    if limit != configured:
        extra["configured_rate_limit"] = str(configured)
    return {
        "rate_limit": str(limit),
        **extra,
        "used_in_window": int(used),
        "usage": round(int(used) / limit.amount, 3),
        "planned_ahead_s": round(ahead, 3),
        "cooling_down_s": round(max(0.0, float(cool) - now), 3) if cool else 0.0,
    }
