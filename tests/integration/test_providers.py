"""Same queue, any provider: CapMonster, Anti-Captcha and 2Captcha accounts side by side."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from worker.cli import main
from worker.errors import ReportError
from worker.producer import Producer
from worker.settings import load_settings
from worker.store.keys import Keys
from worker.testing.sandbox import Rule, Sandbox

from ..redis_bytes import as_bytes, stream_entries
from .conftest import FAST_RECOVERY, running_worker, wait_until

KEYS = {"cm": "capmonster-key-1111", "ac": "anticaptcha-key-2222", "tc": "twocaptcha-key-3333"}


@pytest.fixture
def apis() -> Iterator[dict[str, Sandbox]]:
    """One sandbox per provider, each playing that provider's paths and error shapes."""
    sandboxes = {
        "cm": Sandbox(profile="capmonster").start(),
        "ac": Sandbox(profile="anticaptcha").start(),
        "tc": Sandbox(profile="twocaptcha").start(),
    }
    yield sandboxes
    for sandbox in sandboxes.values():
        sandbox.stop()


@pytest.fixture
def three_accounts(
    apis: dict[str, Sandbox], env: dict[str, str], tmp_path: Path, redis_client: redis.Redis
) -> Callable[[], dict[str, str]]:
    del redis_client
    config = tmp_path / "three.toml"
    config.write_text(
        FAST_RECOVERY
        + f"""
[accounts.cm]
provider = "capmonster"
key_env = "CM_KEY"
rate_limit = "50/second"
api_url = "{apis["cm"].url}"
[accounts.ac]
provider = "anticaptcha"
key_env = "AC_KEY"
rate_limit = "7/second"
api_url = "{apis["ac"].url}"
[accounts.tc]
provider = "twocaptcha"
key_env = "TC_KEY"
rate_limit = "30/second"
deadline_s = 120
api_url = "{apis["tc"].url}"
"""
    )
    environ = {k: v for k, v in env.items() if k != "REPORT_FORWARDER_API_URL"}
    environ.update(
        REPORT_FORWARDER_CONFIG=str(config),
        CM_KEY=KEYS["cm"],
        AC_KEY=KEYS["ac"],
        TC_KEY=KEYS["tc"],
    )
    return lambda: environ


def test_one_worker_forwards_three_providers_each_to_its_endpoint_with_its_key(
    three_accounts: Callable[[], dict[str, str]],
    apis: dict[str, Sandbox],
    redis_client: redis.Redis,
) -> None:
    """The same worker sends each account's reports to its provider's endpoint, with its own
    key, deadline and limit; each provider's error shape is classified the same way."""
    environ = three_accounts()
    settings = load_settings(environ=environ)
    assert (300, 60, 120) == tuple(settings.accounts[a].deadline_s for a in ("cm", "ac", "tc"))
    apis["ac"].add_rule(Rule(task_id=13, error_code="ERROR_NO_SUCH_CAPCHA_ID"))  # errorId 16
    items = [
        {"taskId": 1, "captchaType": "ImageToTextTask", "account": "cm"},
        {"taskId": 2, "captchaType": "TurnstileTask", "account": "cm"},
        {"taskId": 11, "captchaType": "ImageToTextTask", "account": "ac"},
        {"taskId": 12, "captchaType": "RecaptchaV3TaskProxyless", "account": "ac"},
        {"taskId": 13, "captchaType": "HCaptchaTask", "account": "ac"},
        {"taskId": 21, "captchaType": "image", "account": "tc"},
        {"taskId": 22, "captchaType": "GeeTestTask", "account": "tc"},
    ]
    with running_worker(settings, environ) as svc:
        result = svc.producer.enqueue_many(items)
        assert (7, []) == (result.queued, result.refused)
        wait_until(lambda: sum(s.count() for s in apis.values()) == 7)
        wait_until(lambda: int(redis_client.get(Keys().npending) or 0) == 0)
    seen = {name: {r.task_id: r for r in s.requests()} for name, s in apis.items()}
    assert {1: "/reportIncorrectImageCaptcha", 2: "/reportIncorrectTokenCaptcha"} == {
        t: r.path for t, r in seen["cm"].items()
    }
    assert {
        11: "/reportIncorrectImageCaptcha",
        12: "/reportIncorrectRecaptcha",
        13: "/reportIncorrectHcaptcha",
    } == {t: r.path for t, r in seen["ac"].items()}
    assert {21: "/reportIncorrect", 22: "/reportIncorrect"} == {
        t: r.path for t, r in seen["tc"].items()
    }
    for name, requests in seen.items():
        for task_id, request in requests.items():
            assert {"clientKey": KEYS[name], "taskId": task_id} == json.loads(request.body)
    ((_, letter),) = stream_entries(redis_client, Keys().dead)
    assert (b"13", b"ac", b"rejected", b"ERROR_NO_SUCH_CAPCHA_ID") == (
        letter[b"task_id"],
        letter[b"account"],
        letter[b"reason"],
        letter[b"error_code"],
    )
    stats = CliRunner().invoke(main, ["stats", "--json"], env=environ)
    accounts = json.loads(stats.stdout)["accounts"]
    assert ("capmonster", "7/second", "twocaptcha") == (
        accounts["cm"]["provider"],
        accounts["ac"]["rate_limit"],
        accounts["tc"]["provider"],
    )


@pytest.mark.parametrize(
    ("ctype", "family"),
    [
        ("TurnstileTask", "turnstile"),
        ("GeeTestTask", "geetest"),
        ("token", "token"),
        ("FunCaptchaTaskProxyless", "funcaptcha"),
    ],
)
def test_type_the_provider_cannot_report_is_refused_at_enqueue(
    three_accounts: Callable[[], dict[str, str]], redis_client: redis.Redis, ctype: str, family: str
) -> None:
    """A token type Anti-Captcha has no endpoint for is refused for the Anti-Captcha account,
    naming the provider and what it can report; nothing is queued."""
    producer = Producer(load_settings(environ=three_accounts()))
    with pytest.raises(ReportError) as info:
        producer.enqueue(5, ctype, "ac")
    message = str(info.value)
    assert f"account 'ac' (provider 'anticaptcha') cannot report captchaType '{ctype}'" in message
    assert f"no endpoint for '{family}' reports" in message
    assert "hcaptcha, image, recaptcha" in message
    assert [] == redis_client.keys("*")
    assert "queued" == producer.enqueue(5, ctype, "tc")  # 2Captcha takes every kind
    producer.client.close()


def test_cli_account_option_and_bulk_account_field(
    three_accounts: Callable[[], dict[str, str]], redis_client: redis.Redis
) -> None:
    """`--account` picks the account on the CLI; an `account` field picks it per bulk line."""
    environ = three_accounts()
    result = CliRunner().invoke(main, ["enqueue", "7", "image", "--account", "tc"], env=environ)
    assert 0 == result.exit_code, result.output
    lines = (
        '{"taskId": 8, "captchaType": "image", "account": "ac"}\n'
        '{"taskId": 9, "captchaType": "image"}\n'
    )
    result = CliRunner().invoke(
        main, ["enqueue", "-f", "-", "--account", "cm"], input=lines, env=environ
    )
    assert 0 == result.exit_code, result.output
    stored = {as_bytes(k).decode() for k in redis_client.keys("rf:r:*")}
    assert {"rf:r:tc:7", "rf:r:ac:8", "rf:r:cm:9"} == stored
