"""A password (or a query value) in an API URL is never shown: check-config (text and JSON),
accounts list, the outcome log lines' ``endpoint`` and the settings' error messages show
``user:****@host`` and ``?name=****``, as Redis URLs are shown. A query or a fragment is
refused (the endpoint's path is appended to the URL): one line, masked, exit 2."""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import structlog
from click.testing import CliRunner
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from worker.cli import main
from worker.errors import ConfigError
from worker.settings import Settings, load_settings
from worker.settings.quoting import masked_url
from worker.testing.sandbox import Sandbox

from .clirun import run_cli
from .conftest import FAST_RECOVERY, running_worker, wait_until

PREFIX = "Qx7PW"  # a password's distinctive start: no other word of the output holds it
passwords = st.text(string.ascii_letters + string.digits + "-._~!$*+,;=:", max_size=20).map(
    lambda tail: PREFIX + tail
)


def _with_userinfo(url: str, password: str, user: str = "ops") -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{user}:{password}@{rest}"


def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


@given(password=passwords, as_json=st.booleans())
@hypothesis_settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_check_config_masks_a_password_in_the_api_url(
    env: dict[str, str], sandbox: Sandbox, password: str, as_json: bool
) -> None:
    """check-config, text or JSON, shows REPORT_FORWARDER_API_URL's user and ``****``, never
    its password."""
    url = _with_userinfo(sandbox.url, password)
    args = ["check-config", "--json"] if as_json else ["check-config"]
    code, out, err = _cli(env | {"REPORT_FORWARDER_API_URL": url}, *args)
    assert 0 == code, err
    assert PREFIX not in out + err
    shown = _with_userinfo(sandbox.url, "****")
    if as_json:
        assert shown == json.loads(out)["accounts"]["default"]["base_url"]
    else:
        assert f"'base_url': '{shown}'" in out


def test_an_accounts_api_url_password_is_masked_in_check_config_and_accounts(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    """An account's api_url in the config file with a password is shown with it masked by
    check-config and by accounts list --json."""
    del redis_client  # flushed
    path = tmp_path / "c.toml"
    path.write_text(
        '[accounts.other]\nprovider = "capmonster"\nkey_env = "OTHER_KEY"\n'
        'rate_limit = "1/s"\n'
        f'api_url = "http://u:{PREFIX}a@127.0.0.1:1/api"\n'
    )
    environ = env | {"REPORT_FORWARDER_CONFIG": str(path), "REPORT_FORWARDER_API_URL": ""}
    for args in (["check-config"], ["check-config", "--json"], ["accounts", "list", "--json"]):
        code, out, err = _cli(environ, *args)
        assert 0 == code, err
        assert PREFIX not in out + err
        assert "http://u:****@127.0.0.1:1/api" in out


@pytest.mark.parametrize(
    ("toml", "var", "key", "shown"),
    [
        (
            '[accounts.other]\nprovider = "capmonster"\nkey_env = "OTHER_KEY"\n'
            'rate_limit = "1/s"\napi_url = "http://u:{pw}a@127.0.0.1:1/api?key={pw}b&v=2"\n',
            "",
            "accounts.other.api_url",
            "'http://u:****@127.0.0.1:1/api?key=****&v=****'",
        ),
        (
            '[providers.capmonster]\nbase_url = "https://127.0.0.1:1/x#{pw}"\n',
            "",
            "providers.capmonster.base_url",
            "'https://127.0.0.1:1/x#****'",
        ),
        (
            "",
            "https://ops:{pw}@127.0.0.1:1/x?{pw}",
            "api_url_override",
            "'https://ops:****@127.0.0.1:1/x?****' (from REPORT_FORWARDER_API_URL)",
        ),
    ],
)
def test_check_config_refuses_a_query_or_fragment_in_one_masked_line(
    env: dict[str, str], tmp_path: Path, toml: str, var: str, key: str, shown: str
) -> None:
    """check-config, in-process and as a real subprocess, refuses an API URL with a query
    or a fragment: exit 2, one line on stderr naming the key, the URL masked, what is
    accepted, no password or query value."""
    path = tmp_path / "c.toml"
    path.write_text(toml.format(pw=PREFIX))
    environ = env | {
        "REPORT_FORWARDER_CONFIG": str(path),
        "REPORT_FORWARDER_API_URL": var.format(pw=PREFIX),
    }
    in_process = _cli(environ, "check-config")
    real = run_cli(environ, "check-config")
    for code, out, err in (in_process, (real.returncode, real.stdout, real.stderr)):
        lines = err.splitlines()
        assert (2, 1) == (code, len(lines)), err
        assert lines[0].startswith(f"error: {key} = {shown}: expected an http:// or https:// URL")
        assert "is not accepted" in lines[0]
        assert PREFIX not in out + err


@pytest.mark.parametrize(
    ("toml", "var"),
    [
        ('[accounts.default]\napi_url = "ftp://u:{pw}@127.0.0.1/"\n', ""),
        ('[providers.capmonster]\nbase_url = "ftp://u:{pw}@127.0.0.1/"\n', ""),
        ("", "ftp://u:{pw}@127.0.0.1/"),
    ],
)
def test_a_refused_api_url_is_named_with_its_password_masked(
    tmp_path: Path, toml: str, var: str
) -> None:
    """A refused api_url, base_url or REPORT_FORWARDER_API_URL is quoted in the error with
    its password masked."""
    path = tmp_path / "c.toml"
    path.write_text(toml.format(pw=PREFIX + "z"))
    environ = {"REPORT_FORWARDER_CONFIG": str(path), "REPORT_FORWARDER_API_URL": ""}
    if var:
        environ["REPORT_FORWARDER_API_URL"] = var.format(pw=PREFIX + "z")
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=environ)
    assert "ftp://u:****@127.0.0.1/" in str(caught.value)
    assert PREFIX not in str(caught.value)


def test_a_workers_outcome_lines_show_the_endpoint_with_the_password_masked(
    make_settings: Callable[..., Settings],
    env: dict[str, str],
    sandbox: Sandbox,
    redis_client: redis.Redis,
) -> None:
    """A worker delivering through an API URL with user:password logs ``endpoint`` with the
    password masked, and no log line holds the password."""
    del redis_client  # flushed
    url = _with_userinfo(sandbox.url, PREFIX + "secret")
    environ = env | {"REPORT_FORWARDER_API_URL": url}
    settings = make_settings(FAST_RECOVERY, REPORT_FORWARDER_API_URL=url)
    with structlog.testing.capture_logs() as lines, running_worker(settings, environ) as svc:
        svc.producer.enqueue(1, "image")
        wait_until(lambda: any(line["event"] == "report.accepted" for line in lines))
    (accepted,) = [line for line in lines if line["event"] == "report.accepted"]
    account = settings.accounts["default"]
    path = account.provider.path_for(settings.captcha_types.resolve("image"))
    assert f"{_with_userinfo(sandbox.url, '****')}{path}" == accepted["endpoint"]
    assert PREFIX not in repr(lines)
    assert 1 == sandbox.count(task_id=1)


@given(user=st.sampled_from(["", "ops"]), password=passwords, query=st.lists(passwords, max_size=3))
def test_masked_url_never_holds_a_password_or_query_value(
    user: str, password: str, query: list[str]
) -> None:
    """masked_url() leaves no password and no query value of an http URL, and keeps the
    host."""
    url = f"https://{user}:{password}@api.example:8443/p" + (
        "?" + "&".join(f"k{i}={v}" for i, v in enumerate(query)) if query else ""
    )
    shown = masked_url(url)
    assert PREFIX not in shown
    assert f"https://{user}:****@api.example:8443/p" == shown.split("?")[0]
