"""Crash runs: thousands of reports through real worker subprocesses and a real Redis, with
workers SIGKILLed mid-flight and Redis SIGKILLed and restarted from its AOF. Then every
report must have exactly one terminal outcome (accepted, or one dead letter), and the API
must have seen no more duplicates than the reports in flight at the kills.

Used by tests/test_crash.py (one run) and runnable on its own for repeated runs::

    .venv/bin/python -m tests.crash_harness --runs 5 --reports 3000
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from worker.config import load_settings
from worker.keys import Keys
from worker.producer import Producer
from worker.sandbox import Rule, Sandbox
from worker.testing import RedisProcess, WorkerProcesses, service_env

CLIENT_KEY = "crash-test-key-8d1e"
CONCURRENCY = 8
RECOVERY = """
[recovery]
lease_s = 5
visibility_timeout_s = 25
restore_interval_s = 2
lost_grace_s = 2
sweep_interval_s = 0.2
[delivery]
backoff_cap_s = 4.0
[accounts.default]
provider = "capmonster"
key_env = "CAPMONSTER_CLIENT_KEY"
rate_limit = "100000/second"
"""


@dataclass
class RunResult:
    reports: int
    accepted: int = 0
    dead_lettered: int = 0
    lost: list[int] = field(default_factory=list)
    double_outcomes: list[int] = field(default_factory=list)
    duplicate_calls: int = 0
    kills: list[str] = field(default_factory=list)
    in_flight_at_kills: list[int] = field(default_factory=list)
    # workers that were not killed but died anyway (e.g. on the Redis restart)
    workers_died: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        bound = len(self.kills) * CONCURRENCY
        return (
            not self.lost
            and not self.double_outcomes
            and self.duplicate_calls <= bound
            and not self.workers_died
        )


def run_once(reports: int = 3000, seed: int = 1, workdir: Path | None = None) -> RunResult:
    """One crash run; returns what happened to every report."""
    rng = random.Random(seed)
    owned = workdir is None
    base = Path(tempfile.mkdtemp(prefix="rf-crash-")) if workdir is None else workdir
    server = RedisProcess(base / "redis").start()
    result = RunResult(reports=reports)
    started = time.monotonic()
    with Sandbox(latency_ms=15) as sandbox:
        config = base / "crash.toml"
        config.write_text(RECOVERY)
        env = service_env(
            REDIS_URL=server.url,
            REPORT_FORWARDER_API_URL=sandbox.url,
            CAPMONSTER_CLIENT_KEY=CLIENT_KEY,
            REPORT_FORWARDER_CONFIG=str(config),
            REPORT_FORWARDER_LOG_FORMAT="json",
        )
        settings = load_settings(environ=env)
        keys = Keys(settings.key_prefix)
        ids = [10_000_000 + n for n in range(reports)]
        rejected = set(rng.sample(ids, reports // 20))
        flaky = set(rng.sample(sorted(set(ids) - rejected), reports // 30))
        for task_id in rejected:
            sandbox.add_rule(Rule(task_id=task_id, error_code="ERROR_NO_SUCH_CAPCHA_ID"))
        for task_id in flaky:
            sandbox.add_rule(Rule(task_id=task_id, http_status=503, times=1))
        workers = WorkerProcesses(env, base, CONCURRENCY)
        victims = [workers.spawn(), workers.spawn()]
        producer = Producer(settings)
        client = producer.client

        feeding = threading.Thread(target=_feed, args=(producer, ids), daemon=True)
        feeding.start()

        def done_count() -> int:
            return sandbox.count(success=True) + sandbox.count(success=False)

        try:
            for share, victim in ((0.15, victims[0]), (0.35, victims[1])):
                _wait(lambda s=share: done_count() >= reports * s, 120)
                result.in_flight_at_kills.append(int(client.zcard(keys.leases)))
                workers.kill(victim)
                result.kills.append(f"worker pid {victim.pid}")
                workers.spawn()
            _wait(lambda: done_count() >= reports * 0.55, 120)
            result.in_flight_at_kills.append(int(client.zcard(keys.leases)))
            server.kill()
            result.kills.append("redis")
            server.start()  # same port and directory: it replays its AOF
            feeding.join(120)
            _wait(lambda: _pending(client, keys) == 0, 240)
            killed = set(victims)
            result.workers_died = sum(
                1 for proc in workers.procs if proc not in killed and proc.poll() is not None
            )
        finally:
            workers.stop_all()
        _verify(result, client, keys, ids, sandbox)
        producer.client.close()
    server.stop()
    result.seconds = round(time.monotonic() - started, 1)
    if owned:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    return result


def _feed(producer: Producer, ids: list[int]) -> None:
    """Enqueue in chunks while the workers run (and die), as producers would."""
    types = ["ImageToTextTask", "RecaptchaV2TaskProxyless", "HCaptchaTask", "TurnstileTask"]
    for start in range(0, len(ids), 100):
        items = [(t, types[t % len(types)]) for t in ids[start : start + 100]]
        while True:
            try:
                producer.enqueue_many(items)
                break
            except Exception:
                time.sleep(0.2)
        time.sleep(0.02)


def _pending(client: redis.Redis, keys: Keys) -> int:
    try:
        return int(client.get(keys.npending) or 0)
    except redis.RedisError:
        return -1


def _wait(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"crash run stalled ({timeout:.0f} s)")
        time.sleep(0.05)


def _verify(
    result: RunResult, client: redis.Redis, keys: Keys, ids: list[int], sandbox: Sandbox
) -> None:
    accepted = {
        task_id for task_id in ids if client.hget(keys.report("default", task_id), "s") == b"a"
    }
    dead = Counter(int(fields[b"task_id"]) for _, fields in client.xrange(keys.dead))
    result.accepted = len(accepted)
    result.dead_lettered = sum(dead.values())
    result.lost = sorted(set(ids) - accepted - set(dead))
    result.double_outcomes = sorted({t for t, n in dead.items() if n > 1} | (accepted & set(dead)))
    # a duplicate call: the API answered this task's report with a terminal answer before
    calls: dict[int, int] = Counter()
    for request in sandbox.requests():
        if request.task_id is not None and request.status != 503:
            calls[request.task_id] += 1
    result.duplicate_calls = sum(n - 1 for n in calls.values() if n > 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--reports", type=int, default=3000)
    args = parser.parse_args()
    failures = 0
    for run in range(1, args.runs + 1):
        result = run_once(args.reports, seed=run)
        doc = asdict(result)
        doc["lost"] = len(result.lost)
        doc["double_outcomes"] = len(result.double_outcomes)
        doc["ok"] = result.ok
        print(json.dumps({"run": run, **doc}), flush=True)
        failures += not result.ok
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
