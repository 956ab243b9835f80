"""An enqueue whose command reached Redis but whose answer was lost (Redis frozen or busy
past the read timeout, a connection reset after the command was written) may have been
executed: it is an unknown outcome (StoreOutcomeUnknownError, CLI exit 4, the intake's
503 ERROR_OUTCOME_UNKNOWN), never StoreError's "nothing was accepted". A failure before
anything of the command left (connection refused, a handshake that timed out) stays
StoreUnreachableError, and so does any read-only command. Real redis-server processes,
real sockets, a real TCP proxy that loses answers, the intake on uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import re
import select
import signal
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.asyncio.retry
import requests
from redis.backoff import NoBackoff
from redis.driver_info import DriverInfo
from redis.retry import Retry

from worker.errors import (
    ForwarderError,
    StoreError,
    StoreOutcomeUnknownError,
    StoreUnreachableError,
    StoreUnreplicatedError,
)
from worker.intake import Intake
from worker.producer import Producer
from worker.settings import Settings, load_settings
from worker.store import connection as store
from worker.store import outcome
from worker.store.keys import Keys
from worker.testing.processes import RedisProcess, free_port

from .clirun import run_cli
from .conftest import CLIENT_KEY, wait_until
from .intake_support import Server

pytestmark = pytest.mark.timeout(120)

EVALSHA = b"\r\nEVALSHA\r\n"  # how redis-py spells a script call on the wire


def settings_for(env: dict[str, str], url: str, retry_s: float = 0) -> Settings:
    return load_settings(
        environ=env | {"REDIS_URL": url, "REPORT_FORWARDER_CONNECT_RETRY_S": str(retry_s)}
    )


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A Redis of its own, which a test may freeze (SIGSTOP) and resume (SIGCONT)."""
    server = RedisProcess(tmp_path / "redis", appendonly=False).start()
    yield server
    assert server.process is not None
    server.process.send_signal(signal.SIGCONT)  # never stop a frozen server
    server.stop()


@contextlib.contextmanager
def frozen(server: RedisProcess) -> Iterator[None]:
    """``server`` stopped (SIGSTOP: its sockets stay open, it answers nothing) inside."""
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.process.send_signal(signal.SIGCONT)


def is_pending(port: int, settings: Settings, task_id: int, account: str = "default") -> bool:
    """Whether Redis on ``port`` has a ledger entry for the report (it was queued)."""
    client = redis.Redis(port=port)
    try:
        return bool(client.exists(Keys(settings.key_prefix).report(account, task_id)))
    finally:
        client.close()


class AnswerLoser:
    """A TCP proxy in front of a real Redis that passes everything through, except that
    from the ``lose_from``-th command named ``marker`` on it hands the command to Redis,
    waits until Redis answers (the command has run) and then resets the client's
    connection instead of passing the answer on."""

    def __init__(self, port: int, marker: bytes = EVALSHA, lose_from: int = 1) -> None:
        self.target = port
        self.marker = marker
        self.lose_from = lose_from
        self.seen = 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._pump, args=(client,), daemon=True).start()

    def _count(self, data: bytes) -> bool:
        with self.lock:
            self.seen += data.count(self.marker)
            return self.seen >= self.lose_from

    def _pump(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target))
        losing, tail = False, b""
        try:
            while True:
                readable, _, _ = select.select([client, upstream], [], [], 60)
                if not readable:
                    return
                if client in readable:
                    data = client.recv(1 << 16)
                    if not data:
                        return
                    window = tail + data
                    losing = self._count(window) or losing if self.marker in window else losing
                    tail = window[-len(self.marker) :]
                    upstream.sendall(data)
                if upstream in readable:
                    data = upstream.recv(1 << 16)
                    if not data:
                        return
                    if losing:  # Redis ran the command: the client never hears so
                        client.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                        return
                    client.sendall(data)
        finally:
            client.close()
            upstream.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def loser(redis_server: RedisProcess, redis_client: redis.Redis) -> Iterator[Callable[..., Any]]:
    """Make an AnswerLoser in front of the session's (flushed) Redis, with the enqueue
    script already loaded there (so the first script call runs, not NOSCRIPT)."""
    del redis_client  # flushed for this test
    made: list[AnswerLoser] = []

    def make(marker: bytes = EVALSHA, lose_from: int = 1) -> AnswerLoser:
        made.append(AnswerLoser(redis_server.port, marker, lose_from))
        return made[-1]

    yield make
    for one in made:
        one.close()


def test_a_frozen_redis_runs_the_enqueue_it_held_so_the_producer_says_outcome_unknown(
    env: dict[str, str], own_redis: RedisProcess
) -> None:
    """A Redis frozen (SIGSTOP) after the producer connected holds the enqueue unanswered
    past the read timeout: the producer raises StoreOutcomeUnknownError, not a StoreError
    ("nothing was accepted"), because once resumed Redis runs it — the report is queued,
    and a retry through report-forwarder answers `duplicate`."""
    producer = Producer(settings_for(env, own_redis.url, retry_s=0))
    assert "queued" == producer.enqueue(1, "image")  # connected, script loaded
    with frozen(own_redis), pytest.raises(ForwarderError) as caught:
        producer.enqueue(2, "image")
    assert isinstance(caught.value, StoreOutcomeUnknownError), repr(caught.value)
    assert not isinstance(caught.value, StoreError)
    assert 1 == len(str(caught.value).splitlines())
    assert "retrying through report-forwarder is safe" in str(caught.value)
    wait_until(lambda: is_pending(own_redis.port, producer.settings, 2), timeout=10)
    assert "duplicate" == producer.enqueue(2, "image")
    producer.client.close()


def test_the_intake_answers_outcome_unknown_when_a_frozen_redis_held_the_enqueue(
    env: dict[str, str], own_redis: RedisProcess
) -> None:
    """The intake's enqueue cut short by its round-trip deadline while a frozen Redis held
    it is answered 503 ERROR_OUTCOME_UNKNOWN with Retry-After, not "unavailable": once
    resumed Redis runs it, and a retry through report-forwarder is a `duplicate`."""
    settings = settings_for(env, own_redis.url)
    with Server(Intake(settings, own_redis.url, environ=env)) as server:
        url = f"{server.url}/reportIncorrectImageCaptcha"
        first = requests.post(url, json={"clientKey": CLIENT_KEY, "taskId": 901}, timeout=30)
        assert 200 == first.status_code, first.text  # connected, script loaded
        with frozen(own_redis):
            answer = requests.post(url, json={"clientKey": CLIENT_KEY, "taskId": 902}, timeout=30)
    assert (503, "1") == (answer.status_code, answer.headers.get("retry-after")), answer.text
    assert "ERROR_OUTCOME_UNKNOWN" == answer.json()["errorCode"]
    assert "answer was lost" in answer.json()["errorDescription"]
    wait_until(lambda: is_pending(own_redis.port, settings, 902), timeout=10)
    producer = Producer(settings)
    assert "duplicate" == producer.enqueue(902, "image")
    producer.client.close()


def test_a_reset_after_the_enqueue_was_written_is_exit_4_and_the_report_is_queued(
    env: dict[str, str], redis_server: RedisProcess, loser: Callable[..., AnswerLoser]
) -> None:
    """`enqueue` whose connection is reset after Redis ran it exits 4 with one line saying a
    retry here is safe; the report is queued, so the retry answers `duplicate`. A read-only
    `stats` whose answer is lost the same way still says "unreachable" and exits 3."""
    proxy = loser()
    environ = env | {"REPORT_FORWARDER_CONNECT_RETRY_S": "0"}
    assert 0 == run_cli(environ, "enqueue", "1", "image").returncode  # the script is loaded
    lost = run_cli(environ | {"REDIS_URL": proxy.url}, "enqueue", "11", "image")
    assert 4 == lost.returncode, lost.stdout + lost.stderr
    assert 1 == len(lost.stderr.strip().splitlines()), lost.stderr
    assert "answer was lost" in lost.stderr
    assert "retrying through report-forwarder is safe" in lost.stderr
    again = run_cli(environ, "enqueue", "11", "image")
    assert (0, "duplicate") == (again.returncode, again.stdout.split(":")[0]), again.stderr
    stats = run_cli(environ | {"REDIS_URL": loser(b"\r\nLLEN\r\n").url}, "stats")
    assert 3 == stats.returncode, stats.stdout + stats.stderr
    assert "is unreachable" in stats.stderr


def test_mid_bulk_the_chunk_whose_answer_was_lost_is_unknown_and_later_ones_not_sent(
    env: dict[str, str], redis_server: RedisProcess, loser: Callable[..., AnswerLoser]
) -> None:
    """The intake's bulk route, the answer of its second chunk lost (every retry too): 503
    ERROR_OUTCOME_UNKNOWN counting the first chunk's reports as queued, the second's as
    `unconfirmed`, the third's as `not_queued`; a lost single report is 503 likewise, and
    the Python API raises StoreOutcomeUnknownError. Retried against Redis, all that may
    have been queued was: only the untried reports are queued then."""
    settings = settings_for(env, redis_server.url)
    direct = Producer(settings)
    assert "queued" == direct.enqueue(1, "image")  # the script is loaded
    proxy = loser(lose_from=2)
    lossy = settings_for(env, proxy.url)
    items = [{"taskId": 1000 + i, "captchaType": "image"} for i in range(2500)]
    with Server(Intake(lossy, proxy.url, environ=env)) as server:
        bulk = requests.post(f"{server.url}/v1/reports", json=items, timeout=60)
        single = requests.post(
            f"{server.url}/reportIncorrectImageCaptcha",
            json={"clientKey": CLIENT_KEY, "taskId": 5000},
            timeout=60,
        )
    assert 503 == bulk.status_code, bulk.text[:300]
    doc = bulk.json()
    assert ("ERROR_OUTCOME_UNKNOWN", 1000, 0) == (
        doc["errorCode"],
        doc["queued"],
        doc["duplicates"],
    )
    assert list(range(1000, 2000)) == doc["unconfirmed"]
    assert list(range(2000, 2500)) == doc["not_queued"]
    assert (503, "ERROR_OUTCOME_UNKNOWN") == (single.status_code, single.json()["errorCode"])
    with pytest.raises(StoreOutcomeUnknownError):
        Producer(lossy).enqueue_many([(6000 + i, "image") for i in range(3)])
    result = direct.enqueue_many([*((i["taskId"], "image") for i in items), (5000, "image")])
    assert (500, 2001) == (result.queued, result.duplicates)
    assert [1, 1, 1] == [is_pending(redis_server.port, settings, 6000 + i) for i in range(3)]
    direct.client.close()


class FakeRedis:
    """A loopback listener that answers each connection as ``behave`` says, on the first
    data the client sends: "silent" (never answers), "close" (hangs up), "reset" (RST),
    "error" (an error reply)."""

    def __init__(self, behave: str) -> None:
        self.behave = behave
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.held.append(conn)
            if not conn.recv(1 << 16) or self.behave == "silent":
                continue
            if self.behave == "error":
                conn.sendall(b"-ERR no such thing\r\n")
                continue
            if self.behave == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def close(self) -> None:
        self.listener.close()
        for conn in self.held:
            conn.close()


def failure(port: int, *, handshake: bool, asynchronous: bool = False) -> BaseException:
    """The error of one PING (no retries) to ``port``, with or without redis-py's
    connection handshake (HELLO, CLIENT SETINFO), read timeout 0.5 s."""
    options: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "socket_timeout": 0.5,
        "socket_connect_timeout": 0.5,
    }
    if not handshake:
        options |= {"protocol": 2, "driver_info": DriverInfo(name=None, lib_version=None)}
    try:
        if asynchronous:

            async def ping() -> None:
                client = redis.asyncio.Redis(
                    retry=redis.asyncio.retry.Retry(NoBackoff(), 0), **options
                )
                try:
                    await client.ping()
                finally:
                    await client.aclose()

            asyncio.run(ping())
        else:
            client = redis.Redis(retry=Retry(NoBackoff(), 0), **options)
            try:
                client.ping()
            finally:
                client.close()
    except Exception as exc:
        return exc
    raise AssertionError("the PING succeeded")


# (how the server behaves, handshake or not) -> (the locked redis-py's message, may the
# command have reached Redis). A redis-py upgrade that changes a message fails here loudly.
CASES = {
    ("closed port", True): (
        # asyncio: "... Connect call failed ('127.0.0.1', PORT)."
        r"Error 111 connecting to 127\.0\.0\.1:\d+\. "
        r"(Connection refused|Connect call failed \('127\.0\.0\.1', \d+\))\.",
        False,
    ),
    ("silent", True): (r"Timeout reading from 127\.0\.0\.1:\d+", False),  # the handshake's
    ("close", True): (r"Connection closed by server\.", False),  # the handshake's
    ("silent", False): (r"Timeout reading from 127\.0\.0\.1:\d+", True),
    ("close", False): (r"Connection closed by server\.", True),
    ("reset", False): (
        r"Error while reading from 127\.0\.0\.1:\d+ ?: \(104, 'Connection reset by peer'\)",
        True,
    ),
    ("error", False): (r"no such thing", False),  # an answer: nothing unknown about it
}


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "asyncio"])
@pytest.mark.parametrize(("behave", "handshake"), list(CASES))
def test_each_failure_of_the_locked_redis_py_is_classified_by_the_phase_it_failed_in(
    behave: str, handshake: bool, asynchronous: bool
) -> None:
    """Each failure redis-py raises, sync and asyncio, has the message listed and counts as
    "may have reached Redis" exactly when it came after the command was written — a
    handshake that timed out or was hung up on sent nothing of it."""
    message, expected = CASES[behave, handshake]
    if behave == "closed port":
        exc = failure(free_port(), handshake=handshake, asynchronous=asynchronous)
    else:
        server = FakeRedis(behave)
        try:
            exc = failure(server.port, handshake=handshake, asynchronous=asynchronous)
        finally:
            server.close()
    assert re.fullmatch(message, str(exc)), repr(exc)
    assert expected is outcome.reached(exc), repr(exc)


def test_a_deadline_that_cuts_a_call_counts_as_reached_only_once_the_command_was_written() -> None:
    """asyncio.timeout cutting a call while redis-py read the command's answer: may have
    reached Redis; cutting it in the handshake, or in a sleep of our own: not."""

    async def cut(port: int, handshake: bool) -> BaseException:
        options: dict[str, Any] = {"host": "127.0.0.1", "port": port}
        if not handshake:
            options |= {"protocol": 2, "driver_info": DriverInfo(name=None, lib_version=None)}
        client = redis.asyncio.Redis(retry=redis.asyncio.retry.Retry(NoBackoff(), 0), **options)
        try:
            async with asyncio.timeout(0.3):
                await client.ping()
        except TimeoutError as exc:
            return exc
        finally:
            await client.aclose()
        raise AssertionError("the PING succeeded")

    async def asleep() -> BaseException:
        try:
            async with asyncio.timeout(0.01):
                await asyncio.sleep(10)
        except TimeoutError as exc:
            return exc
        raise AssertionError("the sleep finished")

    server = FakeRedis("silent")
    try:
        assert outcome.reached(asyncio.run(cut(server.port, handshake=False)))
        assert not outcome.reached(asyncio.run(cut(server.port, handshake=True)))
    finally:
        server.close()
    assert not outcome.reached(asyncio.run(asleep()))


def test_a_read_only_call_whose_answer_is_lost_stays_store_unreachable(
    env: dict[str, str], redis_server: RedisProcess, loser: Callable[..., AnswerLoser]
) -> None:
    """`translate` without a watched write says "unreachable" (a StoreError) for a lost
    answer: an unknown outcome means nothing for a read."""
    client = redis.Redis.from_url(loser(b"\r\nPING\r\n").url, retry=Retry(NoBackoff(), 0))
    try:
        with pytest.raises(redis.ConnectionError) as caught:
            client.ping()
    finally:
        client.close()
    assert outcome.reached(caught.value)
    assert isinstance(store.translate(caught.value, redis_server.url), StoreUnreachableError)


def waiting_in_wait(port: int) -> bool:
    """Whether a client of Redis on ``port`` is blocked in WAIT (its enqueue ran)."""
    client = redis.Redis(port=port)
    try:
        return any(
            c.get("cmd") == "wait" and "b" in str(c.get("flags")) for c in client.client_list()
        )
    finally:
        client.close()


def test_a_rerun_refused_after_an_answered_enqueue_is_still_an_unknown_outcome(
    env: dict[str, str], own_redis: RedisProcess
) -> None:
    """With min_replicas_ack unmet, the enqueue's first run was answered (the primary has
    the report) and its re-run is then refused (Redis full: "nothing was written" of that
    run): the producer says StoreUnreplicatedError, an unknown outcome, not the re-run's
    StoreFullError — the report is queued and a retry here is a `duplicate`."""
    settings = load_settings(
        environ=env
        | {
            "REDIS_URL": own_redis.url,
            "REPORT_FORWARDER_CONNECT_RETRY_S": "3",
            "REPORT_FORWARDER_MIN_REPLICAS_ACK": "1",
        }
    )
    producer = Producer(settings)
    with pytest.raises(StoreUnreplicatedError):  # no replica; the script is loaded now
        producer.enqueue(6, "image")
    caught: list[BaseException] = []

    def enqueue() -> None:
        try:
            producer.enqueue(7, "image")
        except BaseException as exc:  # looked at below
            caught.append(exc)

    thread = threading.Thread(target=enqueue)
    thread.start()
    wait_until(lambda: waiting_in_wait(own_redis.port), timeout=20)  # the first run is in
    admin = redis.Redis(port=own_redis.port)
    admin.config_set("maxmemory", 1)  # every later write refused (noeviction)
    thread.join(timeout=30)
    admin.config_set("maxmemory", 0)
    admin.close()
    assert not thread.is_alive()
    assert 1 == len(caught)
    assert isinstance(caught[0], StoreOutcomeUnknownError), repr(caught[0])
    assert not isinstance(caught[0], StoreError)
    assert is_pending(own_redis.port, settings, 7)
    producer.client.close()


def test_the_intake_says_outcome_unknown_when_a_rerun_is_refused_after_an_answered_enqueue(
    env: dict[str, str], own_redis: RedisProcess
) -> None:
    """The intake's enqueue under min_replicas_ack: its first run answered, its re-run
    refused (Redis full), the answer is 503 ERROR_OUTCOME_UNKNOWN, not "unavailable" — the
    report is queued."""
    environ = env | {
        "REDIS_URL": own_redis.url,
        "REPORT_FORWARDER_CONNECT_RETRY_S": "3",
        "REPORT_FORWARDER_MIN_REPLICAS_ACK": "1",
    }
    settings = load_settings(environ=environ)
    answers: list[requests.Response] = []
    with Server(Intake(settings, own_redis.url, environ=environ)) as server:
        url = f"{server.url}/reportIncorrectImageCaptcha"

        def post(task_id: int) -> requests.Response:
            return requests.post(url, json={"clientKey": CLIENT_KEY, "taskId": task_id}, timeout=30)

        assert 503 == post(6).status_code  # no replica; the script is loaded now
        thread = threading.Thread(target=lambda: answers.append(post(7)))
        thread.start()
        wait_until(lambda: waiting_in_wait(own_redis.port), timeout=20)
        admin = redis.Redis(port=own_redis.port)
        admin.config_set("maxmemory", 1)
        thread.join(timeout=30)
        admin.config_set("maxmemory", 0)
        admin.close()
    assert 1 == len(answers)
    assert 503 == answers[0].status_code
    assert "ERROR_OUTCOME_UNKNOWN" == answers[0].json()["errorCode"], answers[0].text
    assert is_pending(own_redis.port, settings, 7)
