"""What to do after an outcome: record it, retry it (when), or dead-letter it (why).

Transient failures back off exponentially: ``base * 2**n`` (n = retries so far) capped at
``cap``, then up to ``+jitter`` added on top, never below 2 s (CapMonster asks for at
least 2 s between calls). A longer ``Retry-After`` from the API wins. The report's
deadline and attempt budget bound it all: when the next try would land after the
deadline, one last try is made just before it if there is room, else it expires.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from worker.delivery.upstream import Outcome
from worker.settings import MIN_BACKOFF_S
from worker.store.vocabulary import Reason

LAST_CHANCE_MARGIN_S = 1.0


@dataclass(frozen=True, slots=True)
class Policy:
    max_attempts: int = 10
    base_s: float = 2.0
    cap_s: float = 60.0
    jitter: float = 0.25


@dataclass(frozen=True, slots=True)
class Step:
    action: Literal["accepted", "retry", "dead"]
    reason: str = ""  # for dead: rejected, account_fault, expired, retries_exhausted
    due: float = 0.0  # for retry: epoch seconds
    delay_s: float = 0.0
    pause_account: bool = False


def backoff_delay(retries: int, policy: Policy, rng: random.Random | None = None) -> float:
    """Delay before retry number ``retries + 1``."""
    base = min(policy.cap_s, policy.base_s * float(2 ** min(retries, 30)))
    jittered: float = base * (1.0 + (rng or random).uniform(0.0, policy.jitter))
    return max(MIN_BACKOFF_S, jittered)


def next_step(
    outcome: Outcome,
    *,
    attempts: int,
    deadline: float,
    now: float,
    policy: Policy,
    rng: random.Random | None = None,
) -> Step:
    """``attempts`` counts API calls made so far, this one included."""
    if outcome.status == "accepted":
        return Step("accepted")
    if outcome.status == "rejected":
        return Step("dead", reason=Reason.REJECTED)
    if outcome.status == "account_fault":
        return Step("dead", reason=Reason.ACCOUNT_FAULT, pause_account=True)
    if attempts >= policy.max_attempts:
        return Step("dead", reason=Reason.RETRIES_EXHAUSTED)
    delay = backoff_delay(attempts - 1, policy, rng)
    if outcome.retry_after is not None and outcome.retry_after > delay:
        delay = outcome.retry_after
    due = now + delay
    if due >= deadline - LAST_CHANCE_MARGIN_S:
        last_chance = deadline - LAST_CHANCE_MARGIN_S
        told_to_wait = outcome.retry_after is not None and now + outcome.retry_after > last_chance
        if told_to_wait or last_chance - now < MIN_BACKOFF_S:
            return Step("dead", reason=Reason.EXPIRED)
        due = last_chance
        delay = due - now
    return Step("retry", due=due, delay_s=delay)
