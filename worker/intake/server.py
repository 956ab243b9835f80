"""The intake's connections: uvicorn (uvloop + httptools) with the guards it lacks.

uvicorn closes idle keep-alive connections, but has no deadline for a request's headers or
body and no cap per client address (``limit_concurrency`` answers 503 only once a request's
headers are in): a slow or silent client holds a file descriptor for ever, and enough of
them from one address starve everyone. :class:`GuardedProtocol`, uvicorn's httptools
protocol with these added, gives each connection:

- a header deadline, from the connection's opening (or from a request's first byte after
  a keep-alive pause) until the request's headers are complete;
- a body deadline: the body in too, within the header and body timeouts together;
- a keep-alive deadline, from the end of a response to the next request's first byte;
- a cap on the open connections of each client address and on all of them together: a
  connection over a cap is answered at once (429 for its address's cap, 503 for the
  server's), and closed.

A missed deadline closes the connection (with a 408 if a request was under way). Each
connection has one timer, re-armed lazily: a request only stores when its wait began, and
the timer, firing, works out which deadline applies and sleeps until it if it is not yet
due, so the fast path makes no timer calls (fewer than uvicorn's own keep-alive timer).
Every bite is counted (``report_forwarder_intake_connections_refused_total{why}``,
``report_forwarder_intake_connections_timed_out_total{phase}``) and logged at most once per
``LOG_EVERY_S`` per reason, with the number since the previous line.
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

from prometheus_client import CollectorRegistry, Counter, Gauge
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from worker.observability.logs import get_logger

if TYPE_CHECKING:
    import uvicorn

log = get_logger("worker.intake")

LOG_EVERY_S = 10.0
FD_RESERVE = 128  # descriptors kept for Redis connections, the log stream and the like


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Deadlines (seconds) and caps (connections; 0 = no cap) of the intake's connections."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    max_per_client: int = 1000
    max_connections: int = 10_000

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be above 0, not {getattr(self, name)!r}")
        for name in ("max_per_client", "max_connections"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (no cap) or more, not {getattr(self, name)!r}")


class Refused(StrEnum):
    """Why a new connection was refused."""

    CLIENT_CAP = "client_cap"
    SERVER_CAP = "server_cap"


class Phase(StrEnum):
    """What a connection is waiting for from its client, each with its own deadline."""

    HEADERS = "headers"
    BODY = "body"
    KEEP_ALIVE = "keep_alive"


# enum members read from the class cost ~0.1 us each, a global a tenth of that
_HEADERS, _BODY, _KEEP_ALIVE = Phase.HEADERS, Phase.BODY, Phase.KEEP_ALIVE


def _answer(status: bytes, code: str, description: str, retry_after: bool) -> bytes:
    body = json.dumps({"errorId": 1, "errorCode": code, "errorDescription": description})
    head = [
        b"HTTP/1.1 " + status,
        b"content-type: application/json",
        b"content-length: " + str(len(body)).encode(),
        b"connection: close",
    ]
    if retry_after:
        head.append(b"retry-after: 1")
    return b"\r\n".join([*head, b"", body.encode()])


_REFUSALS = {
    Refused.CLIENT_CAP: _answer(
        b"429 Too Many Requests",
        "ERROR_TOO_MUCH_REQUESTS",
        "too many open connections from this address; reuse keep-alive connections",
        retry_after=True,
    ),
    Refused.SERVER_CAP: _answer(
        b"503 Service Unavailable",
        "ERROR_SERVICE_UNAVAILABLE",
        "the intake has too many open connections; retry shortly",
        retry_after=True,
    ),
}
_TIMED_OUT = _answer(
    b"408 Request Timeout",
    "ERROR_REQUEST_TIMEOUT",
    "the request's headers or body took too long to arrive",
    retry_after=False,
)


class _Tally:
    """Logs an event's first occurrence at once, then at most one line per ``every_s``
    with the number since the previous line (so a flood is a few lines, not one each)."""

    def __init__(self, event: str, field: str, every_s: float = LOG_EVERY_S) -> None:
        self.event = event
        self.field = field
        self.every_s = every_s
        self.pending: dict[str, int] = {}
        self.last_peer: dict[str, str] = {}
        self.logged_at: dict[str, float] = {}
        self.flush_armed: set[str] = set()

    def note(self, why: str, peer: str, level: str, loop: asyncio.AbstractEventLoop) -> None:
        self.pending[why] = self.pending.get(why, 0) + 1
        self.last_peer[why] = peer
        now = time.monotonic()
        due = self.logged_at.get(why, -self.every_s) + self.every_s
        if now >= due:
            self._emit(why, level)
        elif why not in self.flush_armed:  # the end of a burst is logged too
            self.flush_armed.add(why)
            loop.call_later(due - now, self._flush, why, level)

    def _flush(self, why: str, level: str) -> None:
        self.flush_armed.discard(why)
        if self.pending.get(why):
            self._emit(why, level)

    def _emit(self, why: str, level: str) -> None:
        count = self.pending.pop(why, 0)
        self.logged_at[why] = time.monotonic()
        getattr(log, level)(
            self.event,
            **{self.field: why},
            count=count,
            last_peer=self.last_peer.get(why, ""),
            every_s=self.every_s,
        )


class ConnectionGuard:
    """The open connections by client address, the caps and the counters: one per server."""

    def __init__(self, limits: ConnectionLimits, registry: CollectorRegistry) -> None:
        self.limits = limits
        self.total = 0
        self.by_peer: dict[str, int] = {}
        self.refused = Counter(
            "report_forwarder_intake_connections_refused",
            "Connections refused on opening, by cap: client_cap (its address's) or server_cap.",
            ["why"],
            registry=registry,
        )
        self.timed_out = Counter(
            "report_forwarder_intake_connections_timed_out",
            "Connections closed for a missed deadline, by what they were waiting for: "
            "headers, body, or keep_alive (the next request).",
            ["phase"],
            registry=registry,
        )
        open_gauge = Gauge(
            "report_forwarder_intake_connections",
            "Open client connections of the intake.",
            registry=registry,
        )
        open_gauge.set_function(lambda: self.total)
        self._refusals = _Tally("intake.connections_refused", "why")
        self._timeouts = _Tally("intake.connections_timed_out", "phase")

    def admit(self, peer: str) -> Refused | None:
        """Count a new connection in, or say which cap refuses it."""
        limits = self.limits
        if limits.max_connections and self.total >= limits.max_connections:
            return Refused.SERVER_CAP
        count = self.by_peer.get(peer, 0)
        if limits.max_per_client and count >= limits.max_per_client:
            return Refused.CLIENT_CAP
        self.by_peer[peer] = count + 1
        self.total += 1
        return None

    def release(self, peer: str) -> None:
        self.total -= 1
        count = self.by_peer[peer] - 1
        if count:
            self.by_peer[peer] = count
        else:
            del self.by_peer[peer]

    def note_refused(self, why: Refused, peer: str, loop: asyncio.AbstractEventLoop) -> None:
        self.refused.labels(why.value).inc()
        self._refusals.note(why.value, peer, "warning", loop)

    def note_timed_out(self, phase: Phase, peer: str, loop: asyncio.AbstractEventLoop) -> None:
        self.timed_out.labels(phase.value).inc()
        level = "debug" if phase is Phase.KEEP_ALIVE else "info"  # idle keep-alive is normal
        self._timeouts.note(phase.value, peer, level, loop)


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with deadlines and connection caps (module docstring).
    ``protocol_for`` makes a subclass bound to one :class:`ConnectionGuard`.

    A request costs no more than under uvicorn: the protocol notes only when a wait began
    (a request's first bytes after a keep-alive pause, the end of a response), in methods
    uvicorn calls anyway; the timer, when it fires, reads what the request is waiting for
    from uvicorn's own state, and closes the connection or sleeps until that deadline."""

    guard: ClassVar[ConnectionGuard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limits = self.guard.limits
        self._header_s = limits.header_timeout_s
        self._body_s = limits.body_timeout_s
        self._keep_alive_s = limits.keep_alive_s
        self._peer: str | None = None  # set once admitted (and then released on loss)
        self._phase: Phase | None = None  # HEADERS: a request is due; None: closed or refused
        self._since = 0.0  # when the phase began
        self._begun = False  # bytes arrived since the phase began
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # -- deadlines ---------------------------------------------------------------------

    def _arm(self, deadline: float) -> None:
        """Make sure the timer fires by ``deadline`` (it never fires late; it may fire
        early, and then sleeps again)."""
        if self._timer is None or deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline

    def _on_timer(self) -> None:
        self._timer = None
        if self._phase is None or self.transport.is_closing():
            return
        now = self.loop.time()
        late: Phase | None
        if self._phase is _KEEP_ALIVE:
            late, deadline = _KEEP_ALIVE, self._since + self._keep_alive_s
        else:  # a request is due: where is it?
            cycle = self.cycle
            if cycle is None or cycle.response_complete:  # its headers are still coming
                late, deadline = _HEADERS, self._since + self._header_s
            elif cycle.more_body:  # its body is still coming
                late, deadline = _BODY, self._since + self._header_s + self._body_s
            else:  # all in: the app's turn, bounded by its own timeouts; look again later
                late, deadline = None, now + self._header_s
        if late is None or now < deadline:
            self._arm(deadline)
            return
        self.guard.note_timed_out(late, self._peer or "", self.loop)
        if late is _BODY:
            answer = self.cycle is not None and not self.cycle.response_started
        else:  # a request's headers under way (an idle connection just closes)
            answer = late is _HEADERS and self._begun
        if answer:
            self.transport.write(_TIMED_OUT)
        self.transport.close()

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        peer = self.client[0] if self.client else ""
        refused = self.guard.admit(peer)
        if refused is not None:
            self.guard.note_refused(refused, peer, self.loop)
            transport.write(_REFUSALS[refused])
            transport.close()
            return
        self._peer = peer
        self._phase = _HEADERS
        self._since = self.loop.time()
        self._arm(self._since + self._header_s)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = None
        if self._peer is not None:
            self.guard.release(self._peer)
            self._peer = None
        super().connection_lost(exc)

    # -- uvicorn's hooks, replaced -----------------------------------------------------

    def _unset_keepalive_if_required(self) -> None:
        # uvicorn calls this for every chunk received (its keep-alive timer, which we never
        # arm, would be cancelled here): the end of a keep-alive pause starts a request
        if self._phase is _KEEP_ALIVE:
            self._phase = _HEADERS
            self._begun = True
            self._since = now = self.loop.time()
            if now + self._header_s < self._timer_at:
                self._arm(now + self._header_s)
        else:
            self._begun = True

    def on_response_complete(self) -> None:
        # uvicorn's own, with our keep-alive deadline instead of its timer (a call_later
        # per response): one float stored
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        elif self._phase is not None:
            self._phase = _KEEP_ALIVE
            self._since = now = self.loop.time()
            if now + self._keep_alive_s < self._timer_at:
                self._arm(now + self._keep_alive_s)


def protocol_for(guard: ConnectionGuard) -> type[GuardedProtocol]:
    """A :class:`GuardedProtocol` subclass bound to ``guard`` (uvicorn builds the instances)."""
    return type("GuardedProtocol", (GuardedProtocol,), {"guard": guard})


def raise_fd_limit() -> int:
    """Raise this process's open-file limit (RLIMIT_NOFILE) to its hard limit; the new soft
    limit (unchanged if it cannot be raised)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
        return hard if hard != resource.RLIM_INFINITY else soft
    return soft


def fitted(limits: ConnectionLimits, fd_limit: int) -> ConnectionLimits:
    """``limits`` with the server cap lowered to what the open-file limit allows (a cap
    above it would let accept() fail with EMFILE, which nobody sees coming)."""
    usable = max(1, fd_limit - FD_RESERVE)
    if fd_limit == resource.RLIM_INFINITY or (0 < limits.max_connections <= usable):
        return limits
    if limits.max_connections:
        log.warning(
            "intake.connection_cap_lowered",
            max_connections=limits.max_connections,
            to=usable,
            fd_limit=fd_limit,
        )
    return ConnectionLimits(
        header_timeout_s=limits.header_timeout_s,
        body_timeout_s=limits.body_timeout_s,
        keep_alive_s=limits.keep_alive_s,
        max_per_client=limits.max_per_client,
        max_connections=usable,
    )


def uvicorn_config(
    app: Any, host: str, port: int, guard: ConnectionGuard, *, loop: str = "uvloop"
) -> uvicorn.Config:
    """The uvicorn configuration of the intake: ``app`` behind ``guard``."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop=loop,
        http=protocol_for(guard),
        lifespan="on",
        access_log=False,
        log_config=None,
        server_header=False,
        date_header=False,
    )
