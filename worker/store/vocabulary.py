"""The ledger's vocabulary, named once (rq's ``JobStatus`` is the model): a report's state,
what a finish records, the outcomes counted, and the dead-letter reasons. They are ``str``
enums: a member is the very string Redis, the logs and the metrics hold."""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple


class State(StrEnum):
    """A ledger entry's state (hash field ``s``; docs/design.md §3.1)."""

    QUEUED = "q"
    RUNNING = "r"
    WAITING = "w"  # for a retry, or for its rate-limit slot
    ACCEPTED = "a"


class Finish(StrEnum):
    """What a worker records for one delivery (the finish script's outcome argument)."""

    ACCEPTED = "accepted"
    RETRY = "retry"
    DEFER = "defer"
    DEAD = "dead"
    # not sent (shutting down, or its lease too short to send it now): queued for its
    # message again, which hands it to a new urgent message when the message is closed
    RELEASE = "release"


class Reason(StrEnum):
    """Why a report was dead-lettered (docs/design.md §1, §4)."""

    REJECTED = "rejected"
    ACCOUNT_FAULT = "account_fault"
    ACCOUNT_PAUSED = "account_paused"
    EXPIRED = "expired"
    RETRIES_EXHAUSTED = "retries_exhausted"
    POISON = "poison"


class Outcome(StrEnum):
    """Outcomes that are not dead letters (metrics' ``outcome`` label; a dead letter's
    outcome is its :class:`Reason`)."""

    ACCEPTED = "accepted"
    RETRYING = "retrying"


REASONS: tuple[str, ...] = tuple(r.value for r in Reason)
TERMINAL: tuple[str, ...] = (Outcome.ACCEPTED.value, *REASONS)


class EnqueueRow(NamedTuple):
    """One validated report, as the enqueue script takes it (a tab-separated line)."""

    account: str
    task_id: int
    captcha_type: str
    kind: str
    deadline: str  # epoch seconds, formatted
    dead_letter_id: str = ""  # a replayed dead letter, removed in the same script
