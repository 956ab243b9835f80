"""A batch's machinery (docs/design.md §3.4): the reports claimed in one round trip, the
crew of threads that send them within the worker's budget, and the recorder that writes
outcomes many per round trip. What happens to one report is :mod:`report`'s."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from worker.observability.logs import get_logger
from worker.store.keys import split_ref
from worker.store.records import Claim, Record

log = get_logger("worker.runtime")

# A lease shorter than a report's longest path (a setting's choice) is used as a report
# claimed alone would use it: a report of a batch starts only with all but this of it left.
FRESH_S = 1.0
# Outcomes wait at most this long to be recorded with others (a killed worker sends again
# what it had not recorded), or not at all once this many wait.
RECORD_EVERY_S = 0.02
RECORD_AT_ONCE = 64


Concluded = tuple[Record, Callable[[bool], None]]  # an outcome, and what follows its record


class Job:
    __slots__ = ("batch", "claim", "concluded", "ctx", "message_id", "ref")

    def __init__(self, batch: Batch, message_id: str, ref: str, claim: Claim) -> None:
        account, task_id = split_ref(ref)
        self.batch = batch
        self.ref = ref
        self.message_id = message_id
        self.claim = claim
        self.concluded = False
        self.ctx: dict[str, Any] = {
            "task_id": task_id,
            "captcha_type": claim.captcha_type,
            "kind": claim.kind,
            "account": account,
            "queue_ms": max(0, round((batch.claimed_at - claim.queued_at) * 1000)),
        }


class Batch:
    """The reports claimed in one round trip (one message's, and any taken with it): taken
    one at a time by the thread delivering the message and by idle crew threads."""

    def __init__(self, claim_began: float, lease_until: float, claimed_at: float) -> None:
        self.claim_began = claim_began
        self.lease_until = lease_until
        self.claimed_at = claimed_at
        self.messages: list[str] = []  # closed by the last record
        self.jobs: list[Job] = []
        self._next = 0
        self._open = 0  # reports taken or not, without an outcome yet
        self._lock = threading.Lock()
        self.closed = threading.Event()  # its outcomes are recorded, its messages closed

    def add(self, message_id: str, answers: Iterable[tuple[str, Claim | str]]) -> None:
        """A message and its claim answers; a report it may not act on is skipped."""
        self.messages.append(message_id)
        for ref, claim in answers:
            if isinstance(claim, str):
                account, task_id = split_ref(ref)
                log.debug("report.skipped", task_id=task_id, account=account, state=claim)
                continue
            self.jobs.append(Job(self, message_id, ref, claim))
            self._open += 1

    def take(self) -> Job | None:
        """The next report no thread has taken, if any."""
        with self._lock:
            if self._next >= len(self.jobs):
                return None
            self._next += 1
            return self.jobs[self._next - 1]

    def in_time(self, longest_path_s: float, lease_s: float) -> bool:
        """Whether a report started now still has the lease a report claimed alone has:
        room for its longest path, or — when the lease is shorter than that path (a
        setting's choice) — all but ``FRESH_S`` of it. Counted from before the claim was
        sent: a claim that redis-py retried through a failover carries the time of its
        first try, so its leases may be nearly over when it returns (its reports then go
        back unsent instead of being sent while the sweep re-queues them)."""
        left = self.lease_until - time.time()
        return left >= min(longest_path_s, lease_s - FRESH_S)

    def conclude(self, recorder: Recorder, outcome: Concluded | None) -> None:
        """A report's outcome (None: it ended without one, left running for the sweep)
        goes to ``recorder``, the last one with the batch to close. One step under the
        batch's lock: were another thread's last outcome handed over between this one's
        count and its hand-over, the close would be recorded first, and a released report
        recorded after its message was closed would never be handed on."""
        with self._lock:
            self._open -= 1
            recorder.add(outcome, None if self._open else self)


class Recorder:
    """Outcomes recorded as they come, many per round trip (docs/design.md §3.4): a thread
    of its own records every outcome of the worker waiting — whatever its batch — at most
    ``RECORD_EVERY_S`` after the first of them, or at once when ``RECORD_AT_ONCE`` wait.
    A worker killed sends again only what it had not recorded: about that long's worth.
    A batch's messages are closed in the round trip that records its last outcome, or a
    later one."""

    def __init__(self, record_all: Callable[[list[Concluded], list[str]], None]) -> None:
        self._record_all = record_all
        self._cond = threading.Condition(threading.Lock())
        self._outcomes: list[Concluded] = []
        self._closing: list[Batch] = []
        self._thread: threading.Thread | None = None
        self._stopping = False

    def add(self, outcome: Concluded | None, closing: Batch | None) -> None:
        with self._cond:
            if outcome is not None:
                self._outcomes.append(outcome)
            if closing is not None:
                self._closing.append(closing)
            if self._thread is None:  # one recording thread at a time, so records keep order
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
                self._thread.start()
            if len(self._outcomes) == 1 or len(self._outcomes) >= RECORD_AT_ONCE:
                self._cond.notify()

    def stop(self) -> None:
        """Record what waits, then stop (a later :meth:`add` starts again)."""
        with self._cond:
            thread, self._stopping = self._thread, True
            self._cond.notify()
        if thread is not None:
            thread.join(timeout=60)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._outcomes or self._closing or self._stopping):
                    self._cond.wait()
                if not self._stopping:
                    self._cond.wait_for(
                        lambda: len(self._outcomes) >= RECORD_AT_ONCE or self._stopping,
                        RECORD_EVERY_S,
                    )
                outcomes, self._outcomes = self._outcomes, []
                batches, self._closing = self._closing, []
                if not outcomes and not batches:  # stopping, nothing left
                    self._thread = None
                    return
            try:
                self._record_all(outcomes, [m for batch in batches for m in batch.messages])
            except Exception:  # a defect: the reports stay running, for the sweep
                log.exception("report.record_failed")
            finally:
                for batch in batches:
                    batch.closed.set()


class Crew:
    """The worker's budget of reports at once (its thread count, as before batches) and
    threads beside Celery's that help spend it: while a slot is free, an idle crew thread
    takes the next report of the oldest batch that still has one. Never the only senders:
    the thread delivering a batch sends its reports too, and gets the next free slot
    before any crew thread does, so a busy crew slows no batch below one report at a
    time, and a worker whose Celery threads fill every slot wakes no crew thread."""

    def __init__(self, size: int, work: Callable[[Batch, Job], None]) -> None:
        self.size = size
        self._work = work
        self._free = size  # slots: reports that may be on their way now
        self._callers = 0  # batch threads waiting for a slot
        self._batches: deque[Batch] = deque()
        lock = threading.Lock()
        self._slot_freed = threading.Condition(lock)  # batch threads wait here
        self._work_ready = threading.Condition(lock)  # crew threads wait here
        self._threads: list[threading.Thread] = []
        self._stopped = False

    def share(self, batch: Batch) -> None:
        """``batch`` may be helped with (its own thread works on it too)."""
        with self._work_ready:
            if self._stopped:
                return
            if not self._threads:
                for n in range(self.size):
                    thread = threading.Thread(target=self._run, name=f"crew-{n}", daemon=True)
                    thread.start()
                    self._threads.append(thread)
            self._batches.append(batch)
            self._work_ready.notify(min(len(batch.jobs) - 1, self._free))

    def work_on(self, batch: Batch) -> bool:
        """On the batch's own thread: one report of ``batch`` in a slot (waiting for one);
        False if none was left to take."""
        with self._slot_freed:
            self._callers += 1
            while not self._free:
                self._slot_freed.wait()
            self._callers -= 1
            self._free -= 1
        try:
            job = batch.take()
            if job is None:
                return False
            self._work(batch, job)
            return True
        finally:
            self._release()

    def withdraw(self, batch: Batch) -> None:
        """``batch`` has no report left to take."""
        with self._work_ready:
            if batch in self._batches:
                self._batches.remove(batch)

    def stop(self) -> None:
        with self._work_ready:
            self._stopped = True
            self._batches.clear()
            self._work_ready.notify_all()
        for thread in self._threads:
            thread.join(timeout=60)
        with self._work_ready:
            self._threads = []
            self._stopped = False  # a runtime started again gets a new crew

    def _release(self) -> None:
        with self._slot_freed:
            self._free += 1
            if self._callers:
                self._slot_freed.notify()
            elif self._batches:
                self._work_ready.notify()

    def _run(self) -> None:
        while True:
            with self._work_ready:
                while not self._stopped and not (self._batches and self._free):
                    self._work_ready.wait()
                if self._stopped:
                    return
                self._free -= 1
                batch = self._batches[0]
            try:
                job = batch.take()
                if job is None:  # nothing left to take: drop it from the line
                    self.withdraw(batch)
                else:
                    self._work(batch, job)
            finally:
                self._release()
