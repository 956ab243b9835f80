"""worker.retries: exponential backoff with jitter, Retry-After, deadline and attempt budget."""

from __future__ import annotations

import random

import pytest

from worker.delivery.retries import LAST_CHANCE_MARGIN_S, Policy, Step, backoff_delay, next_step
from worker.delivery.upstream import Outcome

SEEDS = range(300)
POLICY = Policy()  # max_attempts 10, base 2 s, cap 60 s, jitter +25 %
NOW = 1_700_000_000.0
FAR = NOW + 10_000.0  # a deadline that never gets in the way


def transient(retry_after: float | None = None) -> Outcome:
    """A transient failure, optionally with a Retry-After (seconds)."""
    return Outcome("transient", 503, "HTTP_503", "busy", retry_after)


def step(
    outcome: Outcome,
    *,
    attempts: int = 1,
    deadline: float = FAR,
    policy: Policy = POLICY,
    seed: int = 0,
) -> Step:
    return next_step(
        outcome,
        attempts=attempts,
        deadline=deadline,
        now=NOW,
        policy=policy,
        rng=random.Random(seed),
    )


# --- backoff_delay ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy",
    [POLICY, Policy(base_s=0.1), Policy(base_s=1.0, jitter=0.0), Policy(base_s=0.5, cap_s=1.0)],
)
def test_first_retry_delay_is_at_least_two_seconds(policy: Policy) -> None:
    """The first retry never comes sooner than 2 s, whatever the policy and the jitter."""
    for seed in SEEDS:
        assert backoff_delay(0, policy, random.Random(seed)) >= 2.0


@pytest.mark.parametrize("retries", [0, 1, 2, 3, 4])
def test_backoff_delay_within_exponential_band(retries: int) -> None:
    """Before the cap, retry n waits between base·2ⁿ and base·2ⁿ·1.25."""
    low = POLICY.base_s * 2**retries
    assert low < POLICY.cap_s  # still below the cap for these n
    for seed in SEEDS:
        delay = backoff_delay(retries, POLICY, random.Random(seed))
        assert low <= delay <= low * 1.25


@pytest.mark.parametrize("retries", [5, 6, 9, 30, 31, 1000])
def test_backoff_delay_is_capped(retries: int) -> None:
    """Past the cap, the delay stays within [cap, cap·(1 + jitter)], however many retries."""
    for seed in SEEDS:
        delay = backoff_delay(retries, POLICY, random.Random(seed))
        assert POLICY.cap_s <= delay <= POLICY.cap_s * (1 + POLICY.jitter)


def test_backoff_delay_jitter_spreads_delays() -> None:
    """Jitter spreads the delays of one retry number over most of its +25 % band."""
    delays = [backoff_delay(2, POLICY, random.Random(seed)) for seed in SEEDS]

    assert min(delays) < 8.0 * 1.05
    assert max(delays) > 8.0 * 1.20


def test_backoff_delay_without_jitter_is_exact() -> None:
    """With zero jitter the delay is exactly base·2ⁿ."""
    policy = Policy(jitter=0.0)

    assert [2.0, 4.0, 8.0, 16.0, 32.0, 60.0] == [backoff_delay(n, policy) for n in range(6)]


def test_backoff_delay_is_reproducible_with_seeded_rng() -> None:
    """The same seed gives the same delay."""
    first = backoff_delay(3, POLICY, random.Random(42))

    assert first == backoff_delay(3, POLICY, random.Random(42))


# --- next_step: terminal outcomes -------------------------------------------------------------


def test_accepted_is_done() -> None:
    """An accepted report needs no further step."""
    assert Step("accepted") == step(Outcome("accepted", 200))


@pytest.mark.parametrize("attempts", [1, 5])
def test_rejected_is_dead_immediately(attempts: int) -> None:
    """A rejected report is dead-lettered at once, without pausing the account."""
    result = step(Outcome("rejected", 200, "ERROR_NO_SUCH_CAPCHA_ID"), attempts=attempts)

    assert "dead" == result.action
    assert "rejected" == result.reason
    assert result.pause_account is False


@pytest.mark.parametrize("attempts", [1, 5])
def test_account_fault_is_dead_and_pauses_account(attempts: int) -> None:
    """An account fault dead-letters the report at once and asks to pause the account."""
    result = step(Outcome("account_fault", 200, "ERROR_ZERO_BALANCE"), attempts=attempts)

    assert "dead" == result.action
    assert "account_fault" == result.reason
    assert result.pause_account is True


def test_permanent_outcomes_ignore_retry_after() -> None:
    """A Retry-After on a permanent failure does not turn it into a retry."""
    rejected = Outcome("rejected", 400, "HTTP_400", retry_after=5.0)
    fault = Outcome("account_fault", 403, "ERROR_IP_BANNED", retry_after=5.0)

    assert "dead" == step(rejected).action
    assert "dead" == step(fault).action


# --- next_step: transient retries ---------------------------------------------------------


@pytest.mark.parametrize("attempts", [1, 2, 3, 4, 5])
def test_transient_retries_with_backoff_of_its_number(attempts: int) -> None:
    """After ``attempts`` calls, the retry waits backoff(attempts - 1) and is due now + delay."""
    low = POLICY.base_s * 2 ** (attempts - 1)
    for seed in SEEDS:
        result = step(transient(), attempts=attempts, seed=seed)
        assert "retry" == result.action
        assert low <= result.delay_s <= low * 1.25
        assert NOW + result.delay_s == pytest.approx(result.due)


def test_first_transient_retry_waits_at_least_two_seconds() -> None:
    """The first retry of a transient failure is never sooner than 2 s, even for a tiny base."""
    for seed in SEEDS:
        result = step(transient(retry_after=0.0), policy=Policy(base_s=0.01), seed=seed)
        assert "retry" == result.action
        assert result.delay_s >= 2.0


@pytest.mark.parametrize("attempts", [1, 3, 6])
def test_longer_retry_after_wins(attempts: int) -> None:
    """A Retry-After longer than the backoff is what the retry waits."""
    for seed in SEEDS[:50]:
        result = step(transient(retry_after=90.0), attempts=attempts, seed=seed)
        assert "retry" == result.action
        assert 90.0 == result.delay_s
        assert NOW + 90.0 == result.due


@pytest.mark.parametrize("retry_after", [0.0, 0.5, 3.0, 7.9])
def test_shorter_retry_after_does_not_shorten(retry_after: float) -> None:
    """A Retry-After shorter than the backoff does not make the retry come sooner."""
    for seed in SEEDS:
        result = step(transient(retry_after=retry_after), attempts=4, seed=seed)
        assert "retry" == result.action
        assert 16.0 <= result.delay_s <= 20.0


# --- next_step: attempt budget ------------------------------------------------------------


@pytest.mark.parametrize("max_attempts", [1, 3, 10])
def test_attempt_budget_exhausted_is_dead(max_attempts: int) -> None:
    """Once ``max_attempts`` calls have failed transiently, the report dies as retries_exhausted."""
    policy = Policy(max_attempts=max_attempts)

    result = step(transient(), attempts=max_attempts, policy=policy)

    assert "dead" == result.action
    assert "retries_exhausted" == result.reason
    assert result.pause_account is False


def test_attempt_budget_not_yet_exhausted_retries() -> None:
    """One call short of the budget, a transient failure is still retried."""
    policy = Policy(max_attempts=3)

    assert "retry" == step(transient(), attempts=2, policy=policy).action


# --- next_step: the deadline --------------------------------------------------------------


def test_retry_past_deadline_becomes_last_chance_before_it() -> None:
    """A retry that would land after the deadline is moved to deadline - 1 s when there is room."""
    deadline = NOW + 20.0  # attempt 5 would wait 32..40 s
    for seed in SEEDS[:50]:
        result = step(transient(), attempts=5, deadline=deadline, seed=seed)
        assert "retry" == result.action
        assert deadline - LAST_CHANCE_MARGIN_S == result.due
        assert 19.0 == pytest.approx(result.delay_s)


def test_last_chance_exactly_two_seconds_away_is_taken() -> None:
    """A last chance exactly 2 s away is still taken."""
    result = step(transient(), attempts=2, deadline=NOW + 3.0)

    assert "retry" == result.action
    assert NOW + 2.0 == result.due
    assert 2.0 == pytest.approx(result.delay_s)


@pytest.mark.parametrize("left_s", [2.9, 2.0, 1.0, 0.0, -30.0])
def test_expired_when_last_chance_is_under_two_seconds_away(left_s: float) -> None:
    """With less than 2 s between now and deadline - 1 s, the report dies as expired."""
    result = step(transient(), attempts=1, deadline=NOW + left_s)

    assert "dead" == result.action
    assert "expired" == result.reason


@pytest.mark.parametrize("retry_after", [300.0, 99.5, 100.0, 3600.0])
def test_retry_after_beyond_deadline_expires(retry_after: float) -> None:
    """A Retry-After that reaches past the last chance before the deadline means expired."""
    result = step(transient(retry_after=retry_after), attempts=1, deadline=NOW + 100.0)

    assert "dead" == result.action
    assert "expired" == result.reason


def test_retry_after_within_deadline_is_honoured() -> None:
    """A Retry-After that still lands before the deadline is honoured exactly."""
    result = step(transient(retry_after=50.0), attempts=1, deadline=NOW + 100.0)

    assert "retry" == result.action
    assert NOW + 50.0 == result.due


def test_retries_never_land_after_deadline_nor_sooner_than_two_seconds() -> None:
    """Over many random situations, a retry is always ≥ 2 s away and due before the deadline."""
    rng = random.Random(1234)
    retries = 0
    for _ in range(5000):
        deadline = NOW + rng.uniform(-5.0, 400.0)
        retry_after = rng.choice([None, rng.uniform(0.0, 500.0)])
        attempts = rng.randint(1, POLICY.max_attempts - 1)
        result = next_step(
            transient(retry_after),
            attempts=attempts,
            deadline=deadline,
            now=NOW,
            policy=POLICY,
            rng=random.Random(rng.randrange(2**32)),
        )
        if result.action == "retry":
            retries += 1
            assert result.delay_s >= 2.0
            assert result.due <= deadline - LAST_CHANCE_MARGIN_S
            assert NOW + result.delay_s == pytest.approx(result.due)
            if retry_after is not None:
                assert result.delay_s >= retry_after
        else:
            assert "dead" == result.action
            assert "expired" == result.reason
    assert retries > 1000
