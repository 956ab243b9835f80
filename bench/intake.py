"""Intake benchmarks, with wrk (Debian package ``wrk``) as the keep-alive load generator.

``intake``: requests/s and latency percentiles of ``POST /reportIncorrectImageCaptcha``
(unique taskIds across every run, warm-ups included, so every request really queues a
report) against the same server answering a constant success without touching Redis —
the ceiling — timed in alternation in the same run, on the same Redis (AOF, appendfsync
always, as in production).

``servers``: the constant-answer ASGI app on each candidate server (uvicorn with uvloop and
httptools, granian, hypercorn), to show why the intake runs on uvicorn.

``idle_connections`` (``python -m bench.intake idle-connections --count 20000``): one
address opens thousands of connections and sends nothing, while a well-behaved client on
another address keeps reporting; does the intake (``report-forwarder serve`` with its
default limits) still answer it, and what does it log?
"""

from __future__ import annotations

import argparse
import errno
import http.client
import json
import re
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from worker.testing.processes import RedisProcess, free_port, service_env

KEY = "bench-intake-key"
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux
# Every wrk run gets its own taskId range (``-- BASE``), and each of its threads its own
# slice of it, so no request of any run repeats an id: a repeat would take the intake's
# cheaper duplicate path (no queue write) and flatter it.
WRK_SCRIPT = """
local counter = 0
local offset = 0
local threads = 0
function setup(thread)
  thread:set("offset", threads * 100000000)
  threads = threads + 1
end
function init(args)
  offset = (tonumber(args[1]) or 1000000000) + (tonumber(wrk.thread:get("offset")) or 0)
end
request = function()
  counter = counter + 1
  local body = '{"clientKey":"%s","taskId":' .. (offset + counter) .. '}'
  return wrk.format("POST", "/reportIncorrectImageCaptcha",
                    {["Content-Type"] = "application/json"}, body)
end
"""
CONSTANT_APP = """
BODY = b'{"errorId":0,"status":"success"}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
"""


_RUN_IDS = 1_000_000_000  # taskIds per wrk run: threads x 100,000,000


class _Runs:
    """Hands each wrk run its own taskId range."""

    def __init__(self) -> None:
        self.count = 0

    def base(self) -> int:
        self.count += 1
        return self.count * _RUN_IDS


def _wrk(
    url: str, script: Path, seconds: int, connections: int, base: int, threads: int = 2
) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    out = subprocess.run(
        [
            wrk,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(script),
            url,
            "--",
            str(base),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    latency = {}
    for q in ("50", "90", "99"):
        match = re.search(rf"\s{q}%\s+([\d.]+)(us|ms|s)", out)
        if match:
            scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]
            latency[f"p{q}_ms"] = round(float(match.group(1)) * scale, 3)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return {
        "requests_per_s": rate,
        **latency,
        "requests": total,
        "non_2xx": int(errors.group(1)) if errors else 0,
    }


def _wait_port(port: int, timeout: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def _serve(env: dict[str, str], port: int, enqueue: bool) -> subprocess.Popen[bytes]:
    code = (
        "from worker.settings import load_settings; from worker.intake import serve; "
        f"serve(load_settings(), '127.0.0.1', {port}, token=None, "
        f"client_rate=1e9, enqueue={enqueue})"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def intake(seconds: int = 10, connections: int = 32, rounds: int = 5) -> dict[str, Any]:
    """The intake vs its constant-answer ceiling: both servers up side by side, timed in
    alternation (ceiling, intake, ceiling, ...) for ``rounds`` rounds, so that a change in
    the shared machine's load hits both; the ratio is the median of the rounds' ratios."""
    results: dict[str, Any] = {
        "scenario": "intake",
        "connections": connections,
        "seconds": seconds,
        "rounds": [],
    }
    runs = _Runs()
    names = {"ceiling": False, "intake": True}
    with tempfile.TemporaryDirectory(prefix="rf-bench-") as tmp:
        base = Path(tmp)
        server = RedisProcess(base / "redis", appendonly=True).start()
        script = base / "post.lua"
        script.write_text(WRK_SCRIPT.replace("%s", KEY))
        env = service_env(
            REDIS_URL=server.url, CAPMONSTER_CLIENT_KEY=KEY, REPORT_FORWARDER_LOG_FORMAT="json"
        )
        ports = {name: free_port() for name in names}
        procs = [_serve(env, ports[name], enqueue) for name, enqueue in names.items()]
        try:
            sent = 0
            for name, enqueue in names.items():
                _wait_port(ports[name])
                warm = _wrk(f"http://127.0.0.1:{ports[name]}", script, 2, connections, runs.base())
                sent += warm["requests"] if enqueue else 0
            for _ in range(rounds):
                one: dict[str, Any] = {}
                for name in names:
                    url = f"http://127.0.0.1:{ports[name]}"
                    one[name] = _wrk(url, script, seconds, connections, runs.base())
                one["ratio"] = round(
                    one["intake"]["requests_per_s"] / one["ceiling"]["requests_per_s"], 3
                )
                sent += one["intake"]["requests"]
                results["rounds"].append(one)
            import redis

            client = redis.Redis.from_url(server.url)
            queued = int(client.get("rf:npending") or 0)
            client.close()
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(20)
            server.stop()
    for name in names:
        each = [r[name] for r in results["rounds"]]
        results[name] = {
            key: round(_median([float(r[key]) for r in each if key in r]), 3)
            for key in ("requests_per_s", "p50_ms", "p90_ms", "p99_ms")
        }
        results[name]["non_2xx"] = sum(r["non_2xx"] for r in each)
    # every request carried a new taskId, so each one must have queued a report (wrk
    # counts only the answers it read: a few requests of each run may be missing)
    results["intake"]["reports_queued"] = queued
    results["intake"]["requests_sent"] = sent
    results["intake"]["duplicates"] = max(0, sent - queued)
    results["ratio"] = _median([r["ratio"] for r in results["rounds"]])
    return results


def servers(seconds: int = 8, connections: int = 32) -> dict[str, Any]:
    """The constant-answer app on each candidate ASGI server."""
    results: dict[str, Any] = {"scenario": "intake-servers", "connections": connections}
    runs = _Runs()
    with tempfile.TemporaryDirectory(prefix="rf-bench-") as tmp:
        base = Path(tmp)
        (base / "constant_app.py").write_text(CONSTANT_APP)
        script = base / "post.lua"
        script.write_text(WRK_SCRIPT.replace("%s", KEY))
        bindir = Path(sys.executable).parent
        for name in ("uvicorn", "granian", "hypercorn"):
            port = free_port()
            command = {
                "uvicorn": [
                    str(bindir / "uvicorn"),
                    "constant_app:app",
                    "--port",
                    str(port),
                    "--loop",
                    "uvloop",
                    "--http",
                    "httptools",
                    "--no-access-log",
                    "--log-level",
                    "warning",
                ],
                "granian": [
                    str(bindir / "granian"),
                    "--interface",
                    "asgi",
                    "--port",
                    str(port),
                    "--no-ws",
                    "--log-level",
                    "warning",
                    "constant_app:app",
                ],
                "hypercorn": [
                    str(bindir / "hypercorn"),
                    "constant_app:app",
                    "-b",
                    f"127.0.0.1:{port}",
                    "--log-level",
                    "warning",
                ],
            }[name]
            proc = subprocess.Popen(
                command, cwd=base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                _wait_port(port)
                url = f"http://127.0.0.1:{port}"
                _wrk(url, script, 2, connections, runs.base())
                results[name] = _wrk(url, script, seconds, connections, runs.base())
            finally:
                proc.terminate()
                proc.wait(20)
    return results


def _raise_own_fd_limit(wanted: int) -> dict[str, int]:
    """This process's RLIMIT_NOFILE raised for ``wanted`` sockets: the soft limit to the
    hard one, and the hard one too where allowed (root); the limits before and after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = {"soft_before": soft, "hard_before": hard}
    for new_hard in (max(hard, wanted), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_hard, new_hard))
            break
        except (ValueError, OSError):
            continue
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {**before, "soft": soft, "hard": hard}


class _Probe(threading.Thread):
    """A well-behaved client on its own address: one report after another, each on a new
    connection (as curl would; a kept-alive connection opened before a flood proves
    nothing), every outcome and latency kept."""

    def __init__(self, port: int, source: str) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.source = source
        self.stop = threading.Event()
        self.phase = "before"
        self.outcomes: dict[str, Counter[str]] = {}
        self.latency_ms: dict[str, list[float]] = {}

    def run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        task_id = 5_000_000_000
        while not self.stop.is_set():
            task_id += 1
            body = json.dumps({"clientKey": KEY, "taskId": task_id})
            started = time.perf_counter()
            try:
                if conn is None:
                    source = None if self.source == "127.0.0.1" else (self.source, 0)
                    conn = http.client.HTTPConnection(
                        "127.0.0.1", self.port, timeout=5, source_address=source
                    )
                conn.request(
                    "POST",
                    "/reportIncorrectImageCaptcha",
                    body,
                    {"Content-Type": "application/json"},
                )
                response = conn.getresponse()
                response.read()
                outcome = str(response.status)
            except (OSError, http.client.HTTPException) as exc:
                outcome = type(exc).__name__
            if conn is not None:
                conn.close()
            conn = None
            elapsed = (time.perf_counter() - started) * 1000
            self.outcomes.setdefault(self.phase, Counter())[outcome] += 1
            if outcome == "200":
                self.latency_ms.setdefault(self.phase, []).append(elapsed)
            time.sleep(0.002)  # pacing: a steady client, not a load test
        if conn is not None:
            conn.close()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for phase, outcomes in self.outcomes.items():
            lat = sorted(self.latency_ms.get(phase, [])) or [float("nan")]
            out[phase] = {
                "outcomes": dict(outcomes),
                "p50_ms": round(lat[len(lat) // 2], 2),
                "p99_ms": round(lat[int(len(lat) * 0.99)], 2),
                "max_ms": round(lat[-1], 2),
            }
        return out


def idle_connections(
    count: int = 20_000, hold_s: float = 3.0, source: str = "127.0.0.2", serve_args: str = ""
) -> dict[str, Any]:
    """``count`` connections from ``source`` that send nothing, against `report-forwarder
    serve` (its default limits, plus ``serve_args``), while a client on 127.0.0.1 reports.
    The connections are held by as many processes as this machine's open-file limit needs
    (each raises its own limit to the hard one)."""
    limits = _raise_own_fd_limit(count + 1000)
    per_process = max(1000, min(10_000, limits["soft"] - 500))
    shares = [min(per_process, count - start) for start in range(0, count, per_process)]
    results: dict[str, Any] = {"scenario": "intake-idle-connections", "count": count}
    results["client_fd_limit"] = limits
    results["client_processes"] = len(shares)
    with tempfile.TemporaryDirectory(prefix="rf-bench-") as tmp:
        base = Path(tmp)
        server = RedisProcess(base / "redis", appendonly=False).start()
        port = free_port()
        env = service_env(
            REDIS_URL=server.url, CAPMONSTER_CLIENT_KEY=KEY, REPORT_FORWARDER_LOG_FORMAT="json"
        )
        log_path = base / "serve.log"
        command = [sys.executable, "-m", "worker", "serve", "--port", str(port)]
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [*command, *serve_args.split()], env=env, stdout=log_file, stderr=log_file
            )
        probe = _Probe(port, "127.0.0.1")
        holders: list[subprocess.Popen[str]] = []
        try:
            _wait_port(port)
            probe.start()
            time.sleep(1.0)  # a baseline for the probe
            probe.phase = "during"
            started = time.monotonic()
            holders += [_holder(port, share, source, hold_s) for share in shares]
            for holder in holders:  # each says "opened" once its share is open
                assert holder.stdout is not None
                holder.stdout.readline()
            results["open_s"] = round(time.monotonic() - started, 2)
            probe.phase = "after"
            flood: Counter[str] = Counter()
            for holder, share in zip(holders, shares, strict=True):
                assert holder.stdout is not None
                assert holder.stderr is not None
                out, err = holder.stdout.read(), holder.stderr.read()  # past readline's buffer
                holder.wait(timeout=120)
                if not out.strip():
                    tail = err.strip().splitlines()[-1:] or [f"exit {holder.returncode}"]
                    out = json.dumps({f"holder failed: {tail[0]}": share})
                flood.update(json.loads(out))
            results["flood"] = dict(flood)
        finally:
            probe.stop.set()
            probe.join(10)
            for holder in holders:
                holder.kill()
            proc.terminate()
            proc.wait(20)
            server.stop()
        results["probe"] = probe.summary()
        results["server_log_events"] = _log_events(log_path)
    return results


def _holder(port: int, count: int, source: str, hold_s: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.intake", "hold", "--port", str(port),
         "--count", str(count), "--source", source, "--hold", str(hold_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def hold(port: int, count: int, source: str, hold_s: float) -> dict[str, int]:
    """One holder process of ``idle_connections``: open ``count`` connections, say
    "opened", keep them ``hold_s`` seconds, then tell what became of them."""
    _raise_own_fd_limit(count + 100)
    flood: list[socket.socket] = []
    errors = _open_idle(flood, port, count, source)
    print("opened", flush=True)
    time.sleep(hold_s)
    states = {f"connect failed: {k}": v for k, v in errors.items()}
    states.update({f"after {hold_s:g} s: {k}": v for k, v in _states(flood).items()})
    for sock in flood:
        sock.close()
    return states


def _open_idle(flood: list[socket.socket], port: int, count: int, source: str) -> Counter[str]:
    """Open ``count`` connections from ``source`` into ``flood``; the failures by kind."""
    errors: Counter[str] = Counter()
    for _ in range(count):
        sock = socket.socket()
        sock.settimeout(5)
        # the source port is picked at connect(), per destination: bind() alone would
        # take it from the ports shared by every address
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        # closed with a reset, so that no TIME_WAIT holds the ports for the next run
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        try:
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", port))
        except OSError as exc:
            errors[errno.errorcode.get(exc.errno or 0, type(exc).__name__)] += 1
            sock.close()
            continue
        flood.append(sock)
    return errors


def _states(flood: list[socket.socket]) -> dict[str, int]:
    """What the server did with each connection: answered it (and how), closed it, or
    holds it open."""
    states: Counter[str] = Counter()
    for sock in flood:
        sock.setblocking(False)
        try:
            data = sock.recv(64)
            states["answered " + data[:12].decode() if data else "closed"] += 1
        except BlockingIOError:
            states["open, idle"] += 1
        except OSError as exc:
            states[type(exc).__name__] += 1
    return dict(states)


def _log_events(path: Path) -> dict[str, int]:
    events: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                events[json.loads(line).get("event", "?")] += 1
            except ValueError:
                events["(not JSON)"] += 1
    return dict(events)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.intake")
    parser.add_argument("scenario", choices=["idle-connections", "hold"])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--hold", type=float, default=3.0)
    parser.add_argument("--source", default="127.0.0.2")
    parser.add_argument("--serve-args", default="", help="extra options of `serve`")
    parser.add_argument("--port", type=int, help="(hold) the intake's port")
    args = parser.parse_args()
    if args.scenario == "hold":
        print(json.dumps(hold(args.port, args.count, args.source, args.hold)))
        return 0
    doc = idle_connections(args.count, args.hold, args.source, args.serve_args)
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
