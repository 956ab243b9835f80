"""Crash runs: thousands of reports through real worker subprocesses and a real Redis while
faults are injected, judged by what the API double (the sandbox) received — not by the
project's own ledger.

Modes:

- ``kills``: two worker SIGKILLs mid-flight and a Redis SIGKILL, restarted from its AOF.
- ``squeeze``: Redis's memory squeezed (``maxmemory`` below its use, ``noeviction``) for a few
  seconds while workers drain and producers keep enqueueing; then memory comes back.
- ``deadline``: a 60-second report deadline (Anti-Captcha's); a worker SIGKILLed mid-run and
  a fresh one started at once. No report may expire without having been tried, and the
  killed worker's reports must be back in flight within seconds (measured).
- ``failover``: Redis as a primary, two replicas and three Sentinels, every component
  given the ``sentinel://`` URL and ``min_replicas_ack = 1``; the primary SIGKILLed
  mid-run while producers are still enqueueing; a Sentinel promotes a replica; the old
  primary is restarted (as a supervisor would) and rejoins as a replica. No component is
  restarted. Measured: the failover time and the longest producer call.

Every report must end with exactly one outcome — accepted by the sandbox, or dead-lettered
with a reason — and the sandbox may have seen a report twice only for reports in flight at
a kill (the bound is measured at each kill, not fixed).

Used by tests/integration/test_crash.py (one run per mode) and runnable on its own::

    .venv/bin/python -m tests.crash_harness --mode squeeze --runs 5 --reports 3000
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from worker.errors import StoreError, StoreFullError, StoreOutcomeUnknownError
from worker.producer import Producer
from worker.settings import Settings, load_settings
from worker.store.keys import Keys, split_ref
from worker.testing.processes import RedisProcess, SentinelCluster, WorkerProcesses, service_env
from worker.testing.sandbox import Rule, Sandbox

from .failover import fail_over
from .redis_bytes import as_bytes, optional_bytes, stream_entries

CLIENT_KEY = "crash-test-key-8d1e"
CONCURRENCY = 8
MODES = ("kills", "squeeze", "deadline", "failover")
RECOVERY = """
[recovery]
lease_s = 30
visibility_timeout_s = 60
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
DEADLINE_S = 60
FAILOVER = """
[redis]
min_replicas_ack = 1
connect_retry_s = 30
"""


@dataclass
class RunResult:
    mode: str
    reports: int
    accepted: int = 0  # reports the sandbox accepted at least once
    dead_lettered: int = 0
    dead_by_reason: dict[str, int] = field(default_factory=dict)
    lost: list[int] = field(default_factory=list)  # neither accepted nor dead-lettered
    double_outcomes: list[int] = field(default_factory=list)  # accepted and dead, or dead twice
    left_pending: int = 0  # ledger entries not at a terminal outcome after the run
    duplicate_calls: int = 0  # terminal answers the sandbox gave beyond one per report
    kills: list[str] = field(default_factory=list)
    in_flight_at_kills: list[int] = field(default_factory=list)
    # reports a killed worker held (in flight, or queued in messages it had prefetched), and
    # the seconds from its SIGKILL until every one of them was back in flight
    held_at_kills: list[int] = field(default_factory=list)
    recovery_s: list[float] = field(default_factory=list)
    expired_untried: int = 0  # dead-lettered "expired" without a single attempt
    refused_full: int = 0  # producer calls refused with StoreFullError (squeeze)
    worker_full_lines: int = 0  # worker log lines that saw Redis out of memory (squeeze)
    recovered_by: dict[str, int] = field(default_factory=dict)  # report.recovered, by why
    workers_declared_lost: int = 0  # worker.lost lines: heartbeats seen to stop
    workers_died: int = 0  # workers that were not killed but died anyway
    stalled_pending: int = 0  # reports still pending when the run gave up waiting (240 s)
    failover_s: float = 0.0  # primary SIGKILL -> a majority of Sentinels name a new primary
    rejoin_s: float = 0.0  # old primary restarted -> in sync as a replica
    longest_producer_call_s: float = 0.0  # the longest enqueue call (100 reports) of the run
    producer_errors: int = 0  # enqueue calls that failed after their own retries
    seconds: float = 0.0

    @property
    def bound(self) -> int:
        return sum(self.in_flight_at_kills)

    @property
    def ok(self) -> bool:
        return (
            not self.lost
            and not self.stalled_pending
            and not self.double_outcomes
            and not self.left_pending
            and self.duplicate_calls <= self.bound
            and not self.workers_died
            and not self.expired_untried
            and all(s <= 15 for s in self.recovery_s)
        )


class _Run:
    """One crash run's parts: Redis, the sandbox, workers, a producer feeding them."""

    def __init__(
        self, mode: str, reports: int, seed: int, base: Path, sandbox: Sandbox, replicas: int = 2
    ) -> None:
        self.mode = mode
        self.rng = random.Random(seed)
        self.cluster: SentinelCluster | None = None
        self.server: RedisProcess | None = None
        if mode == "failover":
            self.cluster = SentinelCluster(base / "sentinel", replicas=replicas).start()
            url = self.cluster.url
        else:
            self.server = RedisProcess(base / "redis").start()
            url = self.server.url
        self.sandbox = sandbox
        config = base / "crash.toml"
        toml = RECOVERY
        if mode == "deadline":
            toml += f"deadline_s = {DEADLINE_S}\n"
        if mode == "failover":
            toml = FAILOVER + toml
        config.write_text(toml)
        self.env = service_env(
            REDIS_URL=url,
            REPORT_FORWARDER_API_URL=sandbox.url,
            CAPMONSTER_CLIENT_KEY=CLIENT_KEY,
            REPORT_FORWARDER_CONFIG=str(config),
            REPORT_FORWARDER_LOG_FORMAT="json",
        )
        self.settings: Settings = load_settings(environ=self.env)
        self.keys = Keys(self.settings.key_prefix)
        self.ids = [10_000_000 + n for n in range(reports)]
        self.result = RunResult(mode=mode, reports=reports)
        self.workers = WorkerProcesses(self.env, base, CONCURRENCY)
        self.producer = Producer(self.settings)
        self.client = self.producer.client
        self.refused_full = 0
        self.pace_s = {"squeeze": 0.2, "failover": 0.15}.get(mode, 0.02)
        self.fed = 0  # reports acknowledged to the producer so far

    def script_the_api(self) -> None:
        reports = len(self.ids)
        rejected = set(self.rng.sample(self.ids, reports // 20))
        flaky = set(self.rng.sample(sorted(set(self.ids) - rejected), reports // 30))
        for task_id in rejected:
            self.sandbox.add_rule(Rule(task_id=task_id, error_code="ERROR_NO_SUCH_CAPCHA_ID"))
        for task_id in flaky:
            self.sandbox.add_rule(Rule(task_id=task_id, http_status=503, times=1))

    def feed(self) -> None:
        """Enqueue in chunks while the workers run (and die), as producers would: a call
        refused (Redis down or full) is retried; only what was acknowledged counts."""
        types = ["ImageToTextTask", "RecaptchaV2TaskProxyless", "HCaptchaTask", "TurnstileTask"]
        for start in range(0, len(self.ids), 100):
            items = [(t, types[t % len(types)]) for t in self.ids[start : start + 100]]
            # bulk messages, and single-report ones (which workers take several at a time)
            per_message = 1 if start // 100 % 2 else 20
            while True:
                began = time.monotonic()
                try:
                    self.producer.enqueue_many(items, per_message=per_message)
                    self.fed += len(items)
                    break
                except StoreFullError:
                    self.refused_full += 1
                    time.sleep(0.2)
                except (StoreError, StoreOutcomeUnknownError):  # retried here: safe
                    self.result.producer_errors += 1
                    time.sleep(0.2)
                finally:
                    took = time.monotonic() - began
                    self.result.longest_producer_call_s = max(
                        self.result.longest_producer_call_s, round(took, 2)
                    )
            time.sleep(self.pace_s)  # producers spread over the run, so faults meet them too

    def done_count(self) -> int:
        return self.sandbox.count(success=True) + self.sandbox.count(success=False)

    def kill_worker(self, victim: Any) -> None:
        """SIGKILL ``victim`` (then start a fresh worker at once) and measure how long its
        reports take to be back in flight."""
        worker_id = self._worker_id(victim.pid)
        self.workers.kill(victim)
        killed_at = time.monotonic()
        self.result.kills.append(f"worker pid {victim.pid}")
        self.workers.spawn()
        # what the dead worker held, as Redis still has it (its heartbeat's last list)
        watched = self._held_by(worker_id) if worker_id else {}
        self.result.in_flight_at_kills.append(len(self._running(worker_id)) if worker_id else 0)
        self.result.held_at_kills.append(len(watched))
        _wait(lambda: not self._still_held(watched), 60)
        self.result.recovery_s.append(round(time.monotonic() - killed_at, 2))

    def _worker_id(self, pid: int) -> str | None:
        for raw in self.client.zrange(self.keys.workers, 0, -1):
            worker_id = as_bytes(raw).decode()
            if worker_id.split(":")[1] == str(pid):
                return worker_id
        return None

    def _running(self, worker_id: str) -> set[str]:
        return {as_bytes(r).decode() for r in self.client.smembers(self.keys.running(worker_id))}

    def _held_by(self, worker_id: str) -> dict[str, tuple[bytes, bytes]]:
        """The reports a worker holds: ref -> (state, message or owner) as the ledger had it."""
        watched = {ref: (b"r", worker_id.encode()) for ref in self._running(worker_id)}
        for message_id in map(as_bytes, self.client.smembers(self.keys.held(worker_id))):
            entry = optional_bytes(self.client.hget(self.keys.msgrefs, message_id))
            for ref in entry.decode().split("|", 1)[1].split(",") if entry else []:
                state, owner = self._state(ref)
                if state == b"q" and owner == message_id:
                    watched[ref] = (b"q", message_id)
        return watched

    def _state(self, ref: str) -> tuple[bytes | None, bytes | None]:
        account, task_id = split_ref(ref)
        answer = self.client.hmget(self.keys.report(account, task_id), "s", "m", "o")
        state, message, owner = map(optional_bytes, answer)
        return state, (owner if state == b"r" else message)

    def _still_held(self, watched: dict[str, tuple[bytes, bytes]]) -> bool:
        return any(self._state(ref) == was for ref, was in watched.items())

    def squeeze(self, seconds: float = 4.0) -> None:
        """Redis out of memory for ``seconds``: maxmemory at half its use, noeviction."""
        used = int(self.client.info("memory")["used_memory"])
        self.client.config_set("maxmemory-policy", "noeviction")
        self.client.config_set("maxmemory", max(1, used // 2))
        self.result.kills.append(f"memory squeeze {seconds:g} s")
        self.result.in_flight_at_kills.append(int(self.client.zcard(self.keys.leases)))
        time.sleep(seconds)  # the fault's duration, not a synchronisation
        self.client.config_set("maxmemory", 0)

    def fail_over(self) -> None:
        """SIGKILL the primary; measure until the Sentinels name a new one; restart the old
        one (it comes back with its AOF and Sentinel turns it into a replica)."""
        assert self.cluster is not None
        failover = fail_over(self.cluster, self.keys, self.settings.lease_s)
        old = failover.old
        self.result.in_flight_at_kills.append(len(failover.in_flight))
        self.result.kills.append(f"primary :{old.port}")
        self.result.failover_s = round(failover.seconds, 2)
        old.start()
        restarted = time.monotonic()
        _wait(lambda: self.cluster is not None and self.cluster.in_sync(old), 120)
        self.result.rejoin_s = round(time.monotonic() - restarted, 2)

    def pending(self) -> int:
        try:
            return int(self.client.get(self.keys.npending) or 0)
        except redis.RedisError:
            return -1

    def verify(self) -> None:
        """Judge by the sandbox: each report accepted there, or dead-lettered with a reason."""
        result = self.result
        ids = set(self.ids)
        accepted_calls: Counter[int] = Counter()
        terminal_calls: Counter[int] = Counter()
        for request in self.sandbox.requests():
            if request.task_id not in ids:
                continue
            if request.success:
                accepted_calls[request.task_id] += 1
            if request.outcome not in ("http_503", "dropped"):
                terminal_calls[request.task_id] += 1
        dead: Counter[int] = Counter()
        reasons: Counter[str] = Counter()
        for _, fields in stream_entries(self.client, self.keys.dead):
            task_id = int(fields[b"task_id"])
            dead[task_id] += 1
            reasons[fields[b"reason"].decode()] += 1
            assert fields[b"reason"], f"dead letter of {task_id} has no reason"
            if fields[b"reason"] == b"expired" and int(fields[b"attempts"] or 0) == 0:
                result.expired_untried += 1
        accepted = set(accepted_calls)
        result.accepted = len(accepted)
        result.dead_lettered = sum(dead.values())
        result.dead_by_reason = dict(reasons)
        result.lost = sorted(ids - accepted - set(dead))
        result.double_outcomes = sorted(
            {t for t, n in dead.items() if n > 1} | (accepted & set(dead))
        )
        result.duplicate_calls = sum(n - 1 for n in terminal_calls.values() if n > 1)
        result.left_pending = sum(
            1
            for key in self.client.scan_iter(f"{self.keys.prefix}:r:*", count=1000)
            if self.client.hget(key, "s") in (b"q", b"r", b"w")
        )
        result.refused_full = self.refused_full
        why: Counter[str] = Counter()
        for path in self.workers.log_paths():
            text = path.read_text(errors="replace")
            result.worker_full_lines += text.count("out of memory")
            for line in text.splitlines():
                if '"report.recovered"' in line:
                    why[json.loads(line)["why"]] += 1
                elif '"worker.lost"' in line:
                    result.workers_declared_lost += 1
        result.recovered_by = dict(why)

    def close(self) -> None:
        self.workers.stop_all()
        self.producer.client.close()
        if self.server is not None:
            self.server.stop()
        if self.cluster is not None:
            self.cluster.stop()


def run_once(
    reports: int = 3000,
    seed: int = 1,
    workdir: Path | None = None,
    mode: str = "kills",
    replicas: int = 2,
) -> RunResult:
    """One crash run of ``mode``; returns what happened to every report."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    owned = workdir is None
    base = Path(tempfile.mkdtemp(prefix="rf-crash-")) if workdir is None else workdir
    started = time.monotonic()
    with Sandbox(latency_ms=15) as sandbox:
        run = _Run(mode, reports, seed, base, sandbox, replicas)
        result = run.result
        run.script_the_api()
        victims = [run.workers.spawn(), run.workers.spawn()]
        feeding = threading.Thread(target=run.feed, daemon=True)
        feeding.start()
        try:
            if mode == "kills":
                for share, victim in ((0.15, victims[0]), (0.35, victims[1])):
                    _wait(lambda s=share: run.done_count() >= reports * s, 120)
                    run.kill_worker(victim)
                _wait(lambda: run.done_count() >= reports * 0.55, 120)
                result.in_flight_at_kills.append(int(run.client.zcard(run.keys.leases)))
                assert run.server is not None
                run.server.kill()
                result.kills.append("redis")
                run.server.start()  # same port and directory: it replays its AOF
            elif mode == "squeeze":
                _wait(lambda: run.done_count() >= reports * 0.2, 120)
                run.squeeze()
            elif mode == "failover":  # while producers are still enqueueing
                _wait(lambda: run.fed >= reports * 0.4, 120)
                run.fail_over()
            else:
                _wait(lambda: run.done_count() >= reports * 0.3, 120)
                run.kill_worker(victims[0])
            feeding.join(180)
            try:
                _wait(lambda: run.pending() == 0, 240)
            except TimeoutError:  # reports stranded: judged below like any other run
                result.stalled_pending = run.pending()
            killed = {victims[0]} if mode == "deadline" else set(victims)
            if mode in ("squeeze", "failover"):
                killed = set()
            result.workers_died = sum(
                1 for proc in run.workers.procs if proc not in killed and proc.poll() is not None
            )
            run.workers.stop_all()
            run.verify()
        finally:
            run.close()
    result.seconds = round(time.monotonic() - started, 1)
    if owned:
        shutil.rmtree(base, ignore_errors=True)
    return result


def _wait(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"crash run stalled ({timeout:.0f} s)")
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=MODES, default="kills")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--reports", type=int, default=3000)
    parser.add_argument(
        "--replicas", type=int, default=2, help="failover mode: replicas under the primary"
    )
    args = parser.parse_args()
    failures = 0
    for run in range(1, args.runs + 1):
        result = run_once(args.reports, seed=run, mode=args.mode, replicas=args.replicas)
        doc = asdict(result)
        doc["lost"] = len(result.lost)
        doc["double_outcomes"] = len(result.double_outcomes)
        doc["bound"] = result.bound
        doc["ok"] = result.ok
        print(json.dumps({"run": run, **doc}), flush=True)
        failures += not result.ok
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
