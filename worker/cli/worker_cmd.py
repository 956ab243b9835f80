"""``report-forwarder worker``: run a worker that delivers queued reports until stopped.
Celery (and the delivery layer) is imported inside the command, so that the commands
that do not need it, ``enqueue`` above all, start without it."""

from __future__ import annotations

import logging
import os
import socket
import sys
import warnings
from typing import TYPE_CHECKING

import click

from worker.cli.app import command_logging, current_state, main
from worker.observability.logs import get_logger
from worker.settings import MAX_CONCURRENCY
from worker.store import connection as store

if TYPE_CHECKING:
    from worker.delivery.runtime import Runtime
    from worker.observability.health import Probes


@main.command()
@click.option(
    "--concurrency", "-c", type=click.IntRange(1, MAX_CONCURRENCY), help="Threads (default 16)."
)
@click.option("--hostname", "-n", help="Celery node name (default report-forwarder-PID@host).")
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=0,
    help="Serve Prometheus /metrics and the /healthz and /readyz probes on this port (0: off).",
)
@click.option("--events", is_flag=True, help="Send Celery task events (for Flower).")
@click.option(
    "--remote-control",
    is_flag=True,
    help="Answer Celery remote control (inspect, Flower's worker views). Off by default: it "
    "holds a Redis pub/sub connection that kombu does not carry reliably across a Redis restart.",
)
def worker(
    concurrency: int | None,
    hostname: str | None,
    metrics_port: int,
    events: bool,
    remote_control: bool,
) -> None:
    """Run a worker: deliver queued reports until stopped (SIGTERM: finish in-flight ones)."""
    from worker.delivery.celery_app import create_app, worker_options
    from worker.delivery.runtime import Runtime
    from worker.observability.metrics import Metrics

    settings = current_state().settings
    from worker.delivery import upstream

    # a CA bundle the environment names but cannot be used: exit 2 now; and read before
    # the threads' first requests (loading a bundle holds them ~35 ms)
    upstream.verify_trust()
    command_logging(settings, cache=True)
    logging.captureWarnings(True)  # Celery's warnings become log lines, not raw stderr
    # We keep running tasks through a broker reconnect on purpose (the ledger re-queues
    # whatever cannot be acked); Celery warns about that default on every reconnect.
    warnings.filterwarnings("ignore", message=r"(?s).*worker_cancel_long_running_tasks")
    metrics = Metrics()
    options = worker_options(settings.queue, concurrency or settings.concurrency)
    runtime = Runtime(
        settings,
        store.resolve_url(settings),
        metrics=metrics,
        concurrency=options["concurrency"],
    )
    if metrics_port:
        # a scrape must answer within Prometheus's timeout, Redis up or not: the fleet
        # gauges read Redis with one short attempt, not the worker's 30-s patience
        metrics.watch(store.connect(runtime.redis_url, retry_s=0), settings)
        metrics.serve(metrics_port, probes=_probes(runtime))
    app = create_app(runtime)
    if events:
        app.conf.worker_send_task_events = True
        app.conf.task_send_sent_event = True
    if remote_control:
        app.conf.worker_enable_remote_control = True
    node = hostname or f"report-forwarder-{os.getpid()}@{socket.gethostname()}"
    celery_worker = app.Worker(
        hostname=node,
        quiet=True,
        without_mingle=True,
        without_gossip=True,
        without_heartbeat=not events,
        loglevel="WARNING",
        **options,
    )
    get_logger("worker.cli").info(
        "worker.started",
        node=node,
        queue=settings.queue,
        concurrency=options["concurrency"],
        metrics_port=metrics_port or None,
        redis=store.describe(runtime.redis_url),
        accounts=sorted(settings.accounts),
    )
    celery_worker.start()
    sys.exit(celery_worker.exitcode or 0)


def _probes(runtime: Runtime) -> Probes:
    """The worker's /healthz and /readyz (docs/design.md §4.4)."""
    from worker.observability.health import Probes, Readiness, redis_ping

    readiness = Readiness(
        runtime.settings,
        redis_ping(runtime.redis_url),
        lambda account: account.name in runtime.client_keys,
    )
    return Probes(runtime.liveness, readiness, runtime.stopping.is_set)
