"""One rate limit per account, shared by every worker thread, process and host on a Redis.

The guarantee: never more than N requests in any sliding window of the account's period
(``"20/second"``: any 1 s), as the API sees them. Two scripts, both timed by Redis's own
clock (``TIME``), so hosts with skewed clocks still share one limit:

* ``plan`` — fairness. Each report takes the account's next free slot (slots spaced
  ``(period + margin) / N`` apart, after any cool-down). A slot within
  ``max_inline_wait_s`` is waited for in the thread; a later one is *deferred*: the report
  leaves the worker (ledger schedule, no attempt spent) and comes back just before its
  slot, so a backlog on one account never ties up the threads other accounts need. A report
  whose slot would fall after its deadline is not given one (it expires: no capacity).
* ``admit`` — the guarantee. Right before the POST, a sliding log of actual send times
  admits the request only if fewer than N were admitted in the last ``period + margin``.
  The margin absorbs the jitter between admission and the request reaching the API.

Push-back (HTTP 429, ``ERROR_TOO_MUCH_REQUESTS``) sets a cool-down for the whole account
(``Retry-After``, at least 2 s) that both scripts honour on every worker.

Why not the ``limits`` library: see ``bench/README.md`` (its moving window is timed by each
client's clock, has no margin for delivery jitter and no way to reserve a future slot, and
in the benchmark it let more than N through in a 1-s window).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from dataclasses import dataclass

import redis

from . import guarded
from .config import Account, RateLimit
from .keys import Keys
from .logs import get_logger

log = get_logger("worker.ratelimit")

MIN_COOL_DOWN_S = 2.0
THROTTLED_LOG_INTERVAL_S = 10.0

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
_PLAN = (
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
_ADMIT = (
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
_COOL = (
    LUA
    + """
local untl = rl_now() + tonumber(ARGV[1])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur >= untl then return 0 end
redis.call('SET', KEYS[1], string.format('%.6f', untl), 'PX', math.ceil(tonumber(ARGV[1]) * 1000))
return 1
"""
)


@dataclass(frozen=True, slots=True)
class Slot:
    """A planned slot: ``wait_s`` from now (None: none before the deadline)."""

    wait_s: float | None
    at: float  # Redis time of the slot (epoch seconds)


class Limiter:
    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        margin_s: float = 0.025,
        max_inline_wait_s: float = 1.0,
    ) -> None:
        self.client = client
        self.keys = keys
        self.margin_s = margin_s
        self.max_inline_wait_s = max_inline_wait_s
        self._plan = client.register_script(_PLAN)
        self._admit = client.register_script(_ADMIT)
        self._cool = client.register_script(_COOL)
        self._ids = itertools.count()
        self._origin = f"{os.getpid()}-{id(self):x}"
        self._last_log: dict[str, float] = {}
        self._log_lock = threading.Lock()

    def interval_s(self, limit: RateLimit) -> float:
        return (limit.period_s + self.margin_s) / limit.amount

    def claim_args(self, account: Account) -> list[str | float | int]:
        """What the ledger's claim needs to plan and admit for ``account`` in one trip."""
        limit = account.rate_limit
        return [
            self.interval_s(limit),
            limit.amount,
            limit.period_s + self.margin_s,
            f"{self._origin}-{next(self._ids)}",
        ]

    def plan(self, account: Account, deadline: float) -> Slot:
        """Reserve the account's next free slot (unless it falls after ``deadline``)."""
        limit = account.rate_limit
        keys = [
            self.keys.plan(account.name),
            self.keys.cooldown(account.name),
            self.keys.limit(account.name),
        ]
        args = [self.interval_s(limit), deadline, limit.amount, limit.period_s + self.margin_s]
        wait, now = guarded.call(self._plan, keys=keys, args=args, on=self.client)
        wait_s = float(wait)
        if wait_s < 0:
            return Slot(None, float(now))
        return Slot(wait_s, float(now) + wait_s)

    def admit(self, account: Account, *, give_up_after_s: float) -> tuple[bool, float]:
        """Block until the sliding log admits one request: (True, seconds waited); or
        (False, seconds still to wait) as soon as admission is further away than
        ``give_up_after_s`` in all (a long cool-down: the caller defers the report)."""
        limit = account.rate_limit
        keys = [
            self.keys.ratelimit(account.name),
            self.keys.cooldown(account.name),
            self.keys.limit(account.name),
        ]
        window = limit.period_s + self.margin_s
        interval = self.interval_s(limit)
        started = time.monotonic()
        while True:
            member = f"{self._origin}-{next(self._ids)}"
            ok, wait = guarded.call(
                self._admit,
                keys=keys,
                args=[limit.amount, window, member, interval],
                on=self.client,
            )
            waited = time.monotonic() - started
            if int(ok):
                return True, waited
            wait_s = float(wait)
            if waited + wait_s > give_up_after_s:
                return False, wait_s
            self.throttled(account, wait_s)
            time.sleep(wait_s + 0.001)

    def cool_down(self, account: Account, retry_after: float | None) -> float | None:
        """The API pushed back: no sends for this account, on any worker, for
        ``max(retry_after, 2 s)``. Returns the cool-down if it was extended, else None."""
        seconds = max(MIN_COOL_DOWN_S, retry_after or 0.0)
        keys = [self.keys.cooldown(account.name)]
        return (
            seconds
            if int(guarded.call(self._cool, keys=keys, args=[seconds], on=self.client))
            else None
        )

    def throttled(self, account: Account, wait_s: float) -> None:
        """One ``ratelimit.throttled`` line per account per interval, not one per report."""
        now = time.monotonic()
        with self._log_lock:
            if now - self._last_log.get(account.name, -1e9) < THROTTLED_LOG_INTERVAL_S:
                return
            self._last_log[account.name] = now
        log.info(
            "ratelimit.throttled",
            account=account.name,
            rate_limit=str(account.rate_limit),
            wait_s=round(wait_s, 3),
        )

    def effective(self, configured: RateLimit, stored: bytes | str | None) -> RateLimit:
        """The limit the fleet runs an account under: the stricter of ``configured`` and
        the one the live workers' heartbeats agreed on (``stored``, "interval,amount,window")."""
        if not stored:
            return configured
        text = stored.decode() if isinstance(stored, bytes) else stored
        _, amount, window = text.split(",")
        fleet = RateLimit(int(amount), round(float(window) - self.margin_s, 6))
        if fleet.amount / fleet.period_s < configured.amount / configured.period_s:
            return fleet
        return configured

    def declaration(self, account: Account) -> tuple[str, float, int, float]:
        """What this worker declares for ``account`` in its heartbeat."""
        limit = account.rate_limit
        return (
            account.name,
            self.interval_s(limit),
            limit.amount,
            limit.period_s + self.margin_s,
        )

    def usage(self, account: Account) -> dict[str, float | int | str]:
        """Requests admitted in the last window, against the limit (for ``stats``)."""
        configured = account.rate_limit
        key = self.keys.ratelimit(account.name)
        now = time.time()
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self.keys.limit(account.name))
        pipe.get(self.keys.plan(account.name))
        pipe.get(self.keys.cooldown(account.name))
        stored, tat, cool = pipe.execute()
        limit = self.effective(configured, stored)
        used = self.client.zcount(key, now - limit.period_s, "+inf")
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
