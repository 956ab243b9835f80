"""The rate limiter's Redis side: its scripts (timed by Redis's clock) and what ``stats``
reads of it. The policy that waits, defers and logs is ``worker.delivery.ratelimit``; the
ledger's claim runs the same Lua to plan and admit in the claim's round trip. See
docs/design.md §5."""

from __future__ import annotations

import time

import redis

from worker.settings import Account, RateLimit
from worker.store.keys import Keys

# Lua shared by the scripts below and by the ledger's claim (which plans and admits in the
# same round trip as the claim when the account has capacity now).
LUA = """
-- the stricter of this worker's limit and the fleet's effective one (the strictest any
-- live worker declares, kept by the heartbeats): one limit per account, fleet-wide
local function rl_limit(limit_key, interval, amount, window)
  local stored = redis.call('GET', limit_key)
  if stored then
    local i, a, w = string.match(stored, '^([^,]+),([^,]+),([^,]+)$')
    if i and tonumber(a) / tonumber(w) < amount / window then
      return tonumber(i), tonumber(a), tonumber(w)
    end
  end
  return interval, amount, window
end
local function rl_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
-- reserve the next planned slot; returns its time, or nil if it falls after the deadline
local function rl_plan(plan_key, cool_key, interval, deadline, now)
  local tat = tonumber(redis.call('GET', plan_key) or '0')
  local cool = tonumber(redis.call('GET', cool_key) or '0')
  local slot = math.max(now, tat, cool)
  if slot > deadline then return nil end
  local nxt = slot + interval
  redis.call('SET', plan_key, string.format('%.6f', nxt), 'PX',
    math.ceil((nxt - now) * 1000) + 60000)
  return slot
end
-- admit one request now if the sliding log allows; returns 0, else the seconds to wait
local function rl_admit(log_key, cool_key, limit, window, member, now)
  local cool = tonumber(redis.call('GET', cool_key) or '0')
  if cool > now then return cool - now end
  redis.call('ZREMRANGEBYSCORE', log_key, '-inf', '(' .. string.format('%.6f', now - window))
  if redis.call('ZCARD', log_key) < limit then
    redis.call('ZADD', log_key, now, member)
    redis.call('PEXPIRE', log_key, math.ceil(window * 1000) + 1000)
    return 0
  end
  local oldest = redis.call('ZRANGE', log_key, 0, 0, 'WITHSCORES')
  return tonumber(oldest[2]) + window - now
end
"""

# KEYS: plan key, cool key, limit key. ARGV: interval s, deadline (epoch s), limit N, window.
# Returns {slot - now, now}, or {-1, now} when no slot is free before the deadline.
PLAN = (
    LUA
    + """
local interval = rl_limit(KEYS[3], tonumber(ARGV[1]), tonumber(ARGV[3]), tonumber(ARGV[4]))
local now = rl_now()
local slot = rl_plan(KEYS[1], KEYS[2], interval, tonumber(ARGV[2]), now)
if not slot then return {'-1', string.format('%.6f', now)} end
return {string.format('%.6f', slot - now), string.format('%.6f', now)}
"""
)

# KEYS: log key, cool key, limit key. ARGV: limit N, window s (period + margin), member,
# interval s. Returns {1, 0} when admitted, else {0, seconds to wait}.
ADMIT = (
    LUA
    + """
local _, amount, window = rl_limit(KEYS[3], tonumber(ARGV[4]), tonumber(ARGV[1]),
  tonumber(ARGV[2]))
local wait = rl_admit(KEYS[1], KEYS[2], amount, window, ARGV[3], rl_now())
if wait == 0 then return {1, '0'} end
return {0, string.format('%.6f', wait)}
"""
)

# KEYS: cool key. ARGV: seconds. Extends, never shortens. Returns 1 if extended.
COOL = (
    LUA
    + """
local untl = rl_now() + tonumber(ARGV[1])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur >= untl then return 0 end
redis.call('SET', KEYS[1], string.format('%.6f', untl), 'PX', math.ceil(tonumber(ARGV[1]) * 1000))
return 1
"""
)


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
