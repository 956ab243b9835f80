"""Real parts only, for the integration tests: a redis-server process per session, the
sandbox API on loopback, real Celery workers (in-process here; subprocesses in the crash
tests). The unit tests (tests/unit/) start nothing and cannot see these fixtures."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.contrib.testing.worker import start_worker

from worker.delivery.celery_app import ForwarderApp, create_app, worker_options
from worker.delivery.runtime import Runtime
from worker.producer import Producer
from worker.settings import Settings, load_settings
from worker.store.keys import Keys
from worker.store.messages import list_keys
from worker.testing.processes import RedisProcess, service_env
from worker.testing.sandbox import Sandbox

from ..redis_bytes import as_bytes, stream_entries

CLIENT_KEY = "test-client-key-5f3a9c"


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


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path_factory.mktemp("redis"), appendonly=False).start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisProcess) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox() as sb:
        yield sb


@pytest.fixture
def env(redis_server: RedisProcess, sandbox: Sandbox, tmp_path: Path) -> dict[str, str]:
    """The environment of a service pointed at the test Redis and the sandbox."""
    return {
        "REDIS_URL": redis_server.url,
        "REPORT_FORWARDER_API_URL": sandbox.url,
        "CAPMONSTER_CLIENT_KEY": CLIENT_KEY,
        "REPORT_FORWARDER_HOME": str(tmp_path / "home"),
        "REPORT_FORWARDER_LOG_FORMAT": "json",
        # the limiter has its own tests; elsewhere it must not be what a test waits for
        "REPORT_FORWARDER_RATE_LIMIT": "100000/second",
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
    runtime = Runtime(settings, settings.redis_url, environ, concurrency=concurrency)
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
        kind = as_bytes(client.type(key)).decode()
        if kind == "string":
            chunks.append(as_bytes(client.get(key) or b""))
        elif kind == "hash":
            for field, value in client.hgetall(key).items():
                chunks += [as_bytes(field), as_bytes(value)]
        elif kind == "list":
            chunks += map(as_bytes, client.lrange(key, 0, -1))
        elif kind == "set":
            chunks += map(as_bytes, client.smembers(key))
        elif kind == "zset":
            chunks += map(as_bytes, client.zrange(key, 0, -1))
        elif kind == "stream":
            for _, fields in stream_entries(client, key):
                for field, value in fields.items():
                    chunks += [field, value]
    return b"\n".join(chunks)


def queue_length(client: redis.Redis, queue: str = "reports") -> int:
    """Messages waiting in both of the queue's lists (urgent and normal)."""
    return sum(int(client.llen(key)) for key in list_keys(queue))


def queued_messages(client: redis.Redis, queue: str = "reports") -> list[bytes]:
    """Waiting messages, next to be taken first (urgent list, then normal)."""
    out: list[bytes] = []
    for key in list_keys(queue):
        out += map(as_bytes, reversed(client.lrange(key, 0, -1)))
    return out


def cli_env(env: dict[str, str], **extra: str) -> dict[str, str]:
    """``env`` on top of the real environment (PATH etc.) for subprocesses."""
    return service_env(None, **{**env, **extra})
