"""Metrics and fleet-wide stats: values after real outcomes, the /metrics text, a real
Prometheus server scraping a worker, and `stats` agreeing with what the API saw."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
from click.testing import CliRunner
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from worker.cli import main
from worker.delivery.celery_app import create_app, worker_options
from worker.delivery.runtime import Runtime
from worker.observability.metrics import Metrics
from worker.producer import Producer
from worker.settings import Settings, load_settings
from worker.store.keys import Keys
from worker.testing.processes import WorkerProcesses, free_port
from worker.testing.sandbox import Rule, Sandbox

from .conftest import FAST_RECOVERY, cli_env, wait_until


@pytest.fixture
def metered(settings: Settings, env: dict[str, str]) -> Iterator[tuple[Metrics, Runtime, Producer]]:
    """An in-process worker whose metrics live in a private registry."""
    from celery.contrib.testing.worker import start_worker

    metrics = Metrics(CollectorRegistry())
    runtime = Runtime(settings, settings.redis_url, env, metrics=metrics)
    metrics.watch(runtime.client, settings)
    app = create_app(runtime)
    with start_worker(app, perform_ping_check=False, **worker_options(settings.queue, 8)):
        yield metrics, runtime, Producer(settings, runtime.client)
    runtime.client.close()


def _pending(client: redis.Redis) -> int:
    return int(client.get(Keys().npending) or -1)


def test_outcome_counters_and_histograms_after_real_outcomes(
    metered: tuple[Metrics, Runtime, Producer], sandbox: Sandbox, redis_client: redis.Redis
) -> None:
    """Counters count each outcome by kind and code; histograms count each request."""
    metrics, _, producer = metered
    sandbox.add_rule(Rule(task_id=4, error_code="ERROR_NO_SUCH_CAPCHA_ID"))
    sandbox.add_rule(Rule(task_id=5, http_status=503, times=1))
    producer.enqueue_many(
        [(1, "image"), (2, "image"), (3, "HCaptchaTask"), (4, "image"), (5, "token")]
    )
    total = "report_forwarder_reports_total"

    def observed() -> dict[str, float | None]:
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in metrics.registry.collect()
            for s in family.samples
        }

        def value(name: str, **labels: str) -> float | None:
            return samples.get((name, tuple(sorted(labels.items()))))

        def outcome(outcome: str, kind: str, error_code: str = "") -> float | None:
            return value(total, outcome=outcome, kind=kind, error_code=error_code)

        return {
            "accepted image": outcome("accepted", "image"),
            "accepted token": outcome("accepted", "token"),
            "rejected image": outcome("rejected", "image", "ERROR_NO_SUCH_CAPCHA_ID"),
            "retrying token": outcome("retrying", "token", "HTTP_503"),
            "requests timed": sum(
                value("report_forwarder_request_seconds_count", kind=kind) or 0.0
                for kind in ("image", "token")
            ),
            "requests the API saw": float(sandbox.count()),
            "queue waits": value("report_forwarder_queue_seconds_count"),
            "dead letters, rejected": value("report_forwarder_dead_letters", reason="rejected"),
            "pending reports": value("report_forwarder_pending_reports"),
            "redis up": value("report_forwarder_redis_up"),
        }

    expected = {
        "accepted image": 2.0,
        "accepted token": 2.0,
        "rejected image": 1.0,
        "retrying token": 1.0,
        "requests timed": 6.0,
        "requests the API saw": 6.0,
        "queue waits": 6.0,
        "dead letters, rejected": 1.0,
        "pending reports": 0.0,
        "redis up": 1.0,
    }
    with contextlib.suppress(AssertionError):  # the assert below shows what differed
        wait_until(lambda: expected == observed(), timeout=15)
    assert expected == observed()
    del redis_client


def test_metrics_endpoint_text_parses_with_the_expected_families(
    metered: tuple[Metrics, Runtime, Producer], sandbox: Sandbox, redis_client: redis.Redis
) -> None:
    """/metrics serves Prometheus text that prometheus_client's parser reads, with the
    documented names and types and no per-task labels."""
    metrics, _, producer = metered
    port = free_port()
    server, thread = metrics.serve(port, "127.0.0.1")
    try:
        producer.enqueue(1, "image")
        wait_until(lambda: _pending(redis_client) == 0)
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    expected = {
        "report_forwarder_reports": "counter",
        "report_forwarder_request_seconds": "histogram",
        "report_forwarder_queue_seconds": "histogram",
        "report_forwarder_ratelimit_wait_seconds": "histogram",
        "report_forwarder_queue_depth": "gauge",
        "report_forwarder_pending_reports": "gauge",
        "report_forwarder_oldest_queued_age_seconds": "gauge",
        "report_forwarder_dead_letters": "gauge",
        "report_forwarder_paused_accounts": "gauge",
        "report_forwarder_ratelimit_usage_ratio": "gauge",
    }
    for name, kind in expected.items():
        assert kind == families[name].type, name
    labels = {key for f in families.values() for s in f.samples for key in s.labels}
    assert "task_id" not in labels
    del sandbox


PROMETHEUS = shutil.which("prometheus")


@pytest.mark.skipif(
    PROMETHEUS is None,
    reason="no `prometheus` binary (Debian package `prometheus`); .ci/run installs it where "
    "apt-get runs as root",
)
@pytest.mark.timeout(120)
def test_real_prometheus_scrapes_a_worker_and_answers_a_throughput_query(
    env: dict[str, str], sandbox: Sandbox, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """A Prometheus server started on loopback scrapes a running worker's /metrics:
    `sum(rate(report_forwarder_reports_total[1m]))` comes back above zero, and the accepted
    reports it counts are ones the API accepted."""
    metrics_port, prom_port = free_port(), free_port()
    config = tmp_path / "w.toml"
    config.write_text(FAST_RECOVERY)
    # the port through its environment variable, as compose and ops would set it
    environ = cli_env(
        env,
        REPORT_FORWARDER_CONFIG=str(config),
        REPORT_FORWARDER_WORKER_METRICS_PORT=str(metrics_port),
    )
    workers = WorkerProcesses(environ, tmp_path / "logs")
    workers.spawn()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: report-forwarder\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    assert PROMETHEUS is not None
    prometheus = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    producer = Producer(load_settings(environ=environ))
    query_url = f"http://127.0.0.1:{prom_port}/api/v1/query"

    def query(expression: str) -> float | None:
        """The value of a one-series PromQL query, None while there is none."""
        try:
            answer = requests.get(query_url, params={"query": expression}, timeout=5).json()
        except requests.RequestException:
            return None
        result = answer.get("data", {}).get("result", [])
        return float(result[0]["value"][1]) if result else None

    def throughput() -> float | None:
        """The fleet's throughput as Prometheus computes it (None while not above zero),
        with 20 more reports queued each time, so there is always traffic to see."""
        producer.enqueue_many([(n, "image") for n in range(time.time_ns(), time.time_ns() + 20)])
        rate = query("sum(rate(report_forwarder_reports_total[1m]))")
        return rate if rate is not None and rate > 0 else None

    try:
        wait_until(throughput, timeout=60, interval=1.0)  # AssertionError if never above 0
        scraped = query('sum(report_forwarder_reports_total{outcome="accepted"})')
        accepted_by_api = sandbox.count(success=True)
    finally:
        prometheus.terminate()
        prometheus.wait(20)
        workers.stop_all()
        producer.client.close()
    # what Prometheus scraped is real: never more accepted reports than the API accepted
    assert scraped is not None
    assert 0 < scraped <= accepted_by_api
    del redis_client


def test_stats_equal_what_the_api_saw_across_two_worker_processes(
    env: dict[str, str], sandbox: Sandbox, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """With two worker processes, `stats --json` counts the same accepted and rejected
    reports as the sandbox recorded."""
    config = tmp_path / "w.toml"
    config.write_text(FAST_RECOVERY)
    environ = cli_env(env, REPORT_FORWARDER_CONFIG=str(config))
    for task_id in range(1, 301, 10):
        sandbox.add_rule(Rule(task_id=task_id, error_code="ERROR_NO_SUCH_CAPCHA_ID"))
    workers = WorkerProcesses(environ, tmp_path / "logs")
    workers.spawn()
    workers.spawn()
    producer = Producer(load_settings(environ=environ))
    try:
        producer.enqueue_many([(n, "image" if n % 2 else "token") for n in range(1, 301)])
        wait_until(lambda: _pending(redis_client) == 0, timeout=60)
    finally:
        workers.stop_all()
        producer.client.close()
    result = CliRunner().invoke(main, ["stats", "--json"], env=environ)
    window = json.loads(result.stdout)["throughput"]["5m"]["by_outcome"]
    assert sandbox.count(success=True) == window["accepted"]
    assert sandbox.count(success=False) == window["rejected"]
    assert (270, 30) == (window["accepted"], window["rejected"])
    dead = json.loads(result.stdout)["dead_letters"]
    assert {"total": 30, "by_reason": {"rejected": 30}} == dead
