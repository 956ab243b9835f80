"""What a worker process does with each report, and the threads beside it (no Celery here).

Per message: its reports claimed in one round trip, sent side by side (the Celery thread
and idle crew threads), their outcomes recorded by the recorder thread with the worker's
other outcomes, the last round trip closing the message (reports not started — on
shutdown — go to a new message at once). Per report: claim it
in the ledger (skip it if this delivery may not act on it) → guard (known account and
type, account not paused, deadline not passed) → wait for the rate limiter → POST →
classify → record exactly one outcome (accepted, retry at a time, or dead letter with its
reason) → one log line.

No exit path loses a report: a store call that fails (Redis full or unreachable) is retried
for a while and then left where the sweeper finds it; any other exception past the claim
leaves the report ``running`` under this worker, which the sweeper re-queues when the
worker's heartbeat stops or the lease runs out.

Beside the Celery threads, ours: the crew (helpers sending a bulk message's reports), the
recorder (outcomes, many per round trip), the heartbeat (every ``HEARTBEAT_S``: this
worker is alive, these are the messages it holds, these are its rate limits) and the
sweeper.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

import redis

from worker.delivery.background import Heartbeat, HeldMessages, Sweeper, announce_sweep_event
from worker.delivery.batch import Crew, Recorder
from worker.delivery.ratelimit import Limiter
from worker.delivery.report import MAX_ADMIT_WAIT_S, ReportSteps
from worker.delivery.retries import Policy
from worker.errors import ConfigError, StoreError
from worker.observability import events
from worker.observability.health import Liveness
from worker.observability.logs import get_logger, register_secret
from worker.observability.metrics import Metrics
from worker.settings import Settings, client_key
from worker.store import calls as guarded
from worker.store import connection as store
from worker.store import scripts
from worker.store.keys import Keys
from worker.store.ledger import WORKER_TIMEOUT_S, Ledger, SweepEvent
from worker.store.replication import UNREPLICATED_BACKOFF_S, replica_acks

log = get_logger("worker.runtime")

# A finished message stays in the heartbeat's held list this long (covers the moment between
# the task's end and kombu's ack, so a live worker's message is never taken for an orphan).
HELD_LINGER_S = 5.0
# How long a thread keeps retrying a ledger call that failed (Redis full or unreachable)
# before it leaves the report where the sweeper finds it.
STORE_RETRY_S = 30.0

T = TypeVar("T")


class Runtime(ReportSteps):
    """Everything a worker process needs, built once; thread-safe."""

    def __init__(
        self,
        settings: Settings,
        redis_url: str,
        environ: Mapping[str, str] | None = None,
        *,
        client: redis.Redis | None = None,
        metrics: Metrics | None = None,
        concurrency: int | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.announce = events.standard(self.metrics)
        self.redis_url = redis_url
        self.client = client or store.connect(redis_url)
        self.keys = Keys(settings.key_prefix)
        self.client_keys = _load_client_keys(settings, environ)
        self.ledger = Ledger(
            self.client,
            self.keys,
            settings.queue,
            dedup_ttl_s=settings.dedup_ttl_s,
            dead_max_entries=settings.dead_letter_max_entries,
            dead_max_age_s=settings.dead_letter_max_age_s,
            acks=replica_acks(settings, STORE_RETRY_S),
            on_unreplicated=self._unreplicated,
        )
        self.policy = Policy(
            max_attempts=settings.max_attempts,
            base_s=settings.backoff_base_s,
            cap_s=settings.backoff_cap_s,
            jitter=settings.backoff_jitter,
        )
        self.limiter = Limiter(
            self.client,
            self.keys,
            margin_s=settings.ratelimit_margin_s,
            max_inline_wait_s=settings.ratelimit_max_inline_wait_s,
        )
        self._limits = self.limiter.claim_limits(settings.accounts.values())
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.held = HeldMessages(HELD_LINGER_S)
        self.stopping = threading.Event()
        self.liveness = Liveness()  # marked by the consumer loop and the heartbeat
        # as many helpers as Celery threads, and as many reports at once
        self.crew = Crew(concurrency or settings.concurrency, self.work)
        self.recorder = Recorder(self.record_all)
        self._pauses = {}
        self._pace_s = 0.0
        self._busy = 0
        self._busy_cond = threading.Condition()
        self._effective: dict[str, tuple[float, int, float]] = {}
        self._store_logged = 0.0
        self._sweeper: Sweeper | None = None
        self._heartbeat: Heartbeat | None = None
        self._check_redis_version()

    def _check_redis_version(self) -> None:
        """ConfigError (exit 2) on a Redis too old for the scripts; if Redis cannot be asked
        now, the worker starts anyway and keeps trying to reach it."""
        try:
            info = guarded.call(self.client.info, "server", on=self.client)
        except StoreError:
            return
        scripts.require_version(info, store.describe(self.redis_url))

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Beat once (so this worker's rate limits are in force before its first claim),
        then run the heartbeat and the sweeper beside the Celery threads."""
        if self._sweeper is not None:
            return
        self.stopping.clear()
        try:
            self.beat_once()
        except StoreError as exc:  # Redis not there yet: the heartbeat thread keeps trying
            log.warning("worker.heartbeat_failed", error=str(exc))
        self._heartbeat = Heartbeat(self.beat_once, self.liveness)
        self._heartbeat.start()
        self._sweeper = Sweeper(self.sweep_once, self.settings.sweep_interval_s)
        self._sweeper.start()

    def begin_shutdown(self) -> None:
        """Stop taking reports: each thread finishes the report in flight and hands the rest
        of its message back (see :meth:`deliver`)."""
        self.stopping.set()

    def stop(self, timeout_s: float | None = None) -> None:
        """Shut down: finish in-flight reports (bounded by one report's longest path: both
        HTTP timeouts and the rate limiter's inline wait), then stop beating."""
        self.begin_shutdown()
        if timeout_s is None:
            timeout_s = (
                self.settings.connect_timeout_s
                + self.settings.read_timeout_s
                + self.settings.ratelimit_max_inline_wait_s
                + MAX_ADMIT_WAIT_S
                + 2.0
            )
        with self._busy_cond:
            self._busy_cond.wait_for(lambda: self._busy == 0, timeout=timeout_s)
        self.crew.stop()
        self.recorder.stop()
        if self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper = None
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
            try:
                self.ledger.unregister(self.worker_id, sorted(self.settings.accounts))
            except StoreError as exc:
                log.warning("worker.unregister_failed", error=str(exc))

    # -- heartbeat -------------------------------------------------------------------------

    def beat_once(self) -> None:
        """One heartbeat; logs when an account's fleet-wide limit differs from ours."""
        declarations = [self.limiter.declaration(a) for a in self.settings.accounts.values()]
        effective = self.ledger.heartbeat(
            self.worker_id, self.held.snapshot(), declarations, timeout_s=WORKER_TIMEOUT_S
        )
        for name, spec in effective.items():
            if self._effective.get(name) == spec:
                continue
            self._effective[name] = spec
            account = self.settings.accounts[name]
            own = self.limiter.declaration(account)[1:]
            if spec != own:
                fleet = self.limiter.effective(account.rate_limit, ",".join(map(repr, spec)))
                log.warning(
                    "ratelimit.conflict",
                    account=name,
                    configured=str(account.rate_limit),
                    effective=str(fleet),
                    why="another worker declares a different limit for this account; "
                    "every worker uses the strictest one declared",
                )

    # -- one message -----------------------------------------------------------------------

    def received(self, message_id: str) -> None:
        """Celery handed this worker the message (prefetched or to run now)."""
        self.held.add(message_id)

    def deliver(self, message_id: str, refs: Iterable[str]) -> None:
        """Deliver the reports of one message (:meth:`deliver_message`). On shutdown, the
        reports in flight finish and the ones not started go back to the queue at once."""
        self.held.add(message_id)
        with self._busy_cond:
            self._busy += 1
        try:
            if self.stopping.is_set():
                self._done(message_id)
            else:
                self.deliver_message(message_id, list(refs))
        except Exception:  # a defect: what it left running, the sweep re-queues
            log.exception("message.failed", message_id=message_id)
            self._done(message_id)
        finally:
            self.held.finish(message_id)
            with self._busy_cond:
                self._busy -= 1
                self._busy_cond.notify_all()

    def _done(self, message_id: str) -> None:
        try:
            handed = self._store(lambda: self.ledger.done(message_id), "done")
        except StoreError as exc:  # its reports stay where the sweeper finds them
            log.warning("message.done_failed", message_id=message_id, error=str(exc))
        else:
            if handed:
                log.info("message.handed_back", message_id=message_id, reports=handed)

    def _unreplicated(self, what: str, replicas: int) -> None:
        """An outcome the replicas did not confirm in time: it stands on the primary, and
        a failover now could send its report again (docs/design.md §8)."""
        log.warning(
            "store.unreplicated",
            call=what,
            replicas=replicas,
            wanted=self.settings.min_replicas_ack,
            waits_again_in_s=UNREPLICATED_BACKOFF_S,
        )

    def _store(self, call: Callable[[], T], what: str) -> T:
        """``call()``, retried while Redis is full or unreachable (for ``STORE_RETRY_S``, or
        not at all once shutting down). Every ledger script writes all or nothing, so a
        retry never doubles a write."""
        deadline = time.monotonic() + STORE_RETRY_S
        delay = 0.05
        while True:
            try:
                return call()
            except StoreError as exc:
                if self.stopping.is_set() or time.monotonic() + delay > deadline:
                    raise
                now = time.monotonic()
                if now - self._store_logged > 10:
                    self._store_logged = now
                    log.warning("store.retrying", call=what, error=str(exc))
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    # -- one report ------------------------------------------------------------------------

    def resume(self, account: str) -> bool:
        if self.ledger.resume(account):
            log.info("account.resumed", account=account, by="operator")
            return True
        return False

    # -- sweeper ---------------------------------------------------------------------------

    def sweep_once(self) -> list[SweepEvent]:
        events = self.ledger.sweep(
            lease_s=self.settings.lease_s,
            max_deliveries=self.settings.max_deliveries,
            lost_grace_s=self.settings.lost_grace_s,
            worker_timeout_s=WORKER_TIMEOUT_S,
        )
        for event in events:
            announce_sweep_event(event, self.announce)
        return events


def _load_client_keys(settings: Settings, environ: Mapping[str, str] | None) -> dict[str, str]:
    """Each account's API key (its clientKey) from the environment; registered for masking."""
    client_keys: dict[str, str] = {}
    missing = []
    for account in settings.accounts.values():
        api_key = client_key(account, environ)
        if api_key is None:
            missing.append(f"{account.key_env} (account {account.name!r})")
        else:
            client_keys[account.name] = api_key
            register_secret(api_key)
    if missing:
        raise ConfigError(
            "no API key for: "
            + ", ".join(missing)
            + "; export the key in that environment variable (it is never stored in Redis)"
        )
    return client_keys
