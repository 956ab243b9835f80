"""Which API the sandbox plays: its report paths and the shape of its error answers.

The paths come from the provider profiles checked in as ``config/providers.toml``, read by
the settings loader itself, so the double and the worker can never disagree about where a
report goes. A profile is named after its provider; ``any`` answers on every provider's
paths. CapMonster also answers Anti-Captcha's per-family methods (clients of the
Anti-Captcha protocol call them; the intake accepts them too), so the ``capmonster``
profile adds Anti-Captcha's paths for those families.

Error answers are ``{"errorId": N, "errorCode": ..., "errorDescription": ...}``. CapMonster
answers ``errorId`` 1 for every error; Anti-Captcha and 2Captcha (and so RuCaptcha, 2Captcha's
API on its own host) number their codes, and as ``providers.toml`` has no place for those
numbers they are kept here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

# The settings loader's own reading of a provider table (a public helper for the checked-in
# providers does not exist yet; Settings exposes only the providers its accounts use).
from worker.settings import Provider, builtin_providers
from worker.testing.sandbox_server import Answer

SUCCESS = b'{"errorId": 0, "status": "success"}'
ANY = "any"
# CapMonster answers Anti-Captcha's methods for these families besides its own endpoints.
_ALSO_ANSWERS = {"capmonster": ("anticaptcha", ("recaptcha", "hcaptcha"))}
_NUMBERED = {
    "ERROR_KEY_DOES_NOT_EXIST": 1, "ERROR_NO_SLOT_AVAILABLE": 2, "ERROR_ZERO_BALANCE": 10,
    "ERROR_IP_NOT_ALLOWED": 11, "ERROR_CAPTCHA_UNSOLVABLE": 12, "ERROR_NO_SUCH_METHOD": 14,
    "ERROR_NO_SUCH_CAPCHA_ID": 16, "ERROR_IP_BLOCKED": 21, "ERROR_TOO_MUCH_REQUESTS": 29,
}  # fmt: skip
_ERROR_IDS: dict[str, Mapping[str, int]] = {
    "anticaptcha": _NUMBERED, "twocaptcha": _NUMBERED, "rucaptcha": _NUMBERED,
}  # fmt: skip
_DESCRIPTIONS = {
    "ERROR_KEY_DOES_NOT_EXIST": "Account authorization key not found in the system",
    "ERROR_NO_SUCH_CAPCHA_ID": "Captcha with such ID was not found in the system",
    "ERROR_NO_SUCH_METHOD": "Request to API made with method which does not exist",
}


@dataclass(frozen=True, slots=True)
class Profile:
    """One API the sandbox can play: the paths it answers reports on, its error numbers."""

    name: str
    paths: frozenset[str]
    error_ids: Mapping[str, int] = field(default_factory=dict)

    def error(self, status: int, code: str) -> Answer:
        """The provider's answer for ``code`` (errorId 1 for a code it does not number)."""
        payload = {
            "errorId": self.error_ids.get(code, 1),
            "errorCode": code,
            "errorDescription": _DESCRIPTIONS.get(
                code, "Scripted error from the report-forwarder sandbox"
            ),
        }
        return Answer(status, json.dumps(payload).encode(), error_code=code, outcome=code)


def checked_in_providers() -> dict[str, Provider]:
    """The provider profiles of the checked-in ``providers.toml`` (not a user's config)."""
    return builtin_providers()


def load_profiles(providers: Mapping[str, Provider]) -> dict[str, Profile]:
    """``any`` and one profile per provider, its paths those of its endpoints."""
    profiles = {}
    for name, provider in providers.items():
        paths = set(provider.endpoints.values())
        if name in _ALSO_ANSWERS:
            other, families = _ALSO_ANSWERS[name]
            paths.update(providers[other].endpoints[family] for family in families)
        profiles[name] = Profile(name, frozenset(paths), _ERROR_IDS.get(name, {}))
    every = frozenset(path for profile in profiles.values() for path in profile.paths)
    return {ANY: Profile(ANY, every), **profiles}


PROFILES = load_profiles(checked_in_providers())
REPORT_PATHS = PROFILES[ANY].paths
