"""The Celery task: thin. Everything about a report happens in :mod:`worker.delivery.runtime`."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task

from worker.store.messages import TASK_NAME


def register(app: Celery) -> Task[Any, Any]:
    """Register the forwarding task on ``app`` (whose ``runtime`` attribute is set)."""

    @app.task(
        name=TASK_NAME,
        shared=False,  # one task per app: tests and the demo build several apps
        bind=True,
        ignore_result=True,
        acks_late=True,
        reject_on_worker_lost=True,
        # The ledger, not Celery, retries: a Celery retry would hold an ETA message unacked
        # in the worker past the visibility timeout (docs/design.md §4).
        max_retries=0,
    )
    def forward(self: Task[Any, Any], refs: list[str]) -> None:
        self.app.runtime.deliver(self.request.id, refs)  # type: ignore[attr-defined]

    return forward
