"""Rate-limit benchmarks.

``pipeline``: N worker processes x M threads (the real ``report-forwarder worker``) drain a
backlog for one account limited to L/s, against the sandbox on loopback. From the sandbox's
arrival times: the most requests in any sliding 1-s window (must be <= L), the achieved rate
as a fraction of L (target >= 95%), and, from the workers' log lines, the p50/p99 time a
report waited for the limiter. Optionally a second account with its own limit.

``compare``: the limiter alone (no Celery), N processes x M threads each looping
"acquire, then POST", for our limiter and for the ``limits`` library's moving-window and
sliding-window-counter strategies, measured the same way in the same run.
"""

from __future__ import annotations

import json
import multiprocessing
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import requests

from worker.producer import Producer
from worker.settings import load_settings
from worker.testing.processes import RedisProcess, WorkerProcesses, service_env
from worker.testing.sandbox import Sandbox

KEY = "bench-key"
OTHER_KEY = "bench-key-2"


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most timestamps inside any half-open window [t, t + window)."""
    times = sorted(times)
    best = j = 0
    for i, start in enumerate(times):
        while j < len(times) and times[j] < start + window:
            j += 1
        best = max(best, j - i)
    return best


def achieved(times: list[float], limit: float) -> float:
    """Achieved rate over the run, as a fraction of ``limit``: (n - 1) / span."""
    times = sorted(times)
    if len(times) < 2:
        return 0.0
    return (len(times) - 1) / (times[-1] - times[0]) / limit


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _config(limit: int, other_limit: int | None) -> str:
    text = f"""
[accounts.default]
provider = "capmonster"
key_env = "CAPMONSTER_CLIENT_KEY"
rate_limit = "{limit}/second"
"""
    if other_limit:
        text += f"""
[accounts.other]
provider = "capmonster"
key_env = "BENCH_OTHER_KEY"
rate_limit = "{other_limit}/second"
"""
    return text


def pipeline(
    processes: int = 2,
    threads: int = 16,
    limit: int = 20,
    seconds: float = 20.0,
    other_limit: int | None = None,
    latency_ms: float = 5.0,
) -> dict[str, Any]:
    """Real workers drain a backlog of ``limit * seconds`` reports per account."""
    with tempfile.TemporaryDirectory(prefix="rf-bench-") as tmp:
        base = Path(tmp)
        server = RedisProcess(base / "redis", appendonly=False).start()
        try:
            with Sandbox(latency_ms=latency_ms) as sandbox:
                config = base / "bench.toml"
                config.write_text(_config(limit, other_limit))
                env = service_env(
                    REDIS_URL=server.url,
                    REPORT_FORWARDER_API_URL=sandbox.url,
                    CAPMONSTER_CLIENT_KEY=KEY,
                    BENCH_OTHER_KEY=OTHER_KEY,
                    REPORT_FORWARDER_CONFIG=str(config),
                    REPORT_FORWARDER_LOG_FORMAT="json",
                )
                settings = load_settings(environ=env)
                producer = Producer(settings)
                total = int(limit * seconds)
                items: list[tuple[int, str, str]] = [
                    (n, "token", "default") for n in range(1, total + 1)
                ]
                if other_limit:
                    other_total = int(other_limit * seconds)
                    items += [(10**9 + n, "image", "other") for n in range(1, other_total + 1)]
                workers = WorkerProcesses(env, base / "logs", threads)
                for _ in range(processes):
                    workers.spawn()
                time.sleep(2)  # let the workers connect, so all start on a full backlog
                producer.enqueue_many(items)
                expected = len(items)
                deadline = time.monotonic() + seconds * 3 + 60
                while sandbox.count() < expected and time.monotonic() < deadline:
                    time.sleep(0.2)
                workers.stop_all()
                producer.client.close()
                log = sandbox.requests()
                waits: dict[str, list[float]] = defaultdict(list)
                for path in workers.log_paths():
                    for line in path.read_text().splitlines():
                        if '"report.accepted"' in line:
                            doc = json.loads(line)
                            waits[doc["account"]].append(doc.get("ratelimit_wait_ms", 0.0))
        finally:
            server.stop()
    result: dict[str, Any] = {
        "scenario": "ratelimit-pipeline",
        "processes": processes,
        "threads": threads,
        "sandbox_latency_ms": latency_ms,
        "accounts": {},
    }
    for account, key, account_limit in (("default", KEY, limit), ("other", OTHER_KEY, other_limit)):
        if not account_limit:
            continue
        times = [r.monotonic for r in log if r.client_key == key]
        result["accounts"][account] = {
            "limit_per_s": account_limit,
            "requests": len(times),
            "max_in_any_1s_window": max_in_window(times),
            "achieved_fraction": round(achieved(times, account_limit), 4),
            "limiter_wait_p50_ms": round(percentile(waits[account], 0.5), 1),
            "limiter_wait_p99_ms": round(percentile(waits[account], 0.99), 1),
        }
    return result


# -- compare: the limiter alone ------------------------------------------------------------


def _compare_process(
    kind: str, redis_url: str, api: str, limit: int, threads: int, until: float, out: Any
) -> None:
    from worker.delivery.ratelimit import Limiter
    from worker.settings import Account, Provider, RateLimit
    from worker.store.connection import connect
    from worker.store.keys import Keys

    sent: list[float] = []
    lock = threading.Lock()
    if kind == "ours":
        limiter = Limiter(connect(redis_url), Keys("bench"))
        provider = Provider("p", api, {"token": "/x"}, 300)
        account = Account("a", provider, "K", RateLimit(limit, 1.0), api, 300)

        def acquire() -> None:
            slot = limiter.plan(account, time.time() + 3600)
            if slot.wait_s:
                time.sleep(slot.wait_s)
            limiter.admit(account, give_up_after_s=3600)
    else:
        from limits import RateLimitItemPerSecond
        from limits.storage import storage_from_string
        from limits.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

        storage = storage_from_string(redis_url)
        strategy = (
            MovingWindowRateLimiter if kind == "limits-moving" else SlidingWindowCounterRateLimiter
        )
        lim = strategy(storage)
        item = RateLimitItemPerSecond(limit)

        def acquire() -> None:
            while not lim.hit(item, "bench"):
                reset = lim.get_window_stats(item, "bench").reset_time
                time.sleep(min(max(reset - time.time(), 0.001), 1.0))

    def loop() -> None:
        with requests.Session() as http:
            while time.time() < until:
                acquire()
                http.post(
                    api + "/reportIncorrectTokenCaptcha", json={"clientKey": "k", "taskId": 1}
                )
                with lock:
                    sent.append(time.time())

    pool = [threading.Thread(target=loop) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    out.put(len(sent))


def compare(
    processes: int = 2, threads: int = 16, limit: int = 20, seconds: float = 15.0
) -> dict[str, Any]:
    results: dict[str, Any] = {
        "scenario": "ratelimit-compare",
        "processes": processes,
        "threads": threads,
        "limit_per_s": limit,
        "limiters": {},
    }
    for kind in ("ours", "limits-moving", "limits-sliding-counter"):
        with tempfile.TemporaryDirectory(prefix="rf-bench-") as tmp:
            server = RedisProcess(Path(tmp), appendonly=False).start()
            try:
                with Sandbox() as sandbox:
                    until = time.time() + seconds
                    queue: Any = multiprocessing.Queue()
                    procs = [
                        multiprocessing.Process(
                            target=_compare_process,
                            args=(kind, server.url, sandbox.url, limit, threads, until, queue),
                        )
                        for _ in range(processes)
                    ]
                    for proc in procs:
                        proc.start()
                    for proc in procs:
                        proc.join(seconds + 60)
                    times = [r.monotonic for r in sandbox.requests()]
            finally:
                server.stop()
        # drop the tail: threads stop at `until`, the last window is partial
        results["limiters"][kind] = {
            "requests": len(times),
            "max_in_any_1s_window": max_in_window(times),
            "achieved_fraction": round(achieved(times, limit), 4),
        }
    return results
