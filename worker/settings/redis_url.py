"""Redis URLs in settings: refused early when they cannot name a server (a ConfigError,
exit 2, not "unreachable"), and shown with any password masked."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit


def mask_url(url: str) -> str:
    """The URL with any password (in the address or as ``?password=``) masked."""
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
            "password=****" if part.startswith("password=") else part for part in query.split("&")
        )
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def check_redis_url(fail: Callable[[str, object, str], Exception], url: str) -> None:
    """Refuse a Redis URL that cannot name a server: a ConfigError (exit 2), not a Redis
    that is "unreachable"."""
    expected = "a redis://[user:password@]host[:port][/db], rediss://... or unix:///path URL"
    shown = mask_url(url)
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
