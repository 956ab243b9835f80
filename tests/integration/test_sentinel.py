"""Redis Sentinel (docs/design.md §8): every component finds the primary through the
Sentinels and follows a failover without a restart; with ``redis.min_replicas_ack`` a
report is "queued" only once a replica has it. Real processes throughout: a primary,
replicas and three Sentinels (``redis-server --sentinel``), worker subprocesses, the
sandbox API."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from worker.errors import StoreError, StoreOutcomeUnknownError, StoreUnreplicatedError
from worker.intake import Intake
from worker.producer import Producer
from worker.settings import load_settings
from worker.store.keys import Keys
from worker.store.ledger import Ledger
from worker.testing.processes import SentinelCluster, WorkerProcesses
from worker.testing.sandbox import Sandbox

from ..failover import fail_over
from ..redis_bytes import stream_entries
from .clirun import run_cli
from .conftest import CLIENT_KEY, FAST_RECOVERY, cli_env, wait_until
from .intake_support import Server

pytestmark = pytest.mark.timeout(180)


def _cluster(tmp_path: Path, replicas: int) -> Iterator[SentinelCluster]:
    cluster = SentinelCluster(tmp_path / "sentinel", replicas=replicas)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    """A primary, one replica and three Sentinels."""
    yield from _cluster(tmp_path, replicas=1)


@pytest.fixture
def cluster2(tmp_path: Path) -> Iterator[SentinelCluster]:
    """A primary, two replicas and three Sentinels: after a failover one replica is left,
    so writes that wait for one replica go on."""
    yield from _cluster(tmp_path, replicas=2)


def _env(env: dict[str, str], cluster: SentinelCluster, tmp_path: Path, **extra: str) -> dict:
    config = tmp_path / "sentinel.toml"
    config.write_text(FAST_RECOVERY)
    return {**env, "REDIS_URL": cluster.url, "REPORT_FORWARDER_CONFIG": str(config), **extra}


def test_check_config_names_the_sentinels_and_the_current_primary(
    env: dict[str, str], cluster: SentinelCluster, tmp_path: Path
) -> None:
    """`check-config --json` lists the Sentinels and the primary they name now, and shows
    no password (neither the data password nor the Sentinels')."""
    url = cluster.url.replace("sentinel://127", "sentinel://:data-secret-1@127", 1)
    url += "&sentinel_password=sentinel-secret-2"
    run = run_cli({**env, "REDIS_URL": url}, "check-config", "--json")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    ports = [port for _, port in (s.split(":") for s in doc["sentinel"]["sentinels"].split(", "))]
    assert ports == [str(p) for p in cluster.sentinel_ports]
    assert doc["sentinel"]["master_name"] == SentinelCluster.MASTER
    # the Sentinels here have no password, so asking them works: the primary is named
    assert doc["sentinel"]["primary"] == f"127.0.0.1:{cluster.primary().port}"
    assert "data-secret-1" not in run.stdout + run.stderr
    assert "sentinel-secret-2" not in run.stdout + run.stderr


def test_with_min_replicas_ack_an_enqueue_without_a_replica_is_an_unknown_outcome_then_succeeds(
    env: dict[str, str], cluster: SentinelCluster, tmp_path: Path
) -> None:
    """Replica stopped: the Python API raises StoreUnreplicatedError (an outcome-unknown
    error, not a StoreError) after its bounded wait, the CLI exits 4 naming
    min_replicas_ack, the intake answers 503 ERROR_OUTCOME_UNKNOWN with Retry-After saying
    a retry here is safe (bulk: which items) — never "queued", never "not accepted".
    Replica back: the same calls succeed, and the unconfirmed reports are duplicates."""
    environ = _env(
        env,
        cluster,
        tmp_path,
        REPORT_FORWARDER_MIN_REPLICAS_ACK="1",
        REPORT_FORWARDER_CONNECT_RETRY_S="1",
    )
    settings = load_settings(environ=environ)
    producer = Producer(settings)
    assert producer.enqueue(501, "image") == "queued"  # with the replica up

    replica = cluster.nodes[1]
    replica.stop()
    with pytest.raises(StoreUnreplicatedError, match=r"min_replicas_ack = 1") as caught:
        producer.enqueue(502, "image")
    assert isinstance(caught.value, StoreOutcomeUnknownError)
    assert not isinstance(caught.value, StoreError)
    assert "0 of 1 replica" in str(caught.value)
    assert "retrying through report-forwarder is safe" in str(caught.value).lower()
    cli = run_cli(environ, "enqueue", "503", "image")
    assert cli.returncode == 4, cli.stdout + cli.stderr
    assert "min_replicas_ack" in cli.stderr
    assert "may still be delivered" in cli.stderr
    assert 1 == len(cli.stderr.strip().splitlines())
    with Server(Intake(settings, settings.redis_url, environ=environ)) as server:
        answer = requests.post(
            f"{server.url}/reportIncorrectImageCaptcha",
            json={"clientKey": CLIENT_KEY, "taskId": 504},
            timeout=30,
        )
        assert answer.status_code == 503, answer.text
        assert answer.headers["retry-after"] == "1"
        assert (1, "ERROR_OUTCOME_UNKNOWN") == (
            answer.json()["errorId"],
            answer.json()["errorCode"],
        )
        assert "retrying here is safe" in answer.json()["errorDescription"].lower()
        # 1,001 valid reports (item 1 is refused): a first chunk of 1,000, then one more
        items = [
            {"taskId": -1 if i == 1 else 2000 + i, "captchaType": "image"} for i in range(1002)
        ]
        bulk = requests.post(f"{server.url}/v1/reports", json=items, timeout=30)
        assert bulk.status_code == 503, bulk.text[:300]
        assert bulk.headers["retry-after"] == "1"
        doc = bulk.json()
        assert "ERROR_OUTCOME_UNKNOWN" == doc["errorCode"]
        assert [0, *range(2, 1001)] == doc["unconfirmed"]  # may be queued
        assert ([1001], 0) == (doc["not_queued"], doc["queued"])  # not tried
        assert [1] == [item["index"] for item in doc["refused"]]

        replica.start()
        wait_until(lambda: cluster.in_sync(replica), timeout=60)
        answer = requests.post(
            f"{server.url}/reportIncorrectImageCaptcha",
            json={"clientKey": CLIENT_KEY, "taskId": 505},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["errorId"] == 0
        again = requests.post(f"{server.url}/v1/reports", json=items, timeout=30)
        assert again.status_code == 200, again.text[:300]
        assert (1, 1000) == (again.json()["queued"], again.json()["duplicates"])
    assert producer.enqueue(506, "image") == "queued"
    # the unconfirmed calls' writes were on the primary all along: a retry finds them queued
    assert producer.enqueue(502, "image") == "duplicate"
    assert producer.enqueue_many([(503, "image"), (504, "image")]).duplicates == 2
    assert run_cli(environ, "enqueue", "507", "image").returncode == 0
    producer.client.close()


def test_an_unconfirmed_enqueue_is_delivered_once_and_a_retry_here_is_a_duplicate(
    env: dict[str, str], cluster: SentinelCluster, sandbox: Sandbox, tmp_path: Path
) -> None:
    """With min_replicas_ack = 1 and the replica stopped, an enqueue fails with an
    outcome-unknown error that is not a StoreError ("nothing was accepted"): the report
    is delivered all the same, once, and retried through report-forwarder once the
    replica is back it is a `duplicate`, never sent a second time."""
    environ = _env(
        env,
        cluster,
        tmp_path,
        REPORT_FORWARDER_MIN_REPLICAS_ACK="1",
        REPORT_FORWARDER_CONNECT_RETRY_S="1",
    )
    settings = load_settings(environ=environ)
    producer = Producer(settings)
    replica = cluster.nodes[1]
    replica.stop()
    with pytest.raises(StoreOutcomeUnknownError) as caught:
        producer.enqueue(601, "image")
    assert not isinstance(caught.value, StoreError)  # StoreError: "nothing was accepted"
    workers = WorkerProcesses(cli_env(environ), tmp_path / "logs", concurrency=2)
    workers.spawn()
    try:
        wait_until(lambda: sandbox.count(task_id=601, success=True) == 1, timeout=60)
        replica.start()
        wait_until(lambda: cluster.in_sync(replica), timeout=60)
        assert producer.enqueue(601, "image") == "duplicate"
        assert producer.enqueue(602, "image") == "queued"  # queued after the retry
        wait_until(lambda: sandbox.count(task_id=602, success=True) == 1, timeout=60)
        npending = Keys(settings.key_prefix).npending
        wait_until(lambda: int(producer.client.get(npending) or 0) == 0, timeout=60)
    finally:
        workers.stop_all()
    assert 1 == sandbox.count(task_id=601)  # nothing left that could send it again
    producer.client.close()


def test_producers_workers_and_commands_ride_through_a_failover_without_a_restart(
    env: dict[str, str], cluster2: SentinelCluster, sandbox: Sandbox, tmp_path: Path
) -> None:
    """The primary is SIGKILLed while a producer keeps enqueueing and a worker keeps
    sending: a Sentinel promotes a replica, and every report the producer was told is
    queued reaches the API and is accepted — a report twice only if it was in flight at
    the kill — with nothing dead-lettered, the same worker process throughout, an
    account pause set before the failover still in force after it, and `stats` answering
    from the new primary."""
    environ = _env(
        env,
        cluster2,
        tmp_path,
        REPORT_FORWARDER_MIN_REPLICAS_ACK="1",
        REPORT_FORWARDER_CONNECT_RETRY_S="30",
    )
    # a second account, paused for 10 minutes before the failover
    Path(environ["REPORT_FORWARDER_CONFIG"]).write_text(
        FAST_RECOVERY + '\n[accounts.held]\nprovider = "capmonster"\n'
        'key_env = "CAPMONSTER_CLIENT_KEY"\nrate_limit = "100/second"\n'
    )
    settings = load_settings(environ=environ)
    producer = Producer(settings)
    keys = Keys(settings.key_prefix)
    ledger = Ledger(producer.client, keys, settings.queue)
    assert ledger.pause("held", 600, json.dumps({"reason": "test", "error_code": "X"}))

    workers = WorkerProcesses(cli_env(environ), tmp_path / "logs", concurrency=4)
    worker = workers.spawn()
    acknowledged: list[int] = []
    stop = threading.Event()

    def feed() -> None:
        """A producer: what it was told is queued counts; a call that fails after its own
        retries (a failover slower than connect_retry_s, on a loaded machine) is retried."""
        task_id = 1_000
        while not stop.is_set():
            batch = list(range(task_id, task_id + 20))
            try:
                result = producer.enqueue_many([(t, "image") for t in batch])
            except (StoreError, StoreOutcomeUnknownError):  # the same batch again: safe
                continue
            assert result.queued + result.duplicates == len(batch)
            assert not result.refused
            acknowledged.extend(batch)
            task_id += 20
            time.sleep(0.05)  # a producer spread over the run, so the failover meets it

    feeding = threading.Thread(target=feed, daemon=True)
    feeding.start()
    try:
        wait_until(lambda: sandbox.count(success=True) >= 100, timeout=60)
        failover = fail_over(cluster2, keys, settings.lease_s)
        sent_at_failover = sandbox.count(success=True)
        # the producer and the worker go on through the new primary
        wait_until(lambda: sandbox.count(success=True) >= sent_at_failover + 100, timeout=60)
        held = producer.enqueue(77, "image", account="held")
        wait_until(lambda: producer.client.xlen(keys.dead) > 0, timeout=60)
        stop.set()
        feeding.join(60)
        assert not feeding.is_alive()
        done = set(acknowledged)
        wait_until(lambda: done <= {r.task_id for r in sandbox.requests() if r.success}, 90)
        assert worker.poll() is None  # never restarted, never died
        stats = run_cli(environ, "stats", "--json")
        assert stats.returncode == 0, stats.stderr
    finally:
        stop.set()
        workers.stop_all()
    calls: dict[int, int] = {}
    for request in sandbox.requests():
        if request.task_id is not None:
            calls[request.task_id] = calls.get(request.task_id, 0) + 1
    assert held == "queued"
    assert 77 not in calls  # the pause lives on in the new primary
    paused = json.loads(stats.stdout)["paused_accounts"]
    assert [p["account"] for p in paused] == ["held"]
    twice = {task_id for task_id, n in calls.items() if n > 1}
    in_flight = {int(ref.rpartition(":")[2]) for ref in failover.in_flight}
    assert twice <= in_flight  # sent twice: only what was in flight at the kill
    assert all(calls[task_id] == 2 for task_id in twice)
    assert len(acknowledged) > 200
    # nothing dead-lettered for the switch; the paused account's report, for its pause
    dead = [
        (int(fields[b"task_id"]), fields[b"reason"].decode())
        for _, fields in stream_entries(producer.client, keys.dead)
    ]
    assert dead == [(77, "account_paused")]
    producer.client.close()


def test_a_dead_replica_slows_no_worker_for_long(
    env: dict[str, str], cluster: SentinelCluster, sandbox: Sandbox, tmp_path: Path
) -> None:
    """With min_replicas_ack = 1 and the only replica gone, a worker still delivers what
    was queued before: an outcome the replicas do not confirm stands on the primary, and
    the worker says so once (`store.unreplicated`) instead of stalling every report."""
    environ = _env(env, cluster, tmp_path, REPORT_FORWARDER_MIN_REPLICAS_ACK="1")
    producer = Producer(load_settings(environ=environ))
    assert producer.enqueue_many([(t, "image") for t in range(1, 41)]).queued == 40
    cluster.nodes[1].stop()
    workers = WorkerProcesses(cli_env(environ), tmp_path / "logs", concurrency=4)
    workers.spawn()
    try:
        wait_until(lambda: sandbox.count(success=True) >= 40, timeout=60)
    finally:
        workers.stop_all()
    log = workers.log_paths()[0].read_text()
    lines = [json.loads(x) for x in log.splitlines() if '"store.unreplicated"' in x]
    assert lines, "no store.unreplicated line"
    assert lines[0]["wanted"] == 1
    assert lines[0]["replicas"] == 0
    assert len(lines) < 40  # one per back-off period, not one per report
    assert int(producer.client.get(Keys().npending) or 0) == 0
    producer.client.close()


def test_the_intake_rides_through_a_failover_instead_of_answering_503(
    env: dict[str, str], cluster2: SentinelCluster, tmp_path: Path
) -> None:
    """A report POSTed to the intake right after the primary is SIGKILLed is answered
    success once a Sentinel has promoted a replica: the intake makes its round trip again
    while the failure is a lost connection (for connect_retry_s, at most 9 s), and with
    min_replicas_ack = 1 the report is on a replica when it says so."""
    environ = _env(
        env,
        cluster2,
        tmp_path,
        REPORT_FORWARDER_MIN_REPLICAS_ACK="1",
        REPORT_FORWARDER_CONNECT_RETRY_S="9",
    )
    settings = load_settings(environ=environ)
    url = "/reportIncorrectImageCaptcha"
    with Server(Intake(settings, settings.redis_url, environ=environ)) as server:
        before = requests.post(
            server.url + url, json={"clientKey": CLIENT_KEY, "taskId": 901}, timeout=30
        )
        assert before.status_code == 200, before.text
        old = cluster2.primary()
        old.kill()
        during = requests.post(
            server.url + url, json={"clientKey": CLIENT_KEY, "taskId": 902}, timeout=30
        )
        new = cluster2.primary()
    assert new.port != old.port  # the answer came from the promoted replica
    assert during.status_code == 200, during.text
    assert during.json()["errorId"] == 0
    producer = Producer(settings)
    keys = Keys(settings.key_prefix)
    assert producer.client.exists(keys.report("default", 902)) == 1
    producer.client.close()


def test_a_dropped_connection_reconnects_to_the_new_primary(cluster2: SentinelCluster) -> None:
    """redis-py reconnects a dropped connection with the address it had: after a failover,
    the dead primary's (an outcome write kept failing for 30 s so, while fresh connections
    reached the new primary). Ours ask the Sentinels on every reconnect."""
    from worker.store import connection as store

    client = store.connect(cluster2.url)
    conn = client.connection_pool.get_connection()
    conn.send_command("PING")
    assert conn.read_response() == b"PONG"
    old = cluster2.primary()
    old.kill()
    new = cluster2.wait_for_new_primary(old.port, timeout_s=60)
    conn.disconnect()
    conn.send_command("PING")  # reconnects here, inside send_packed_command
    assert conn.read_response() == b"PONG"
    assert conn.port == new.port != old.port
    client.connection_pool.release(conn)
    client.close()
