"""The retry policies of the clients :mod:`worker.store.connection` builds.

Two kinds of patience: a worker's client rides out a Redis restart that replays its AOF
(connection errors and ``LOADING`` retried for about 30 s); a producer's or the command
line's client (``retry_s``) retries for at most that long, so a caller hears within seconds
that Redis is unreachable instead of hanging. Every failed attempt is told to
:mod:`worker.store.outcome`, so an enqueue knows whether one of them may have run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
import redis.asyncio.retry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from worker.store import outcome

T = TypeVar("T")

# Workers: retried for about 30 s in all, long enough for a Redis restart that replays its AOF.
WORKER_RETRIES = 12
RETRY_ON = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)
# Producers and the command line (``retry_s``): one connect attempt gives up after this
# long, one reply after SHORT_READ_TIMEOUT_S; no new attempt starts once ``retry_s`` has
# passed, so the caller hears within retry_s + 4 s at worst (9 s with the default 5 s).
SHORT_CONNECT_TIMEOUT_S = 3.0
SHORT_READ_TIMEOUT_S = 4.0


class NotingRetry(Retry):
    """redis-py's Retry that tells :mod:`worker.store.outcome` of every failed attempt
    (an enqueue that fails later still knows an earlier attempt may have run)."""

    def call_with_retry(
        self,
        do: Callable[[], T],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        def noted(error: Exception, *count: int) -> Any:
            outcome.note(error)
            return fail(error, *count)

        return super().call_with_retry(do, noted, is_retryable, with_failure_count)


class NotingAsyncRetry(redis.asyncio.retry.Retry):
    """:class:`NotingRetry` for the asyncio client (redis-py's default policy)."""

    async def call_with_retry(
        self,
        do: Callable[[], Any],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> Any:
        async def noted(error: Exception, *count: int) -> Any:
            outcome.note(error)
            return await fail(error, *count)

        return await super().call_with_retry(do, noted, is_retryable, with_failure_count)


class BoundedRetry(Retry):
    """Retries connection loss and ``LOADING`` until ``budget_s`` has passed since the call
    began (a time, not a count, so slow attempts cannot add up); never retries a refused
    password, which no retry can fix. Every failed attempt is noted (worker.store.outcome)."""

    def __init__(self, budget_s: float) -> None:
        super().__init__(ExponentialBackoff(cap=1.0, base=0.05), -1, supported_errors=RETRY_ON)
        self.budget_s = budget_s

    def call_with_retry(
        self,
        do: Callable[[], T],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        self._backoff.reset()  # type: ignore[no-untyped-call]  # redis-py 8: untyped
        started = time.monotonic()
        failures = 0
        while True:
            try:
                return do()
            except self._supported_errors as error:
                outcome.note(error)
                if isinstance(error, redis.AuthenticationError):
                    raise
                if is_retryable is not None and not is_retryable(error):
                    raise
                failures += 1
                if with_failure_count:
                    fail(error, failures)
                else:
                    fail(error)
                delay = self._backoff.compute(failures)
                if time.monotonic() - started + delay > self.budget_s:
                    raise
                time.sleep(delay)


def transient(exc: BaseException) -> bool:
    """Whether a failed call may succeed if made again soon: the connection was lost or
    timed out, the server is loading its AOF, or a primary was turned into a replica (a
    restart or a failover) — not a refusal such as bad credentials or out of memory."""
    if isinstance(exc, redis.AuthenticationError):
        return False
    return isinstance(exc, (*RETRY_ON, redis.exceptions.ReadOnlyError, ConnectionError))
