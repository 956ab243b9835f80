"""Scripted answers: :class:`Rule`, how a request is matched to one, and what it answers.

A rule matches on its non-None criteria (path, clientKey, taskId), applies to its first
``times`` matches, and answers a provider error (in the profile's shape), a raw body, a bare
status, success, or nothing at all (``drop``), optionally after ``latency_ms``. The first
matching rule in the order they were added wins. Rules come as objects in process or as
JSON over the control API (:func:`rule_from_json`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from worker.testing.sandbox_profiles import SUCCESS, Profile
from worker.testing.sandbox_server import Answer


@dataclass(frozen=True)
class Rule:
    """A scripted answer: matches on the non-None criteria, applies to its first ``times`` hits."""

    task_id: int | None = None
    client_key: str | None = None
    path: str | None = None
    error_code: str | None = None
    http_status: int = 200
    body: str | None = None
    retry_after: float | None = None
    latency_ms: float = 0.0
    drop: bool = False
    times: int | None = None

    def __post_init__(self) -> None:
        if not 100 <= self.http_status <= 599:
            raise ValueError(f"http_status must be 100..599, got {self.http_status}")
        if self.latency_ms < 0 or (self.times is not None and self.times < 0):
            raise ValueError("latency_ms and times must not be negative")

    def matches(self, path: str, client_key: str | None, task_id: int | None) -> bool:
        return (
            (self.path is None or self.path == path)
            and (self.client_key is None or self.client_key == client_key)
            and (self.task_id is None or self.task_id == task_id)
        )


@dataclass
class ScriptedRule:
    """A rule as scripted into a sandbox, with how many requests it has answered."""

    rule: Rule
    used: int = 0


def take_rule(
    scripted: Iterable[ScriptedRule], path: str, client_key: str | None, task_id: int | None
) -> Rule | None:
    """The first rule with uses left that matches, counting this use; None if none does."""
    for entry in scripted:
        limit = entry.rule.times
        if (limit is None or entry.used < limit) and entry.rule.matches(path, client_key, task_id):
            entry.used += 1
            return entry.rule
    return None


def rule_answer(rule: Rule, profile: Profile) -> Answer:
    """The answer ``rule`` scripts, in ``profile``'s error shape."""
    if rule.drop:
        return Answer(0, b"", drop=True, outcome="dropped")
    if rule.error_code is not None:
        answer = profile.error(rule.http_status, rule.error_code)
    elif rule.body is not None:
        answer = Answer(rule.http_status, rule.body.encode(), "text/html")
        answer.outcome = f"http_{rule.http_status}"
    elif rule.http_status != 200:  # no usable body: the client must go by the status alone
        answer = Answer(rule.http_status, b"", "text/plain", outcome=f"http_{rule.http_status}")
    else:
        answer = Answer(200, SUCCESS)
    answer.retry_after = rule.retry_after
    return answer


def parse_report(body: bytes) -> tuple[str | None, int | None]:
    """The body's clientKey (a string) and taskId (a positive int), None where unusable."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None, None
    if not isinstance(obj, dict):
        return None, None
    key, task_id = obj.get("clientKey"), obj.get("taskId")
    valid_id = isinstance(task_id, int) and not isinstance(task_id, bool) and task_id > 0
    return (key if isinstance(key, str) else None), (task_id if valid_id else None)


_RULE_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "task_id": (int, type(None)),
    "client_key": (str, type(None)),
    "path": (str, type(None)),
    "error_code": (str, type(None)),
    "http_status": (int,),
    "body": (str, type(None)),
    "retry_after": (int, float, type(None)),
    "latency_ms": (int, float),
    "drop": (bool,),
    "times": (int, type(None)),
}


def rule_from_json(obj: object) -> Rule:
    """Build a Rule from its JSON form (the control API's body); ValueError names the bad field."""
    if not isinstance(obj, dict):
        raise TypeError("a rule must be a JSON object")
    for name, value in obj.items():
        allowed = _RULE_FIELD_TYPES.get(name)
        if allowed is None:
            raise ValueError(f"unknown rule field {name!r}")
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ValueError(f"bad value for rule field {name!r}: {value!r}")
    return Rule(**obj)
