"""Redis URLs in settings: refused early when they cannot name a server (a ConfigError,
exit 2, not "unreachable"), and shown with any password masked."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit


def mask_url(url: str) -> str:
    """The URL with any password (in the address, or as ``?password=`` or
    ``?sentinel_password=``) masked; a ``sentinel://`` URL part by part."""
    if ";" in url and is_sentinel(url):
        return ";".join(mask_url(part) for part in url.split(";"))
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(an unparsable URL)" if "@" in url or "password" in url else url
    netloc = parts.netloc
    if "@" in netloc:
        credentials, _, host = netloc.rpartition("@")
        if credentials != "****" and not credentials.endswith(":****"):  # not masked yet
            user = credentials.split(":", 1)[0]
            netloc = f"{user + ':' if user else ''}****@{host}"
    query = parts.query
    if "password" in query:
        query = "&".join(
            f"{part.split('=', 1)[0]}=****"
            if part.startswith(("password=", "sentinel_password="))
            else part
            for part in query.split("&")
        )
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def check_redis_url(fail: Callable[[str, object, str], Exception], url: str) -> None:
    """Refuse a Redis URL that cannot name a server: a ConfigError (exit 2), not a Redis
    that is "unreachable"."""
    expected = (
        "a redis://[user:password@]host[:port][/db], rediss://..., unix:///path or "
        "sentinel://host:port;sentinel://host:port/db?master_name=NAME URL"
    )
    shown = mask_url(url)
    if is_sentinel(url):
        if any(ch.isspace() or not ch.isprintable() for ch in url):
            raise fail("redis.url", shown, _EXPECTED_SENTINEL)
        try:
            parse_sentinel(url)
        except ValueError as exc:
            raise fail("redis.url", shown, f"{_EXPECTED_SENTINEL}: {exc}") from exc
        return
    if not url.startswith(("redis://", "rediss://", "unix://")) or any(
        ch.isspace() or not ch.isprintable() for ch in url
    ):
        raise fail("redis.url", shown, expected)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError when out of range or not a number
    except ValueError as exc:
        raise fail("redis.url", shown, f"{expected} ({exc})") from exc
    if parts.scheme == "unix":
        if not parts.path:
            raise fail("redis.url", shown, "unix:// followed by the socket's path")
        return
    db = parts.path.strip("/")
    if db and not (db.isascii() and db.isdigit() and len(db) <= 9):
        raise fail("redis.url", shown, f"{expected}, db a number such as /0")


# -- Redis Sentinel ---------------------------------------------------------------------------
#
# kombu's convention (its ``sentinel://`` broker URLs), extended so that one URL says all:
#
#     sentinel://[[user]:password@]host:port;sentinel://host:port;.../db?master_name=NAME
#         [&sentinel_password=SECRET][&sentinel_username=USER]
#
# The userinfo is the *data* password (the primary's and replicas' ``requirepass``); the
# Sentinels' own password (``requirepass`` in sentinel.conf) is ``sentinel_password``.
# ``sentinels://`` speaks TLS to the Sentinels and to the data nodes.

SENTINEL_SCHEMES = ("sentinel://", "sentinels://")
_SENTINEL_QUERY = ("master_name", "sentinel_password", "sentinel_username")
_EXPECTED_SENTINEL = (
    "sentinel://[:password@]host:port;sentinel://host:port;.../db?master_name=NAME "
    "(one part per Sentinel; master_name required; sentinel_password optional)"
)


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """What a ``sentinel://`` URL names: the Sentinels to ask, the master they watch, and
    how to talk to the data nodes. Holds passwords: never print it (``mask_url`` the URL)."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    tls: bool = False


def is_sentinel(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEMES)


def parse_sentinel(url: str) -> SentinelTarget:
    """The parts of a ``sentinel://`` URL; ValueError saying what is wrong (never
    echoing a password)."""
    parts = [p for p in url.split(";") if p.strip()]
    if not parts:
        raise ValueError("no Sentinel address")
    schemes = {p.split("://", 1)[0] for p in parts}
    if not all(p.startswith(SENTINEL_SCHEMES) for p in parts) or len(schemes) != 1:
        raise ValueError("every part must start with the same sentinel:// or sentinels://")
    hosts: list[tuple[str, int]] = []
    found: dict[str, str] = {}
    db = 0

    def agree(name: str, value: str) -> None:
        if name in found and found[name] != value:
            raise ValueError(f"the parts give different {name.replace('_', ' ')}s")
        found[name] = value

    for part in parts:
        split = urlsplit(part)
        if split.fragment:
            raise ValueError("a fragment ('#...') is not part of a Sentinel URL")
        host, port = split.hostname, split.port or 26379
        if not host:
            raise ValueError(f"a part names no host ({mask_url(part)})")
        hosts.append((host, port))
        if split.username:
            agree("username", unquote(split.username))
        if split.password is not None:
            agree("password", unquote(split.password))
        path = split.path.strip("/")
        if path:
            if not (path.isascii() and path.isdigit() and len(path) <= 9):
                raise ValueError("the database must be a number such as /0")
            agree("db", path)
            db = int(path)
        for name, values in parse_qs(split.query, keep_blank_values=True).items():
            if name not in _SENTINEL_QUERY:
                raise ValueError(f"unknown option {name!r}; known: {', '.join(_SENTINEL_QUERY)}")
            for value in values:
                agree(name, value)
    if len(set(hosts)) != len(hosts):
        raise ValueError("a Sentinel is listed twice")
    master = found.get("master_name", "")
    if not master or any(ch.isspace() or not ch.isprintable() for ch in master):
        raise ValueError("?master_name=NAME is required (the name in `sentinel monitor`)")
    return SentinelTarget(
        sentinels=tuple(hosts),
        master_name=master,
        db=db,
        username=found.get("username") or None,
        password=found.get("password") or None,
        sentinel_username=found.get("sentinel_username") or None,
        sentinel_password=found.get("sentinel_password") or None,
        tls=parts[0].startswith("sentinels://"),
    )
