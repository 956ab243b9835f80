"""The log schema (docs/logging.md) is what the service writes: every stable event in it
is produced here, and the key never appears in a line."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import structlog
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from worker.delivery.runtime import Runtime, Sweeper
from worker.observability import logs
from worker.observability.logs import REDACTED, configure, redact, register_secret
from worker.producer import Producer
from worker.settings import Settings
from worker.store.keys import Keys, ref
from worker.store.messages import list_key
from worker.testing.processes import WorkerProcesses
from worker.testing.sandbox import Rule, Sandbox

from .conftest import (
    CLIENT_KEY,
    FAST_RECOVERY,
    cli_env,
    queued_messages,
    running_worker,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
TWO = (
    FAST_RECOVERY
    + """
[accounts.default]
provider = "capmonster"
key_env = "CAPMONSTER_CLIENT_KEY"
rate_limit = "100000/second"
[accounts.slow]
provider = "capmonster"
key_env = "SLOW_KEY"
rate_limit = "1/second"
"""
)


def documented_events() -> set[str]:
    text = (ROOT / "docs" / "logging.md").read_text()
    table = text.split("## Stable events", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z]+\.[a-z_]+)` \|", table, re.M))


def test_every_documented_event_is_produced(
    make_settings: Callable[..., Settings],
    env: dict[str, str],
    sandbox: Sandbox,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    """Accepted, duplicate, refused, retried, dead-lettered, recovered, paused and resumed,
    throttled, pushed back, a failed sweep and a worker start each write their line."""
    settings = make_settings(TWO, REPORT_FORWARDER_RATE_LIMIT="")
    environ = dict(env, SLOW_KEY="slow-key-0001", REPORT_FORWARDER_RATE_LIMIT="")
    keys = Keys(settings.key_prefix)
    sandbox.add_rule(Rule(task_id=2, error_code="ERROR_NO_SUCH_CAPCHA_ID"))
    sandbox.add_rule(Rule(task_id=3, http_status=503, times=1))
    sandbox.add_rule(Rule(task_id=4, http_status=429, retry_after=2, times=1))
    sandbox.add_rule(Rule(client_key="slow-key-0001", error_code="ERROR_ZERO_BALANCE", times=1))
    with structlog.testing.capture_logs() as lines:
        with running_worker(settings, environ) as svc:
            svc.producer.enqueue(1, "image")
            svc.producer.enqueue(1, "image")  # duplicate
            svc.producer.enqueue_many([(2, "image"), (-1, "image"), (3, "token")])
            svc.producer.enqueue(4, "token")
            wait_until(lambda: sandbox.count(task_id=3) == 2 and sandbox.count(task_id=4) == 2)
            # the slow account: a zero balance pauses it; resumed by the operator, then
            # three reports at 1/s make the limiter throttle and defer
            svc.producer.enqueue(50, "image", "slow")
            wait_until(lambda: redis_client.zscore(keys.paused, "slow") is not None)
            assert svc.runtime.resume("slow")
            svc.producer.enqueue_many(
                [(51, "image", "slow"), (52, "image", "slow"), (53, "image", "slow")]
            )
            wait_until(lambda: sandbox.count(task_id=53) == 1, timeout=15)
        # a worker lost mid-flight (none runs now): it took report 60's message and its
        # lease ran out; the next worker's sweeper re-queues and delivers it
        producer = Producer(settings)
        producer.enqueue(60, "image")
        ((raw),) = queued_messages(redis_client, settings.queue)
        redis_client.delete(list_key(settings.queue, urgent=False))
        message_id = json.loads(raw)["headers"]["id"]
        producer.ledger.claim(ref("default", 60), message_id, 0.01)
        producer.client.close()
        with running_worker(settings, environ):
            wait_until(lambda: any(x["event"] == "report.recovered" for x in lines))
            wait_until(lambda: sandbox.count(task_id=60) == 1)
        unreachable = redis.Redis(port=1, socket_connect_timeout=1)  # no retries: fail fast
        broken = Runtime(settings, "redis://127.0.0.1:1/0", environ, client=unreachable)
        Sweeper(broken).run_once()
        broken.client.close()
    config = tmp_path / "w.toml"
    config.write_text(FAST_RECOVERY)
    workers = WorkerProcesses(cli_env(env, REPORT_FORWARDER_CONFIG=str(config)), tmp_path / "w")
    workers.spawn()
    (log,) = workers.log_paths()
    wait_until(lambda: '"worker.started"' in log.read_text())
    workers.stop_all()
    started = [json.loads(x) for x in log.read_text().splitlines() if '"worker.started"' in x]

    produced = {x["event"] for x in lines} | {x["event"] for x in started}
    assert set() == documented_events() - produced
    assert {"accepted", "rejected", "account_fault"} <= {
        x.get("reason", "accepted")
        for x in lines
        if x["event"].startswith("report.")
        and x["event"] in ("report.accepted", "report.dead_lettered")
    }
    assert CLIENT_KEY not in json.dumps(lines, default=str)


def test_celery_records_are_rendered_as_json_lines(tmp_path: Path) -> None:
    """A stdlib record from Celery goes through the same chain: one JSON object per line."""
    import io
    import logging

    stream = io.StringIO()
    configure("json", "INFO", stream=stream, cache=False)
    logging.getLogger("celery.worker.consumer").warning("Connection to broker lost: %s", "x")
    structlog.get_logger("worker.x").info("report.accepted", task_id=5)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert ["Connection to broker lost: x", "report.accepted"] == [x["event"] for x in lines]
    assert {"warning", "info"} == {x["level"] for x in lines}
    del tmp_path


def test_console_format_is_key_value(tmp_path: Path) -> None:
    """On a terminal (or with `console`), lines are readable key=value, not JSON."""
    import io

    stream = io.StringIO()
    configure("console", "INFO", stream=stream, cache=False)
    structlog.get_logger("worker.x").info("report.accepted", task_id=5, account="default")
    line = stream.getvalue()
    assert "report.accepted" in line
    assert "task_id=5" in line
    assert not line.lstrip().startswith("{")
    del tmp_path


def test_redaction_masks_a_registered_key_anywhere_in_a_line() -> None:
    """A configured key that reaches a log value is replaced by ****."""
    register_secret("supersecret-key-9999")
    event = redact(None, "info", {"event": "x", "error": "bad key supersecret-key-9999 here"})
    assert f"bad key {REDACTED} here" == event["error"]


# API-key-like strings: printable ASCII (quotes and backslashes included) but no "*", the
# mask's own letter, and long enough not to occur in a line's fixed text by chance
KEYS = st.text(
    st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="*"),
    min_size=12,
    max_size=64,
)


def mangle(key: str, flips: list[bool]) -> str:
    """``key`` with each letter's case set by ``flips`` (an echo that changed the case)."""
    return "".join(
        c.lower() if i < len(flips) and not flips[i] else c.upper() for i, c in enumerate(key)
    )


@pytest.mark.parametrize("echo", [str.upper, str.capitalize, str.swapcase, str.title])
def test_redaction_masks_a_registered_key_in_any_letter_case(echo: Callable[[str], str]) -> None:
    """A configured key that reaches a rendered log line upper-cased (or in any other
    case) is masked there as well."""
    stream = io.StringIO()
    configure("json", "INFO", stream=stream, cache=False)
    register_secret(CLIENT_KEY)
    structlog.get_logger("worker.x").warning(
        "report.dead_lettered", error=f"ERROR_KEY_DOES_NOT_EXIST: key {echo(CLIENT_KEY)} unknown"
    )
    (line,) = stream.getvalue().splitlines()
    assert CLIENT_KEY.lower() not in line.lower()
    assert f"ERROR_KEY_DOES_NOT_EXIST: key {REDACTED} unknown" == json.loads(line)["error"]


@hsettings(deadline=None, max_examples=200)
@given(key=KEYS, flips=st.lists(st.booleans(), max_size=64), before=st.text(" :=-", max_size=8))
def test_redaction_masks_any_key_in_any_case_mix(key: str, flips: list[bool], before: str) -> None:
    """Whatever the key and whatever the case of each of its letters in an echo, the
    redaction processor leaves no form of the key in any value."""
    echo = mangle(key, flips)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(logs, "_registry", logs._Secrets())  # this key only, for this example
        register_secret(key)
        event = redact(
            None,
            "info",
            {"event": "x", "error": f"key{before}{echo}{before}end", "json": json.dumps(echo)},
        )
    for value in event.values():
        assert key.lower() not in value.lower(), value
        assert json.dumps(key)[1:-1].lower() not in value.lower(), value
    assert f"key{before}{REDACTED}{before}end" == event["error"]
