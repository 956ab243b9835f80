"""What runs beside the Celery threads in every worker process: the heartbeat (alive;
the messages held; the rate limits declared) and the sweeper, and how a sweep's events are
announced. See docs/design.md §4."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sized

from worker.errors import StoreError
from worker.observability.health import Liveness
from worker.observability.logs import get_logger
from worker.store.keys import split_ref
from worker.store.ledger import HEARTBEAT_S, SweepEvent
from worker.store.vocabulary import Reason

log = get_logger("worker.runtime")


def announce_sweep_event(event: SweepEvent, announce: Callable[..., None]) -> None:
    """Say what a sweep event did: a recovered or poisoned report is announced (its log line
    and metrics hang off that); the rest are log lines of their own."""
    if event.kind == "resumed":
        log.info("account.resumed", account=event.subject, by="timer")
        return
    if event.kind == "worker_dead":
        log.warning("worker.lost", worker=event.subject, silent_s=float(event.detail or 0))
        return
    account, task_id = split_ref(event.subject)
    if event.kind == "poison":
        deliveries, ctype, kind = ([*event.detail.split("|"), "", ""])[:3]
        announce(
            "report.dead_lettered",
            task_id=task_id,
            account=account,
            captcha_type=ctype,
            kind=kind,
            reason=Reason.POISON,
            deliveries=int(deliveries or 0),
        )
        return
    if event.kind == "requeued":
        log.debug("report.requeued", task_id=task_id, account=account)
        return
    if event.kind == "worker_lost":
        why = "worker lost mid-flight"
    elif event.kind == "lease_expired":
        why = "lease expired"
    else:  # orphaned: "why|new message id"
        why = event.detail.split("|", 1)[0] or "message orphaned"
    announce("report.recovered", task_id=task_id, account=account, why=why)


class HeldMessages:
    """The messages this worker has received and not finished, for its heartbeat. A finished
    one lingers ``linger_s`` (until kombu's ack has surely landed)."""

    def __init__(self, linger_s: float) -> None:
        self.linger_s = linger_s
        self._items: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, message_id: str) -> None:
        with self._lock:
            self._items[message_id] = math.inf

    def finish(self, message_id: str) -> None:
        with self._lock:
            self._items[message_id] = time.monotonic() + self.linger_s

    def snapshot(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            for gone in [m for m, until in self._items.items() if until <= now]:
                del self._items[gone]
            return list(self._items)


class _Periodic(threading.Thread):
    """A daemon thread running ``tick`` every ``interval_s`` until stopped; it never dies of
    a failure, which it logs as ``event`` at most every 30 s (with the traceback when it is
    not a Redis failure)."""

    event = "periodic.failed"

    def __init__(self, name: str, interval_s: float) -> None:
        super().__init__(name=name, daemon=True)
        self.interval_s = interval_s
        self._stop_event = threading.Event()
        self._last_error = 0.0

    def tick(self) -> int:
        raise NotImplementedError

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            while self.run_once() >= 500 and not self._stop_event.is_set():
                pass  # a full batch: more may be due right now

    def run_once(self) -> int:
        """One tick; never raises."""
        try:
            return self.tick()
        except Exception as exc:
            now = time.monotonic()
            if now - self._last_error > 30:
                log.warning(
                    self.event,
                    error=f"{type(exc).__name__}: {exc}",
                    exc_info=not isinstance(exc, StoreError),
                )
                self._last_error = now
            return 0

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


class Heartbeat(_Periodic):
    """Calls ``beat`` (the runtime's one heartbeat) every ``HEARTBEAT_S`` (docs/design.md
    §4.1); marks ``liveness`` when it starts and before and after each beat (docs/design.md
    §4.4)."""

    event = "worker.heartbeat_failed"

    def __init__(self, beat: Callable[[], object], liveness: Liveness) -> None:
        super().__init__("report-forwarder-heartbeat", HEARTBEAT_S)
        self.beat = beat
        self.liveness = liveness

    def run(self) -> None:
        self.liveness.heartbeat_ticked()
        super().run()

    def tick(self) -> int:
        self.liveness.heartbeat_ticked()
        try:
            self.beat()
        finally:
            self.liveness.heartbeat_ticked()
        return 0


class Sweeper(_Periodic):
    """Calls ``sweep`` (the runtime's ledger sweep, which returns its events) every
    ``interval_s`` (``sweep_interval_s``) in each worker process. The sweep is one atomic
    script, so any number of sweepers on any number of hosts is safe."""

    event = "sweeper.failed"

    def __init__(self, sweep: Callable[[], Sized], interval_s: float) -> None:
        super().__init__("report-forwarder-sweeper", interval_s)
        self.sweep = sweep

    def tick(self) -> int:
        return len(self.sweep())
