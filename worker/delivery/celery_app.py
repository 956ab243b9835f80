"""The Celery app, built from Settings: JSON only, late acks, no result backend, our logging.

Workers run the threads pool (the work is I/O-bound) on the configured queue. A bootstep
starts the runtime's sweeper with the worker and stops it with the worker; another marks
the worker's liveness from the consumer's event loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import weakref
from typing import Any

import celery.apps.worker
from celery import Celery, bootsteps, signals

from worker.delivery.runtime import Runtime
from worker.delivery.tasks import register
from worker.observability.health import LOOP_TICK_S
from worker.store import connection as store
from worker.store.messages import TASK_NAME

# the runtimes of the workers running in this process (tests run several)
_RUNNING: weakref.WeakSet[Runtime] = weakref.WeakSet()


class ForwarderApp(Celery):
    runtime: Runtime


class _RuntimeStep(bootsteps.StartStopStep):
    """Starts the sweeper when the worker starts; stops it on shutdown."""

    requires = ("celery.worker.components:Pool",)

    def start(self, parent: Any) -> None:
        parent.app.runtime.start()
        _RUNNING.add(parent.app.runtime)

    def stop(self, parent: Any) -> None:
        parent.app.runtime.stop()
        _RUNNING.discard(parent.app.runtime)

    def terminate(self, parent: Any) -> None:  # cold shutdown calls this instead of stop
        parent.app.runtime.stop(timeout_s=0)
        _RUNNING.discard(parent.app.runtime)


class _LoopTick(bootsteps.StartStopStep):
    """The consumer's event loop marks the runtime's liveness (docs/design.md §4.4): an
    entry on the loop's own timer, so it fires only while the loop turns. While the
    consumer (re)connects to the broker, its loop is marked as connecting instead."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._entry: Any = None

    def start(self, parent: Any) -> None:
        liveness = parent.app.runtime.liveness
        if parent.hub is None:
            liveness.loop_unwatched()
            return
        liveness.loop_ticked()
        self._entry = parent.hub.timer.call_repeatedly(LOOP_TICK_S, liveness.loop_ticked)

    def stop(self, parent: Any) -> None:  # also on a lost connection, before reconnecting
        if self._entry is not None:
            self._entry.cancel()
            self._entry = None
        parent.app.runtime.liveness.loop_connecting()


@signals.task_received.connect
def _hold(request: Any = None, **_kwargs: Any) -> None:
    """A message reached this worker (prefetched or to run now): its heartbeat lists it."""
    if request is not None and request.name == TASK_NAME:
        runtime = getattr(request.task.app, "runtime", None)
        if runtime is not None:
            runtime.received(request.id)


@signals.worker_shutting_down.connect
def _shutting_down(**_kwargs: Any) -> None:
    """SIGTERM (warm shutdown): every thread finishes its report in flight and hands the
    rest of its message back at once, so the worker exits within one report's time."""
    for runtime in list(_RUNNING):
        runtime.begin_shutdown()


@signals.setup_logging.connect
def _keep_our_logging(**_kwargs: Any) -> None:
    """Connected so Celery leaves logging to :mod:`worker.observability.logs` (no root hijack)."""


def _banner_as_log_line(log_format: str) -> None:
    """Celery writes its shutdown banner ("worker: Warm shutdown (MainProcess)", after a
    blank line) as plain text, which breaks a JSON log stream. Say it as one of our lines
    instead. It is said from a signal handler, so: one ``os.write``, no logger, no lock."""
    as_json = log_format == "json" or (log_format == "auto" and not sys.stdout.isatty())

    def say(msg: str, f: Any = None) -> None:
        del f
        text = " ".join(str(msg).split())
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if as_json:
            doc = {"event": "worker.shutting_down", "message": text, "level": "info",
                   "logger": "celery", "timestamp": stamp}  # fmt: skip
            line = json.dumps(doc) + "\n"
        else:
            line = f"{stamp} [info     ] worker.shutting_down  message={text!r}\n"
        with contextlib.suppress(OSError, AttributeError, ValueError):
            os.write(sys.__stdout__.fileno(), line.encode())  # type: ignore[union-attr]

    celery.apps.worker.safe_say = say  # type: ignore[attr-defined]


def create_app(runtime: Runtime) -> ForwarderApp:
    settings = runtime.settings
    _banner_as_log_line(settings.log_format)
    app = ForwarderApp("report_forwarder", set_as_current=False)
    app.runtime = runtime
    app.conf.update(
        broker_url=store.broker_url(runtime.redis_url),
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # keep reconnecting through a Redis restart
        broker_channel_error_retry=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": settings.restore_interval_s,
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": 5,
            "socket_timeout": 30,
            "retry_on_timeout": True,
            "health_check_interval": 10,
            # a Sentinel URL: the master's name and the Sentinels' own password
            **store.broker_options(runtime.redis_url),
        },
        broker_use_ssl=store.broker_ssl(runtime.redis_url),
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_default_queue=settings.queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        # one message ready behind each busy thread, so a thread that finishes does not wait
        # for a Redis round trip before its next report (more would hoard work)
        worker_prefetch_multiplier=2,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        # Remote control (Celery's pidbox) is the worker's only Redis pub/sub subscription,
        # and kombu's handling of that connection across a Redis restart can hang the
        # worker's event loop or kill the worker (seen in our crash runs, kombu 5.7). Off
        # unless asked for (`worker --remote-control`, for Flower's inspect views).
        worker_enable_remote_control=False,
    )
    register(app)
    app.steps["worker"].add(_RuntimeStep)
    app.steps["consumer"].add(_LoopTick)
    return app


def worker_options(queue: str, concurrency: int) -> dict[str, Any]:
    """Options for ``app.Worker`` and ``start_worker``: the threads pool on our queue
    (``start_worker`` adds no mingle/gossip itself; ``app.Worker`` callers add them)."""
    return {"pool": "threads", "concurrency": concurrency, "queues": [queue]}
