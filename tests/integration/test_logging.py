"""The log schema (docs/logging.md) is what the service writes: every stable event in it
is produced by a real worker, Redis and API double, and the key never appears in a line
(the chain's rendering and masking are in tests/unit/test_logging.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import redis
import structlog

from worker.delivery.background import Sweeper
from worker.delivery.runtime import Runtime
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

ROOT = Path(__file__).resolve().parents[2]
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
        Sweeper(broken.sweep_once, settings.sweep_interval_s).run_once()
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
