"""The global rate limiter: the sliding-window guarantee, fairness between accounts,
deferral without spending attempts, and push-back across processes."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, MutableMapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
import structlog
from click.testing import CliRunner

from bench.ratelimit import max_in_window
from worker.cli import main
from worker.delivery.ratelimit import Limiter
from worker.producer import Producer
from worker.settings import Account, Settings, load_settings
from worker.store.keys import Keys
from worker.testing.processes import WorkerProcesses
from worker.testing.sandbox import Rule, Sandbox

from ..redis_bytes import scored_members
from .conftest import CLIENT_KEY, FAST_RECOVERY, cli_env, running_worker, wait_until

OTHER_KEY = "other-account-key-77"
TWO_ACCOUNTS = (
    FAST_RECOVERY
    + """
[accounts.default]
provider = "capmonster"
key_env = "CAPMONSTER_CLIENT_KEY"
rate_limit = "{a}/second"
[accounts.other]
provider = "capmonster"
key_env = "OTHER_KEY"
rate_limit = "{b}/second"
"""
)


@pytest.fixture
def two_accounts(
    make_settings: Callable[..., Settings], redis_client: redis.Redis
) -> Callable[..., Settings]:
    del redis_client

    def build(a: int, b: int) -> Settings:
        return make_settings(TWO_ACCOUNTS.format(a=a, b=b), REPORT_FORWARDER_RATE_LIMIT="")

    return build


def _limiter(settings: Settings, client: redis.Redis) -> tuple[Limiter, Account]:
    return Limiter(client, Keys(settings.key_prefix)), settings.accounts["default"]


def _redis_now(client: redis.Redis) -> float:
    """Redis's clock, which times every limiter decision."""
    seconds, micros = client.time()
    return float(seconds) + micros / 1e6


# the limiter hands times over as "%.6f" text
ROUNDING = 2e-6


def test_admission_refuses_the_n_plus_first_in_a_window(
    make_settings: Callable[..., Settings], redis_client: redis.Redis
) -> None:
    """N admissions pass at once; the next is refused, without taking a place in the log,
    and told to wait until the oldest admission leaves the window (period + margin)."""
    settings = make_settings(REPORT_FORWARDER_RATE_LIMIT="5/second")
    limiter, account = _limiter(settings, redis_client)
    for _ in range(5):
        assert limiter.admit(account, give_up_after_s=0)[0]
    admitted, wait_s = limiter.admit(account, give_up_after_s=0)
    refused_by = _redis_now(redis_client)
    window_key = Keys(settings.key_prefix).ratelimit("default")
    admissions = [score for _, score in scored_members(redis_client, window_key)]
    assert not admitted
    assert 5 == len(admissions)
    oldest, newest = min(admissions), max(admissions)
    window = 1.0 + limiter.margin_s
    # refused after the fifth admission and before `refused_by`, both by Redis's clock
    assert oldest + window - refused_by - ROUNDING <= wait_s
    assert wait_s <= oldest + window - newest + ROUNDING


def test_plan_spaces_slots_and_refuses_past_the_deadline(
    make_settings: Callable[..., Settings], redis_client: redis.Redis
) -> None:
    """Each planned slot is (period + margin) / N after the one before (or now, when that
    has passed); none is given after the deadline."""
    settings = make_settings(REPORT_FORWARDER_RATE_LIMIT="4/second")
    limiter, account = _limiter(settings, redis_client)
    interval = (1.0 + limiter.margin_s) / 4
    slots = [limiter.plan(account, time.time() + 60) for _ in range(4)]
    for before, slot in itertools.pairwise(slots):
        assert slot.wait_s is not None
        asked_at = slot.at - slot.wait_s  # Redis's clock when the slot was planned
        assert max(asked_at, before.at + interval) == pytest.approx(slot.at, abs=ROUNDING)
    # the next slot is at least `interval` after the last: a deadline before it gets none
    assert limiter.plan(account, slots[-1].at + interval - 0.01).wait_s is None
    later = limiter.plan(account, slots[-1].at + interval + 60)  # the refusal reserved nothing
    assert later.wait_s is not None
    assert max(later.at - later.wait_s, slots[-1].at + interval) == pytest.approx(
        later.at, abs=ROUNDING
    )


def test_cool_down_extends_and_never_shortens(
    make_settings: Callable[..., Settings], redis_client: redis.Redis
) -> None:
    """A push-back cools the account 5 s from when it came; a shorter one does not shorten
    it, and admission is refused until its end."""
    settings = make_settings()
    limiter, account = _limiter(settings, redis_client)
    before = _redis_now(redis_client)
    assert 5.0 == limiter.cool_down(account, 5)
    assert limiter.cool_down(account, 1) is None
    admitted, wait_s = limiter.admit(account, give_up_after_s=0)
    after = _redis_now(redis_client)
    stored = redis_client.get(Keys(settings.key_prefix).cooldown("default"))
    assert stored is not None
    until = float(stored)
    assert before + 5 - ROUNDING <= until <= after + 5 + ROUNDING
    assert not admitted
    assert until - after - ROUNDING <= wait_s <= until - before + ROUNDING


def test_cool_down_is_at_least_two_seconds(
    make_settings: Callable[..., Settings], redis_client: redis.Redis
) -> None:
    """Push-back without Retry-After (or with a shorter one) cools the account for 2 s."""
    settings = make_settings()
    limiter, account = _limiter(settings, redis_client)
    assert 2.0 == limiter.cool_down(account, 0.5)


def test_two_accounts_each_get_their_own_limit(
    two_accounts: Callable[..., Settings], env: dict[str, str], sandbox: Sandbox
) -> None:
    """On the same worker, 4/s and 8/s accounts never exceed their own limit in any 1 s."""
    settings = two_accounts(4, 8)
    environ = dict(env, OTHER_KEY=OTHER_KEY)
    with running_worker(settings, environ, concurrency=8) as svc:
        svc.producer.enqueue_many([(n, "image", "default") for n in range(1, 13)])
        svc.producer.enqueue_many([(n, "image", "other") for n in range(101, 125)])
        wait_until(lambda: sandbox.count() == 36, timeout=30)
    by_key = {
        key: [r.monotonic for r in sandbox.requests() if r.client_key == key]
        for key in (CLIENT_KEY, OTHER_KEY)
    }
    assert 12 == len(by_key[CLIENT_KEY])
    assert 24 == len(by_key[OTHER_KEY])
    assert max_in_window(by_key[CLIENT_KEY]) <= 4
    assert max_in_window(by_key[OTHER_KEY]) <= 8


def test_a_throttled_account_does_not_starve_another(
    two_accounts: Callable[..., Settings],
    env: dict[str, str],
    sandbox: Sandbox,
    redis_client: redis.Redis,
) -> None:
    """A backlog on a 2/s account is deferred out of the worker's threads, so reports of
    another account queued behind it go through at once; deferral spends no attempt."""
    settings = two_accounts(2, 1000)
    environ = dict(env, OTHER_KEY=OTHER_KEY)

    def sent(key: str) -> int:
        return sum(1 for r in sandbox.requests() if r.client_key == key)

    def lines_of(event: str) -> list[MutableMapping[str, Any]]:
        return [x for x in list(lines) if x["event"] == event and x["account"] == "default"]

    capture = structlog.testing.capture_logs()
    with capture as lines, running_worker(settings, environ, concurrency=4) as svc:
        # one report per message: the backlog is 30 messages for the worker's 4 threads
        slow = [(n, "image", "default") for n in range(1, 31)]
        svc.producer.enqueue_many(slow, per_message=1)
        svc.producer.enqueue_many([(n, "image", "other") for n in range(101, 131)])
        wait_until(lambda: sent(OTHER_KEY) == 30, timeout=20)
        slow_done = sent(CLIENT_KEY)
        wait_until(lambda: sent(CLIENT_KEY) >= slow_done + 2, timeout=10)  # it goes on
        wait_until(
            lambda: (
                lines_of("report.deferred") and len(lines_of("report.accepted")) >= slow_done + 2
            )
        )
    assert slow_done < 30  # the other account finished while this one was still draining
    assert lines_of("report.deferred")
    assert {1} == {x["attempt"] for x in lines_of("report.accepted")}
    del redis_client


@pytest.mark.timeout(120)
def test_push_back_cools_the_account_across_processes_for_retry_after(
    env: dict[str, str], sandbox: Sandbox, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """A 429 with Retry-After: 3 seen by one worker process stops both processes from
    calling for that account for 3 s; then every report is delivered."""
    config = tmp_path / "w.toml"
    config.write_text(FAST_RECOVERY)
    environ = cli_env(
        env, REPORT_FORWARDER_CONFIG=str(config), REPORT_FORWARDER_RATE_LIMIT="40/second"
    )
    workers = WorkerProcesses(environ, tmp_path / "logs", concurrency=4)
    workers.spawn()
    workers.spawn()
    try:
        producer = Producer(load_settings(environ=environ))
        sandbox.add_rule(Rule(task_id=20, http_status=429, retry_after=3, times=1))
        producer.enqueue_many([(n, "token") for n in range(1, 121)])
        wait_until(lambda: sandbox.count(success=True) == 120, timeout=60)
        producer.client.close()
    finally:
        workers.stop_all()
    log = sorted(sandbox.requests(), key=lambda r: r.at)
    (pushed,) = [r for r in log if r.status == 429]
    (line,) = [
        json.loads(text)
        for path in workers.log_paths()
        for text in path.read_text().splitlines()
        if '"ratelimit.pushed_back"' in text
    ]
    # written once the cool-down (3 s from when the worker had the 429, so ending no sooner
    # than 3 s after the API sent it) was in Redis
    cooling = datetime.fromisoformat(line["timestamp"]).timestamp()
    assert pushed.at <= cooling
    # what reaches the API after that and before the cool-down's end was admitted before it:
    # at most one request in flight per other worker thread (2 processes x 4 threads)
    in_flight = [r for r in log if cooling < r.at < pushed.at + 3.0]
    assert len(in_flight) <= 2 * 4 - 1
    first, second = (r.at for r in log if r.task_id == 20)
    assert second - first >= 3.0  # the pushed-back report itself, after Retry-After
    assert 121 == len(log)


def test_stats_show_limit_and_usage(
    make_settings: Callable[..., Settings], redis_client: redis.Redis, env: dict[str, str]
) -> None:
    """`stats --json` shows each account's limit and how much of it the last window used (a
    minute's window: the admissions are still in it however slowly the command starts)."""
    settings = make_settings(REPORT_FORWARDER_RATE_LIMIT="10/minute")
    limiter, account = _limiter(settings, redis_client)
    for _ in range(3):
        limiter.admit(account, give_up_after_s=0)
    environ = dict(env, REPORT_FORWARDER_RATE_LIMIT="10/minute")
    result = CliRunner().invoke(main, ["stats", "--json"], env=environ)
    doc = json.loads(result.stdout)["accounts"]["default"]
    assert ("10/minute", 3, 0.3) == (doc["rate_limit"], doc["used_in_window"], doc["usage"])
