"""Whether a failed write may have reached Redis: the difference between "nothing was
accepted" (:class:`~worker.errors.StoreError`) and an unknown outcome
(:class:`~worker.errors.StoreOutcomeUnknownError`).

A command whose answer was lost — a read timeout (Redis frozen or busy), a connection
reset after the command was written, a write that failed part-way — may have run: a Redis
stopped with SIGSTOP runs the command it buffered once resumed. A failure while the
connection was being made (refused, "Timeout connecting", the handshake's own commands
timing out) or while its health-check PING ran sent nothing of the command. redis-py says
which phase failed by where it raised, not in its messages (a handshake that times out
says "Timeout reading from …" too), so :func:`reached` reads the traceback: an error
raised under one of redis-py's connect-phase functions sent nothing; any other lost
connection may have. Should redis-py rename those functions, a connect-phase failure
reads as "may have reached Redis": an unknown outcome, never a false "nothing accepted".

The enqueue path watches its calls (:func:`watching`); the retry loops of the clients
built by :mod:`worker.store.connection` :func:`note` every failed attempt in it, so an
attempt that may have reached Redis is remembered when a later one fails before sending.
A later attempt that succeeds makes the outcome known (the enqueue deduplicates).
Read-only calls do not watch: for them an unknown outcome means nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import traceback
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import redis

# Functions of redis-py (and of our connection classes) that run before a command is
# written: the pool handing out and checking a connection, the connect with its handshake
# (HELLO, AUTH, SELECT, CLIENT SETINFO), Sentinel's lookup of the primary, the health PING.
CONNECT_PHASE = frozenset(
    {
        "get_connection",
        "ensure_connection",
        "make_connection",
        "connect",
        "connect_check_health",
        "_connect",
        "_connect_retry",
        "connect_to",
        "on_connect",
        "on_connect_check_health",
        "check_health",
        "_send_ping",
    }
)


def reached(exc: BaseException) -> bool:
    """Whether the failed call ``exc`` ended may have reached Redis unanswered: a lost
    connection or a timeout raised while redis-py sent the command or read its answer
    (not while connecting). An answer — an error reply, refused credentials — is not."""
    if isinstance(exc, TimeoutError) and not isinstance(exc, redis.RedisError):
        cut = exc.__cause__ or exc.__context__  # asyncio.timeout: where was the call cut?
        if isinstance(cut, asyncio.CancelledError):
            exc = cut
    if isinstance(exc, redis.AuthenticationError) or not isinstance(
        exc, redis.ConnectionError | redis.TimeoutError | OSError | asyncio.CancelledError
    ):
        return False
    innermost = None  # the deepest frame of redis-py (or of our connection classes)
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        module = str(frame.f_globals.get("__name__", ""))
        if module.startswith("redis.") or module in (
            "redis",
            "worker.store.connection",
            "worker.store.retrying",
        ):
            if frame.f_code.co_name in CONNECT_PHASE:
                return False
            innermost = frame.f_code.co_name
    # cancelled in a retry's backoff: between attempts, each already noted
    return innermost is not None and innermost != "call_with_retry"


@dataclass(slots=True)
class Sends:
    """What a watched call's failed attempts tell: ``lost``, the first that may have
    reached Redis unanswered (None: none did)."""

    lost: BaseException | None = None

    def note(self, exc: BaseException) -> None:
        if self.lost is None and reached(exc):
            self.lost = exc


_WATCHED: ContextVar[Sends | None] = ContextVar("report_forwarder_sends", default=None)


@contextlib.contextmanager
def watching() -> Iterator[Sends]:
    """Note the failed attempts of the calls made inside (this thread or asyncio task)."""
    sends = Sends()
    token = _WATCHED.set(sends)
    try:
        yield sends
    finally:
        _WATCHED.reset(token)


def note(exc: BaseException) -> None:
    """A failed attempt, for the watched call in progress (if any)."""
    sends = _WATCHED.get()
    if sends is not None:
        sends.note(exc)
