"""API URLs through the loader (worker/settings/api_url.py): an endpoint's path is appended
to an account's api_url, a provider's base_url or REPORT_FORWARDER_API_URL, so one with a
query or a fragment — or another scheme than http(s), no host, whitespace or a control
character — is a one-line ConfigError naming the key, showing the URL with its secrets
masked and saying what is accepted; user:password@ is allowed, and masked."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from worker.errors import ConfigError
from worker.settings import Settings, load_settings

PREFIX = "Qx7PW"  # a secret's distinctive start: no other word of a message holds it
SAFE = string.ascii_letters + string.digits + "-._~!$*+,;=:"
secrets = st.text(SAFE, max_size=12).map(lambda tail: PREFIX + tail)
# a password as a person may paste it, '/', '?', '#' or '@' unencoded
pasted = st.text(SAFE + "/?#@%", max_size=12).map(lambda tail: PREFIX + tail)
hosts = st.sampled_from(["api.example.test", "127.0.0.1", "[::1]", "xn--bcher-kva.example"])
ports = st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}"))
paths = st.from_regex(r"(/[A-Za-z0-9._~-]{0,10}){0,3}", fullmatch=True)
userinfo = st.one_of(
    st.just(""),
    st.builds(lambda u, p: f"{u}:{p}@", st.sampled_from(["", "ops"]), secrets),
    # a lone token (no ':', which would make it user:password, the user shown)
    st.text(SAFE.replace(":", ""), max_size=12).map(lambda tail: f"{PREFIX}{tail}@"),
)
# a query or a fragment, any of its values a secret
tails = st.one_of(
    st.lists(secrets, max_size=3).map(
        lambda vs: "?" + "&".join(f"k{i}={v}" for i, v in enumerate(vs))
    ),
    # a bare token (no '=': with one it reads as name=value, and a name is shown)
    st.builds(lambda v: f"?{v}", secrets.filter(lambda v: "=" not in v)),
    st.builds(lambda v: f"#{v}", secrets),
    st.builds(lambda q, f: f"?k={q}#{f}", secrets, secrets),
)
WHERE = {
    "env": ("api_url_override", "REPORT_FORWARDER_API_URL"),
    "account": ("accounts.default.api_url", None),
    "provider": ("providers.capmonster.base_url", None),
}


def _load(where: str, url: str, tmp_path: Path) -> Settings:
    """Settings with ``url`` as REPORT_FORWARDER_API_URL, the default account's api_url or
    the capmonster provider's base_url."""
    if where == "env":
        return load_settings(environ={"REPORT_FORWARDER_API_URL": url})
    section = (
        "[accounts.default]\napi_url" if where == "account" else "[providers.capmonster]\nbase_url"
    )
    path = tmp_path / "c.toml"
    path.write_text(f"{section} = {json.dumps(url)}\n", encoding="utf-8")
    return load_settings(environ={"REPORT_FORWARDER_CONFIG": str(path)})


def _refusal(where: str, url: str, tmp_path: Path) -> str:
    """The message of the ConfigError loading ``url`` there, checked to be one line naming
    the key (and the variable), saying what is accepted, and holding no secret."""
    with pytest.raises(ConfigError) as caught:
        _load(where, url, tmp_path)
    message = str(caught.value)
    key, var = WHERE[where]
    assert message.startswith(f"{key} = "), message
    assert var is None or f"(from {var})" in message
    assert "an http:// or https:// URL: host, optional :port and /path prefix" in message
    assert "\n" not in message
    assert "\r" not in message
    assert PREFIX not in message
    return message


@hsettings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    where=st.sampled_from(sorted(WHERE)),
    scheme=st.sampled_from(["http", "https"]),
    user=userinfo,
    host=hosts,
    port=ports,
    path=paths,
    tail=tails,
)
def test_a_query_or_fragment_is_refused_in_one_masked_line(
    tmp_path: Path, where: str, scheme: str, user: str, host: str, port: str, path: str, tail: str
) -> None:
    """An API URL with a query or a fragment is refused, the key named, the URL shown with
    its password and query values masked, and the query or fragment named as the fault."""
    message = _refusal(where, f"{scheme}://{user}{host}{port}{path}{tail}", tmp_path)
    assert ("a query (?...)" if tail.startswith("?") else "a fragment (#...)") in message
    assert host in message or "..." in message  # the shown URL may be cut, never a secret


@hsettings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(sorted(WHERE)), password=pasted, host=hosts, path=paths)
def test_a_pasted_password_with_url_characters_is_refused_unshown(
    tmp_path: Path, where: str, password: str, host: str, path: str
) -> None:
    """A password pasted with '/', '?', '#' or '@' unencoded, which no parse reads as one,
    is refused (or, when it parses as a password, accepted) without any of it shown."""
    url = f"https://ops:{password}@{host}{path}"
    try:
        shown = _load(where, url, tmp_path).accounts["default"].shown_base_url
    except ConfigError as exc:
        shown = refused = str(exc)
    else:
        refused = ""
    assert PREFIX not in shown
    assert "\n" not in shown
    assert refused or set(password) <= set(SAFE + "%")


BAD = [
    ("ftp://api.example.test/", "the scheme must be http:// or https://"),
    ("HTTPS://api.example.test", "the scheme must be http:// or https://"),
    ("api.example.test", "the scheme must be http:// or https://"),
    ("javascript:alert(1)", "the scheme must be http:// or https://"),
    ("http://", "it names no host"),
    ("https:///api", "it names no host"),
    ("http://:8080/api", "it names no host"),
    ("http://ops:{pw}@/api", "it names no host"),
    ("http://api.example.test:99999/", "its port is not a number from 1 to 65535"),
    ("http://api.example.test:port/", "its port is not a number from 1 to 65535"),
    ("http://api.example.test:0/", "its port is not a number from 1 to 65535"),
    ("http://[::1/api", "not a URL"),
    ("http://api.example.test/a@b", "an '@' outside user:password@"),
    ("http://ops:a@b@api.example.test/", "an '@' outside user:password@"),
]


@pytest.mark.parametrize(("url", "says"), BAD)
@pytest.mark.parametrize("where", sorted(WHERE))
def test_another_scheme_no_host_or_a_bad_port_is_refused(
    tmp_path: Path, where: str, url: str, says: str
) -> None:
    """A scheme other than http(s), no host, a port that is not one, an '@' in the path:
    refused in one line saying which."""
    assert says in _refusal(where, url.format(pw=PREFIX + "pw"), tmp_path)


@hsettings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    where=st.sampled_from(sorted(WHERE)),
    path=paths,
    at=st.integers(0, 1000),
    bad=st.sampled_from(
        [" ", "\t", "\n", "\r", "\x00", "\x1b", "\x7f", "\u2028", "\u202e", "\x85"]
    ),
    user=userinfo,
)
def test_whitespace_or_a_control_character_is_refused(
    tmp_path: Path, where: str, path: str, at: int, bad: str, user: str
) -> None:
    """Whitespace or a control character anywhere in an API URL is refused in one line,
    the character escaped in the URL shown, no secret in it."""
    url = f"https://{user}api.example.test{path}"
    cut = len("https://") + at % (len(url) - len("https://") + 1)
    message = _refusal(where, url[:cut] + bad + url[cut:], tmp_path)
    assert "whitespace or a control character" in message
    assert bad == " " or bad not in message


@hsettings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    where=st.sampled_from(sorted(WHERE)),
    scheme=st.sampled_from(["http", "https"]),
    user=userinfo,
    host=hosts,
    port=ports,
    path=paths,
)
def test_host_port_path_and_userinfo_are_accepted_and_masked(
    tmp_path: Path, where: str, scheme: str, user: str, host: str, port: str, path: str
) -> None:
    """http(s)://[user:password@]host[:port][/path prefix] loads as the account's base URL,
    shown with the password masked."""
    url = f"{scheme}://{user}{host}{port}{path}"
    settings = _load(where, url, tmp_path)
    account = settings.accounts["default"]
    assert url == account.base_url
    assert PREFIX not in account.shown_base_url
