"""worker.delivery.upstream against a real server: the sandbox on loopback (the pure tests,
with ``responses``, are in tests/unit/test_upstream.py)."""

from __future__ import annotations

import time

from worker.delivery.upstream import send_report
from worker.testing.sandbox import Rule, Sandbox

CLIENT_KEY = "ck-5e1b7d0a9c3f4e2b8a6d-do-not-leak"
TASK_ID = 123456789


def test_send_report_duration_spans_the_round_trip(sandbox: Sandbox) -> None:
    """``duration_s`` covers the whole round trip: at least the time a real server (the
    sandbox on loopback) held the answer back, at most the call's own time."""
    sandbox.add_rule(Rule(latency_ms=80))

    before = time.perf_counter()
    outcome = send_report(sandbox.url + "/reportIncorrectImageCaptcha", CLIENT_KEY, TASK_ID)
    elapsed = time.perf_counter() - before

    assert "accepted" == outcome.status
    assert 0.080 <= outcome.duration_s <= elapsed
