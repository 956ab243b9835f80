"""Throughput, latency and memory scenarios, each with its baseline measured in the same run.

All run against one real redis-server (AOF, ``appendfsync always``: production settings)
and the sandbox API in its own process on loopback. Worker figures come from real
``report-forwarder worker`` processes; CPU time is read from the process (psutil).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import redis
import requests

from worker.producer import Producer
from worker.settings import load_settings
from worker.store.keys import Keys
from worker.testing.processes import RedisProcess, WorkerProcesses, free_port, service_env

KEY = "bench-perf-key"
PAYLOAD = 560  # bytes: about one of our messages


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return (
        ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")
    )


@contextmanager
def stack(latency_ms: float = 0.0, rate_limit: str = "1000000/second") -> Iterator[dict[str, Any]]:
    """Redis + the sandbox (own process) + the environment of a service using them."""
    with tempfile.TemporaryDirectory(prefix="rf-perf-") as tmp:
        base = Path(tmp)
        server = RedisProcess(base / "redis", appendonly=True).start()
        port = free_port()
        sandbox = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker",
                "sandbox",
                "--port",
                str(port),
                "--latency-ms",
                str(latency_ms),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        _wait_http(url + "/_sandbox/stats")
        env = service_env(
            REDIS_URL=server.url,
            REPORT_FORWARDER_API_URL=url,
            CAPMONSTER_CLIENT_KEY=KEY,
            REPORT_FORWARDER_RATE_LIMIT=rate_limit,
            REPORT_FORWARDER_LOG_FORMAT="json",
            REPORT_FORWARDER_HOME=str(base / "home"),
        )
        try:
            yield {"env": env, "redis": server, "sandbox_url": url, "base": base}
        finally:
            sandbox.terminate()
            sandbox.wait(20)
            server.stop()


def _wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=1)
        except requests.RequestException:
            time.sleep(0.05)
        else:
            return
    raise RuntimeError(f"{url} did not answer")


def _sandbox_log(url: str) -> list[dict[str, Any]]:
    log: list[dict[str, Any]] = requests.get(url + "/_sandbox/requests", timeout=60).json()
    return log


def _api_saw(url: str, sent: int, *, accepted: bool = False, timeout: float = 30.0) -> int:
    """Wait until the sandbox (the API double, the judge of a run) has logged ``sent``
    report requests, then check it logged exactly that many (and, with ``accepted``, that
    it accepted every one): a figure counts what reached the API, not our bookkeeping."""
    deadline = time.monotonic() + timeout
    while True:
        stats = requests.get(url + "/_sandbox/stats", timeout=30).json()
        if stats["total"] >= sent or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    successes = stats["by_outcome"].get("success", 0)
    if stats["total"] != sent or (accepted and successes != sent):
        raise RuntimeError(
            f"{sent} reports sent, but the API saw {stats['total']} requests "
            f"({successes} accepted): the figure would not be what the API received"
        )
    return int(stats["total"])


# -- producer ------------------------------------------------------------------------------


def producer_single(n: int = 3000) -> dict[str, Any]:
    """enqueue_report latency vs one raw LPUSH round trip, interleaved, same Redis."""
    with stack() as s:
        producer = Producer(load_settings(environ=s["env"]))
        raw = redis.Redis.from_url(s["redis"].url)
        payload = b"x" * PAYLOAD
        ours, lpush = [], []
        for i in range(n):
            t = time.perf_counter()
            producer.enqueue(i + 1, "image")
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            raw.lpush("bench:raw", payload)
            lpush.append(time.perf_counter() - t)
        producer.client.close()
        raw.close()
    p50, base = statistics.median(ours), statistics.median(lpush)
    return {
        "enqueue_p50_us": round(p50 * 1e6, 1),
        "enqueue_p99_us": round(_pct(ours, 0.99) * 1e6, 1),
        "lpush_p50_us": round(base * 1e6, 1),
        "lpush_p99_us": round(_pct(lpush, 0.99) * 1e6, 1),
        "ratio_p50": round(p50 / base, 2),
    }


def producer_bulk(n: int = 100_000) -> dict[str, Any]:
    """enqueue_reports and `enqueue --file` vs pipelined raw LPUSH of as many payloads."""
    with stack() as s:
        env = s["env"]
        producer = Producer(load_settings(environ=env))
        raw = redis.Redis.from_url(s["redis"].url)
        items = [{"taskId": i, "captchaType": "image"} for i in range(1, n + 1)]
        t = time.perf_counter()
        result = producer.enqueue_many(items)
        ours = time.perf_counter() - t
        assert result.queued == n
        payload = b"x" * PAYLOAD
        t = time.perf_counter()
        for start in range(0, n, 1000):
            pipe = raw.pipeline(transaction=False)
            for _ in range(min(1000, n - start)):
                pipe.lpush("bench:raw", payload)
            pipe.execute()
        base = time.perf_counter() - t
        raw.flushall()
        lines = s["base"] / "reports.jsonl"
        lines.write_text(
            "".join(
                json.dumps({"taskId": i + n, "captchaType": "image"}) + "\n"
                for i in range(1, n + 1)
            )
        )
        t = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "worker", "enqueue", "--file", str(lines)],
            env=env,
            check=True,
            capture_output=True,
        )
        cli = time.perf_counter() - t
        producer.client.close()
        raw.close()
    return {
        "reports": n,
        "enqueue_reports_per_s": round(n / ours),
        "enqueue_file_per_s": round(n / cli),
        "raw_lpush_per_s": round(n / base),
        "ratio": round(base / ours, 3),
    }


# -- workers -------------------------------------------------------------------------------


def _drain(
    env: dict[str, str], base: Path, n: int, threads: int, per_message: int, tag: str
) -> dict[str, Any]:
    """Queue n reports, then one worker process drains them: rate and CPU per report."""
    settings = load_settings(environ=env)
    producer = Producer(settings)
    producer.enqueue_many(
        ({"taskId": i, "captchaType": "image"} for i in range(1, n + 1)), per_message=per_message
    )
    workers = WorkerProcesses(env, base / f"logs-{tag}", threads)
    proc = workers.spawn()
    ps = psutil.Process(proc.pid)
    keys = Keys(settings.key_prefix)
    client = producer.client
    started = None
    while int(client.get(keys.npending) or 0) > 0:
        if started is None and int(client.get(keys.npending) or 0) < n:
            started, cpu0 = time.perf_counter(), ps.cpu_times()
        time.sleep(0.01)
    elapsed = time.perf_counter() - (started or time.perf_counter())
    cpu1 = ps.cpu_times()
    received = _api_saw(env["REPORT_FORWARDER_API_URL"], n, accepted=True)
    workers.stop_all()
    client.close()
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system) if started else 0.0
    return {
        "reports_per_s": round(n / elapsed),
        "cpu_ms_per_report": round(cpu * 1000 / n, 3),
        "api_received": received,
    }


NAIVE_APP = """
import threading, requests
from celery import Celery
app = Celery("naive", broker="{broker}")
app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True,
                worker_prefetch_multiplier=1, task_acks_late=True, worker_hijack_root_logger=False)
_local = threading.local()
@app.task(name="naive.post", ignore_result=True)
def post(task_id):
    session = getattr(_local, "s", None) or requests.Session()
    _local.s = session
    session.post("{api}/reportIncorrectImageCaptcha", json={{"clientKey": "k", "taskId": task_id}})
"""


def _naive(s: dict[str, Any], n: int, threads: int) -> dict[str, Any]:
    """The baseline: a Celery task that only POSTs with requests (nothing else)."""
    base: Path = s["base"]
    (base / "naive_app.py").write_text(
        NAIVE_APP.format(broker=s["redis"].url, api=s["sandbox_url"])
    )
    sys.path.insert(0, str(base))
    try:
        import naive_app  # type: ignore[import-not-found]

        with naive_app.app.producer_or_acquire() as producer:
            for i in range(n):
                naive_app.post.apply_async((i,), producer=producer)
    finally:
        sys.path.remove(str(base))
    client = redis.Redis.from_url(s["redis"].url)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "naive_app",
            "worker",
            "-P",
            "threads",
            "-c",
            str(threads),
            "--without-mingle",
            "--without-gossip",
            "-l",
            "WARNING",
            "-Q",
            "celery",
        ],
        cwd=base,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(base)},
    )
    ps = psutil.Process(proc.pid)
    started = None
    while client.llen("celery") > 0 or client.hlen("unacked") > 0:
        if started is None and client.llen("celery") < n:
            started, cpu0 = time.perf_counter(), ps.cpu_times()
        time.sleep(0.01)
    elapsed = time.perf_counter() - (started or time.perf_counter())
    cpu1 = ps.cpu_times()
    received = _api_saw(s["sandbox_url"], n)
    proc.terminate()
    proc.wait(30)
    client.close()
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system) if started else 0.0
    return {
        "reports_per_s": round(n / elapsed),
        "cpu_ms_per_report": round(cpu * 1000 / n, 3),
        "api_received": received,
    }


DRAMATIQ_APP = """
import threading, requests, dramatiq
from dramatiq.brokers.redis import RedisBroker
dramatiq.set_broker(RedisBroker(url="{broker}"))
_local = threading.local()
@dramatiq.actor(queue_name="default", max_retries=0)
def post(task_id):
    session = getattr(_local, "s", None) or requests.Session()
    _local.s = session
    session.post("{api}/reportIncorrectImageCaptcha", json={{"clientKey": "k", "taskId": task_id}})
"""


def _tree_cpu(ps: psutil.Process) -> dict[int, float]:
    """CPU seconds (user + system) of a process and each of its descendants, by pid."""
    out = {}
    for proc in [ps, *ps.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        out[proc.pid] = times.user + times.system
    return out


def _dramatiq(s: dict[str, Any], n: int, threads: int) -> dict[str, Any]:
    """The strongest general-purpose peer: a Dramatiq actor that only POSTs with a
    requests.Session per thread (Redis broker, default middleware, one worker process of
    ``threads`` threads), measured as :func:`_naive` is."""
    import importlib.util

    base: Path = s["base"]
    path = base / "naive_dramatiq.py"
    path.write_text(DRAMATIQ_APP.format(broker=s["redis"].url, api=s["sandbox_url"]))
    spec = importlib.util.spec_from_file_location(f"naive_dramatiq_{id(s)}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for i in range(n):
        module.post.send(i)
    module.dramatiq.get_broker().close()
    client = redis.Redis.from_url(s["redis"].url)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dramatiq",
            "naive_dramatiq",
            "--processes",
            "1",
            "--threads",
            str(threads),
            "--queues",
            "default",
        ],
        cwd=base,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(base)},
    )
    # the CLI's supervisor forks the one worker process: CPU is the whole tree's
    ps = psutil.Process(proc.pid)
    started = None
    cpu0: dict[int, float] = {}
    while client.hlen("dramatiq:default.msgs") > 0:
        if started is None and client.llen("dramatiq:default") < n:
            started, cpu0 = time.perf_counter(), _tree_cpu(ps)
        time.sleep(0.01)
    elapsed = time.perf_counter() - (started or time.perf_counter())
    cpu1 = _tree_cpu(ps)
    received = _api_saw(s["sandbox_url"], n)
    proc.terminate()
    proc.wait(30)
    client.close()
    cpu = sum(t - cpu0.get(pid, 0.0) for pid, t in cpu1.items()) if started else 0.0
    return {
        "reports_per_s": round(n / elapsed),
        "cpu_ms_per_report": round(cpu * 1000 / n, 3),
        "api_received": received,
    }


def _bare(url: str, n: int, threads: int, client: str = "requests") -> dict[str, Any]:
    """The floor: the HTTP client alone POSTing in the same number of threads, nothing
    else (bench/http.py: ``requests``, ``urllib3``, or ``pycurl`` as the worker uses it)."""
    from .http import post_loop

    r = post_loop(client, url, n, threads)
    return {
        "reports_per_s": r["posts_per_s"],
        "cpu_ms_per_report": r["cpu_ms_per_post"],
        "api_received": r["api_received"],
    }


BASELINES = ("naive_celery", "dramatiq", "bare_requests", "bare_urllib3", "bare_pycurl")


def worker_throughput(n: int = 6000, threads: int = 16, chunk: int = 20) -> dict[str, Any]:
    """One worker process against a zero-latency sandbox vs the naive Celery task, the
    Dramatiq actor and the bare client loops; CPU per report as ratios to each."""
    with stack() as s:
        single = _drain(s["env"], s["base"], n, threads, 1, "single")
    with stack() as s:
        bulk = _drain(s["env"], s["base"], n, threads, chunk, "bulk")
    with stack() as s:
        naive = _naive(s, n, threads)
    with stack() as s:
        peer = _dramatiq(s, n, threads)
    with stack() as s:
        bare = _bare(s["sandbox_url"], n, threads, "requests")
    with stack() as s:
        bare3 = _bare(s["sandbox_url"], n, threads, "urllib3")
    with stack() as s:
        curl = _bare(s["sandbox_url"], n, threads, "pycurl")
    baselines = {
        "naive_celery": naive,
        "dramatiq": peer,
        "bare_requests": bare,
        "bare_urllib3": bare3,
        "bare_pycurl": curl,
    }

    def ratios(ours: dict[str, Any], field: str) -> dict[str, float]:
        return {
            name: round(ours[field] / b[field], 3) if b[field] else float("nan")
            for name, b in baselines.items()
        }

    return {
        "threads": threads,
        "reports": n,
        "single_messages": single,
        "bulk_messages": {**bulk, "reports_per_message": chunk},
        **baselines,
        "single_vs_naive": round(single["reports_per_s"] / naive["reports_per_s"], 3),
        "bulk_vs_naive": round(bulk["reports_per_s"] / naive["reports_per_s"], 3),
        "cpu_ratio": {
            "single_messages": ratios(single, "cpu_ms_per_report"),
            "bulk_messages": ratios(bulk, "cpu_ms_per_report"),
        },
        "rate_ratio": {
            "single_messages": ratios(single, "reports_per_s"),
            "bulk_messages": ratios(bulk, "reports_per_s"),
        },
    }


def latency_bound(
    latency_ms: float = 50.0, threads: tuple[int, ...] = (16, 64), per_message: int = 1
) -> dict[str, Any]:
    """With a 50 ms API: reports/s against the bound concurrency / latency."""
    out: dict[str, Any] = {"latency_ms": latency_ms, "reports_per_message": per_message}
    for t in threads:
        bound = t / (latency_ms / 1000)
        n = int(bound * 8)
        with stack(latency_ms) as s:
            result = _drain(s["env"], s["base"], n, t, per_message, f"lat{t}-{per_message}")
        out[f"threads_{t}"] = {
            **result,
            "bound_per_s": round(bound),
            "efficiency": round(result["reports_per_s"] / bound, 3),
        }
    return out


def end_to_end(rate: float, seconds: float = 10.0, threads: int = 16) -> dict[str, Any]:
    """enqueue -> the API received it, at a steady ``rate`` (half the measured capacity)."""
    with stack() as s:
        env = s["env"]
        workers = WorkerProcesses(env, s["base"] / "logs", threads)
        workers.spawn()
        producer = Producer(load_settings(environ=env))
        time.sleep(2)
        sent: dict[int, float] = {}
        interval = 1.0 / rate
        t0 = time.perf_counter()
        i = 0
        while time.perf_counter() - t0 < seconds:
            i += 1
            sent[i] = time.time()
            producer.enqueue(i, "image")
            delay = t0 + i * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        keys = Keys(load_settings(environ=env).key_prefix)
        while int(producer.client.get(keys.npending) or 0) > 0:
            time.sleep(0.05)
        _api_saw(s["sandbox_url"], len(sent), accepted=True)
        workers.stop_all()
        log = _sandbox_log(s["sandbox_url"])
        producer.client.close()
    lat = [(r["at"] - sent[r["task_id"]]) * 1000 for r in log if r["task_id"] in sent]
    return {
        "rate_per_s": rate,
        "reports": len(lat),
        "p50_ms": round(statistics.median(lat), 1),
        "p99_ms": round(_pct(lat, 0.99), 1),
    }


def memory(total: int = 100_000, checkpoint: int = 10_000, threads: int = 16) -> dict[str, Any]:
    """Worker RSS after the first 10,000 reports and after 100,000 (should stay flat)."""
    with stack() as s:
        env = s["env"]
        settings = load_settings(environ=env)
        producer = Producer(settings)
        keys = Keys(settings.key_prefix)
        workers = WorkerProcesses(env, s["base"] / "logs", threads)
        proc = workers.spawn()
        ps = psutil.Process(proc.pid)
        rss: dict[int, int] = {}
        done = 0
        peak = 0
        for start in range(0, total, checkpoint):
            producer.enqueue_many(
                {"taskId": i, "captchaType": "image"}
                for i in range(start + 1, start + checkpoint + 1)
            )
            while int(producer.client.get(keys.npending) or 0) > 0:
                peak = max(peak, ps.memory_info().rss)
                time.sleep(0.05)
            done += checkpoint
            rss[done] = ps.memory_info().rss
            _api_saw(s["sandbox_url"], done, accepted=True)
        workers.stop_all()
        producer.client.close()
    first, last = rss[checkpoint], rss[total]
    return {
        "rss_mb": {k: round(v / 2**20, 1) for k, v in rss.items()},
        "peak_mb": round(peak / 2**20, 1),
        "growth_10k_to_100k": round(last / first - 1, 3),
    }
