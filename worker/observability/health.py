"""A worker's health probes, answered on its metrics port (docs/design.md §4.4).

Liveness (``/healthz``) says the process's own loops turn; it never asks Redis, so a Redis
outage does not get every worker restarted by its orchestrator. Two loops are watched:

- the Celery consumer's event loop, which fires a timer entry every ``LOOP_TICK_S`` (a
  bootstep of the worker's Celery app registers it on the loop's own timer, so the entry
  runs only when the loop turns). While the consumer waits for the broker — a Redis outage —
  the loop is not running and liveness holds; after ``LOOP_STALE_S`` without a turn
  otherwise, the loop is stuck.
- the heartbeat thread, which marks each beat it attempts, before and after (a beat rides
  out an unreachable Redis with the worker's retries, so one beat may take minutes); after
  ``HEARTBEAT_STALE_S`` without a mark it is stuck, and the fleet already takes this worker
  for dead while it still holds reports.

Once shutdown has begun, the worker is neither alive nor ready.

Readiness (``/readyz``) says the worker can deliver: Redis answers a PING within
``PING_TIMEOUT_S`` (a client of its own: one attempt, short timeouts) and every configured
account has its key. Neither body ever holds a key or a password.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from worker.errors import ForwarderError, StoreError
from worker.observability.logs import get_logger
from worker.settings import Account, Settings
from worker.store import calls as guarded
from worker.store import connection as store

log = get_logger("worker.health")

# The consumer's event loop marks itself alive this often...
LOOP_TICK_S = 1.0
# ...and is stuck after this long without a mark (kombu's own Redis calls on that loop may
# block for 30 s and retry; a stuck loop stays stuck).
LOOP_STALE_S = 120.0
# The heartbeat thread is stuck after this long without starting or finishing a beat (one
# beat through an unreachable Redis takes up to ~3 minutes of the worker's retries).
HEARTBEAT_STALE_S = 300.0
# Readiness's PING: one attempt, this long to connect and this long to answer.
PING_TIMEOUT_S = 1.0

Verdict = tuple[bool, dict[str, Any]]


class Liveness:
    """The marks the watched loops leave, and the rule that calls them alive. Thread-safe;
    ``clock`` is injectable for tests (monotonic seconds)."""

    def __init__(
        self,
        *,
        loop_stale_s: float = LOOP_STALE_S,
        heartbeat_stale_s: float = HEARTBEAT_STALE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.loop_stale_s = loop_stale_s
        self.heartbeat_stale_s = heartbeat_stale_s
        self.clock = clock
        self._lock = threading.Lock()
        self._loop_state = "starting"  # starting | running | connecting | unwatched
        self._loop_mark = clock()  # the last turn, or when the state began
        self._beat_mark: float | None = None  # None: the heartbeat thread has not started
        self._failing = False

    def loop_ticked(self) -> None:
        """The consumer's event loop turned (called on that loop)."""
        with self._lock:
            self._loop_state = "running"
            self._loop_mark = self.clock()

    def loop_connecting(self) -> None:
        """The consumer stopped its loop to (re)connect to the broker."""
        with self._lock:
            if self._loop_state != "connecting":
                self._loop_state = "connecting"
                self._loop_mark = self.clock()

    def loop_unwatched(self) -> None:
        """The consumer runs without an event loop (a transport without one): not judged."""
        with self._lock:
            self._loop_state = "unwatched"
            self._loop_mark = self.clock()

    def heartbeat_ticked(self) -> None:
        """The heartbeat thread started or finished a beat (or started itself)."""
        with self._lock:
            self._beat_mark = self.clock()

    def check(self, *, stopping: bool = False) -> Verdict:
        """(alive, body): ``{"alive": bool, "checks": {name: "ok" or why not}}``."""
        with self._lock:
            now = self.clock()
            loop_state, loop_age = self._loop_state, now - self._loop_mark
            beat_age = None if self._beat_mark is None else now - self._beat_mark
        checks: dict[str, str] = {"worker": "shutting down" if stopping else "ok"}
        loop_ok = True
        if loop_state == "running":
            loop_ok = loop_age <= self.loop_stale_s
            checks["consumer"] = (
                "ok"
                if loop_ok
                else f"stuck: the event loop has not turned for {loop_age:.0f} s "
                f"(limit {self.loop_stale_s:g} s)"
            )
        elif loop_state == "connecting":
            checks["consumer"] = f"connecting to the broker for {loop_age:.0f} s (see /readyz)"
        elif loop_state == "unwatched":
            checks["consumer"] = "not watched (the transport has no event loop)"
        else:
            checks["consumer"] = "starting"
        beat_ok = beat_age is None or beat_age <= self.heartbeat_stale_s
        if beat_age is None:
            checks["heartbeat"] = "starting"
        elif beat_ok:
            checks["heartbeat"] = "ok"
        else:
            checks["heartbeat"] = (
                f"stuck: no beat started or finished for {beat_age:.0f} s "
                f"(limit {self.heartbeat_stale_s:g} s)"
            )
        alive = loop_ok and beat_ok and not stopping
        self._note(loop_ok and beat_ok, checks)
        return alive, {"alive": alive, "checks": checks}

    def _note(self, healthy: bool, checks: dict[str, str]) -> None:
        """One ``worker.unhealthy`` line when a loop is found stuck (not again until it
        has been found well)."""
        with self._lock:
            turned, self._failing = self._failing != (not healthy), not healthy
        if turned and not healthy:
            stuck = {name: text for name, text in checks.items() if text.startswith("stuck")}
            log.warning("worker.unhealthy", checks=stuck)


class Readiness:
    """Redis answers and every account has its key."""

    def __init__(
        self,
        settings: Settings,
        ping: Callable[[], object],
        has_key: Callable[[Account], bool],
    ) -> None:
        self.settings = settings
        self.ping = ping
        self.has_key = has_key

    def check(self, *, stopping: bool = False) -> Verdict:
        """(ready, body): ``{"ready": bool, "checks": {"redis": ..., "accounts": {...},
        "worker": ...}}``; a failed check says why, naming no secret."""
        try:
            self.ping()
        except ForwarderError as exc:  # says which Redis (password masked) and why
            redis_check = str(exc)
        else:
            redis_check = "ok"
        accounts = {
            name: "ok" if self.has_key(account) else f"missing: {account.key_env} is not set"
            for name, account in sorted(self.settings.accounts.items())
        }
        ready = redis_check == "ok" and all(v == "ok" for v in accounts.values()) and not stopping
        checks = {
            "redis": redis_check,
            "accounts": accounts,
            "worker": "shutting down" if stopping else "ok",
        }
        return ready, {"ready": ready, "checks": checks}


class Probes:
    """What the metrics port answers on ``/healthz`` and ``/readyz``."""

    def __init__(
        self, liveness: Liveness, readiness: Readiness, stopping: Callable[[], bool]
    ) -> None:
        self.liveness = liveness
        self.readiness = readiness
        self.stopping = stopping

    def alive(self) -> Verdict:
        return self.liveness.check(stopping=self.stopping())

    def ready(self) -> Verdict:
        return self.readiness.check(stopping=self.stopping())


def redis_ping(url: str, timeout_s: float = PING_TIMEOUT_S) -> Callable[[], object]:
    """A PING of the Redis at ``url`` by a client of its own: one attempt, ``timeout_s`` to
    connect and to answer; a failure is a :class:`StoreError` naming the URL (password
    masked) and why."""
    client = store.connect(url, retry_s=0)
    client.connection_pool.connection_kwargs.update(
        socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )

    shown = store.describe(url)  # the configured URL (a Sentinel URL too), password masked

    def ping() -> object:
        try:
            return guarded.call(client.ping)
        except ForwarderError as exc:
            raise StoreError(f"{shown}: {exc}") from exc

    return ping
