"""Real processes for tests, benchmarks and crash runs: a redis-server on a free loopback
port (AOF on, so it can be SIGKILLed and restarted from it), and worker subprocesses.
Like ``celery.contrib.testing``, shipped so that bench/ and tests/ share one copy."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import redis

from worker.store.embedded import redis_server_binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisProcess:
    """``redis-server`` on 127.0.0.1 with its data in ``directory``."""

    def __init__(self, directory: Path, *, appendonly: bool = True, port: int = 0) -> None:
        self.directory = directory
        self.appendonly = appendonly
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 30.0) -> RedisProcess:
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)  # noqa: S603
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except (redis.ConnectionError, redis.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not come up")
                time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save (the AOF holds what was acknowledged)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            self.process = None


def service_env(base: Mapping[str, str] | None = None, **values: str) -> dict[str, str]:
    """The current environment without any report-forwarder setting, plus ``values``."""
    env = dict(os.environ if base is None else base)
    for name in list(env):
        if name.startswith("REPORT_FORWARDER_") or name in ("REDIS_URL", "CAPMONSTER_CLIENT_KEY"):
            del env[name]
    env.update(values)
    return env


class WorkerProcesses:
    """``report-forwarder worker`` subprocesses, each logging to its own file."""

    def __init__(self, env: Mapping[str, str], logs: Path, concurrency: int = 8) -> None:
        self.env = dict(env)
        self.logs = logs
        self.concurrency = concurrency
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, concurrency: int | None = None, **env: str) -> subprocess.Popen[bytes]:
        """Start one more worker; ``env`` adds to (or overrides) the shared environment."""
        self.logs.mkdir(parents=True, exist_ok=True)
        path = self.logs / f"worker-{len(self.procs)}.log"
        with open(path, "wb") as log:
            proc = subprocess.Popen(  # noqa: S603
                [sys.executable, "-m", "worker", "worker", "--concurrency",
                 str(concurrency or self.concurrency)],
                env={**self.env, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.procs.append(proc)
        return proc

    def log_paths(self) -> list[Path]:
        return [self.logs / f"worker-{n}.log" for n in range(len(self.procs))]

    @staticmethod
    def kill(proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop_all(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (warm shutdown: in-flight reports finish), SIGKILL after ``timeout_s``."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
