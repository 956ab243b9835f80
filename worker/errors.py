"""Every exception report-forwarder raises on purpose.

::

    ForwarderError                  base: catch everything we raise on purpose
    ├── ConfigError                 bad file or environment value -> exit 2, naming key and value
    ├── ReportError                 invalid taskId / captchaType / account -> refused at enqueue
    ├── StoreError                  Redis failed the call (nothing was accepted) -> exit 3
    │   ├── StoreUnreachableError   cannot connect / timed out, after the bounded retries
    │   └── StoreFullError          Redis is out of memory (maxmemory, noeviction)
    ├── StoreOutcomeUnknownError    the write may have been accepted: retry HERE only -> exit 4
    │   │                           (e.g. it was sent, but its answer was lost)
    │   └── StoreUnreplicatedError  fewer replicas than redis.min_replicas_ack had the write
    ├── Refusal, ItemRefusal        (worker.intake.input) a request, or one bulk item, refused
    ├── ClientGoneError             (worker.intake.input) the client left mid-body: no answer
    └── UpstreamError               an answer (or no answer) from the captcha API
        ├── TransientUpstreamError  retry with backoff
        │   └── ExchangeError       (worker.delivery.upstream) no whole answer: timeout, network
        └── PermanentUpstreamError  dead-letter now
            └── AccountFaultError   ...and pause the whole account

A StoreOutcomeUnknownError is not a StoreError: a StoreError promises that nothing was
accepted, so a producer may send the report another way; after an unknown outcome the
report may still be delivered, and only a retry through report-forwarder (which
deduplicates) is safe. ``except ForwarderError`` catches both.

Messages never contain an API key.
"""

from __future__ import annotations


class ForwarderError(Exception):
    """Base class of every error report-forwarder raises on purpose."""


class ConfigError(ForwarderError):
    """A configuration file or environment value is invalid."""


class ReportError(ForwarderError, ValueError):
    """A report was refused at enqueue: bad taskId, unknown captchaType or account."""


class StoreError(ForwarderError):
    """Redis failed the call (after retries); nothing was accepted. Worth retrying later."""


class StoreUnreachableError(StoreError):
    """Redis could not be reached, or did not answer in time, after the bounded retries
    (an enqueue sent whose answer was lost is a StoreOutcomeUnknownError instead)."""


class StoreFullError(StoreError):
    """Redis refused a write because it is out of memory (``maxmemory`` with ``noeviction``).
    Scripts write all or nothing, so nothing of the failed call was kept."""


class StoreOutcomeUnknownError(ForwarderError):
    """The call may have been accepted: Redis took the write, but not as the promise of
    success requires — or the write was sent and its answer lost (a read timeout with
    Redis frozen or busy, a connection reset after the command was written), so Redis may
    have run it. Not a :class:`StoreError` ("nothing was accepted"): the report may still
    be delivered. Retrying through report-forwarder is safe (it deduplicates: the retry
    answers ``duplicate`` if the first call was kept); sending the report elsewhere is not
    (it could be reported twice)."""


class StoreUnreplicatedError(StoreOutcomeUnknownError):
    """The primary took the write but fewer than ``redis.min_replicas_ack`` replicas had it
    in time, so it could be lost in a failover: not reported as done, yet the report may
    still be delivered (workers take it from the primary). Retrying through
    report-forwarder is safe (it deduplicates) and succeeds once the replicas catch up;
    sending it elsewhere is not."""


class UpstreamError(ForwarderError):
    """The captcha API answered with an error, or could not be reached."""

    def __init__(
        self, message: str, *, http_status: int | None = None, error_code: str | None = None
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.error_code = error_code


class TransientUpstreamError(UpstreamError):
    """Worth retrying later: network error, timeout, 5xx, 429, busy codes."""


class PermanentUpstreamError(UpstreamError):
    """Retrying cannot help this report."""


class AccountFaultError(PermanentUpstreamError):
    """Retrying cannot help any report of this account (bad key, zero balance, banned IP)."""
