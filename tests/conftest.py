"""Real parts only: a redis-server process per session, the sandbox API on loopback, real
Celery workers (in-process here; subprocesses in the crash tests)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import structlog
from celery.contrib.testing.worker import start_worker

from worker import logs
from worker.celery_app import ForwarderApp, create_app, worker_options
from worker.config import Settings, load_settings
from worker.embedded import redis_server_binary
from worker.keys import Keys
from worker.producer import Producer
from worker.runtime import Runtime
from worker.sandbox import Sandbox

CLIENT_KEY = "test-client-key-5f3a9c"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it is truthy (returned) or ``timeout`` passes (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


@dataclass
class RedisServer:
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    appendonly: bool = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        command = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        try:
            wait_until(lambda: _pings(client), timeout=20)
        finally:
            client.close()
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save (the AOF holds what was acknowledged)."""
        if self.process is not None:
            self.process.kill()
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


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.BusyLoadingError):
        return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox() as sb:
        yield sb


@pytest.fixture(autouse=True)
def _test_logging() -> Iterator[None]:
    """Uncached loggers, so ``structlog.testing.capture_logs`` sees every line."""
    logs.configure("json", "DEBUG", cache=False)
    yield
    structlog.reset_defaults()


@pytest.fixture
def env(redis_server: RedisServer, sandbox: Sandbox, tmp_path: Path) -> dict[str, str]:
    """The environment of a service pointed at the test Redis and the sandbox."""
    return {
        "REDIS_URL": redis_server.url,
        "REPORT_FORWARDER_API_URL": sandbox.url,
        "CAPMONSTER_CLIENT_KEY": CLIENT_KEY,
        "REPORT_FORWARDER_HOME": str(tmp_path / "home"),
        "REPORT_FORWARDER_LOG_FORMAT": "json",
    }


@pytest.fixture
def make_settings(env: dict[str, str], tmp_path: Path) -> Callable[..., Settings]:
    """Settings from ``env`` plus optional TOML text and extra environment variables."""

    def build(toml: str = "", **extra: str) -> Settings:
        environ = dict(env, **extra)
        if toml:
            path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.toml"
            path.write_text(toml)
            environ["REPORT_FORWARDER_CONFIG"] = str(path)
        return load_settings(environ=environ)

    return build


FAST_RECOVERY = """
[recovery]
lease_s = 5
visibility_timeout_s = 30
restore_interval_s = 2
lost_grace_s = 2
sweep_interval_s = 0.1
"""


@pytest.fixture
def settings(make_settings: Callable[..., Settings], redis_client: redis.Redis) -> Settings:
    del redis_client  # flushed for this test
    return make_settings(FAST_RECOVERY)


@pytest.fixture
def producer(settings: Settings) -> Producer:
    return Producer(settings)


@pytest.fixture
def keys(settings: Settings) -> Keys:
    return Keys(settings.key_prefix)


@dataclass
class Service:
    """An in-process worker with its runtime, for one test."""

    settings: Settings
    runtime: Runtime
    app: ForwarderApp
    producer: Producer


@contextlib.contextmanager
def running_worker(
    settings: Settings, environ: dict[str, str], concurrency: int = 8
) -> Iterator[Service]:
    runtime = Runtime(settings, settings.redis_url, environ)
    app = create_app(runtime)
    options = worker_options(settings.queue, concurrency)
    with start_worker(app, perform_ping_check=False, shutdown_timeout=30, **options):
        yield Service(settings, runtime, app, Producer(settings, runtime.client))
    assert runtime._sweeper is None, "the worker's shutdown did not stop the sweeper"
    runtime.client.close()


@pytest.fixture
def service(settings: Settings, env: dict[str, str]) -> Iterator[Service]:
    with running_worker(settings, env) as svc:
        yield svc


def all_redis_bytes(client: redis.Redis) -> bytes:
    """Every key and value in Redis (streams, hashes, lists, sets...), concatenated."""
    chunks: list[bytes] = []
    for key in client.scan_iter(count=1000):
        chunks.append(key)
        kind = client.type(key).decode()
        if kind == "string":
            chunks.append(client.get(key) or b"")
        elif kind == "hash":
            for field, value in client.hgetall(key).items():
                chunks += [field, value]
        elif kind == "list":
            chunks += client.lrange(key, 0, -1)
        elif kind == "set":
            chunks += list(client.smembers(key))
        elif kind == "zset":
            chunks += [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            for _, fields in client.xrange(key):
                for field, value in fields.items():
                    chunks += [field, value]
    return b"\n".join(chunks)


def cli_env(env: dict[str, str], **extra: str) -> dict[str, str]:
    """``env`` on top of the real environment (PATH etc.) for subprocesses."""
    merged = dict(os.environ)
    for name in list(merged):
        if name.startswith("REPORT_FORWARDER_") or name in ("REDIS_URL", "CAPMONSTER_CLIENT_KEY"):
            del merged[name]
    merged.update(env)
    merged.update(extra)
    return merged
