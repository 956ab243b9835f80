"""A local double of the captcha providers' report endpoints, for tests, the demo and benchmarks.

:class:`Sandbox` answers reports as a provider would (:mod:`.sandbox_profiles`: the paths
of ``config/providers.toml`` and each provider's error shape), unless a scripted
:class:`Rule` says otherwise (:mod:`.sandbox_rules`), and keeps every report request in a
log of :class:`RecordedRequest`. Running as a subprocess (:func:`serve`, ``report-forwarder
sandbox``), it is scripted over ``/_sandbox/...`` (:mod:`.sandbox_control`). The HTTP/1.1
server underneath is :mod:`.sandbox_server`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from worker.testing.sandbox_control import PREFIX as CONTROL_PREFIX
from worker.testing.sandbox_control import control
from worker.testing.sandbox_profiles import PROFILES, REPORT_PATHS, SUCCESS
from worker.testing.sandbox_rules import (
    Rule,
    ScriptedRule,
    parse_report,
    rule_answer,
    rule_from_json,
    take_rule,
)
from worker.testing.sandbox_server import Answer, HttpServer

__all__ = [
    "PROFILES",
    "REPORT_PATHS",
    "RecordedRequest",
    "Rule",
    "Sandbox",
    "rule_from_json",
    "serve",
]


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One logged request. ``outcome``: success, the error code, http_<status> or dropped."""

    at: float
    monotonic: float
    path: str
    task_id: int | None
    client_key: str | None
    body: bytes
    status: int
    error_code: str | None
    outcome: str

    @property
    def success(self) -> bool:
        return self.outcome == "success"

    def to_json(self) -> dict[str, Any]:
        """Public form (control API): the key, also inside the body, becomes its sha256's 8 hex."""
        digest = None
        body = self.body.decode("utf-8", errors="replace")
        if self.client_key is not None:  # so the body is a JSON object holding the key
            digest = hashlib.sha256(self.client_key.encode()).hexdigest()[:8]
            body = json.dumps({**json.loads(self.body), "clientKey": f"sha256:{digest}"})
        return {
            "at": self.at,
            "monotonic": self.monotonic,
            "path": self.path,
            "task_id": self.task_id,
            "client_key_sha256_8": digest,
            "body": body,
            "status": self.status,
            "error_code": self.error_code,
            "outcome": self.outcome,
        }


@dataclass
class _State:
    rules: list[ScriptedRule] = field(default_factory=list)
    latency_ms: float = 0.0
    log: list[RecordedRequest] = field(default_factory=list)


class Sandbox:
    """The API double; ``start()`` runs it on its own event loop in a daemon thread.
    ``tls``: a server context to answer over https with."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        keys: Iterable[str] | None = None,
        latency_ms: float = 0.0,
        profile: str = "any",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if profile not in PROFILES:
            raise ValueError(f"unknown sandbox profile {profile!r}; known: {', '.join(PROFILES)}")
        self.profile = profile
        self._profile = PROFILES[profile]
        self._keys = frozenset(keys) if keys is not None else None
        self._lock = threading.Lock()
        self._logged = threading.Condition(self._lock)
        self._state = _State(latency_ms=latency_ms)
        self._initial_latency_ms = latency_ms
        self._http = HttpServer(host, port, self._answer, tls)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Sandbox:
        self._http.start()
        return self

    def stop(self) -> None:
        self._http.stop()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def host(self) -> str:
        return self._http.host

    @property
    def port(self) -> int:
        return self._http.port

    @property
    def url(self) -> str:
        return self._http.url

    @property
    def connections_accepted(self) -> int:
        return self._http.connections_accepted

    async def serve_until_signal(self) -> None:
        """Run in the current event loop until SIGINT/SIGTERM (see :func:`serve`)."""
        await self._http.serve_until_signal()

    # -- scripting -------------------------------------------------------------------------------

    def add_rule(self, rule: Rule) -> None:
        with self._lock:
            self._state.rules.append(ScriptedRule(rule))

    def clear_rules(self) -> None:
        with self._lock:
            self._state.rules.clear()

    def set_latency(self, ms: float) -> None:
        if ms < 0:
            raise ValueError(f"latency must not be negative, got {ms}")
        with self._lock:
            self._state.latency_ms = ms

    def reset(self) -> None:
        """Forget rules and the log; latency goes back to the value given at construction."""
        with self._lock:
            self._state = _State(latency_ms=self._initial_latency_ms)

    # -- request log -----------------------------------------------------------------------------

    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._state.log)

    def count(
        self, path: str | None = None, task_id: int | None = None, success: bool | None = None
    ) -> int:
        return sum(
            1
            for r in self.requests()
            if (path is None or r.path == path)
            and (task_id is None or r.task_id == task_id)
            and (success is None or r.success == success)
        )

    def clear(self) -> None:
        with self._lock:
            self._state.log.clear()

    def wait_for(self, predicate_or_count: Callable[[], bool] | int, timeout: float) -> bool:
        """Wait until the predicate holds (or the log has that many requests); False on timeout."""
        if isinstance(predicate_or_count, int):
            wanted = predicate_or_count
            predicate: Callable[[], bool] = lambda: len(self._state.log) >= wanted  # noqa: E731
        else:
            predicate = predicate_or_count
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._logged:  # woken by each new request; the slice covers outside state
                self._logged.wait(min(remaining, 0.05))
        return True

    def stats(self) -> dict[str, Any]:
        log = self.requests()
        return {
            "total": len(log),
            "by_path": dict(Counter(r.path for r in log)),
            "by_outcome": dict(Counter(r.outcome for r in log)),
        }

    # -- answering (event-loop thread) -----------------------------------------------------------

    def _answer(
        self, method: str, path: str, body: bytes, received_at: tuple[float, float]
    ) -> Answer:
        if path.startswith(CONTROL_PREFIX):
            return control(self, method, path, body)
        at, arrived = received_at
        key, task_id = parse_report(body)
        rule: Rule | None = None
        profile = self._profile
        with self._lock:
            latency_ms = self._state.latency_ms
            if path in profile.paths and method == "POST":
                rule = take_rule(self._state.rules, path, key, task_id)
        if path not in profile.paths:
            answer = profile.error(404, "ERROR_NO_SUCH_METHOD")
        elif method != "POST":
            answer = profile.error(405, "ERROR_NO_SUCH_METHOD")
        elif rule is not None:
            answer = rule_answer(rule, profile)
            latency_ms += rule.latency_ms
        elif not key or (self._keys is not None and key not in self._keys):
            answer = profile.error(200, "ERROR_KEY_DOES_NOT_EXIST")
        elif task_id is None:
            answer = profile.error(200, "ERROR_NO_SUCH_CAPCHA_ID")
        else:
            answer = Answer(200, SUCCESS)
        answer.delay_s = latency_ms / 1000
        record = RecordedRequest(
            at, arrived, path, task_id, key, body, answer.status, answer.error_code, answer.outcome
        )
        with self._logged:
            self._state.log.append(record)
            self._logged.notify_all()
        return answer


def serve(
    host: str,
    port: int,
    *,
    latency_ms: float = 0.0,
    keys: Iterable[str] | None = None,
    profile: str = "any",
) -> None:
    """Run a sandbox in the foreground until SIGINT/SIGTERM (``report-forwarder sandbox``)."""
    sandbox = Sandbox(host, port, keys=keys, latency_ms=latency_ms, profile=profile)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(sandbox.serve_until_signal())
