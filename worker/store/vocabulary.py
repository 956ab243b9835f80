"""The ledger's vocabulary, named once (rq's ``JobStatus`` is the model): a report's state,
what a finish records, the outcomes counted, and the dead-letter reasons. They are ``str``
enums: a member is the very string Redis, the logs and the metrics hold. And the bounded
set of error codes an outcome may carry (:func:`known_code`, docs/design.md §1.1)."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from worker.settings import Account


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
# every outcome a stats field starts with: the terminal ones, retrying, and an enqueue's
# duplicate (enqueue.lua)
COUNTED: frozenset[str] = frozenset({*TERMINAL, Outcome.RETRYING.value, "duplicate"})

# -- error codes (docs/design.md §1.1) ------------------------------------------------------
#
# An outcome's error_code (a metric label, a stats field, a dead letter's and the ledger's
# error_code, a log field, a pause's reason) is one of a bounded set: a code of the API
# table (docs/design.md §1), a code of the provider profile's error_codes, one the worker
# makes, or OTHER. The worker writes only those (delivery/upstream.py's classify); readers
# of what an older worker wrote (the stats hashes, kept 2 days; the dead letters) read any
# other code as OTHER, through known_code().
ACCOUNT_FAULT_CODES = frozenset(
    {
        "ERROR_KEY_DOES_NOT_EXIST",
        "ERROR_ZERO_BALANCE",
        "ERROR_IP_NOT_ALLOWED",
        "ERROR_IP_BANNED",
        "ERROR_IP_BLOCKED",
    }
)
TRANSIENT_CODES = frozenset(
    {"ERROR_TOO_MUCH_REQUESTS", "ERROR_NO_SLOT_AVAILABLE", "CAPTCHA_NOT_READY"}
)
REJECTED_CODES = frozenset(
    {
        "ERROR_NO_SUCH_CAPCHA_ID",
        "WRONG_CAPTCHA_ID",
        "ERROR_NO_SUCH_METHOD",
        "ERROR_CAPTCHA_UNSOLVABLE",
    }
)
# ours: an answer that is not the API's JSON, no whole answer, a report never sent
WORKER_CODES = frozenset(
    {"INVALID_JSON", "TIMEOUT", "CONNECTION_ERROR", "UNKNOWN_ACCOUNT", "UNSUPPORTED_TYPE",
     "NO_CLIENT_KEY"}
)  # fmt: skip
OTHER = "other"
# a dead letter's error (the outcome's detail) is written cut to this, and read so
MAX_ERROR_CHARS = 500
_HTTP_CODE = re.compile(r"HTTP_[1-5][0-9][0-9]")  # HTTP_<status> for 100-599
_TABLE = ACCOUNT_FAULT_CODES | TRANSIENT_CODES | REJECTED_CODES | WORKER_CODES | {OTHER}


def known_code(code: str, provider_codes: Collection[str] = ()) -> bool:
    """Whether ``code`` is one of the bounded set of error codes: the API table's, one of
    ``provider_codes`` (the profiles' error_codes), ours (``HTTP_<status>`` for 100-599,
    :data:`WORKER_CODES`) or :data:`OTHER`."""
    return code in _TABLE or code in provider_codes or _HTTP_CODE.fullmatch(code) is not None


def provider_codes(accounts: Iterable[Account]) -> frozenset[str]:
    """The error codes the providers of ``accounts`` map (their profiles' error_codes)."""
    return frozenset(code for account in accounts for code in account.provider.error_codes)


class EnqueueRow(NamedTuple):
    """One validated report, as the enqueue script takes it (a tab-separated line)."""

    account: str
    task_id: int
    captcha_type: str
    kind: str
    deadline: str  # epoch seconds, formatted
    dead_letter_id: str = ""  # a replayed dead letter, removed in the same script
