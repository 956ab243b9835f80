"""Stopping a worker: SIGTERM finishes the report in flight and hands the rest back at once;
the log stream stays JSON to the last line."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import redis

from worker.producer import Producer
from worker.settings import load_settings
from worker.store.keys import Keys
from worker.testing.processes import WorkerProcesses
from worker.testing.sandbox import Sandbox

from .conftest import FAST_RECOVERY, cli_env, queue_length, wait_until


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigterm_sends_only_what_was_in_flight_and_hands_back_the_rest(
    env: dict[str, str], tmp_path: Path, redis_client: redis.Redis, sandbox: Sandbox
) -> None:
    """Behind a slow API, SIGTERM lets each thread finish the one report it is sending; the
    not-yet-started reports of its message (and its prefetched messages) go back to the
    queue at once, none is sent by the stopping worker, and a new worker delivers every one
    of them exactly once. Every line the worker printed is JSON, the shutdown line too."""
    sandbox.set_latency(1500)
    config = tmp_path / "workers.toml"
    config.write_text(FAST_RECOVERY)
    environ = cli_env(env, REPORT_FORWARDER_CONFIG=str(config))
    producer = Producer(load_settings(environ=environ))
    keys = Keys()
    assert 100 == producer.enqueue_many([(n, "image") for n in range(1, 101)]).queued
    workers = WorkerProcesses(environ, tmp_path, concurrency=2)
    first = workers.spawn()
    wait_until(lambda: sandbox.count() >= 2, timeout=30)  # both threads are sending
    answered = sandbox.count()
    first.send_signal(signal.SIGTERM)
    first.wait(60)
    sent_by_first = sandbox.count()
    assert 0 == first.returncode
    assert sent_by_first <= answered + 2  # at most the one report each thread was sending
    assert 0 == redis_client.zcard(keys.leases)  # nothing left running
    assert 100 - sent_by_first == int(redis_client.get(keys.npending) or 0)
    assert queue_length(redis_client) >= 1  # handed back, not waiting for a sweep
    lines = (tmp_path / "worker-0.log").read_text().splitlines()
    events = [json.loads(line)["event"] for line in lines if line.strip()]  # all JSON
    assert "worker.shutting_down" in events
    assert "message.handed_back" in events

    sandbox.set_latency(0)
    second = workers.spawn(concurrency=8)
    try:
        wait_until(lambda: sandbox.count(success=True) >= 100, timeout=60)
    finally:  # a worker left running would fail a later test (ResourceWarning)
        workers.stop_all()
    assert 0 == second.returncode
    per_task = {r.task_id for r in sandbox.requests() if r.success}
    assert set(range(1, 101)) == per_task
    assert 100 == sandbox.count(success=True)  # none sent twice
    producer.client.close()
