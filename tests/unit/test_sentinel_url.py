"""Sentinel URLs (docs/design.md §8): parsed into the Sentinels, master name, database and
passwords; refused with a ConfigError naming what is wrong; never shown with a password."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.errors import ConfigError
from worker.settings import load_settings, mask_url
from worker.settings.redis_url import parse_sentinel
from worker.store.connection import broker_options, broker_url

URL = "sentinel://:data-pw@h1:26379;sentinel://h2:26380;sentinel://h3/2?master_name=main"


def test_a_sentinel_url_names_every_sentinel_the_master_the_database_and_the_passwords() -> None:
    target = parse_sentinel(URL + "&sentinel_password=s-pw")
    assert target.sentinels == (("h1", 26379), ("h2", 26380), ("h3", 26379))
    assert target.master_name == "main"
    assert target.db == 2
    assert target.password == "data-pw"
    assert target.sentinel_password == "s-pw"
    assert not target.tls
    assert parse_sentinel(URL.replace("sentinel://", "sentinels://")).tls


def test_kombu_gets_its_own_url_form_and_the_master_name_as_a_transport_option() -> None:
    assert (
        broker_url(URL) == "sentinel://:data-pw@h1:26379/2;sentinel://h2:26380;sentinel://h3:26379"
    )
    options = broker_options(URL + "&sentinel_password=s-pw")
    assert options["master_name"] == "main"
    assert options["sentinel_kwargs"]["password"] == "s-pw"
    assert broker_options("redis://localhost:6379/0") == {}


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sentinel://h1:26379", "master_name=NAME is required"),
        ("sentinel://h1:26379;redis://h2:6379?master_name=m", "same sentinel://"),
        ("sentinel://h1:26379/x?master_name=m", "number such as /0"),
        ("sentinel://h1:26379?master_name=m&color=red", "unknown option 'color'"),
        ("sentinel://h1;sentinel://h1?master_name=m", "listed twice"),
        ("sentinel://:a@h1;sentinel://:b@h2?master_name=m", "different passwords"),
        ("sentinel://h1:99999?master_name=m", "out of range"),
    ],
)
def test_a_bad_sentinel_url_is_a_config_error_saying_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=r"redis\.url") as caught:
        load_settings(environ={"REDIS_URL": url})
    assert says in str(caught.value)
    assert "sentinel://host:port" in str(caught.value)  # and what is accepted


@settings(max_examples=300, deadline=None)
@given(
    # prefixed so that a generated password cannot be a word of the message itself
    # (e.g. "REDIS_" of "from REDIS_URL"): what must not show is the password, not English
    password=st.text(string.ascii_letters + string.digits + "-_.~", min_size=8, max_size=30).map(
        lambda s: "Pw9" + s
    ),
    other=st.text(string.ascii_letters + string.digits, min_size=8, max_size=30).map(
        lambda s: "Sx7" + s
    ),
    hosts=st.integers(min_value=1, max_value=5),
)
def test_no_password_of_a_sentinel_url_is_ever_shown(password: str, other: str, hosts: int) -> None:
    """In every part, in the address or as ?sentinel_password=, masked."""
    parts = [f"sentinel://:{password}@h{n}:2637{n}" for n in range(hosts)]
    url = ";".join(parts) + f"/0?master_name=m&sentinel_password={other}"
    shown = mask_url(url)
    assert password not in shown
    assert other not in shown
    with pytest.raises(ConfigError) as caught:  # a bad one is refused without showing them
        load_settings(environ={"REDIS_URL": url.replace("master_name=m&", "")})
    assert password not in str(caught.value)
    assert other not in str(caught.value)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_hostile_sentinel_urls_get_a_config_error_or_parse_never_a_traceback(tail: str) -> None:
    url = "sentinel://" + tail
    error: ConfigError | None = None
    try:
        settings_ = load_settings(environ={"REDIS_URL": url})
    except ConfigError as exc:
        error = exc
    if error is not None:
        assert "redis.url" in str(error)
    else:
        assert parse_sentinel(settings_.redis_url).master_name
