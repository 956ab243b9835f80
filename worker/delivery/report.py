"""One report's path through a worker (docs/design.md §3.1): claim → guard → rate limit →
POST → classify → record exactly one outcome, announced once. The steps of
:class:`~worker.delivery.runtime.Runtime`, kept apart from its lifecycle and threads."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from worker.delivery.background import HeldMessages
from worker.delivery.batch import Batch, Concluded, Crew, Job, Recorder
from worker.delivery.ratelimit import Limiter
from worker.delivery.retries import Policy, Step, next_step
from worker.delivery.upstream import Outcome, send_report
from worker.errors import ReportError, StoreError
from worker.observability import logs
from worker.observability.events import Announcer
from worker.observability.logs import get_logger
from worker.settings import Account, Settings
from worker.store.ledger import Ledger
from worker.store.records import Record
from worker.store.vocabulary import Finish, Reason

log = get_logger("worker.runtime")

NO_SLOT = "no rate-limit slot left before the deadline"

T = TypeVar("T")
# A deferred report is re-queued this long before its rate-limit slot, so that it is back in
# a worker (through the sweep and the urgent list) in time for it.
DEFER_LEAD_S = 0.5
# Longest a thread waits for admission (a cool-down) before deferring the report instead.
MAX_ADMIT_WAIT_S = 2.0
# An admission made by a batch's claim while the account is far from its limit is good
# for a send this long after the claim (docs/design.md §5): the batch's later reports need
# no admission round trip of their own.
HOLD_S = 2.0
# A batch fills up to this many reports: a message with fewer takes more messages off the
# queue in its claim's round trip (docs/design.md §3.4) — Celery's and kombu's per-message
# cost, paid once for several messages (three bulk ones, or sixty single ones) — as long
# as one thread would send them all within BATCH_S at the pace of the API's answers, so
# that behind a slow API a batch's last report does not wait long, nor its admission go
# stale.
TAKE_UP_TO = 60
BATCH_S = 1.0


class ReportSteps:
    """The per-report steps; :class:`Runtime` provides the parts they use."""

    settings: Settings
    ledger: Ledger
    limiter: Limiter
    policy: Policy
    client_keys: dict[str, str]
    announce: Announcer
    worker_id: str
    crew: Crew
    recorder: Recorder
    held: HeldMessages
    _pauses: dict[str, float]  # account → when this worker last saw it paused
    stopping: threading.Event
    _limits: str  # Limiter.claim_limits of the configured accounts
    _pace_s: float  # how long the API takes to answer, smoothed

    def _store(self, call: Callable[[], T], what: str) -> T:  # pragma: no cover - Runtime's
        raise NotImplementedError

    def _done(self, message_id: str) -> None:  # pragma: no cover - Runtime's
        raise NotImplementedError

    def deliver_message(self, message_id: str, refs: Sequence[str]) -> None:
        """Deliver the reports of one message — and, with room, of more messages taken off
        the queue in the same round trip (up to ``TAKE_UP_TO`` reports in all): claimed in
        one round trip, sent side by side (this thread and any idle crew thread), their
        outcomes recorded as they come, many per round trip (:class:`Recorder`), which
        also closes the messages. Each report keeps its own claim, lease, outcome and log
        line (docs/design.md §3.1, §3.4)."""
        began = time.time()
        try:
            claimed = self._store(
                lambda: self.ledger.claim_many(
                    [(message_id, ref) for ref in refs],
                    self.settings.lease_s,
                    worker=self.worker_id,
                    limits=self._limits,
                    member_prefix=self.limiter.member_prefix(),
                    room=self._room(),
                    hold_s=HOLD_S,
                ),
                "claim",
            )
        except StoreError as exc:  # still queued for this message: the sweep hands it on
            log.warning("message.store_failed", message_id=message_id, error=str(exc))
            self._done(message_id)
            return
        batch = Batch(began, began + self.settings.lease_s, time.time())
        batch.add(message_id, zip(refs, claimed.claims, strict=True))
        for taken_id, answers in claimed.taken:
            self.held.add(taken_id)
            batch.add(taken_id, answers)
        try:
            if not batch.jobs:  # nothing to send: the messages are closed at once
                self.recorder.add(None, batch)
            elif len(batch.jobs) > 1:
                self.crew.share(batch)
            while self.crew.work_on(batch):
                pass
            self.crew.withdraw(batch)
            batch.closed.wait()
        finally:
            for taken_id, _ in claimed.taken:
                self.held.finish(taken_id)

    def _room(self) -> int:
        """How many reports a batch fills up to (``TAKE_UP_TO``, fewer behind a slow API)."""
        return max(1, min(TAKE_UP_TO, int(BATCH_S / max(self._pace_s, 1e-3))))

    def work(self, batch: Batch, job: Job) -> None:
        """One report of ``batch``, on whichever thread took it. A report that could not
        be sent and recorded within its lease is released unsent (as one not reached on
        shutdown): the lease, not the thread, decides when the sweep may send it again."""
        try:
            in_time = batch.in_time(self._longest_path_s(), self.settings.lease_s)
            if self.stopping.is_set() or not in_time:
                self._conclude(job, Finish.RELEASE, job.claim.attempts, self._released(job))
            else:
                self._act(job)
        except StoreError as exc:
            log.warning("report.store_failed", ref=job.ref, error=str(exc))
        except Exception:  # a defect: the report stays running under us; the sweep re-queues it
            log.exception("report.failed", ref=job.ref)
        finally:
            if not job.concluded:
                batch.conclude(self.recorder, None)

    def _longest_path_s(self) -> float:
        """A report's longest way from its claim to its outcome: the limiter's waits, then
        both HTTP timeouts."""
        s = self.settings
        waits = s.ratelimit_max_inline_wait_s + MAX_ADMIT_WAIT_S
        return waits + s.connect_timeout_s + s.read_timeout_s

    def record_all(self, outcomes: list[Concluded], close: list[str]) -> None:
        """One finish round trip for ``outcomes`` (any batches'), closing ``close``; then
        each outcome's log line and counters (:class:`Recorder`)."""
        records = [record for record, _ in outcomes]
        try:
            flags = self._store(lambda: self.ledger.finish_many(records, close), "finish")
        except StoreError as exc:  # still running under us: the sweep re-queues them
            for record in records:
                log.warning("report.store_failed", ref=record.ref, error=str(exc))
            for message_id in close:
                self._done(message_id)
            return
        released = Counter(
            record.message_id
            for record, recorded in zip(records, flags, strict=True)
            if recorded and record.outcome == Finish.RELEASE
        )
        for message_id, count in released.items():
            log.info("message.handed_back", message_id=message_id, reports=count)
        with logs.together():
            for (_, then), recorded in zip(outcomes, flags, strict=True):
                try:
                    then(recorded)
                except Exception:  # a defect in a log line must not lose the others'
                    log.exception("report.announce_failed")

    def _conclude(
        self, job: Job, outcome: Finish, attempts: int, then: Callable[[bool], None], **fields: Any
    ) -> str:
        """The report's outcome, recorded with its batch's (``then(recorded)`` after)."""
        job.concluded = True
        record = Record(job.ref, job.message_id, outcome, attempts, **fields)
        job.batch.conclude(self.recorder, (record, then))
        return str(outcome)

    def _released(self, job: Job) -> Callable[[bool], None]:
        def then(recorded: bool) -> None:
            log.debug("report.released", task_id=job.ctx["task_id"], account=job.ctx["account"])

        return then

    def _act(self, job: Job) -> str:
        """Guard → rate limit → POST → classify → conclude, for one claimed report."""
        claim, ctx = job.claim, job.ctx
        account = self.settings.accounts.get(ctx["account"])
        if account is None:
            return self._bury(
                job, Reason.REJECTED, "UNKNOWN_ACCOUNT", f"no account {ctx['account']!r}"
            )
        try:
            ctype = self.settings.captcha_types.resolve(claim.captcha_type)
            url = account.endpoint_for(ctype)
        except ReportError as exc:
            return self._bury(job, Reason.REJECTED, "UNSUPPORTED_TYPE", str(exc))
        ctx["endpoint"] = account.shown(url)  # a password in the API URL masked
        if claim.paused_until is not None:
            until = _iso(claim.paused_until)
            return self._bury(job, Reason.ACCOUNT_PAUSED, "", f"account paused until {until}")
        paused_at = self._pauses.get(account.name)
        if paused_at is not None and paused_at >= job.batch.claim_began:
            # paused after this report's claim looked (an answer to another report of
            # this worker): its "not paused" is stale
            at = _iso(paused_at)
            return self._bury(job, Reason.ACCOUNT_PAUSED, "", f"account paused at {at}")
        if time.time() >= claim.deadline:
            return self._bury(job, Reason.EXPIRED, "", "deadline passed before it could be sent")
        client_key = self.client_keys.get(account.name)
        if client_key is None:
            return self._bury(
                job, Reason.ACCOUNT_FAULT, "NO_CLIENT_KEY", f"{account.key_env} unset"
            )
        waited = self._wait_for_limiter(job, account)
        if isinstance(waited, str):
            return waited
        ctx["ratelimit_wait_ms"] = round(waited * 1000, 1)
        outcome = send_report(
            url,
            client_key,
            ctx["task_id"],
            connect_timeout_s=self.settings.connect_timeout_s,
            read_timeout_s=self.settings.read_timeout_s,
            error_codes=account.provider.error_codes,
        )
        # the API's pace, smoothed (updates from several threads may interleave: harmless)
        self._pace_s += (outcome.duration_s - self._pace_s) / 16
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

    def _wait_for_limiter(self, job: Job, account: Account) -> float | str:
        """Hold the thread until the account's limiter admits this report (the seconds it
        waited, counted from when the report first asked), or defer the report to its
        slot when that is further away (then: the outcome it has, as :meth:`_conclude`)."""
        claim = job.claim
        asked = claim.limiter_since or time.time()
        if claim.limiter == "go":  # planned and admitted in the claim's round trip
            if time.time() - job.batch.claimed_at <= self.limiter.margin_s / 2:
                return 0.0
            # admitted a while ago (behind its message's other reports): the margin covers
            # admission to arrival only, so this send needs an admission of its own
            return self._admit(job, account, asked)
        if claim.limiter == "held":  # admitted for a send within HOLD_S of the claim
            if time.time() - job.batch.claim_began <= HOLD_S:
                return 0.0
            return self._admit(job, account, asked)
        if claim.limiter == "none":
            return self._bury(job, Reason.EXPIRED, "", NO_SLOT)
        if claim.limiter:
            slot_at = float(claim.limiter)
        elif claim.planned_slot is not None:
            slot_at = claim.planned_slot
        else:
            slot = self.limiter.plan(account, claim.deadline)
            if slot.wait_s is None:
                return self._bury(job, Reason.EXPIRED, "", NO_SLOT)
            slot_at = slot.at
        ahead = slot_at - time.time()
        if ahead > self.limiter.max_inline_wait_s:
            self.limiter.throttled(account, ahead)
            return self._defer(job, due=slot_at - DEFER_LEAD_S, slot=slot_at, since=asked)
        if ahead > 0:
            time.sleep(ahead)
        return self._admit(job, account, asked)

    def _admit(self, job: Job, account: Account, asked: float) -> float | str:
        admitted, wait_s = self.limiter.admit(account, give_up_after_s=MAX_ADMIT_WAIT_S)
        if not admitted:  # the account is cooling down for a while: come back then
            return self._defer(job, due=time.time() + wait_s, slot=None, since=asked)
        return time.time() - asked

    def _defer(self, job: Job, *, due: float, slot: float | None, since: float) -> str:
        """Out of this worker until ``due`` (no attempt spent); keeps its reserved slot."""
        if job.claim.deadline <= due:
            return self._bury(
                job, Reason.EXPIRED, "", "the rate limit leaves no slot before the deadline"
            )

        def then(recorded: bool) -> None:
            if not recorded:
                self._superseded(job)
            else:
                due_in_s = round(due - time.time(), 3)
                ctx = job.ctx
                log.debug("report.deferred", task_id=ctx["task_id"], account=ctx["account"],
                          due_in_s=due_in_s)  # fmt: skip

        return self._conclude(
            job, Finish.DEFER, job.claim.attempts, then, due=due, planned_slot=slot,
            limiter_since=since,
        )  # fmt: skip

    def _record(
        self, job: Job, account: Account, outcome: Outcome, step: Step, attempts: int
    ) -> str:
        ctx = job.ctx
        if outcome.http_status == 429 or outcome.error_code == "ERROR_TOO_MUCH_REQUESTS":
            cooling = self.limiter.cool_down(account, outcome.retry_after)
            if cooling is not None:
                log.warning("ratelimit.pushed_back", account=account.name,
                            error_code=outcome.error_code, cool_down_s=cooling)  # fmt: skip
        if step.action == "accepted":
            # a provider's code that means done (2Captcha's ERROR_DUPLICATE_REPORT) stays
            # visible on the accepted outcome: log line, metric label, stats field
            field = f"accepted|{ctx['kind']}|{outcome.error_code}|{ctx['account']}"

            def accepted(recorded: bool) -> None:
                self.announce("report.accepted", **ctx)

            return self._conclude(job, Finish.ACCEPTED, attempts, accepted, stats_field=field)
        if step.action == "retry":
            field = f"retrying|{ctx['kind']}|{outcome.error_code}|{ctx['account']}"

            def retrying(recorded: bool) -> None:
                if not recorded:
                    self._superseded(job)
                else:
                    delay = round(step.delay_s, 2)
                    self.announce("report.retrying", **ctx, delay_s=delay, error=outcome.detail)

            return self._conclude(
                job, Finish.RETRY, attempts, retrying, stats_field=field,
                error_code=outcome.error_code, http_status=outcome.http_status,
                error=outcome.detail, due=step.due,
            )  # fmt: skip
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
        job: Job,
        reason: str,
        error_code: str,
        error: str,
        *,
        attempts: int | None = None,
        http_status: int | None = None,
    ) -> str:
        def then(recorded: bool) -> None:
            if not recorded:
                self._superseded(job)
            else:
                job.ctx.setdefault("error_code", error_code or None)
                self.announce("report.dead_lettered", **job.ctx, reason=reason, error=error)

        return self._conclude(
            job, Finish.DEAD, job.claim.attempts if attempts is None else attempts, then,
            error_code=error_code, http_status=http_status, error=error, reason=reason,
        )  # fmt: skip

    def _superseded(self, job: Job) -> None:
        log.debug("report.superseded", task_id=job.ctx["task_id"], account=job.ctx["account"])

    def _pause(self, account: Account, outcome: Outcome) -> None:
        # whether this worker or another paused it first: reports claimed before now were
        # told "not paused", and must not be sent (see _paused_since_claim)
        self._pauses[account.name] = time.time()
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


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
