"""The global rate limiter: the sliding-window guarantee, fairness between accounts,
deferral without spending attempts, and push-back across processes."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import structlog
from click.testing import CliRunner

from bench.ratelimit import max_in_window
from worker.cli import main
from worker.config import Account, Settings, load_settings
from worker.keys import Keys
from worker.producer import Producer
from worker.ratelimit import Limiter
from worker.sandbox import Rule, Sandbox
from worker.testing import WorkerProcesses

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


def test_admission_refuses_the_n_plus_first_in_a_window(
    make_settings: Callable[..., Settings], redis_client: redis.Redis
) -> None:
    """N admissions pass at once; the next must wait about one window (plus the margin)."""
    settings = make_settings(REPORT_FORWARDER_RATE_LIMIT="5/second")
    limiter, account = _limiter(settings, redis_client)
    for _ in range(5):
        assert limiter.admit(account, give_up_after_s=0)[0]
    admitted, wait_s = limiter.admit(account, give_up_after_s=0)
    assert not admitted
    assert 0.9 < wait_s <= 1.025


def test_plan_spaces_slots_and_refuses_past_the_deadline(
    make_settings: Callable[..., Settings], redis_client: redis.Redis
) -> None:
    """Planned slots are (period + margin) / N apart; none is given after the deadline."""
    import time

    settings = make_settings(REPORT_FORWARDER_RATE_LIMIT="4/second")
    limiter, account = _limiter(settings, redis_client)
    slots = [limiter.plan(account, time.time() + 60).at for _ in range(4)]
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    assert all(abs(gap - 1.025 / 4) < 1e-3 for gap in gaps)
    assert limiter.plan(account, time.time() + 0.5).wait_s is None


def test_cool_down_extends_and_never_shortens(
    make_settings: Callable[..., Settings], redis_client: redis.Redis
) -> None:
    """A push-back cools the account at least 2 s; a shorter one does not shorten it."""
    settings = make_settings()
    limiter, account = _limiter(settings, redis_client)
    assert 5.0 == limiter.cool_down(account, 5)
    assert limiter.cool_down(account, 1) is None
    admitted, wait_s = limiter.admit(account, give_up_after_s=0)
    assert not admitted
    assert 4 < wait_s <= 5


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

    capture = structlog.testing.capture_logs()
    with running_worker(settings, environ, concurrency=4) as svc, capture as lines:
        svc.producer.enqueue_many([(n, "image", "default") for n in range(1, 31)])
        svc.producer.enqueue_many([(n, "image", "other") for n in range(101, 131)])
        wait_until(lambda: sent(OTHER_KEY) == 30, timeout=20)
        slow_done = sent(CLIENT_KEY)
        wait_until(lambda: sent(CLIENT_KEY) >= slow_done + 2, timeout=10)  # it goes on
    assert slow_done < 30  # the other account finished while this one was still draining
    assert [x for x in lines if x["event"] == "report.deferred"]
    accepted = [x for x in lines if x["event"] == "report.accepted" and x["account"] == "default"]
    assert {1} == {x["attempt"] for x in accepted}
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
    log = sorted(sandbox.requests(), key=lambda r: r.monotonic)
    pushed = next(r for r in log if r.status == 429)
    after = [r.monotonic - pushed.monotonic for r in log if r.monotonic > pushed.monotonic]
    # requests already in flight when the 429 arrived land within moments; then silence
    assert [] == [t for t in after if 0.3 < t < 3.0]
    assert max(after) >= 3.0
    lines = "".join(p.read_text() for p in workers.log_paths())
    assert 1 <= lines.count('"ratelimit.pushed_back"') <= 2


def test_stats_show_limit_and_usage(
    make_settings: Callable[..., Settings], redis_client: redis.Redis, env: dict[str, str]
) -> None:
    """`stats --json` shows each account's limit and how much of it the last window used."""
    settings = make_settings(REPORT_FORWARDER_RATE_LIMIT="10/second")
    limiter, account = _limiter(settings, redis_client)
    for _ in range(3):
        limiter.admit(account, give_up_after_s=0)
    environ = dict(env, REPORT_FORWARDER_RATE_LIMIT="10/second")
    result = CliRunner().invoke(main, ["stats", "--json"], env=environ)
    doc = json.loads(result.stdout)["accounts"]["default"]
    assert ("10/second", 3, 0.3) == (doc["rate_limit"], doc["used_in_window"], doc["usage"])
