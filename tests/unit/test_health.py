"""The health probes' pure parts: the liveness rule on an injected clock, the readiness
verdict, and the metrics port's WSGI routing (called directly, no socket)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
from prometheus_client import CollectorRegistry, Counter
from structlog.testing import capture_logs

from worker.errors import StoreUnreachableError
from worker.observability.health import Liveness, Probes, Readiness
from worker.observability.serving import make_app
from worker.settings import Account, Settings, load_settings

SECRET = "unit-secret-key-93c1"


class Clock:
    """Monotonic seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def liveness(clock: Clock) -> Liveness:
    return Liveness(loop_stale_s=60, heartbeat_stale_s=300, clock=clock)


def test_a_worker_still_starting_is_alive(liveness: Liveness, clock: Clock) -> None:
    """Before the consumer's first turn and the heartbeat's first beat, liveness holds."""
    clock.now += 3600
    alive, body = liveness.check()
    assert (True, "starting", "starting") == (
        alive,
        body["checks"]["consumer"],
        body["checks"]["heartbeat"],
    )


def test_a_loop_that_turns_is_alive_and_one_that_stops_turning_is_not(
    liveness: Liveness, clock: Clock
) -> None:
    """Alive while the event loop turns within the limit; 503-worthy once it has not
    turned for longer, saying for how long; alive again at its next turn."""
    liveness.heartbeat_ticked()
    for _ in range(5):
        clock.now += 30
        liveness.loop_ticked()
        liveness.heartbeat_ticked()
        assert (True, "ok") == (liveness.check()[0], liveness.check()[1]["checks"]["consumer"])
    clock.now += 60
    assert liveness.check()[0]  # exactly at the limit: still alive
    clock.now += 1
    liveness.heartbeat_ticked()
    alive, body = liveness.check()
    assert not alive
    assert (
        "stuck: the event loop has not turned for 61 s (limit 60 s)" == (body["checks"]["consumer"])
    )
    liveness.loop_ticked()
    assert (True, "ok") == (liveness.check()[0], liveness.check()[1]["checks"]["consumer"])


def test_a_consumer_reconnecting_to_the_broker_stays_alive_for_as_long_as_it_takes(
    liveness: Liveness, clock: Clock
) -> None:
    """A Redis outage stops the event loop while the consumer reconnects: liveness holds
    (an orchestrator restarting every worker would not bring Redis back)."""
    liveness.loop_ticked()
    liveness.heartbeat_ticked()
    clock.now += 10
    liveness.loop_connecting()
    clock.now += 3600
    liveness.loop_connecting()  # a second call does not restart the count
    liveness.heartbeat_ticked()
    alive, body = liveness.check()
    assert (True, "connecting to the broker for 3600 s (see /readyz)") == (
        alive,
        body["checks"]["consumer"],
    )


def test_a_heartbeat_thread_stuck_in_one_beat_is_not_alive(
    liveness: Liveness, clock: Clock
) -> None:
    """The heartbeat marks a beat's start and end: a beat that never ends stops the marks,
    and after the limit the worker is not alive."""
    liveness.heartbeat_ticked()
    for _ in range(10):  # beats of any length below the limit, as through a Redis outage
        clock.now += 290
        liveness.loop_ticked()
        liveness.heartbeat_ticked()
        assert liveness.check()[0]
    clock.now += 301
    liveness.loop_ticked()
    alive, body = liveness.check()
    assert not alive
    assert body["checks"]["heartbeat"].startswith("stuck: no beat started or finished for 301 s")


def test_shutdown_ends_liveness(liveness: Liveness) -> None:
    """Once shutdown has begun the worker answers not alive, whatever its loops do."""
    liveness.loop_ticked()
    liveness.heartbeat_ticked()
    alive, body = liveness.check(stopping=True)
    assert (False, "shutting down") == (alive, body["checks"]["worker"])


def test_a_stuck_loop_is_logged_once_until_it_recovers(liveness: Liveness, clock: Clock) -> None:
    """`worker.unhealthy` names the stuck check once per episode, however often probed."""
    liveness.loop_ticked()
    clock.now += 100
    with capture_logs() as logs:
        for _ in range(3):
            liveness.check()
        liveness.loop_ticked()
        liveness.check()
        clock.now += 100
        liveness.check()
    events = [e for e in logs if e["event"] == "worker.unhealthy"]
    assert 2 == len(events)
    assert ["consumer"] == list(events[0]["checks"])
    assert "warning" == events[0]["log_level"]


def _settings(tmp_path: Path) -> Settings:
    config = tmp_path / "two.toml"
    config.write_text(
        '[accounts.default]\nprovider = "capmonster"\nkey_env = "CAPMONSTER_CLIENT_KEY"\n'
        'rate_limit = "50/second"\n'
        '[accounts.spare]\nprovider = "capmonster"\nkey_env = "SPARE_KEY"\n'
        'rate_limit = "5/second"\n'
    )
    return load_settings(
        environ={"REPORT_FORWARDER_CONFIG": str(config), "REDIS_URL": "redis://127.0.0.1:1/0"}
    )


def _has_key(environ: dict[str, str]) -> Callable[[Account], bool]:
    return lambda account: bool(environ.get(account.key_env))


def _unreachable() -> object:
    raise StoreUnreachableError("Redis at redis://127.0.0.1:1/0 is unreachable (refused)")


def test_readiness_names_the_account_whose_key_is_missing_and_never_a_key(
    tmp_path: Path,
) -> None:
    """An account without its key makes the worker unready, naming the account and the
    variable; the key that is set appears nowhere in the answer."""
    environ = {"CAPMONSTER_CLIENT_KEY": SECRET}
    ready, body = Readiness(_settings(tmp_path), lambda: True, _has_key(environ)).check()
    assert not ready
    assert {"default": "ok", "spare": "missing: SPARE_KEY is not set"} == body["checks"]["accounts"]
    assert "ok" == body["checks"]["redis"]
    assert SECRET not in json.dumps(body)


def test_readiness_says_why_redis_failed(tmp_path: Path) -> None:
    """A failed PING makes the worker unready with the error's one line."""
    environ = {"CAPMONSTER_CLIENT_KEY": SECRET, "SPARE_KEY": "x" * 8}
    ready, body = Readiness(_settings(tmp_path), _unreachable, _has_key(environ)).check()
    assert (False, "Redis at redis://127.0.0.1:1/0 is unreachable (refused)") == (
        ready,
        body["checks"]["redis"],
    )


def test_readiness_all_well_and_then_shutting_down(tmp_path: Path) -> None:
    """Ready with Redis answering and every key set; not ready once shutdown began."""
    environ = {"CAPMONSTER_CLIENT_KEY": SECRET, "SPARE_KEY": "x" * 8}
    readiness = Readiness(_settings(tmp_path), lambda: True, _has_key(environ))
    assert (
        True,
        {"redis": "ok", "accounts": {"default": "ok", "spare": "ok"}, "worker": "ok"},
    ) == (
        readiness.check()[0],
        readiness.check()[1]["checks"],
    )
    assert (False, "shutting down") == (
        readiness.check(stopping=True)[0],
        readiness.check(stopping=True)[1]["checks"]["worker"],
    )


def _call(app: Any, method: str, path: str) -> tuple[str, dict[str, str], bytes]:
    environ: dict[str, Any] = {"REQUEST_METHOD": method, "PATH_INFO": path}
    setup_testing_defaults(environ)
    environ["wsgi.input"] = io.BytesIO()
    answer: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        answer.update(status=status, headers=dict(headers))
        return None

    body = b"".join(app(environ, start_response))
    return answer["status"], answer["headers"], body


@pytest.fixture
def app(tmp_path: Path, liveness: Liveness) -> Any:
    registry = CollectorRegistry()
    Counter("probe_test", "A counter.", registry=registry).inc()
    readiness = Readiness(_settings(tmp_path), _unreachable, _has_key({}))
    return make_app(registry, Probes(liveness, readiness, lambda: False))


def test_the_port_routes_metrics_and_probes_and_404s_the_rest(app: Any) -> None:
    """/metrics is Prometheus text, /healthz and /readyz JSON with 200 or 503, anything else
    a 404 that does not echo the path."""
    status, headers, body = _call(app, "GET", "/metrics")
    assert ("200 OK", True) == (status, b"probe_test_total 1.0" in body)
    status, headers, body = _call(app, "GET", "/healthz")
    assert ("200 OK", "application/json", True) == (
        status,
        headers["Content-Type"],
        json.loads(body)["alive"],
    )
    status, _, body = _call(app, "GET", "/readyz")
    assert ("503 Service Unavailable", False) == (status, json.loads(body)["ready"])
    status, _, body = _call(app, "GET", "/<script>x")
    assert ("404 Not Found", False) == (status, b"script" in body)


def test_probes_answer_get_and_head_only(app: Any) -> None:
    """HEAD gets the status without a body; other methods a 405 naming the allowed ones."""
    status, headers, body = _call(app, "HEAD", "/healthz")
    assert ("200 OK", b"") == (status, body)
    assert int(headers["Content-Length"]) > 0
    for method in ("POST", "PUT", "DELETE", "TRACE", "X" * 100):
        status, headers, _ = _call(app, method, "/readyz")
        assert ("405 Method Not Allowed", "GET, HEAD") == (status, headers["Allow"])


def test_without_probes_only_metrics_is_served() -> None:
    """An in-process metrics server with no probes 404s /healthz instead of guessing."""
    app = make_app(CollectorRegistry())
    assert "404 Not Found" == _call(app, "GET", "/healthz")[0]
    assert "200 OK" == _call(app, "GET", "/metrics")[0]


def test_a_defect_in_a_probe_is_a_500_and_one_logged_line(liveness: Liveness) -> None:
    """A probe that raises answers 500 and logs `worker.probe_failed` with the traceback;
    the app keeps answering."""

    def broken() -> bool:
        raise RuntimeError("defect")

    readiness = Readiness(load_settings(environ={}), lambda: True, lambda _: True)
    app = make_app(CollectorRegistry(), Probes(liveness, readiness, broken))
    with capture_logs() as logs:
        status, _, body = _call(app, "GET", "/readyz")
    assert ("500 Internal Server Error", b"probe failed\n") == (status, body)
    assert [("worker.probe_failed", "/readyz")] == [
        (e["event"], e["path"]) for e in logs if e["event"] == "worker.probe_failed"
    ]
    assert "200 OK" == _call(app, "GET", "/metrics")[0]
