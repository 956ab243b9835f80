"""Several real worker processes sharing one Redis: the account pause holds across them."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from worker.cli import main
from worker.producer import Producer
from worker.store.keys import Keys
from worker.testing.processes import WorkerProcesses
from worker.testing.sandbox import Rule, Sandbox

from ..redis_bytes import stream_entries
from .conftest import CLIENT_KEY, FAST_RECOVERY, cli_env, wait_until


@pytest.fixture
def two_workers(
    env: dict[str, str], tmp_path: Path, redis_client: redis.Redis
) -> Iterator[tuple[dict[str, str], list[subprocess.Popen[bytes]]]]:
    del redis_client  # flushed
    config = tmp_path / "workers.toml"
    config.write_text(FAST_RECOVERY)
    environ = cli_env(env, REPORT_FORWARDER_CONFIG=str(config))
    workers = WorkerProcesses(environ, tmp_path)
    procs = [workers.spawn(), workers.spawn()]
    yield environ, procs
    workers.stop_all()
    for proc in procs:
        assert 0 == proc.returncode, (tmp_path / "worker-0.log").read_text()[-2000:]


@pytest.mark.timeout(120)
def test_account_pause_holds_across_two_worker_processes(
    two_workers: tuple[dict[str, str], list[subprocess.Popen[bytes]]],
    sandbox: Sandbox,
    redis_client: redis.Redis,
) -> None:
    """A zero-balance account costs a handful of API calls across two workers, not one per
    report; `stats --json` shows the pause; `accounts resume` lifts it for both."""
    from worker.settings import load_settings

    environ, _ = two_workers
    sandbox.add_rule(Rule(client_key=CLIENT_KEY, error_code="ERROR_ZERO_BALANCE"))
    producer = Producer(load_settings(environ=environ))
    keys = Keys()
    result = producer.enqueue_many([(n, "image") for n in range(1, 201)])
    assert 200 == result.queued
    wait_until(lambda: redis_client.xlen(keys.dead) == 200, timeout=60)
    reasons = [f[b"reason"] for _, f in stream_entries(redis_client, keys.dead)]
    calls = sandbox.count()
    assert calls == reasons.count(b"account_fault")
    assert calls <= 2 * 16  # at most what was in flight on both workers when it paused
    assert 200 - calls == reasons.count(b"account_paused")

    stats = CliRunner().invoke(main, ["stats", "--json"], env=environ)
    paused = json.loads(stats.stdout)["paused_accounts"]
    assert ["default"] == [p["account"] for p in paused]
    assert "ERROR_ZERO_BALANCE" == paused[0]["error_code"]
    assert 500 < paused[0]["remaining_s"] <= 600

    sandbox.clear_rules()  # the balance was topped up
    resumed = CliRunner().invoke(main, ["accounts", "resume", "default"], env=environ)
    assert "resumed default" in resumed.stdout
    replay = CliRunner().invoke(
        main, ["dead-letters", "replay", "--reason", "account_paused"], env=environ
    )
    assert f"replayed {200 - calls}" in replay.stdout
    wait_until(lambda: sandbox.count(success=True) == 200 - calls, timeout=60)
    producer.client.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_workers_configured_with_different_limits_share_the_stricter(
    env: dict[str, str], tmp_path: Path, redis_client: redis.Redis, sandbox: Sandbox
) -> None:
    """One worker says 4/second for the account, another 40/second: the API never sees more
    than 4 in any 1-s window, and the loose worker says loudly that it runs under 4."""
    from worker.settings import load_settings

    del redis_client  # flushed
    config = tmp_path / "workers.toml"
    config.write_text(FAST_RECOVERY)
    environ = cli_env(env, REPORT_FORWARDER_CONFIG=str(config))
    workers = WorkerProcesses(environ, tmp_path, concurrency=4)
    workers.spawn(REPORT_FORWARDER_RATE_LIMIT="4/second")
    workers.spawn(REPORT_FORWARDER_RATE_LIMIT="40/second")
    log = tmp_path / "worker-1.log"
    wait_until(lambda: "ratelimit.conflict" in log.read_text(), timeout=30)
    producer = Producer(load_settings(environ=environ))
    assert 24 == producer.enqueue_many([(n, "image") for n in range(1, 25)]).queued
    wait_until(lambda: sandbox.count(success=True) == 24, timeout=60)
    workers.stop_all()
    arrivals = sorted(r.at for r in sandbox.requests())
    busiest = max(sum(1 for t in arrivals if start <= t < start + 1.0) for start in arrivals)
    assert busiest <= 4
    conflicts = [
        json.loads(line) for line in log.read_text().splitlines() if "ratelimit.conflict" in line
    ]
    assert {("4/second", "40/second")} == {(c["effective"], c["configured"]) for c in conflicts}
    producer.client.close()
