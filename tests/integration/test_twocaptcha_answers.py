"""2Captcha's own answers and its twin RuCaptcha, over real HTTP to the sandbox playing them:
a RuCaptcha account needs only its provider's name; ERROR_DUPLICATE_REPORT is a success the
provider already had; ERROR_REPORT_NOT_RECORDED is a refusal ops can see and count."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
import structlog
from celery.contrib.testing.worker import start_worker
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from worker.cli import main
from worker.delivery.celery_app import create_app, worker_options
from worker.delivery.runtime import Runtime
from worker.observability.metrics import Metrics
from worker.producer import Producer
from worker.settings import Settings, load_settings
from worker.store.keys import Keys
from worker.testing.sandbox import Rule, Sandbox

from ..redis_bytes import stream_entries
from .conftest import FAST_RECOVERY, wait_until

RU_KEY = "rucaptcha-key-7a41c09e"
TC_KEY = "twocaptcha-key-5d28b3f6"


@pytest.fixture
def rucaptcha() -> Iterator[Sandbox]:
    """The sandbox playing RuCaptcha: 2Captcha's paths and error shape."""
    with Sandbox(profile="rucaptcha", keys=[RU_KEY]) as sandbox:
        yield sandbox


@pytest.fixture
def twocaptcha() -> Iterator[Sandbox]:
    with Sandbox(profile="twocaptcha", keys=[TC_KEY]) as sandbox:
        yield sandbox


@pytest.fixture
def environ(
    env: dict[str, str],
    tmp_path: Path,
    rucaptcha: Sandbox,
    twocaptcha: Sandbox,
    redis_client: redis.Redis,
) -> dict[str, str]:
    """A RuCaptcha account and a 2Captcha account, each pointed at its sandbox."""
    del redis_client  # flushed for this test
    config = tmp_path / "twins.toml"
    config.write_text(
        FAST_RECOVERY
        + f"""
[accounts.ru]
provider = "rucaptcha"
key_env = "RU_KEY"
rate_limit = "50/second"
api_url = "{rucaptcha.url}"
[accounts.tc]
provider = "twocaptcha"
key_env = "TC_KEY"
rate_limit = "50/second"
api_url = "{twocaptcha.url}"
"""
    )
    environ = {k: v for k, v in env.items() if k != "REPORT_FORWARDER_API_URL"}
    environ.update(REPORT_FORWARDER_CONFIG=str(config), RU_KEY=RU_KEY, TC_KEY=TC_KEY)
    return environ


@contextlib.contextmanager
def metered_worker(
    settings: Settings, environ: dict[str, str]
) -> Iterator[tuple[Metrics, Producer]]:
    """An in-process worker whose metrics live in a private registry."""
    metrics = Metrics(CollectorRegistry())
    runtime = Runtime(settings, settings.redis_url, environ, metrics=metrics)
    app = create_app(runtime)
    with start_worker(app, perform_ping_check=False, **worker_options(settings.queue, 4)):
        yield metrics, Producer(settings, runtime.client)
    runtime.client.close()


def reports_total(metrics: Metrics) -> dict[tuple[str, str, str], float]:
    """report_forwarder_reports_total by (outcome, kind, error_code), non-zero only."""
    return {
        (s.labels["outcome"], s.labels["kind"], s.labels["error_code"]): s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == "report_forwarder_reports_total" and s.value
    }


def finished(client: redis.Redis) -> bool:
    """No report pending: each has its terminal outcome, none waits for a retry."""
    return int(client.get(Keys().npending) or -1) == 0


def lines_of(lines: Sequence[Mapping[str, Any]], event: str) -> dict[int, Mapping[str, Any]]:
    """The captured ``event`` lines by task id."""
    return {line["task_id"]: line for line in lines if line["event"] == event}


def test_rucaptcha_account_reaches_report_incorrect_with_its_key(
    environ: dict[str, str], rucaptcha: Sandbox, twocaptcha: Sandbox, redis_client: redis.Redis
) -> None:
    """A RuCaptcha account's reports, image and token, go to /reportIncorrect with its own key
    and are accepted."""
    settings = load_settings(environ=environ)
    assert "rucaptcha" == settings.account("ru").provider.name
    with metered_worker(settings, environ) as (metrics, producer):
        producer.enqueue_many(
            [
                {"taskId": 71, "captchaType": "ImageToTextTask", "account": "ru"},
                {"taskId": 72, "captchaType": "TurnstileTaskProxyless", "account": "ru"},
            ]
        )
        wait_until(lambda: finished(redis_client) and rucaptcha.count() == 2)
        counted = reports_total(metrics)
    assert {71: "/reportIncorrect", 72: "/reportIncorrect"} == {
        r.task_id: r.path for r in rucaptcha.requests()
    }
    assert [{"clientKey": RU_KEY, "taskId": 71}, {"clientKey": RU_KEY, "taskId": 72}] == sorted(
        (json.loads(r.body) for r in rucaptcha.requests()), key=lambda b: b["taskId"]
    )
    assert (2, 0) == (rucaptcha.count(success=True), twocaptcha.count())
    assert {("accepted", "image", ""): 1.0, ("accepted", "token", ""): 1.0} == counted


@pytest.mark.parametrize("account", ["ru", "tc"])
def test_duplicate_report_ends_accepted_after_one_call(
    account: str,
    environ: dict[str, str],
    rucaptcha: Sandbox,
    twocaptcha: Sandbox,
    redis_client: redis.Redis,
) -> None:
    """ERROR_DUPLICATE_REPORT ends the report accepted after one call, with no retry and no
    dead letter; its log line, metric label and stats still name the code."""
    sandbox = {"ru": rucaptcha, "tc": twocaptcha}[account]
    sandbox.add_rule(Rule(task_id=81, error_code="ERROR_DUPLICATE_REPORT"))
    settings = load_settings(environ=environ)
    with (
        structlog.testing.capture_logs() as lines,
        metered_worker(settings, environ) as (metrics, producer),
    ):
        assert "queued" == producer.enqueue(81, "image", account)
        wait_until(lambda: finished(redis_client) and 81 in lines_of(lines, "report.accepted"))
        counted = reports_total(metrics)
    assert 1 == sandbox.count(task_id=81)
    assert "ERROR_DUPLICATE_REPORT" == sandbox.requests()[0].error_code  # as the API answered
    assert [] == stream_entries(redis_client, Keys().dead)
    assert {} == lines_of(lines, "report.retrying") == lines_of(lines, "report.dead_lettered")
    accepted = lines_of(lines, "report.accepted")[81]
    assert ("ERROR_DUPLICATE_REPORT", account, 1) == (
        accepted["error_code"],
        accepted["account"],
        accepted["attempt"],
    )
    assert {("accepted", "image", "ERROR_DUPLICATE_REPORT"): 1.0} == counted
    stats = CliRunner().invoke(main, ["stats", "--json"], env=environ)
    window = json.loads(stats.stdout)["throughput"]["1m"]
    assert (1, {"ERROR_DUPLICATE_REPORT": 1}) == (
        window["by_outcome"].get("accepted"),
        window["by_error_code"],
    )


@pytest.mark.parametrize("account", ["ru", "tc"])
def test_report_not_recorded_is_dead_lettered_under_its_code(
    account: str,
    environ: dict[str, str],
    rucaptcha: Sandbox,
    twocaptcha: Sandbox,
    redis_client: redis.Redis,
) -> None:
    """ERROR_REPORT_NOT_RECORDED dead-letters the report `rejected` after one call, with no
    retry and no pause of the account; the dead letter, log line, metric label and stats
    name the code."""
    sandbox = {"ru": rucaptcha, "tc": twocaptcha}[account]
    sandbox.add_rule(Rule(task_id=91, error_code="ERROR_REPORT_NOT_RECORDED"))
    settings = load_settings(environ=environ)
    with (
        structlog.testing.capture_logs() as lines,
        metered_worker(settings, environ) as (metrics, producer),
    ):
        producer.enqueue_many([(91, "RecaptchaV2Task", account), (92, "image", account)])
        wait_until(lambda: finished(redis_client) and sandbox.count() == 2)
        counted = reports_total(metrics)
    assert (1, 1) == (sandbox.count(task_id=91), sandbox.count(task_id=92, success=True))
    ((_, letter),) = stream_entries(redis_client, Keys().dead)
    assert (b"91", account.encode(), b"rejected", b"ERROR_REPORT_NOT_RECORDED", b"1") == (
        letter[b"task_id"],
        letter[b"account"],
        letter[b"reason"],
        letter[b"error_code"],
        letter[b"attempts"],
    )
    assert {} == lines_of(lines, "report.retrying")
    dead = lines_of(lines, "report.dead_lettered")[91]
    assert ("rejected", "ERROR_REPORT_NOT_RECORDED") == (dead["reason"], dead["error_code"])
    assert {
        ("rejected", "token", "ERROR_REPORT_NOT_RECORDED"): 1.0,
        ("accepted", "image", ""): 1.0,  # the account is not paused: its next report goes
    } == counted
    stats = CliRunner().invoke(main, ["stats", "--json"], env=environ)
    document = json.loads(stats.stdout)
    assert {"ERROR_REPORT_NOT_RECORDED": 1} == document["throughput"]["1m"]["by_error_code"]
    assert {"rejected": 1} == document["dead_letters"]["by_reason"]
