"""worker.settings: checked-in defaults < REPORT_FORWARDER_CONFIG file < environment."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from worker.errors import ConfigError, ReportError
from worker.settings import Account, RateLimit, Settings, client_key, load_settings

CLIENT_KEY = "cm-key-3b8f1e6a2d9c4705-secret"
CAPMONSTER = "https://api.capmonster.cloud"

SECOND_ACCOUNT = """
[accounts.second]
provider = "capmonster"
key_env = "SECOND_CLIENT_KEY"
rate_limit = "5/second"
api_url = "https://second.example.test"
"""


def config_file(tmp_path: Path, text: str, name: str = "forwarder.toml") -> Path:
    """Write ``text`` to a TOML file under ``tmp_path`` and return its path."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def with_config(tmp_path: Path, text: str, **env: str) -> Settings:
    """Settings loaded with REPORT_FORWARDER_CONFIG pointing at a file holding ``text``."""
    environ = {"REPORT_FORWARDER_CONFIG": str(config_file(tmp_path, text)), **env}
    return load_settings(environ=environ)


# --- defaults -------------------------------------------------------------------------------


def test_defaults_from_checked_in_tables() -> None:
    """With an empty environment the documented defaults apply."""
    s = load_settings(environ={})

    assert 300 == s.report_deadline_s
    assert 600 == s.account_pause_s
    assert "" == s.redis_url
    assert s.embedded_redis is True
    assert "auto" == s.log_format
    assert "reports" == s.queue
    assert 10 == s.max_attempts
    assert ("built-in defaults",) == s.sources


def test_default_account_is_capmonster_at_50_per_second() -> None:
    """The default account: capmonster profile, 50/second, key read from CAPMONSTER_CLIENT_KEY."""
    account = load_settings(environ={}).account("default")

    assert "capmonster" == account.provider.name
    assert RateLimit(amount=50, period_s=1.0) == account.rate_limit
    assert "50/second" == str(account.rate_limit)
    assert "CAPMONSTER_CLIENT_KEY" == account.key_env
    assert CAPMONSTER == account.base_url
    assert 300 == account.deadline_s


def test_default_endpoints_follow_design() -> None:
    """Image types go to reportIncorrectImageCaptcha, token types to reportIncorrectTokenCaptcha."""
    s = load_settings(environ={})
    account = s.account("default")

    image = account.endpoint_for(s.captcha_types.resolve("ImageToTextTask"))
    token = account.endpoint_for(s.captcha_types.resolve("RecaptchaV2Task"))

    assert f"{CAPMONSTER}/reportIncorrectImageCaptcha" == image
    assert f"{CAPMONSTER}/reportIncorrectTokenCaptcha" == token


def test_default_home_is_per_user_state_folder(tmp_path: Path) -> None:
    """Without REPORT_FORWARDER_HOME, state lives in $XDG_STATE_HOME/report-forwarder."""
    s = load_settings(environ={"XDG_STATE_HOME": str(tmp_path)})

    assert tmp_path / "report-forwarder" == s.home


def test_unknown_account_is_a_report_error() -> None:
    """Asking for an account that is not configured raises ReportError naming the known ones."""
    s = load_settings(environ={})

    with pytest.raises(ReportError, match=r"'nobody'.*default"):
        s.account("nobody")


def test_settings_are_frozen() -> None:
    """Settings cannot be changed after loading."""
    s = load_settings(environ={})

    with pytest.raises(dataclasses.FrozenInstanceError):
        s.report_deadline_s = 1  # type: ignore[misc]  # the assignment the test expects refused


# --- environment overrides (README, Configuration) ---------------------------------------


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6390/2", "rediss://user:pw@redis.example.test:6380/0", "unix:///r.s"]
)
def test_redis_url_from_env(url: str) -> None:
    """REDIS_URL sets the Redis URL and turns the embedded server off."""
    s = load_settings(environ={"REDIS_URL": url})

    assert url == s.redis_url
    assert s.embedded_redis is False


def test_api_url_env_overrides_every_account(tmp_path: Path) -> None:
    """REPORT_FORWARDER_API_URL replaces the base URL of every account, even one with api_url."""
    s = with_config(tmp_path, SECOND_ACCOUNT, REPORT_FORWARDER_API_URL="http://127.0.0.1:8765")

    assert {"default", "second"} == set(s.accounts)
    for account in s.accounts.values():
        assert "http://127.0.0.1:8765" == account.base_url
    token = s.captcha_types.resolve("HCaptchaTask")
    assert "http://127.0.0.1:8765/reportIncorrectTokenCaptcha" == s.account("second").endpoint_for(
        token
    )


def test_account_api_url_used_without_env_override(tmp_path: Path) -> None:
    """Without REPORT_FORWARDER_API_URL, an account's own api_url is its base URL."""
    s = with_config(tmp_path, SECOND_ACCOUNT)

    assert "https://second.example.test" == s.account("second").base_url
    assert CAPMONSTER == s.account("default").base_url


def test_config_file_adds_account(tmp_path: Path) -> None:
    """An account added by the REPORT_FORWARDER_CONFIG file sits next to the default one."""
    s = with_config(tmp_path, SECOND_ACCOUNT)

    second = s.account("second")
    assert "capmonster" == second.provider.name
    assert "SECOND_CLIENT_KEY" == second.key_env
    assert RateLimit(5, 1.0) == second.rate_limit
    assert "CAPMONSTER_CLIENT_KEY" == s.account("default").key_env
    assert str(tmp_path / "forwarder.toml") == s.sources[-1]


def test_config_file_is_deep_merged_over_defaults(tmp_path: Path) -> None:
    """A file setting one key of a table keeps every other default of that table."""
    s = with_config(
        tmp_path, "[delivery]\nmax_attempts = 4\n\n[accounts.default]\nrate_limit = '7/second'\n"
    )

    assert 4 == s.max_attempts
    assert 300 == s.report_deadline_s
    assert 600 == s.account_pause_s
    assert 2.0 == s.backoff_base_s
    default = s.account("default")
    assert RateLimit(7, 1.0) == default.rate_limit
    assert "capmonster" == default.provider.name
    assert "CAPMONSTER_CLIENT_KEY" == default.key_env


def test_config_file_adds_captcha_type(tmp_path: Path) -> None:
    """A `[types]` line in the config file adds a captcha type and keeps the built-in ones."""
    s = with_config(tmp_path, '[types]\nShinyNewTask = "token"\n')

    assert "token" == s.captcha_types.resolve("shinynewtask").kind
    assert "image" == s.captcha_types.resolve("ImageToTextTask").kind


def test_path_argument_loads_that_file(tmp_path: Path) -> None:
    """``load_settings(path)`` reads that file, even when REPORT_FORWARDER_CONFIG names another."""
    path = config_file(tmp_path, "[delivery]\nreport_deadline_s = 120\n")

    s = load_settings(path, environ={"REPORT_FORWARDER_CONFIG": str(tmp_path / "missing.toml")})

    assert 120 == s.report_deadline_s


def test_env_overrides_config_file(tmp_path: Path) -> None:
    """An environment variable wins over the same key in the config file."""
    text = "[delivery]\nreport_deadline_s = 100\naccount_pause_s = 100\n"

    s = with_config(tmp_path, text, REPORT_FORWARDER_REPORT_DEADLINE_S="200")

    assert 200 == s.report_deadline_s
    assert 100 == s.account_pause_s


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_log_format_from_env(fmt: str) -> None:
    """REPORT_FORWARDER_LOG_FORMAT selects json or console logs."""
    assert fmt == load_settings(environ={"REPORT_FORWARDER_LOG_FORMAT": fmt}).log_format


@pytest.mark.parametrize(
    ("value", "expected"),
    [("10/second", RateLimit(10, 1.0)), ("600/minute", RateLimit(600, 60.0))],
)
def test_rate_limit_env_sets_default_account_only(
    tmp_path: Path, value: str, expected: RateLimit
) -> None:
    """REPORT_FORWARDER_RATE_LIMIT sets the default account's limit, not other accounts'."""
    s = with_config(tmp_path, SECOND_ACCOUNT, REPORT_FORWARDER_RATE_LIMIT=value)

    assert expected == s.account("default").rate_limit
    assert RateLimit(5, 1.0) == s.account("second").rate_limit


def test_report_deadline_from_env() -> None:
    """REPORT_FORWARDER_REPORT_DEADLINE_S sets the report deadline (and the accounts' with it)."""
    s = load_settings(environ={"REPORT_FORWARDER_REPORT_DEADLINE_S": "120"})

    assert 120 == s.report_deadline_s
    assert 120 == s.account("default").deadline_s


def test_report_deadline_env_is_capped_by_provider_for_accounts() -> None:
    """A deadline longer than the provider remembers tasks is capped per account (300 s)."""
    s = load_settings(environ={"REPORT_FORWARDER_REPORT_DEADLINE_S": "900"})

    assert 900 == s.report_deadline_s
    assert 300 == s.account("default").deadline_s


def test_account_pause_from_env() -> None:
    """REPORT_FORWARDER_ACCOUNT_PAUSE_S sets how long an account fault pauses the account."""
    assert 30 == load_settings(environ={"REPORT_FORWARDER_ACCOUNT_PAUSE_S": "30"}).account_pause_s


def test_home_from_env(tmp_path: Path) -> None:
    """REPORT_FORWARDER_HOME sets where embedded state lives."""
    s = load_settings(environ={"REPORT_FORWARDER_HOME": str(tmp_path / "state")})

    assert tmp_path / "state" == s.home


def test_home_from_env_expands_user() -> None:
    """A REPORT_FORWARDER_HOME starting with ~ is expanded to the user's home."""
    s = load_settings(environ={"REPORT_FORWARDER_HOME": "~/rf-state"})

    assert Path.home() / "rf-state" == s.home


@pytest.mark.parametrize(
    "var",
    [
        "REDIS_URL",
        "REPORT_FORWARDER_API_URL",
        "REPORT_FORWARDER_CONFIG",
        "REPORT_FORWARDER_LOG_FORMAT",
        "REPORT_FORWARDER_RATE_LIMIT",
        "REPORT_FORWARDER_REPORT_DEADLINE_S",
        "REPORT_FORWARDER_ACCOUNT_PAUSE_S",
    ],
)
def test_empty_env_var_means_default(var: str) -> None:
    """An environment variable set to the empty string is treated as unset."""
    s = load_settings(environ={var: ""})

    default = load_settings(environ={})
    assert default == dataclasses.replace(s, captcha_types=default.captcha_types)
    assert default.captcha_types.names == s.captcha_types.names


# --- RateLimit.parse --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "amount", "period_s"),
    [
        ("50/second", 50, 1.0),
        ("50/s", 50, 1.0),
        ("1/sec", 1, 1.0),
        ("3/seconds", 3, 1.0),
        (" 50 / Second ", 50, 1.0),
        ("50 per second", 50, 1.0),
        ("600/minute", 600, 60.0),
        ("600/min", 600, 60.0),
        ("10/m", 10, 60.0),
        ("100/hour", 100, 3600.0),
        ("5/10s", 5, 10.0),
        ("5/10 seconds", 5, 10.0),
        ("2/5m", 2, 300.0),
        ("50/SECOND", 50, 1.0),
    ],
)
def test_rate_limit_parse_accepted_forms(text: str, amount: int, period_s: float) -> None:
    """Common 'N/period' spellings parse into an amount per window of seconds."""
    assert RateLimit(amount, period_s) == RateLimit.parse(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "50",
        "fast",
        "0/second",
        "-1/second",
        "1.5/second",
        "50/fortnight",
        "50/",
        "/second",
        "50//second",
        "fifty/second",
        "50/second/extra",
        "50/1.5s",
    ],
)
def test_rate_limit_parse_refused_forms(text: str) -> None:
    """Anything that is not a positive 'N/period' is refused with a message quoting it."""
    with pytest.raises(ValueError, match="not a rate limit") as info:
        RateLimit.parse(text)

    assert repr(text) in str(info.value)


@pytest.mark.parametrize("value", [50, None, 1.5, ["50/second"]])
def test_rate_limit_parse_refuses_non_strings(value: object) -> None:
    """A rate limit that is not a string is refused with ValueError."""
    with pytest.raises(ValueError, match="not a rate limit"):
        RateLimit.parse(value)  # type: ignore[arg-type]  # a wrong type on purpose


@pytest.mark.parametrize("text", ["5/0s", "5/0 minutes"])
def test_rate_limit_parse_refuses_zero_length_window(text: str) -> None:
    """A window of zero seconds is refused rather than silently read as one period."""
    with pytest.raises(ValueError, match="not a rate limit"):
        RateLimit.parse(text)


@pytest.mark.parametrize("text", ["50/second", "600/minute", "5/10s", "100/hour"])
def test_rate_limit_str_round_trips(text: str) -> None:
    """``str(limit)`` parses back to the same limit."""
    limit = RateLimit.parse(text)

    assert limit == RateLimit.parse(str(limit))


# --- bad values -> ConfigError naming key, value and env var --------------------------------


@pytest.mark.parametrize(
    ("var", "value", "key"),
    [
        ("REPORT_FORWARDER_REPORT_DEADLINE_S", "abc", "delivery.report_deadline_s"),
        ("REPORT_FORWARDER_REPORT_DEADLINE_S", "5 minutes", "delivery.report_deadline_s"),
        ("REPORT_FORWARDER_REPORT_DEADLINE_S", "nan", "delivery.report_deadline_s"),
        ("REPORT_FORWARDER_REPORT_DEADLINE_S", "inf", "delivery.report_deadline_s"),
        ("REPORT_FORWARDER_REPORT_DEADLINE_S", "0", "delivery.report_deadline_s"),
        ("REPORT_FORWARDER_REPORT_DEADLINE_S", "-300", "delivery.report_deadline_s"),
        ("REPORT_FORWARDER_ACCOUNT_PAUSE_S", "-5", "delivery.account_pause_s"),
        ("REPORT_FORWARDER_ACCOUNT_PAUSE_S", "ten minutes", "delivery.account_pause_s"),
        ("REPORT_FORWARDER_LOG_FORMAT", "xml", "service.log_format"),
        ("REPORT_FORWARDER_LOG_FORMAT", "pretty", "service.log_format"),
        ("REPORT_FORWARDER_RATE_LIMIT", "fast", "accounts.default.rate_limit"),
        ("REPORT_FORWARDER_RATE_LIMIT", "0/second", "accounts.default.rate_limit"),
        ("REPORT_FORWARDER_RATE_LIMIT", "50/fortnight", "accounts.default.rate_limit"),
        ("REDIS_URL", "http://127.0.0.1:6379", "redis.url"),
        ("REDIS_URL", "localhost:6379", "redis.url"),
        ("REPORT_FORWARDER_API_URL", "ftp://api.example.test", "api_url"),
        ("REPORT_FORWARDER_API_URL", "api.capmonster.cloud", "api_url"),
    ],
)
def test_bad_env_value_names_key_value_and_variable(var: str, value: str, key: str) -> None:
    """A bad environment value raises ConfigError naming the setting, the value and the variable."""
    with pytest.raises(ConfigError) as info:
        load_settings(environ={var: value})

    message = str(info.value)
    assert key in message
    assert value in message
    assert var in message


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ('[delivery]\nreport_deadline_s = "soon"\n', "delivery.report_deadline_s", "soon"),
        ("[delivery]\naccount_pause_s = -1\n", "delivery.account_pause_s", "-1"),
        ('[service]\nlog_format = "yaml"\n', "service.log_format", "yaml"),
        ('[redis]\nurl = "memcached://x"\n', "redis.url", "memcached://x"),
        ('[accounts.default]\nrate_limit = "lots"\n', "accounts.default.rate_limit", "lots"),
        ("[accounts.default]\nrate_limit = 50\n", "accounts.default.rate_limit", "50"),
        ('[accounts.default]\nprovider = "nope"\n', "accounts.default.provider", "nope"),
        (
            '[accounts.other]\nprovider = "deathbycaptcha"\nkey_env = "K"\nrate_limit = "1/s"\n',
            "accounts.other.provider",
            "deathbycaptcha",
        ),
        ('[accounts.default]\nkey_env = "not a var"\n', "accounts.default.key_env", "not a var"),
    ],
)
def test_bad_file_value_names_key_and_value(
    tmp_path: Path, text: str, key: str, value: str
) -> None:
    """A bad value in the config file raises ConfigError naming the setting and the value."""
    with pytest.raises(ConfigError) as info:
        with_config(tmp_path, text)

    message = str(info.value)
    assert key in message
    assert value in message


def test_unknown_provider_lists_known_ones(tmp_path: Path) -> None:
    """An unknown provider name is refused with the list of configured providers."""
    with pytest.raises(ConfigError, match="capmonster"):
        with_config(tmp_path, '[accounts.default]\nprovider = "nope"\n')


@pytest.mark.parametrize(
    "text", ["[delivery\nmax_attempts = 3\n", "max_attempts = \n", 'a = "unterminated\n']
)
def test_toml_syntax_error_names_file_and_line(tmp_path: Path, text: str) -> None:
    """A config file that is not valid TOML raises ConfigError naming the file and the line."""
    path = config_file(tmp_path, text)

    with pytest.raises(ConfigError) as info:
        load_settings(environ={"REPORT_FORWARDER_CONFIG": str(path)})

    message = str(info.value)
    assert str(path) in message
    assert "line 1" in message


@pytest.mark.parametrize("name", ["missing.toml", "a-directory"])
def test_unreadable_config_path_names_variable_and_path(tmp_path: Path, name: str) -> None:
    """A REPORT_FORWARDER_CONFIG that cannot be read raises ConfigError naming it and its path."""
    (tmp_path / "a-directory").mkdir()
    path = str(tmp_path / name)

    with pytest.raises(ConfigError) as info:
        load_settings(environ={"REPORT_FORWARDER_CONFIG": path})

    message = str(info.value)
    assert "REPORT_FORWARDER_CONFIG" in message
    assert path in message


ANTI_CAPTCHA = """
[providers.anticaptcha]
base_url = "https://api.anti-captcha.com"
deadline_s = 60
[providers.anticaptcha.endpoints]
image = "/reportIncorrectImageCaptcha"
recaptcha = "/reportIncorrectRecaptcha"
hcaptcha = "/reportIncorrectHcaptcha"
[providers.anticaptcha.error_codes]
ERROR_PROVIDER_BUSY = "transient"

[accounts.anti]
provider = "anticaptcha"
key_env = "ANTICAPTCHA_CLIENT_KEY"
rate_limit = "10/second"
"""


def test_provider_profile_added_by_config_file(tmp_path: Path) -> None:
    """A profile is extended (or a same-shape provider added) by configuration alone."""
    s = with_config(tmp_path, ANTI_CAPTCHA)
    anti = s.account("anti")
    resolve = s.captcha_types.resolve

    assert "anticaptcha" == anti.provider.name
    assert 60 == anti.deadline_s  # the provider forgets tasks sooner than the report deadline
    assert {"ERROR_ACCOUNT_SUSPENDED": "account_fault", "ERROR_PROVIDER_BUSY": "transient"} == dict(
        anti.provider.error_codes
    )  # the built-in profile's codes, plus the file's
    assert "https://api.anti-captcha.com/reportIncorrectRecaptcha" == anti.endpoint_for(
        resolve("NoCaptchaTaskProxyless")
    )
    assert "https://api.anti-captcha.com/reportIncorrectHcaptcha" == anti.endpoint_for(
        resolve("HCaptchaTask")
    )
    assert "https://api.anti-captcha.com/reportIncorrectImageCaptcha" == anti.endpoint_for(
        resolve("ComplexImageTask")
    )
    with pytest.raises(ReportError, match="TurnstileTask"):
        anti.endpoint_for(resolve("TurnstileTask"))


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        (
            '[providers.p]\nbase_url = "ftp://x"\ndeadline_s = 60\n'
            '[providers.p.endpoints]\ntoken = "/r"\n',
            "providers.p.base_url",
            "ftp://x",
        ),
        (
            '[providers.p]\nbase_url = "https://x"\ndeadline_s = 60\n'
            '[providers.p.endpoints]\ntoken = "no-slash"\n',
            "providers.p.endpoints.token",
            "no-slash",
        ),
        (
            '[providers.p]\nbase_url = "https://x"\ndeadline_s = 60\n'
            '[providers.p.endpoints]\ntoken = "/r"\n[providers.p.error_codes]\nERROR_X = "retry"\n',
            "providers.p.error_codes.ERROR_X",
            "retry",
        ),
    ],
)
def test_bad_provider_profile_names_key_and_value(
    tmp_path: Path, text: str, key: str, value: str
) -> None:
    """A bad provider profile in the config file raises ConfigError naming the key and value."""
    with pytest.raises(ConfigError) as info:
        with_config(tmp_path, text)

    message = str(info.value)
    assert key in message
    assert value in message


# --- secrets ----------------------------------------------------------------------------------


def test_settings_never_contain_client_key(tmp_path: Path) -> None:
    """With client keys in the environment, neither repr nor str of the Settings shows them."""
    s = with_config(
        tmp_path,
        SECOND_ACCOUNT,
        CAPMONSTER_CLIENT_KEY=CLIENT_KEY,
        SECOND_CLIENT_KEY="second-" + CLIENT_KEY,
    )

    for text in (repr(s), str(s), repr(s.accounts), repr(s.account("default"))):
        assert CLIENT_KEY not in text


def test_client_key_reads_account_env_var(tmp_path: Path) -> None:
    """``client_key`` returns the value of the variable the account names, per account."""
    s = with_config(tmp_path, SECOND_ACCOUNT)
    environ = {"CAPMONSTER_CLIENT_KEY": CLIENT_KEY, "SECOND_CLIENT_KEY": "second-key"}

    assert CLIENT_KEY == client_key(s.account("default"), environ)
    assert "second-key" == client_key(s.account("second"), environ)


@pytest.mark.parametrize("environ", [{}, {"CAPMONSTER_CLIENT_KEY": ""}, {"OTHER": CLIENT_KEY}])
def test_client_key_is_none_when_unset_or_empty(environ: dict[str, str]) -> None:
    """``client_key`` returns None when the account's variable is unset or empty."""
    account: Account = load_settings(environ={}).account("default")

    assert client_key(account, environ) is None


# --- hostile configuration -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "unknown", "suggestion"),
    [
        ("[delivery]\nmax_atempts = 3\n", "delivery.max_atempts", "delivery.max_attempts"),
        ("[delivry]\nmax_attempts = 3\n", "delivry", "delivery"),
        ("[redis]\nconnect_retry = 1\n", "redis.connect_retry", "redis.connect_retry_s"),
        (
            '[accounts.default]\nrate_limt = "5/second"\n',
            "accounts.default.rate_limt",
            "accounts.default.rate_limit",
        ),
        (
            "[providers.capmonster]\ndeadline = 60\n",
            "providers.capmonster.deadline",
            "providers.capmonster.deadline_s",
        ),
    ],
)
def test_unknown_key_is_refused_naming_the_nearest_valid_one(
    tmp_path: Path, text: str, unknown: str, suggestion: str
) -> None:
    """A key no setting reads (a typo) is a ConfigError naming the file, the key and the
    nearest valid key, instead of being silently ignored."""
    path = config_file(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"REPORT_FORWARDER_CONFIG": str(path)})
    message = str(info.value)
    assert str(path) in message
    assert f"unknown key {unknown!r}" in message
    assert f"did you mean {suggestion!r}?" in message


def test_unknown_key_far_from_any_lists_the_known_ones(tmp_path: Path) -> None:
    """With no near match the message lists the section's keys."""
    with pytest.raises(ConfigError, match=r"known keys in \[worker\]: concurrency, connect"):
        with_config(tmp_path, "[worker]\nzzzzzz = 1\n")


def test_a_section_that_is_not_a_table_is_refused(tmp_path: Path) -> None:
    """`delivery = 5` instead of a [delivery] table is a ConfigError, not a crash."""
    with pytest.raises(ConfigError, match=r"delivery = 5: expected a table \[delivery\]"):
        with_config(tmp_path, "delivery = 5\n")


@pytest.mark.parametrize("value", ["1e9", "1025", "2000000", "0", "1.5"])
def test_concurrency_beyond_the_command_lines_cap_is_refused(tmp_path: Path, value: str) -> None:
    """worker.concurrency is held to the same 1 to 1024 as `worker --concurrency`."""
    with pytest.raises(
        ConfigError, match=r"worker.concurrency = .*: expected an integer from 1 to 1024"
    ):
        with_config(tmp_path, f"[worker]\nconcurrency = {value}\n")


def test_concurrency_at_the_cap_is_accepted(tmp_path: Path) -> None:
    """1024 threads is the largest accepted."""
    assert 1024 == with_config(tmp_path, "[worker]\nconcurrency = 1024\n").concurrency


def test_account_deadline_is_capped_by_the_providers_task_lifetime(tmp_path: Path) -> None:
    """`deadline_s = 100000` on an account is capped at its provider's deadline (after it the
    provider has forgotten the task), like delivery.report_deadline_s; a shorter one stays."""
    s = with_config(
        tmp_path,
        SECOND_ACCOUNT.replace(
            'rate_limit = "5/second"', 'rate_limit = "5/second"\ndeadline_s = 100000'
        )
        + ANTI_CAPTCHA.replace(
            'rate_limit = "10/second"', 'rate_limit = "10/second"\ndeadline_s = 100000'
        )
        + "[accounts.default]\ndeadline_s = 120\n",
    )
    assert 300 == s.account("second").deadline_s
    assert 60 == s.account("anti").deadline_s
    assert 120 == s.account("default").deadline_s


def test_error_codes_that_are_not_a_table_are_refused(tmp_path: Path) -> None:
    """`error_codes = "x"` in a provider profile is a ConfigError naming the key."""
    with pytest.raises(
        ConfigError, match=r"providers.capmonster.error_codes = 'x': expected a table"
    ):
        with_config(tmp_path, '[providers.capmonster]\nerror_codes = "x"\n')


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    """A config file with bytes that are not UTF-8 is a ConfigError naming the file and the
    byte, not a UnicodeDecodeError."""
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[accounts.default]\nkey_env = "CL\xc9"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"REPORT_FORWARDER_CONFIG": str(path)})
    assert str(path) in str(info.value)
    assert "not UTF-8 text (byte 0xc9" in str(info.value)


def test_connect_retry_has_a_default_a_file_key_and_an_env_var(tmp_path: Path) -> None:
    """redis.connect_retry_s: 5 s by default, from the file, or REPORT_FORWARDER_CONNECT_RETRY_S."""
    assert 5.0 == load_settings(environ={}).connect_retry_s
    assert 1.5 == with_config(tmp_path, "[redis]\nconnect_retry_s = 1.5\n").connect_retry_s
    assert 0 == load_settings(environ={"REPORT_FORWARDER_CONNECT_RETRY_S": "0"}).connect_retry_s
    with pytest.raises(ConfigError, match=r"redis\.connect_retry_s"):
        load_settings(environ={"REPORT_FORWARDER_CONNECT_RETRY_S": "-1"})


@pytest.mark.parametrize(
    "url",
    [
        "redis://:99999",
        "redis://127.0.0.1:port/0",
        "redis://h/abc",
        "redis://h/-1",
        "redis://h/" + "9" * 5000,
        "redis://[::1",
        "redis://ho st/0",
        "unix://",
        "garbage",
    ],
)
def test_a_redis_url_that_cannot_name_a_server_is_refused(url: str) -> None:
    """A URL with a bad port, database, host or path is a ConfigError at load time."""
    with pytest.raises(ConfigError, match=r"redis\.url"):
        load_settings(environ={"REDIS_URL": url})


def test_a_refused_redis_url_never_shows_its_password() -> None:
    """The message quotes the URL with the password masked."""
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"REDIS_URL": "redis://:hunter2@h:99999/0"})
    assert "hunter2" not in str(info.value)
    assert "redis://****@h:99999/0" in str(info.value)


@pytest.mark.parametrize(
    "url", ["redis://h", "redis://h:6380/3", "rediss://u:p@h/0", "unix:///tmp/r.sock"]
)
def test_usable_redis_urls_are_accepted(url: str) -> None:
    """Ordinary URLs load unchanged."""
    assert url == load_settings(environ={"REDIS_URL": url}).redis_url
