"""The checked-in provider profiles (config/providers.toml) say what each provider documents:
its host, its report deadline, and what its own answers mean."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.delivery.upstream import classify
from worker.settings import Settings, builtin_providers, load_settings
from worker.store.vocabulary import OTHER

RUCAPTCHA_ACCOUNT = """
[accounts.ru]
provider = "rucaptcha"
key_env = "RU_KEY"
rate_limit = "10/second"
"""


def with_config(tmp_path: Path, text: str) -> Settings:
    """Settings loaded from the checked-in defaults plus a file holding ``text``."""
    path = tmp_path / "forwarder.toml"
    path.write_text(text, encoding="utf-8")
    return load_settings(environ={"REPORT_FORWARDER_CONFIG": str(path)})


def api_error(code: str) -> bytes:
    return b'{"errorId": 1, "errorCode": "%s"}' % code.encode()


def test_each_profile_deadline_is_what_its_provider_documents() -> None:
    """Anti-Captcha 60 s, CapMonster 300 s, 2Captcha and RuCaptcha 900 s (15 minutes)."""
    providers = builtin_providers()
    assert {"capmonster": 300, "anticaptcha": 60, "twocaptcha": 900, "rucaptcha": 900} == {
        name: provider.deadline_s for name, provider in providers.items()
    }


def test_rucaptcha_is_twocaptchas_api_on_its_own_host() -> None:
    """The rucaptcha profile has 2Captcha's endpoints, codes and deadline on api.rucaptcha.com."""
    providers = builtin_providers()
    ru, two = providers["rucaptcha"], providers["twocaptcha"]
    assert ("https://api.rucaptcha.com", "https://api.2captcha.com") == (ru.base_url, two.base_url)
    assert (two.endpoints, two.error_codes, two.deadline_s) == (
        ru.endpoints,
        ru.error_codes,
        ru.deadline_s,
    )


def test_rucaptcha_account_needs_no_url(tmp_path: Path) -> None:
    """An account naming provider "rucaptcha" reports every kind to api.rucaptcha.com's
    reportIncorrect; an api_url still overrides the host."""
    settings = with_config(tmp_path, RUCAPTCHA_ACCOUNT)
    types = settings.captcha_types
    account = settings.account("ru")
    assert ("rucaptcha", "https://api.rucaptcha.com") == (account.provider.name, account.base_url)
    assert {"https://api.rucaptcha.com/reportIncorrect"} == {
        account.endpoint_for(types.resolve(name))
        for name in ("ImageToTextTask", "RecaptchaV2Task", "TurnstileTask", "GeeTestTask")
    }
    moved = with_config(tmp_path, RUCAPTCHA_ACCOUNT + 'api_url = "https://ru.example.test"\n')
    image = types.resolve("image")
    assert "https://ru.example.test/reportIncorrect" == moved.account("ru").endpoint_for(image)


@pytest.mark.parametrize(
    ("account_deadline", "expected"),
    [
        (None, 300),  # delivery.report_deadline_s, the default
        (600, 600),
        (900, 900),
        (3600, 900),  # capped: after 15 minutes 2Captcha answers ERROR_REPORT_NOT_RECORDED
    ],
)
@pytest.mark.parametrize("provider", ["twocaptcha", "rucaptcha"])
def test_twocaptcha_account_deadline_is_capped_at_15_minutes(
    tmp_path: Path, provider: str, account_deadline: int | None, expected: int
) -> None:
    """A 2Captcha or RuCaptcha account's deadline is its own (or the default 300 s), at most
    the profile's 900 s."""
    text = RUCAPTCHA_ACCOUNT.replace('"rucaptcha"', f'"{provider}"')
    if account_deadline is not None:
        text += f"deadline_s = {account_deadline}\n"
    assert expected == with_config(tmp_path, text).account("ru").deadline_s


@pytest.mark.parametrize("provider", ["twocaptcha", "rucaptcha"])
def test_duplicate_report_is_accepted_and_keeps_its_code(provider: str) -> None:
    """ERROR_DUPLICATE_REPORT (the provider has this report already) classifies as accepted,
    its code kept on the outcome so logs, metrics and stats show it."""
    codes = builtin_providers()[provider].error_codes
    outcome = classify(200, api_error("ERROR_DUPLICATE_REPORT"), error_codes=codes)
    assert ("accepted", "ERROR_DUPLICATE_REPORT") == (outcome.status, outcome.error_code)


@pytest.mark.parametrize("provider", ["twocaptcha", "rucaptcha"])
def test_report_not_recorded_is_rejected_under_its_own_code(provider: str) -> None:
    """ERROR_REPORT_NOT_RECORDED (the provider refused the report) classifies as rejected,
    under its own code, not `other`."""
    codes = builtin_providers()[provider].error_codes
    outcome = classify(200, api_error("ERROR_REPORT_NOT_RECORDED"), error_codes=codes)
    assert ("rejected", "ERROR_REPORT_NOT_RECORDED") == (outcome.status, outcome.error_code)


@pytest.mark.parametrize("provider", ["capmonster", "anticaptcha"])
def test_twocaptcha_codes_mean_nothing_special_elsewhere(provider: str) -> None:
    """From a provider that does not document them, the two codes are an unknown error:
    rejected, labelled `other`; a duplicate is never taken for success."""
    codes = builtin_providers()[provider].error_codes
    for code in ("ERROR_DUPLICATE_REPORT", "ERROR_REPORT_NOT_RECORDED"):
        outcome = classify(200, api_error(code), error_codes=codes)
        assert ("rejected", OTHER) == (outcome.status, outcome.error_code)


def test_sandbox_command_plays_every_profile() -> None:
    """`report-forwarder sandbox --profile` offers exactly the sandbox's profiles: `any` and
    one per checked-in provider, rucaptcha included."""
    import click

    from worker.cli import main
    from worker.testing.sandbox_profiles import PROFILES

    command = main.commands["sandbox"]
    (choice,) = (p.type for p in command.params if p.name == "profile")
    assert isinstance(choice, click.Choice)
    assert {"any", *builtin_providers()} == set(choice.choices) == set(PROFILES)
