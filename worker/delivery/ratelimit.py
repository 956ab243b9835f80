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
from collections.abc import Iterable
from dataclasses import dataclass

import redis

from worker.observability.logs import get_logger
from worker.settings import Account, RateLimit
from worker.store import calls as guarded
from worker.store import limits
from worker.store.keys import Keys
from worker.store.limits import ADMIT, COOL, PLAN

log = get_logger("worker.ratelimit")

MIN_COOL_DOWN_S = 2.0
THROTTLED_LOG_INTERVAL_S = 10.0


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
        self._plan = client.register_script(PLAN)
        self._admit = client.register_script(ADMIT)
        self._cool = client.register_script(COOL)
        self._ids = itertools.count()
        self._origin = f"{os.getpid()}-{id(self):x}"
        self._last_log: dict[str, float] = {}
        self._log_lock = threading.Lock()

    def interval_s(self, limit: RateLimit) -> float:
        return (limit.period_s + self.margin_s) / limit.amount

    def claim_args(self, account: Account) -> list[str | float | int]:
        """What the ledger's claim needs to plan and admit for ``account`` in one trip."""
        limit = account.rate_limit
        return [self.interval_s(limit), limit.amount, limit.period_s + self.margin_s]

    def claim_limits(self, accounts: Iterable[Account]) -> str:
        """The claim script's table of rate limits (``accounts``' own, as :meth:`claim_args`)."""
        rows = ([a.name, *self.claim_args(a)] for a in accounts)
        return "".join("\t".join(map(str, row)) + "\n" for row in rows)

    def member_prefix(self) -> str:
        """A fresh prefix for the sliding-log members a claim adds (unique per call)."""
        return f"{self._origin}-{next(self._ids)}"

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
        """The stricter of ``configured`` and the fleet's stored limit (see store.limits)."""
        return limits.effective(configured, stored, self.margin_s)

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
        return limits.usage(self.client, self.keys, account, self.margin_s)
