"""What a worker process does with each report, and the threads beside it (no Celery here).

Per message: its reports one after another, then "done" (reports not reached — on
shutdown — go to a new message at once). Per report: claim it in the ledger (skip it if this
delivery may not act on it) → guard (known account and type, account not paused, deadline
not passed) → wait for the rate limiter → POST → classify → record exactly one outcome
(accepted, retry at a time, or dead letter with its reason) → one log line.

No exit path loses a report: a store call that fails (Redis full or unreachable) is retried
for a while and then left where the sweeper finds it; any other exception past the claim
leaves the report ``running`` under this worker, which the sweeper re-queues when the
worker's heartbeat stops or the lease runs out.

Beside the Celery threads, two of ours: the heartbeat (every ``HEARTBEAT_S``: this worker
is alive, these are the messages it holds, these are its rate limits) and the sweeper.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import redis

from worker.delivery.ratelimit import Limiter
from worker.delivery.retries import Policy, Step, next_step
from worker.delivery.upstream import Outcome, send_report
from worker.errors import ConfigError, ReportError, StoreError
from worker.observability.logs import get_logger, register_secret
from worker.observability.metrics import Metrics
from worker.settings import Account, Settings, client_key
from worker.store import calls as guarded
from worker.store import connection as store
from worker.store import scripts
from worker.store.keys import Keys, split_ref
from worker.store.ledger import HEARTBEAT_S, WORKER_TIMEOUT_S, Claim, Ledger, SweepEvent

log = get_logger("worker.runtime")

# A deferred report is re-queued this long before its rate-limit slot, so that it is back in
# a worker (through the sweep and the urgent list) in time for it.
DEFER_LEAD_S = 0.5
# Longest a thread waits for admission (a cool-down) before deferring the report instead.
MAX_ADMIT_WAIT_S = 2.0
# A finished message stays in the heartbeat's held list this long (covers the moment between
# the task's end and kombu's ack, so a live worker's message is never taken for an orphan).
HELD_LINGER_S = 5.0
# How long a thread keeps retrying a ledger call that failed (Redis full or unreachable)
# before it leaves the report where the sweeper finds it.
STORE_RETRY_S = 30.0

T = TypeVar("T")


class Runtime:
    """Everything a worker process needs, built once; thread-safe."""

    def __init__(
        self,
        settings: Settings,
        redis_url: str,
        environ: Mapping[str, str] | None = None,
        *,
        client: redis.Redis | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.redis_url = redis_url
        self.client = client or store.connect(redis_url)
        self.keys = Keys(settings.key_prefix)
        self.client_keys = _load_keys(settings, environ)
        self.ledger = Ledger(
            self.client,
            self.keys,
            settings.queue,
            dedup_ttl_s=settings.dedup_ttl_s,
            dead_max_entries=settings.dead_letter_max_entries,
            dead_max_age_s=settings.dead_letter_max_age_s,
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
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.held = HeldMessages(HELD_LINGER_S)
        self.stopping = threading.Event()
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
        self._heartbeat = Heartbeat(self)
        self._heartbeat.start()
        self._sweeper = Sweeper(self)
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
        """Deliver the reports of one message, one after another. On shutdown, the report in
        flight finishes and the ones not reached go back to the queue at once."""
        self.held.add(message_id)
        with self._busy_cond:
            self._busy += 1
        refs = list(refs)
        done_with_last = False  # the last report's finish also closed the message
        try:
            for index, ref in enumerate(refs):
                if self.stopping.is_set():
                    break
                last = index == len(refs) - 1
                status = self._process_one(ref, message_id, last=last)
                done_with_last = last and status not in (None, "skipped")
        finally:
            if not done_with_last:
                self._done(message_id)
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

    def _process_one(self, ref: str, message_id: str, *, last: bool) -> str | None:
        """What became of the report (as :meth:`process`), or None if it raised."""
        try:
            return self.process(ref, message_id, last=last)
        except StoreError as exc:
            log.warning("report.store_failed", ref=ref, error=str(exc))
        except Exception:  # a defect: the report stays running under us; the sweep re-queues it
            log.exception("report.failed", ref=ref)
        return None

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

    def process(self, ref: str, message_id: str, *, last: bool = False) -> str:
        """Deliver one report of message ``message_id``; returns what became of it. ``last``:
        the message's last report, whose outcome also closes the message ("skipped": not)."""
        account_name, task_id = split_ref(ref)
        account = self.settings.accounts.get(account_name)
        limiter_args = self.limiter.claim_args(account) if account is not None else ()
        claim = self._store(
            lambda: self.ledger.claim(
                ref, message_id, self.settings.lease_s, limiter_args, worker=self.worker_id
            ),
            "claim",
        )
        if isinstance(claim, str):
            log.debug("report.skipped", task_id=task_id, account=account_name, state=claim)
            return "skipped"
        started = time.time()
        self.metrics.queue_seconds.observe(max(0.0, started - claim.queued_at))
        ctx: dict[str, Any] = {
            "task_id": task_id,
            "captcha_type": claim.captcha_type,
            "kind": claim.kind,
            "account": account_name,
            "queue_ms": max(0, round((started - claim.queued_at) * 1000)),
        }
        job = _Job(ref, message_id, claim, ctx, last)
        if account is None:
            return self._bury(job, "rejected", "UNKNOWN_ACCOUNT", f"no account {account_name!r}")
        try:
            ctype = self.settings.captcha_types.resolve(claim.captcha_type)
            url = account.endpoint_for(ctype)
        except ReportError as exc:
            return self._bury(job, "rejected", "UNSUPPORTED_TYPE", str(exc))
        ctx["endpoint"] = url
        if claim.paused_until is not None:
            until = _iso(claim.paused_until)
            return self._bury(job, "account_paused", "", f"account paused until {until}")
        if started >= claim.deadline:
            return self._bury(job, "expired", "", "deadline passed before it could be sent")
        key = self.client_keys.get(account.name)
        if key is None:
            return self._bury(job, "account_fault", "NO_CLIENT_KEY", f"{account.key_env} unset")
        waited = self._wait_for_limiter(job, account)
        if isinstance(waited, str):
            return waited
        ctx["ratelimit_wait_ms"] = round(waited * 1000, 1)
        self.metrics.ratelimit_wait_seconds.labels(account.name).observe(waited)
        outcome = send_report(
            url,
            key,
            task_id,
            connect_timeout_s=self.settings.connect_timeout_s,
            read_timeout_s=self.settings.read_timeout_s,
            error_codes=account.provider.error_codes,
        )
        self.metrics.request_seconds.labels(claim.kind).observe(outcome.duration_s)
        attempts = claim.attempts + 1
        step = next_step(
            outcome, attempts=attempts, deadline=claim.deadline, now=time.time(), policy=self.policy
        )
        ctx.update(
            attempt=attempts,
            http_status=outcome.http_status,
            error_code=outcome.error_code or None,
            duration_ms=round(outcome.duration_s * 1000, 1),
        )
        return self._record(job, account, outcome, step, attempts)

    def _wait_for_limiter(self, job: _Job, account: Account) -> float | str:
        """Hold the thread until the account's limiter admits this report (the seconds it
        waited, counted from when the report first asked), or defer the report to its
        slot when that is further away (then: what became of it, "deferred" or "expired")."""
        claim = job.claim
        asked = claim.limiter_since or time.time()
        if claim.limiter == "go":  # planned and admitted in the claim's round trip
            return 0.0
        if claim.limiter == "none":
            return self._bury(job, "expired", "", "no rate-limit slot left before the deadline")
        if claim.limiter:
            slot_at = float(claim.limiter)
        elif claim.planned_slot is not None:
            slot_at = claim.planned_slot
        else:
            slot = self.limiter.plan(account, claim.deadline)
            if slot.wait_s is None:
                return self._bury(job, "expired", "", "no rate-limit slot left before the deadline")
            slot_at = slot.at
        ahead = slot_at - time.time()
        if ahead > self.limiter.max_inline_wait_s:
            self.limiter.throttled(account, ahead)
            return self._defer(job, due=slot_at - DEFER_LEAD_S, slot=slot_at, since=asked)
        if ahead > 0:
            time.sleep(ahead)
        admitted, wait_s = self.limiter.admit(account, give_up_after_s=MAX_ADMIT_WAIT_S)
        if not admitted:  # the account is cooling down for a while: come back then
            return self._defer(job, due=time.time() + wait_s, slot=None, since=asked)
        return time.time() - asked

    def _defer(self, job: _Job, *, due: float, slot: float | None, since: float) -> str:
        """Out of this worker until ``due`` (no attempt spent); keeps its reserved slot."""
        if job.claim.deadline <= due:
            return self._bury(
                job, "expired", "", "the rate limit leaves no slot before the deadline"
            )
        if self._store(
            lambda: self.ledger.finish(
                job.ref,
                job.message_id,
                "defer",
                attempts=job.claim.attempts,
                due=due,
                planned_slot=slot,
                limiter_since=since,
                done=job.last,
            ),
            "finish",
        ):
            log.debug("report.deferred", task_id=job.ctx["task_id"], account=job.ctx["account"],
                      due_in_s=round(due - time.time(), 3))  # fmt: skip
            return "deferred"
        return self._superseded(job)

    def _record(
        self, job: _Job, account: Account, outcome: Outcome, step: Step, attempts: int
    ) -> str:
        ctx = job.ctx
        if outcome.http_status == 429 or outcome.error_code == "ERROR_TOO_MUCH_REQUESTS":
            cooling = self.limiter.cool_down(account, outcome.retry_after)
            if cooling is not None:
                log.warning("ratelimit.pushed_back", account=account.name,
                            error_code=outcome.error_code, cool_down_s=cooling)  # fmt: skip
        if step.action == "accepted":
            field = f"accepted|{ctx['kind']}||{ctx['account']}"
            self._store(
                lambda: self.ledger.finish(
                    job.ref,
                    job.message_id,
                    "accepted",
                    attempts=attempts,
                    stats_field=field,
                    done=job.last,
                ),
                "finish",
            )
            log.info("report.accepted", **ctx)
            self.metrics.outcome("accepted", claim_kind(ctx), None)
            return "accepted"
        if step.action == "retry":
            field = f"retrying|{ctx['kind']}|{outcome.error_code}|{ctx['account']}"
            if self._store(
                lambda: self.ledger.finish(
                    job.ref,
                    job.message_id,
                    "retry",
                    attempts=attempts,
                    stats_field=field,
                    error_code=outcome.error_code,
                    http_status=outcome.http_status,
                    error=outcome.detail,
                    due=step.due,
                    done=job.last,
                ),
                "finish",
            ):
                log.info(
                    "report.retrying", **ctx, delay_s=round(step.delay_s, 2), error=outcome.detail
                )
                self.metrics.outcome("retrying", claim_kind(ctx), outcome.error_code)
                return "retrying"
            return self._superseded(job)
        if step.pause_account:
            self._pause(account, outcome)
        return self._bury(
            job,
            step.reason,
            outcome.error_code,
            outcome.detail,
            attempts=attempts,
            http_status=outcome.http_status,
        )

    def _bury(
        self,
        job: _Job,
        reason: str,
        error_code: str,
        error: str,
        *,
        attempts: int | None = None,
        http_status: int | None = None,
    ) -> str:
        if self._store(
            lambda: self.ledger.finish(
                job.ref,
                job.message_id,
                "dead",
                attempts=job.claim.attempts if attempts is None else attempts,
                error_code=error_code,
                http_status=http_status,
                error=error,
                reason=reason,
                done=job.last,
            ),
            "finish",
        ):
            job.ctx.setdefault("error_code", error_code or None)
            log.warning("report.dead_lettered", **job.ctx, reason=reason, error=error)
            self.metrics.outcome(reason, claim_kind(job.ctx), error_code)
            return reason
        return self._superseded(job)

    def _superseded(self, job: _Job) -> str:
        log.debug("report.superseded", task_id=job.ctx["task_id"], account=job.ctx["account"])
        return "superseded"

    def _pause(self, account: Account, outcome: Outcome) -> None:
        seconds = self.settings.account_pause_s
        reason = json.dumps({"error_code": outcome.error_code, "at": time.time()})
        if self._store(lambda: self.ledger.pause(account.name, seconds, reason), "pause"):
            log.warning(
                "account.paused",
                account=account.name,
                error_code=outcome.error_code,
                pause_s=seconds,
                until=_iso(time.time() + seconds),
            )

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
            why = _log_sweep_event(event)
            if event.kind == "poison":
                kind = ([*event.detail.split("|"), "", "", ""])[2]
                self.metrics.outcome("poison", kind, None)
            elif why:
                self.metrics.recovered.labels(why).inc()
        return events


class _Job:
    __slots__ = ("claim", "ctx", "last", "message_id", "ref")

    def __init__(
        self, ref: str, message_id: str, claim: Claim, ctx: dict[str, Any], last: bool
    ) -> None:
        self.ref = ref
        self.message_id = message_id
        self.claim = claim
        self.ctx = ctx
        self.last = last  # the message's last report: its finish closes the message too


def claim_kind(ctx: dict[str, Any]) -> str:
    return str(ctx.get("kind") or "")


def _log_sweep_event(event: SweepEvent) -> str | None:
    """One log line for a sweep event; returns why a report was recovered, if it was."""
    if event.kind == "resumed":
        log.info("account.resumed", account=event.subject, by="timer")
        return None
    if event.kind == "worker_dead":
        log.warning("worker.lost", worker=event.subject, silent_s=float(event.detail or 0))
        return None
    account, task_id = split_ref(event.subject)
    if event.kind == "poison":
        deliveries, ctype, kind = ([*event.detail.split("|"), "", ""])[:3]
        log.warning(
            "report.dead_lettered",
            task_id=task_id,
            account=account,
            captcha_type=ctype,
            kind=kind,
            reason="poison",
            deliveries=int(deliveries or 0),
        )
        return None
    if event.kind == "requeued":
        log.debug("report.requeued", task_id=task_id, account=account)
        return None
    if event.kind == "worker_lost":
        why = "worker lost mid-flight"
    elif event.kind == "lease_expired":
        why = "lease expired"
    else:  # orphaned: "why|new message id"
        why = event.detail.split("|", 1)[0] or "message orphaned"
    log.warning("report.recovered", task_id=task_id, account=account, why=why)
    return why


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


class Heartbeat(threading.Thread):
    """Beats every ``HEARTBEAT_S``; never raises (a failure is logged at most every 30 s)."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(name="report-forwarder-heartbeat", daemon=True)
        self.runtime = runtime
        self._stop_event = threading.Event()
        self._last_error = 0.0

    def run(self) -> None:
        while not self._stop_event.wait(HEARTBEAT_S):
            try:
                self.runtime.beat_once()
            except Exception as exc:
                now = time.monotonic()
                if now - self._last_error > 30:
                    log.warning(
                        "worker.heartbeat_failed",
                        error=f"{type(exc).__name__}: {exc}",
                        exc_info=not isinstance(exc, StoreError | redis.RedisError),
                    )
                    self._last_error = now

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


class Sweeper(threading.Thread):
    """Runs the ledger sweep every ``sweep_interval_s`` in each worker process. The sweep is
    one atomic script, so any number of sweepers on any number of hosts is safe."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(name="report-forwarder-sweeper", daemon=True)
        self.runtime = runtime
        self._stop_event = threading.Event()
        self._last_error = 0.0

    def run(self) -> None:
        interval = self.runtime.settings.sweep_interval_s
        while not self._stop_event.wait(interval):
            while self.run_once() >= 500 and not self._stop_event.is_set():
                pass  # a full batch: more may be due right now

    def run_once(self) -> int:
        """One sweep; never raises (the sweeper must outlive any one failure, which is
        logged at most every 30 s)."""
        try:
            return len(self.runtime.sweep_once())
        except Exception as exc:
            now = time.monotonic()
            if now - self._last_error > 30:
                log.warning(
                    "sweeper.failed",
                    error=f"{type(exc).__name__}: {exc}",
                    exc_info=not isinstance(exc, StoreError | redis.RedisError),
                )
                self._last_error = now
            return 0

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def _load_keys(settings: Settings, environ: Mapping[str, str] | None) -> dict[str, str]:
    keys: dict[str, str] = {}
    missing = []
    for account in settings.accounts.values():
        key = client_key(account, environ)
        if key is None:
            missing.append(f"{account.key_env} (account {account.name!r})")
        else:
            keys[account.name] = key
            register_secret(key)
    if missing:
        raise ConfigError(
            "no API key for: "
            + ", ".join(missing)
            + "; export the key in that environment variable (it is never stored in Redis)"
        )
    return keys


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
