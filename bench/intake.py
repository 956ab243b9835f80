"""Intake benchmarks, with wrk (Debian package ``wrk``) as the keep-alive load generator.

``intake``: requests/s and latency percentiles of ``POST /reportIncorrectImageCaptcha``
(unique taskIds, so every request really queues a report) against the same server
answering a constant success without touching Redis — the ceiling — measured in the same
run, on the same Redis (AOF, appendfsync always, as in production).

``servers``: the constant-answer ASGI app on each candidate server (uvicorn with uvloop and
httptools, granian, hypercorn), to show why the intake runs on uvicorn.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from worker.testing import RedisProcess, free_port, service_env

KEY = "bench-intake-key"
WRK_SCRIPT = """
local counter = 0
local offset = 0
local threads = 0
function setup(thread)
  thread:set("offset", threads * 100000000)
  threads = threads + 1
end
function init(args)
  offset = tonumber(wrk.thread:get("offset")) or 0
end
request = function()
  counter = counter + 1
  local body = '{"clientKey":"%s","taskId":' .. (1000000000 + offset + counter) .. '}'
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


def _wrk(
    url: str, script: Path, seconds: int, connections: int, threads: int = 2
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
    return {"requests_per_s": rate, **latency, "non_2xx": int(errors.group(1)) if errors else 0}


def _wait_port(port: int, timeout: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def intake(seconds: int = 10, connections: int = 32) -> dict[str, Any]:
    """The intake vs its constant-answer ceiling, same server, same run."""
    results: dict[str, Any] = {"scenario": "intake", "connections": connections, "seconds": seconds}
    with tempfile.TemporaryDirectory(prefix="rf-bench-") as tmp:
        base = Path(tmp)
        server = RedisProcess(base / "redis", appendonly=True).start()
        script = base / "post.lua"
        script.write_text(WRK_SCRIPT.replace("%s", KEY))
        env = service_env(
            REDIS_URL=server.url, CAPMONSTER_CLIENT_KEY=KEY, REPORT_FORWARDER_LOG_FORMAT="json"
        )
        try:
            for name, enqueue in (("ceiling", False), ("intake", True)):
                port = free_port()
                code = (
                    "from worker.config import load_settings; from worker.intake import serve; "
                    f"serve(load_settings(), '127.0.0.1', {port}, token=None, "
                    f"client_rate=1e9, enqueue={enqueue})"
                )
                proc = subprocess.Popen(
                    [sys.executable, "-c", code],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                try:
                    _wait_port(port)
                    _wrk(f"http://127.0.0.1:{port}", script, 2, connections)  # warm up
                    results[name] = _wrk(f"http://127.0.0.1:{port}", script, seconds, connections)
                finally:
                    proc.terminate()
                    proc.wait(20)
            import redis

            client = redis.Redis.from_url(server.url)
            results["intake"]["reports_queued"] = int(client.get("rf:npending") or 0)
            client.close()
        finally:
            server.stop()
    results["ratio"] = round(
        results["intake"]["requests_per_s"] / results["ceiling"]["requests_per_s"], 3
    )
    return results


def servers(seconds: int = 8, connections: int = 32) -> dict[str, Any]:
    """The constant-answer app on each candidate ASGI server."""
    results: dict[str, Any] = {"scenario": "intake-servers", "connections": connections}
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
                _wrk(f"http://127.0.0.1:{port}", script, 2, connections)
                results[name] = _wrk(f"http://127.0.0.1:{port}", script, seconds, connections)
            finally:
                proc.terminate()
                proc.wait(20)
    return results
