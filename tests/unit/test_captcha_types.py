"""worker.settings.captcha_types and the table config/captcha-types.toml (docs/design.md §7)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from worker.errors import ConfigError, ReportError
from worker.settings import load_settings
from worker.settings.captcha_types import CaptchaTypes

IMAGE_NAMES = ("ImageToTextTask", "ComplexImageTask", "image")
TOKEN_NAMES = (
    "RecaptchaV2Task",
    "RecaptchaV2EnterpriseTask",
    "RecaptchaV3TaskProxyless",
    "RecaptchaV3EnterpriseTask",
    "NoCaptchaTask",
    "NoCaptchaTaskProxyless",
    "RecaptchaV2TaskProxyless",
    "HCaptchaTask",
    "HCaptchaTaskProxyless",
    "GeeTestTask",
    "GeeTestTaskProxyless",
    "TurnstileTask",
    "TurnstileTaskProxyless",
    "FunCaptchaTask",
    "FunCaptchaTaskProxyless",
    "AmazonTask",
    "BinanceTask",
    "MTCaptchaTask",
    "ProsopoTask",
    "YidunTask",
    "CustomTask",
    "token",
    "recaptcha",
    "hcaptcha",
    "geetest",
    "turnstile",
    "funcaptcha",
)
DOCUMENTED = [(name, "image") for name in IMAGE_NAMES] + [(name, "token") for name in TOKEN_NAMES]
SPELLINGS: dict[str, Callable[[str], str]] = {
    "as-documented": lambda name: name,
    "lower": str.lower,
    "upper": str.upper,
    "swapcase": str.swapcase,
    "padded": lambda name: f"  \t{name} \n",
    "padded-upper": lambda name: f" {name.upper()} ",
}


@pytest.fixture(scope="module")
def types() -> CaptchaTypes:
    """The type table as shipped (built-in defaults only)."""
    return load_settings(environ={}).captcha_types


@pytest.mark.parametrize("spelling", SPELLINGS.values(), ids=SPELLINGS.keys())
@pytest.mark.parametrize(("name", "kind"), DOCUMENTED)
def test_documented_names_resolve_to_their_kind(
    types: CaptchaTypes, name: str, kind: str, spelling: Callable[[str], str]
) -> None:
    """Every docs/design.md §7 name resolves, in any casing and surrounding spaces, to its kind."""
    resolved = types.resolve(spelling(name))

    assert kind == resolved.kind
    assert name == resolved.name


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("NoCaptchaTaskProxyless", "recaptcha"),
        ("RecaptchaV3EnterpriseTask", "recaptcha"),
        ("hcaptchataskproxyless", "hcaptcha"),
        ("GEETESTTASK", "geetest"),
        ("turnstile", "turnstile"),
        ("FunCaptchaTask", "funcaptcha"),
        ("ComplexImageTask", "image"),
        ("token", "token"),
    ],
)
def test_names_resolve_to_their_family(types: CaptchaTypes, name: str, family: str) -> None:
    """Names of one captcha family share that family (it can pick a provider-specific endpoint)."""
    assert family == types.resolve(name).family


def test_names_lists_every_documented_name(types: CaptchaTypes) -> None:
    """``names`` holds every documented name, in its canonical spelling."""
    assert {name for name, _ in DOCUMENTED} <= set(types.names)
    assert len(types) == len(types.names)


@pytest.mark.parametrize(
    "name",
    [
        "ImageToText",
        "RecaptchaV4Task",
        "",
        "   ",
        "image token",
        "Image-To-Text-Task",
        None,
        42,
        3.5,
        b"image",
        ["image"],
        {"type": "image"},
    ],
)
def test_unknown_name_refused_with_accepted_names(types: CaptchaTypes, name: object) -> None:
    """An unknown name, None or a non-string raises ReportError quoting it and listing the names."""
    with pytest.raises(ReportError) as info:
        types.resolve(name)

    message = str(info.value)
    assert repr(name) in message
    for accepted in ("ImageToTextTask", "RecaptchaV2Task", "TurnstileTask", "CustomTask", "token"):
        assert accepted in message


def test_report_error_is_a_value_error(types: CaptchaTypes) -> None:
    """The refusal is also a ValueError, so generic callers can catch it as bad input."""
    with pytest.raises(ValueError, match="unknown captchaType"):
        types.resolve("nope")


def _settings_with(tmp_path: Path, text: str) -> CaptchaTypes:
    path = tmp_path / "forwarder.toml"
    path.write_text(text, encoding="utf-8")
    return load_settings(environ={"REPORT_FORWARDER_CONFIG": str(path)}).captcha_types


def test_type_added_via_config_file_is_accepted(tmp_path: Path) -> None:
    """A type added in the REPORT_FORWARDER_CONFIG `[types]` table resolves without code changes."""
    types = _settings_with(tmp_path, '[types]\nFriendlyCaptchaTask = "token"\n')

    resolved = types.resolve(" friendlycaptchatask ")
    assert "FriendlyCaptchaTask" == resolved.name
    assert "token" == resolved.kind
    assert "FriendlyCaptchaTask" in types.names
    assert "image" == types.resolve("ImageToTextTask").kind


def test_type_with_new_family_routes_by_kind(tmp_path: Path) -> None:
    """A type of a new `[families]` entry routes to its kind's endpoint on the default account."""
    text = '[families]\nfriendly = "token"\n\n[types]\nFriendlyCaptchaTask = "friendly"\n'
    path = tmp_path / "forwarder.toml"
    path.write_text(text, encoding="utf-8")
    settings = load_settings(environ={"REPORT_FORWARDER_CONFIG": str(path)})

    resolved = settings.captcha_types.resolve("FRIENDLYCAPTCHATASK")
    endpoint = settings.account("default").endpoint_for(resolved)

    assert "friendly" == resolved.family
    assert "https://api.capmonster.cloud/reportIncorrectTokenCaptcha" == endpoint


def test_clashing_duplicate_in_config_file_raises(tmp_path: Path) -> None:
    """A config name equal to a built-in one but for case, with another family, is a ConfigError."""
    with pytest.raises(ConfigError) as info:
        _settings_with(tmp_path, '[types]\nimagetotexttask = "recaptcha"\n')

    message = str(info.value)
    assert "imagetotexttask" in message
    assert "ImageToTextTask" in message


def test_clashing_case_insensitive_duplicates_raise() -> None:
    """Two names equal but for case and with different families raise ConfigError."""
    families = {"image": "image", "recaptcha": "token"}

    with pytest.raises(ConfigError, match=r"FOOTASK.*'FooTask'"):
        CaptchaTypes({"FooTask": "image", "FOOTASK": "recaptcha"}, families)


def test_same_family_case_duplicates_are_allowed() -> None:
    """Two names equal but for case and with the same family are one accepted type."""
    types = CaptchaTypes({"FooTask": "image", "footask": "image"}, {"image": "image"})

    assert 1 == len(types)
    assert "image" == types.resolve("FOOTASK").kind


def test_type_of_unknown_family_raises() -> None:
    """A type naming a family that is not configured raises ConfigError naming both."""
    with pytest.raises(ConfigError, match=r"types\.BarTask.*'bar'.*known families: image"):
        CaptchaTypes({"BarTask": "bar"}, {"image": "image"})


@pytest.mark.parametrize("kind", ["audio", "Image", ""])
def test_family_kind_must_be_image_or_token(kind: str) -> None:
    """A family whose kind is neither image nor token raises ConfigError naming the value."""
    with pytest.raises(ConfigError, match=r"families\.odd"):
        CaptchaTypes({}, {"odd": kind})


def test_non_string_type_entry_in_config_file_raises(tmp_path: Path) -> None:
    """A `[types]` entry that is not a family name raises ConfigError naming the entry."""
    with pytest.raises(ConfigError, match=r"types\.WeirdTask = 3"):
        _settings_with(tmp_path, "[types]\nWeirdTask = 3\n")
