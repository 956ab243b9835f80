"""When Redis is not there, or not usable: every command says so in one line naming the
Redis it tried (password masked) and exits 3 within seconds; a URL or database that can
never work is a configuration error (exit 2); producers retry for a bounded, configurable
time first, workers for much longer. Real redis-server processes, real subprocess runs."""

from __future__ import annotations

import contextlib
import queue
import signal
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from worker.errors import ConfigError, StoreFullError, StoreUnreachableError
from worker.producer import Producer
from worker.settings import Settings
from worker.store import connection as store
from worker.testing.processes import RedisProcess, free_port

from .clirun import run_cli
from .conftest import cli_env

SECRET = "s3cret-pw-9d1f"


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on."""
    return free_port()


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert 1 == len(lines), text
    return lines[0]


REDIS_COMMANDS = [
    ["stats"],
    ["stats", "--json"],
    ["dead-letters", "list"],
    ["dead-letters", "list", "--json"],
    ["dead-letters", "show", "1-0"],
    ["dead-letters", "replay", "--all"],
    ["dead-letters", "purge", "--all"],
    ["dead-letters", "export"],
    ["accounts", "list"],
    ["accounts", "resume", "default"],
    ["enqueue", "1", "image"],
    ["enqueue", "--file", "-"],
]


@pytest.mark.parametrize("args", REDIS_COMMANDS, ids=" ".join)
def test_every_redis_command_says_unreachable_in_one_line_and_exits_3(
    env: dict[str, str], closed_port: int, args: list[str]
) -> None:
    """Each command that touches Redis, with nothing listening: one line naming the Redis
    tried with its password masked, exit 3, no traceback."""
    url = f"redis://:{SECRET}@127.0.0.1:{closed_port}/0"
    result = run_cli(
        dict(env, REDIS_URL=url, REPORT_FORWARDER_CONNECT_RETRY_S="0"),
        *args,
        stdin=b'{"taskId": 1, "captchaType": "image"}\n',
        timeout=30,
    )
    assert 3 == result.returncode, result.stderr
    line = one_line(result.stderr)
    assert line.startswith("error: ")
    assert f"redis://****@127.0.0.1:{closed_port}/0" in line
    assert "unreachable" in line
    assert SECRET not in result.stderr + result.stdout


def test_with_the_default_retry_an_unreachable_redis_is_still_one_line_and_exit_3(
    env: dict[str, str], closed_port: int
) -> None:
    """With the default connect_retry_s (5 s) `stats` gives up after its bounded retry."""
    result = run_cli(env | {"REDIS_URL": f"redis://127.0.0.1:{closed_port}/0"}, "stats")
    assert 3 == result.returncode
    assert f"Redis at redis://127.0.0.1:{closed_port}/0 is unreachable" in one_line(result.stderr)


@pytest.mark.parametrize(
    "url",
    ["redis://:99999", "redis://127.0.0.1:notaport/0", "garbage", "redis://h/abc", "unix://"],
)
def test_a_redis_url_that_cannot_name_a_server_is_a_configuration_error(
    env: dict[str, str], url: str
) -> None:
    """A URL with no usable port, scheme, database or path exits 2 naming redis.url."""
    result = run_cli(env | {"REDIS_URL": url}, "stats")
    assert 2 == result.returncode
    line = one_line(result.stderr)
    assert "redis.url" in line
    assert repr(url) in line


def test_a_database_index_the_server_lacks_is_a_configuration_error(
    env: dict[str, str], redis_server: RedisProcess
) -> None:
    """`redis://host:port/999` against a server with 16 databases: exit 2, says which."""
    url = f"redis://127.0.0.1:{redis_server.port}/999"
    for args in (["stats"], ["enqueue", "1", "image"], ["dead-letters", "list"]):
        result = run_cli(env | {"REDIS_URL": url}, *args)
        assert 2 == result.returncode, result.stderr
        line = one_line(result.stderr)
        assert "no such database" in line
        assert "DB index is out of range" in line


@pytest.fixture
def small_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A Redis of its own (these tests change its configuration)."""
    server = RedisProcess(tmp_path / "redis", appendonly=False).start()
    yield server
    server.stop()


def test_redis_out_of_memory_says_so_and_exits_3(
    env: dict[str, str], small_redis: RedisProcess
) -> None:
    """A Redis at maxmemory (noeviction) refuses the enqueue: "out of memory", exit 3; the
    Python API raises StoreFullError."""
    client = redis.Redis(port=small_redis.port)
    client.config_set("maxmemory", 1)
    environ = env | {"REDIS_URL": small_redis.url}
    for args, stdin in ((["enqueue", "1", "image"], b""), (["enqueue", "-f", "-"], b"1,image")):
        result = run_cli(environ, *args, stdin=b"taskId,captchaType\n" + stdin)
        assert 3 == result.returncode, result.stderr
        assert "out of memory" in one_line(result.stderr)
    settings = settings_for(env, small_redis.url)
    with pytest.raises(StoreFullError, match="out of memory"):
        Producer(settings).enqueue(2, "image")
    client.config_set("maxmemory", 0)
    client.close()


def test_tls_against_a_plain_server_fails_within_the_timeout_in_one_line(
    env: dict[str, str], redis_server: RedisProcess
) -> None:
    """`rediss://` to a server that does not speak TLS: one line, exit 3, no hang."""
    url = f"rediss://127.0.0.1:{redis_server.port}/0"
    result = run_cli(env | {"REDIS_URL": url, "REPORT_FORWARDER_CONNECT_RETRY_S": "0"}, "stats")
    assert 3 == result.returncode
    assert f"Redis at {url} is unreachable" in one_line(result.stderr)


def settings_for(env: dict[str, str], url: str, retry_s: float | None = None) -> Settings:
    from worker.settings import load_settings

    environ = env | {"REDIS_URL": url}
    if retry_s is not None:
        environ["REPORT_FORWARDER_CONNECT_RETRY_S"] = str(retry_s)
    return load_settings(environ=environ)


def test_python_producer_raises_store_unreachable_naming_the_redis(
    env: dict[str, str], closed_port: int
) -> None:
    """`Producer.enqueue` / `enqueue_many` with Redis down: StoreUnreachableError naming the
    URL with its password masked, after the configured retry."""
    url = f"redis://:{SECRET}@127.0.0.1:{closed_port}/0"
    producer = Producer(settings_for(env, url, retry_s=0))
    with pytest.raises(StoreUnreachableError) as info:
        producer.enqueue(1, "image")
    assert f"redis://****@127.0.0.1:{closed_port}/0" in str(info.value)
    assert SECRET not in str(info.value)
    with pytest.raises(StoreUnreachableError):
        producer.enqueue_many([(1, "image"), (2, "token")])


@contextlib.contextmanager
def outage_then_redis(port: int, directory: Path) -> Iterator[Callable[[], None]]:
    """Nothing but a socket that hangs up on ``port`` until the returned function is called
    (after the client's first attempt was turned away): then a real Redis on that port."""
    listener = socket.create_server(("127.0.0.1", port))
    server = RedisProcess(directory, appendonly=False, port=port)

    def first_attempt_then_start() -> None:
        conn, _ = listener.accept()  # the client's first attempt...
        conn.close()  # ...is hung up on: a connection error, which it retries
        listener.close()
        server.start()

    try:
        yield first_attempt_then_start
    finally:
        listener.close()
        server.stop()


def call_in_thread(fn: Callable[[], object]) -> queue.Queue[object]:
    results: queue.Queue[object] = queue.Queue()

    def run() -> None:
        try:
            results.put(fn())
        except Exception as exc:  # reported to the test
            results.put(exc)

    threading.Thread(target=run, daemon=True).start()
    return results


def test_producer_retry_rides_out_a_short_outage(env: dict[str, str], tmp_path: Path) -> None:
    """A producer whose first attempt fails keeps retrying within connect_retry_s and
    queues the report once Redis is up."""
    port = free_port()
    with outage_then_redis(port, tmp_path / "r") as recover:
        producer = Producer(settings_for(env, f"redis://127.0.0.1:{port}/0", retry_s=30))
        results = call_in_thread(lambda: producer.enqueue(1, "image"))
        recover()
        assert "queued" == results.get(timeout=60)
        producer.client.close()


def test_a_workers_client_keeps_its_long_patience(tmp_path: Path, closed_port: int) -> None:
    """store.connect without retry_s (the worker's client) rides out an outage; with
    retry_s=0 (what `stats --watch` redraws with) the first failure is final."""
    impatient = store.connect(f"redis://127.0.0.1:{closed_port}/0", retry_s=0)
    with pytest.raises(redis.ConnectionError):
        impatient.ping()
    impatient.close()
    port = free_port()
    with outage_then_redis(port, tmp_path / "r") as recover:
        patient = store.connect(f"redis://127.0.0.1:{port}/0")
        results = call_in_thread(patient.ping)
        recover()
        assert True is results.get(timeout=60)
        patient.close()


def test_config_error_from_translate_for_refused_credentials(redis_server: RedisProcess) -> None:
    """Refused credentials are a configuration error, not "unreachable"."""
    error = store.translate(redis.AuthenticationError("invalid password"), redis_server.url)
    assert isinstance(error, ConfigError)
    assert "refused the credentials" in str(error)


def test_stats_watch_shows_unreachable_and_redraws_until_redis_is_back(
    env: dict[str, str], tmp_path: Path
) -> None:
    """`stats --watch` with Redis down shows "Redis unreachable (…)" and keeps redrawing;
    once a Redis answers on that address it shows the numbers again."""
    port = free_port()
    environ = cli_env(env | {"REDIS_URL": f"redis://127.0.0.1:{port}/0", "PYTHONUNBUFFERED": "1"})
    # Ctrl-C as at a terminal: a suite started in the background by a shell inherits
    # SIGINT ignored, and so would the command (Python then installs no handler of its own);
    # a handled signal is reset to its default in the child
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "stats", "--watch"],
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    lines: queue.Queue[str] = queue.Queue()

    def read_lines() -> None:
        for line in proc.stdout or ():
            lines.put(line)

    threading.Thread(target=read_lines, daemon=True).start()

    def wait_for(text: str) -> str:
        while True:
            line = lines.get(timeout=60)
            if text in line:
                return line

    server = RedisProcess(tmp_path / "r", appendonly=False, port=port)
    try:
        down = wait_for("Redis unreachable (")
        assert f"redis://127.0.0.1:{port}/0" in down
        wait_for("Redis unreachable (")  # a second frame: it keeps redrawing
        server.start()
        wait_for("queue reports:")
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        finally:
            server.stop()
    assert "Traceback" not in err


class _NotRedis(socketserver.BaseRequestHandler):
    """Answers every connection the way a web server answers garbage, then hangs up."""

    def handle(self) -> None:
        self.request.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")


def test_an_address_that_is_not_redis_says_so_in_one_line(env: dict[str, str]) -> None:
    """REDIS_URL pointing at a web server: one line saying something answered but not as
    Redis (check the host and port), exit 3."""
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), _NotRedis) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
        result = run_cli(env | {"REDIS_URL": f"redis://127.0.0.1:{port}/0"}, "accounts", "list")
        server.shutdown()
    assert 3 == result.returncode
    assert "but not as a Redis server" in one_line(result.stderr)
