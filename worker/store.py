"""Redis connections: the URL (given, or the embedded server), and clients that ride out
a Redis restart (connection errors and ``LOADING`` are retried with backoff)."""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from . import embedded
from .config import Settings
from .errors import StoreError, StoreFullError, StoreUnreachableError

# Retried for about 30 s in all: long enough for a Redis restart that replays its AOF.
_RETRIES = 12
_RETRY_ON = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


def resolve_url(settings: Settings) -> str:
    """The Redis URL to use: ``REDIS_URL``, else the embedded server (started if needed)."""
    if settings.redis_url:
        return settings.redis_url
    return embedded.ensure_running(settings.home)


def broker_url(url: str) -> str:
    """The same server as a kombu broker URL (kombu spells unix sockets differently)."""
    if url.startswith("unix://"):
        return "redis+socket://" + url.removeprefix("unix://")
    return url


def connect(url: str, *, retries: int = _RETRIES) -> redis.Redis:
    """A client whose commands retry through connection loss and AOF loading."""
    retry = Retry(ExponentialBackoff(cap=4.0, base=0.05), retries, supported_errors=_RETRY_ON)
    try:
        return redis.Redis.from_url(
            url,
            retry=retry,
            retry_on_error=list(_RETRY_ON),
            socket_timeout=10,
            socket_connect_timeout=5,
            health_check_interval=30,
            decode_responses=False,
        )
    except ValueError as exc:
        raise StoreError(f"REDIS_URL is not a usable Redis URL: {exc}") from exc


def describe(url: str) -> str:
    """The URL with any password masked, for messages and check-config."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user + ':' if user else ''}****@{host}"


def translate(exc: BaseException, url: str | None = None, doing: str = "") -> StoreError:
    """The project's error for a redis-py failure: full (OOM), unreachable, or other.

    ``doing`` says what was being attempted ("could not enqueue"); ``url`` names the Redis
    tried (password masked)."""
    where = f" at {describe(url)}" if url else ""
    prefix = f"{doing}: " if doing else ""
    text = str(exc)
    if isinstance(exc, redis.ResponseError) and text.startswith("OOM"):
        return StoreFullError(
            f"{prefix}Redis{where} is out of memory (maxmemory reached, noeviction): nothing "
            "was written; free memory or raise maxmemory, then retry"
        )
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError | OSError):
        return StoreUnreachableError(f"{prefix}Redis{where} is unreachable ({text})")
    return StoreError(f"{prefix}Redis{where} failed the call ({type(exc).__name__}: {text})")
