"""captchaType names -> family -> kind ("image" or "token"), from the table in config/.

Names match case-insensitively; the canonical spelling is the one in the table. An
unknown name is refused with the list of accepted ones, so a producer can fix its call.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from worker.errors import ConfigError, ReportError
from worker.settings.quoting import abbreviate

KINDS = ("image", "token")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True, slots=True)
class CaptchaType:
    """One accepted type name and where it routes."""

    name: str
    family: str
    kind: str


class CaptchaTypes:
    """The type table: lookups are O(1) on the lower-cased name."""

    def __init__(self, types: Mapping[str, str], families: Mapping[str, str]) -> None:
        for family, kind in families.items():
            if kind not in KINDS:
                raise ConfigError(
                    f"families.{family} = {kind!r}: a family's kind must be one of {KINDS}"
                )
        self._by_lower: dict[str, CaptchaType] = {}
        for name, family in types.items():
            if not _NAME.fullmatch(name):
                raise ConfigError(
                    f"types.{name!r}: a type name is letters, digits, '_', '.' or '-'"
                )
            if family not in families:
                raise ConfigError(
                    f"types.{name} = {family!r}: unknown family; "
                    f"known families: {', '.join(sorted(families))}"
                )
            entry = CaptchaType(name=name, family=family, kind=families[family])
            previous = self._by_lower.get(name.lower())
            if previous is not None and previous.family != family:
                raise ConfigError(
                    f"types.{name}: clashes with {previous.name!r} (names are case-insensitive)"
                )
            self._by_lower[name.lower()] = entry

    def resolve(self, name: object) -> CaptchaType:
        """Return the entry for ``name``, or raise :class:`ReportError` listing the names."""
        if isinstance(name, str):
            found = self._by_lower.get(name.strip().lower())
            if found is not None:
                return found
        raise ReportError(
            f"unknown captchaType {abbreviate(name)}; accepted (case-insensitive): "
            + ", ".join(self.names)
        )

    @property
    def names(self) -> list[str]:
        """Canonical names, sorted."""
        return sorted((t.name for t in self._by_lower.values()), key=str.lower)

    def __iter__(self) -> Iterator[CaptchaType]:
        return iter(sorted(self._by_lower.values(), key=lambda t: t.name.lower()))

    def __len__(self) -> int:
        return len(self._by_lower)
