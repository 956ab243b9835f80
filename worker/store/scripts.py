"""The Lua scripts, as files in ``worker/store/lua/`` (shipped as package data), and the one
registry that loads them for the synchronous ledger and limiter and for the intake's async
client.

A script file's first line may say ``-- requires: prelude ratelimit``: those shared parts
are put in front of it, in that order. Each file's header lists its KEYS, its ARGV and the
ledger fields it reads or writes. Scripts need Redis 6.2 or newer (``ZRANGE … BYSCORE``):
:func:`require_version` says so clearly at start-up instead of a script error later.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from worker.errors import ConfigError

MIN_REDIS = (6, 2)
_SHARED = ("prelude", "ratelimit")


@cache
def _file(name: str) -> str:
    return resources.files("worker.store").joinpath(f"lua/{name}.lua").read_text("utf-8")


@cache
def source(name: str) -> str:
    """The full text of script ``name``: the parts it requires, then the script itself."""
    text = _file(name)
    first = text.split("\n", 1)[0]
    needs = first.removeprefix("-- requires:").split() if first.startswith("-- requires:") else []
    unknown = [n for n in needs if n not in _SHARED]
    if unknown:
        raise ValueError(f"lua/{name}.lua requires {unknown}: shared parts are {_SHARED}")
    return "".join(_file(n) for n in needs) + text


def require_version(info: dict[str, object], where: str) -> None:
    """ConfigError unless the server (``INFO server``) is at least ``MIN_REDIS``."""
    version = str(info.get("redis_version", "0"))
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < MIN_REDIS:
        need = ".".join(map(str, MIN_REDIS))
        raise ConfigError(
            f"Redis at {where} is version {version}; report-forwarder needs {need} or newer "
            "(its scripts use ZRANGE … BYSCORE)"
        )
