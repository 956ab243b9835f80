"""worker.settings.captcha_types and the table config/captcha-types.toml (docs/design.md §7)."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.errors import ConfigError, ReportError
from worker.settings import builtin_providers, load_settings
from worker.settings.captcha_types import CaptchaTypes

TABLE = Path(__file__).resolve().parents[2] / "config" / "captcha-types.toml"

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


# The names other providers give their task types (config/captcha-types.toml), as
# (name, family, kind). CapSolver: https://docs.capsolver.com/guide/api-support/ and its
# task pages; 2Captcha (and RuCaptcha): the legacy in.php `method` values.
CAPSOLVER_NAMES = (
    ("ImageToTextTask", "image", "image"),
    ("ReCaptchaV2Classification", "image", "image"),
    ("AwsWafClassification", "image", "image"),
    ("VisionEngine", "image", "image"),
    ("ReCaptchaV2Task", "recaptcha", "token"),
    ("ReCaptchaV2TaskProxyLess", "recaptcha", "token"),
    ("ReCaptchaV2EnterpriseTask", "recaptcha", "token"),
    ("ReCaptchaV2EnterpriseTaskProxyLess", "recaptcha", "token"),
    ("ReCaptchaV3Task", "recaptcha", "token"),
    ("ReCaptchaV3TaskProxyLess", "recaptcha", "token"),
    ("ReCaptchaV3EnterpriseTask", "recaptcha", "token"),
    ("ReCaptchaV3EnterpriseTaskProxyLess", "recaptcha", "token"),
    ("AntiTurnstileTaskProxyLess", "turnstile", "token"),
    ("AntiCloudflareTask", "cloudflare", "token"),
    ("AntiAwsWafTask", "amazon", "token"),
    ("AntiAwsWafTaskProxyLess", "amazon", "token"),
    ("GeeTestTaskProxyLess", "geetest", "token"),
    ("MtCaptchaTask", "mtcaptcha", "token"),
    ("MtCaptchaTaskProxyLess", "mtcaptcha", "token"),
    ("DataDomeSliderTask", "datadome", "token"),
)
TWOCAPTCHA_METHODS = (
    ("base64", "image", "image"),
    ("post", "image", "image"),
    ("rotatecaptcha", "image", "image"),
    ("textcaptcha", "text", "image"),  # a text question: its answer is read, not a token
    ("userrecaptcha", "recaptcha", "token"),
    ("hcaptcha", "hcaptcha", "token"),
    ("turnstile", "turnstile", "token"),
    ("geetest", "geetest", "token"),
    ("geetest_v4", "geetest", "token"),
    ("funcaptcha", "funcaptcha", "token"),
    ("amazon_waf", "amazon", "token"),
    ("mt_captcha", "mtcaptcha", "token"),
    ("datadome", "datadome", "token"),
    ("capy", "capy", "token"),
    ("keycaptcha", "keycaptcha", "token"),
    ("lemin", "lemin", "token"),
    ("cybersiara", "cybersiara", "token"),
    ("friendly_captcha", "friendlycaptcha", "token"),
    ("yandex", "yandex", "token"),
    ("cutcaptcha", "cutcaptcha", "token"),
    ("atb_captcha", "atbcaptcha", "token"),
)
PROVIDER_NAMES = CAPSOLVER_NAMES + TWOCAPTCHA_METHODS


def _table() -> dict[str, str]:
    with TABLE.open("rb") as f:
        types = tomllib.load(f)["types"]
    assert isinstance(types, dict)
    return types


@pytest.mark.parametrize("spelling", SPELLINGS.values(), ids=SPELLINGS.keys())
@pytest.mark.parametrize(("name", "family", "kind"), PROVIDER_NAMES)
def test_provider_task_names_resolve_to_their_family_and_kind(
    types: CaptchaTypes, name: str, family: str, kind: str, spelling: Callable[[str], str]
) -> None:
    """Each of CapSolver's task types and 2Captcha's in.php methods resolves, in any casing,
    to its family and kind."""
    resolved = types.resolve(spelling(name))

    assert (family, kind) == (resolved.family, resolved.kind)
    assert name.lower() == resolved.name.lower()


def test_no_name_is_listed_twice() -> None:
    """The shipped table lists each name once, however cased: a name equal to another but for
    case would be one entry in two places (and, with another family, a ConfigError)."""
    by_lower: dict[str, list[str]] = {}
    for name in _table():
        by_lower.setdefault(name.lower(), []).append(name)

    assert {} == {lower: names for lower, names in by_lower.items() if len(names) > 1}


def test_every_listed_name_is_one_accepted_type(types: CaptchaTypes) -> None:
    """Every name in the table is accepted under its own spelling and family, once."""
    table = _table()

    assert len(table) == len(types)
    for name, family in table.items():
        assert (name, family) == (types.resolve(name).name, types.resolve(name).family)


@given(data=st.data())
def test_any_casing_of_any_listed_name_resolves_to_its_family(
    types: CaptchaTypes, data: st.DataObject
) -> None:
    """Any mix of upper and lower case in any listed name resolves to that name's family."""
    name = data.draw(st.sampled_from(types.names), label="name")
    upper = data.draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    spelled = "".join(c.upper() if u else c.lower() for c, u in zip(name, upper, strict=True))

    resolved = types.resolve(spelled)
    assert (name, types.resolve(name).family) == (resolved.name, resolved.family)


@pytest.mark.parametrize(("name", "family", "kind"), PROVIDER_NAMES)
def test_a_family_anticaptcha_cannot_map_stays_refused(
    types: CaptchaTypes, name: str, family: str, kind: str
) -> None:
    """Anti-Captcha maps image, recaptcha and hcaptcha: a new name of another token family
    has no endpoint there (refused at enqueue); CapMonster and 2Captcha map every name."""
    ctype = types.resolve(name)
    providers = builtin_providers()
    mapped = kind == "image" or family in ("recaptcha", "hcaptcha")

    assert mapped == (providers["anticaptcha"].path_for(ctype) is not None)
    for other in ("capmonster", "twocaptcha", "rucaptcha"):
        assert providers[other].path_for(ctype) is not None


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
