"""The sandbox's control API: script a sandbox running in another process over HTTP.

Every path under ``/_sandbox/`` is a control call, never a report, and is not logged::

    POST   /_sandbox/rules      add a rule, as JSON (fields as :class:`~.sandbox_rules.Rule`)
    DELETE /_sandbox/rules      forget every rule
    POST   /_sandbox/latency    {"latency_ms": <number>}: delay every answer
    POST   /_sandbox/reset      forget rules and the log; latency back to its start value
    GET    /_sandbox/requests   the request log (keys as their sha256's first 8 hex)
    GET    /_sandbox/stats      counts by path and by outcome

A bad body is answered 400 with the reason, an unknown call 404, both as ``{"error": ...}``.
What a call does is :class:`Controlled`'s, which :class:`~.sandbox.Sandbox` is.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

from worker.testing.sandbox_rules import Rule, rule_from_json
from worker.testing.sandbox_server import Answer, json_answer

PREFIX = "/_sandbox/"


class Logged(Protocol):
    """One entry of a sandbox's request log."""

    def to_json(self) -> dict[str, Any]: ...


class Controlled(Protocol):
    """What the control calls script: a :class:`~.sandbox.Sandbox`."""

    def add_rule(self, rule: Rule) -> None: ...
    def clear_rules(self) -> None: ...
    def set_latency(self, ms: float) -> None: ...
    def reset(self) -> None: ...
    def requests(self) -> Sequence[Logged]: ...
    def stats(self) -> dict[str, Any]: ...


def control(sandbox: Controlled, method: str, path: str, body: bytes) -> Answer:
    """Carry out the control call ``method path`` on ``sandbox``; the answer says how it went."""
    ok = json_answer(200, {"ok": True})
    try:
        if (method, path) == ("POST", "/_sandbox/rules"):
            sandbox.add_rule(rule_from_json(json.loads(body)))
            return ok
        if (method, path) == ("DELETE", "/_sandbox/rules"):
            sandbox.clear_rules()
            return ok
        if (method, path) == ("POST", "/_sandbox/latency"):
            sandbox.set_latency(_latency_from_json(json.loads(body)))
            return ok
        if (method, path) == ("POST", "/_sandbox/reset"):
            sandbox.reset()
            return ok
        if (method, path) == ("GET", "/_sandbox/requests"):
            return json_answer(200, [r.to_json() for r in sandbox.requests()])
        if (method, path) == ("GET", "/_sandbox/stats"):
            return json_answer(200, sandbox.stats())
    except (ValueError, TypeError) as exc:
        return json_answer(400, {"error": str(exc)})
    return json_answer(404, {"error": f"no sandbox control {method} {path}"})


def _latency_from_json(obj: object) -> float:
    ms = obj.get("latency_ms") if isinstance(obj, dict) else None
    if not isinstance(ms, int | float) or isinstance(ms, bool):
        raise TypeError('expected {"latency_ms": <number>}')
    return ms
