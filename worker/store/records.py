"""What the claim and finish scripts answer and take, as Python values (docs/design.md
§3.1, §3.4): a report's claim, a batch's claims, one delivery's outcome."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Claim:
    """What a worker learns when it claims a report for one delivery."""

    captcha_type: str
    kind: str
    enqueued_at: float
    deadline: float
    attempts: int
    deliveries: int
    queued_at: float
    paused_until: float | None
    planned_slot: float | None  # a rate-limit slot reserved before the report was deferred
    limiter_since: float | None  # when the report first asked the limiter for that slot
    # the limiter's answer in the claim: "" not asked, "go" admitted now, "none" no slot
    # before the deadline, else the time of the slot reserved for it
    limiter: str = ""


@dataclass(frozen=True, slots=True)
class Claimed:
    """What :meth:`Ledger.claim_many` took: an answer per report asked for, in order, and
    the messages taken off the lists, each with its (ref, answer) pairs."""

    claims: list[Claim | str]
    taken: list[tuple[str, list[tuple[str, Claim | str]]]]


@dataclass(frozen=True, slots=True)
class Record:
    """One delivery's outcome, for :meth:`Ledger.finish_many` (fields as :meth:`Ledger.finish`)."""

    ref: str
    message_id: str
    outcome: str  # a Finish
    attempts: int
    stats_field: str = ""
    error_code: str = ""
    http_status: int | None = None
    error: str = ""
    due: float = 0.0
    reason: str = ""
    planned_slot: float | None = None
    limiter_since: float | None = None


def as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_claim(reply: Any) -> Claim | str:
    """One report's answer of the claim script."""
    if int(reply[0]) == 0:
        return as_text(reply[1]) or "gone"
    f = [as_text(v) for v in reply[1:]]
    return Claim(
        captcha_type=f[0],
        kind=f[1],
        enqueued_at=float(f[2]),
        deadline=float(f[3]),
        attempts=int(f[4] or 0),
        deliveries=int(f[5] or 0),
        queued_at=float(f[6] or f[2]),
        paused_until=float(f[7]) if f[7] else None,
        planned_slot=float(f[8].split("|")[0]) if f[8] else None,
        limiter_since=float(f[8].split("|")[1]) if "|" in f[8] else None,
        limiter=f[9],
    )


def parse_taken(entry: Any) -> tuple[str, list[tuple[str, Claim | str]]]:
    """A message the claim script took off a list: its id, and (ref, answer) per report."""
    pairs = zip(entry[1::2], entry[2::2], strict=True)
    return as_text(entry[0]), [(as_text(ref), parse_claim(reply)) for ref, reply in pairs]
