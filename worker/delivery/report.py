"""One report's path through a worker (docs/design.md §3.1): claim → guard → rate limit →
POST → classify → record exactly one outcome, announced once. The steps of
:class:`~worker.delivery.runtime.Runtime`, kept apart from its lifecycle and threads."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

from worker.delivery.ratelimit import Limiter
from worker.delivery.retries import Policy, Step, next_step
from worker.delivery.upstream import Outcome, send_report
from worker.errors import ReportError
from worker.observability.events import Announcer
from worker.observability.logs import get_logger
from worker.settings import Account, Settings
from worker.store.keys import split_ref
from worker.store.ledger import Claim, Ledger
from worker.store.vocabulary import Finish, Reason

log = get_logger("worker.runtime")

NO_SLOT = "no rate-limit slot left before the deadline"

T = TypeVar("T")
# A deferred report is re-queued this long before its rate-limit slot, so that it is back in
# a worker (through the sweep and the urgent list) in time for it.
DEFER_LEAD_S = 0.5
# Longest a thread waits for admission (a cool-down) before deferring the report instead.
MAX_ADMIT_WAIT_S = 2.0


class ReportSteps:
    """The per-report steps; :class:`Runtime` provides the parts they use."""

    settings: Settings
    ledger: Ledger
    limiter: Limiter
    policy: Policy
    client_keys: dict[str, str]
    announce: Announcer
    worker_id: str

    def _store(self, call: Callable[[], T], what: str) -> T:  # pragma: no cover - Runtime's
        raise NotImplementedError

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
        ctx: dict[str, Any] = {
            "task_id": task_id,
            "captcha_type": claim.captcha_type,
            "kind": claim.kind,
            "account": account_name,
            "queue_ms": max(0, round((started - claim.queued_at) * 1000)),
        }
        job = _Job(ref, message_id, claim, ctx, last)
        if account is None:
            return self._bury(
                job, Reason.REJECTED, "UNKNOWN_ACCOUNT", f"no account {account_name!r}"
            )
        try:
            ctype = self.settings.captcha_types.resolve(claim.captcha_type)
            url = account.endpoint_for(ctype)
        except ReportError as exc:
            return self._bury(job, Reason.REJECTED, "UNSUPPORTED_TYPE", str(exc))
        ctx["endpoint"] = url
        if claim.paused_until is not None:
            until = _iso(claim.paused_until)
            return self._bury(job, Reason.ACCOUNT_PAUSED, "", f"account paused until {until}")
        if started >= claim.deadline:
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
            task_id,
            connect_timeout_s=self.settings.connect_timeout_s,
            read_timeout_s=self.settings.read_timeout_s,
            error_codes=account.provider.error_codes,
        )
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
            return self._bury(
                job, Reason.EXPIRED, "", "no rate-limit slot left before the deadline"
            )
        if claim.limiter:
            slot_at = float(claim.limiter)
        elif claim.planned_slot is not None:
            slot_at = claim.planned_slot
        else:
            slot = self.limiter.plan(account, claim.deadline)
            if slot.wait_s is None:
                return self._bury(
                    job, Reason.EXPIRED, "", "no rate-limit slot left before the deadline"
                )
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
                job, Reason.EXPIRED, "", "the rate limit leaves no slot before the deadline"
            )
        if self._store(
            lambda: self.ledger.finish(
                job.ref,
                job.message_id,
                Finish.DEFER,
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
                    Finish.ACCEPTED,
                    attempts=attempts,
                    stats_field=field,
                    done=job.last,
                ),
                "finish",
            )
            self.announce("report.accepted", **ctx)
            return "accepted"
        if step.action == "retry":
            field = f"retrying|{ctx['kind']}|{outcome.error_code}|{ctx['account']}"
            if self._store(
                lambda: self.ledger.finish(
                    job.ref,
                    job.message_id,
                    Finish.RETRY,
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
                self.announce(
                    "report.retrying", **ctx, delay_s=round(step.delay_s, 2), error=outcome.detail
                )
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
                Finish.DEAD,
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
            self.announce("report.dead_lettered", **job.ctx, reason=reason, error=error)
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


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
