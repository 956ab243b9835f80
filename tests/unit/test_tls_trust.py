"""Which CA certificates the environment names (worker/settings/tls.py): requests' order,
then OpenSSL's variables, then certifi; whatever a variable holds, the answer is a Trust
or a one-line ConfigError naming the variable."""

from __future__ import annotations

from pathlib import Path

import certifi
import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.errors import ConfigError
from worker.settings.tls import Trust, trust_from

VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")
CERTIFI = certifi.where()


def test_nothing_set_or_empty_is_certifi() -> None:
    """No variable, or every one empty, trusts certifi's bundle alone."""
    assert Trust(CERTIFI, None, "certifi") == trust_from({})
    assert Trust(CERTIFI, None, "certifi") == trust_from(dict.fromkeys(VARIABLES, ""))


def test_requests_order_then_openssl(tmp_path: Path) -> None:
    """REQUESTS_CA_BUNDLE wins over CURL_CA_BUNDLE, which wins over SSL_CERT_FILE/DIR;
    SSL_CERT_DIR alone adds its directories to certifi's bundle."""
    env = {
        "REQUESTS_CA_BUNDLE": CERTIFI,
        "CURL_CA_BUNDLE": "/nowhere.pem",
        "SSL_CERT_FILE": "/nowhere.pem",
        "SSL_CERT_DIR": str(tmp_path),
    }
    assert Trust(CERTIFI, None, f"REQUESTS_CA_BUNDLE={CERTIFI}") == trust_from(env)
    curl = trust_from({**env, "REQUESTS_CA_BUNDLE": "", "CURL_CA_BUNDLE": CERTIFI})
    assert Trust(CERTIFI, None, f"CURL_CA_BUNDLE={CERTIFI}") == curl
    assert Trust(CERTIFI, str(tmp_path), f"certifi ({CERTIFI}), SSL_CERT_DIR={tmp_path}") == (
        trust_from({"SSL_CERT_DIR": str(tmp_path)})
    )
    assert Trust(None, str(tmp_path), f"REQUESTS_CA_BUNDLE={tmp_path}") == trust_from(
        {"REQUESTS_CA_BUNDLE": str(tmp_path)}
    )


@pytest.mark.parametrize(
    ("variable", "content", "why"),
    [
        ("REQUESTS_CA_BUNDLE", None, "no such file"),
        ("CURL_CA_BUNDLE", b"", "no PEM certificate in it"),
        ("SSL_CERT_FILE", b"not a certificate\n", "no PEM certificate in it"),
        ("SSL_CERT_FILE", "dir", "a directory"),
        ("SSL_CERT_DIR", None, "no such directory"),
    ],
)
def test_what_a_variable_names_must_be_usable(
    tmp_path: Path, variable: str, content: bytes | str | None, why: str
) -> None:
    """A missing file, an empty or garbled one, a directory where a file is wanted, a
    missing directory: a ConfigError naming the variable, the path and why."""
    path = tmp_path / "ca.pem"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)

    with pytest.raises(ConfigError) as caught:
        trust_from({variable: str(path)})

    assert str(caught.value).startswith(f"{variable}={str(path)!r}")
    assert why in str(caught.value)


@given(
    variable=st.sampled_from(VARIABLES),
    value=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=200),
)
def test_any_value_is_a_trust_or_a_one_line_config_error(variable: str, value: str) -> None:
    """Whatever text a variable holds (NUL bytes, newlines, ``:`` lists, nonsense), the
    answer is a Trust or a one-line ConfigError naming the variable, never another error."""
    answer: Trust | ConfigError
    try:
        answer = trust_from({variable: value})
    except ConfigError as exc:
        answer = exc
    if isinstance(answer, ConfigError):
        assert str(answer).startswith(f"{variable}=")
        assert "\n" not in str(answer)
    else:
        assert answer.cafile or answer.capath
