"""Redis connections: the URL (given, or the embedded server), clients, and the one place
where a redis-py failure becomes the project's error.

Two kinds of patience: a worker's client rides out a Redis restart that replays its AOF
(connection errors and ``LOADING`` retried for about 30 s); a producer's or the command
line's client (``retry_s``) retries for at most that long, so a caller hears within seconds
that Redis is unreachable instead of hanging (the retry policies:
:mod:`worker.store.retrying`).
"""

from __future__ import annotations

import re
from typing import Any, TypeVar
from urllib.parse import quote

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.sentinel
from redis.backoff import ExponentialBackoff, ExponentialWithJitterBackoff
from redis.retry import Retry

from worker.errors import (
    ConfigError,
    ForwarderError,
    StoreError,
    StoreFullError,
    StoreOutcomeUnknownError,
    StoreUnreachableError,
)
from worker.settings import Settings, mask_url
from worker.settings.redis_url import SentinelTarget, is_sentinel, parse_sentinel
from worker.store import embedded
from worker.store.retrying import (
    RETRY_ON,
    SHORT_CONNECT_TIMEOUT_S,
    SHORT_READ_TIMEOUT_S,
    WORKER_RETRIES,
    BoundedRetry,
    NotingAsyncRetry,
    NotingRetry,
)

T = TypeVar("T")


def resolve_url(settings: Settings) -> str:
    """The Redis URL to use: ``REDIS_URL``, else the embedded server (started if needed)."""
    if settings.redis_url:
        return settings.redis_url
    return embedded.ensure_running(settings.home)


def broker_url(url: str) -> str:
    """The same server as a kombu broker URL (kombu spells unix sockets differently; its
    Sentinel URLs carry the data password and database on the first part, the rest in
    :func:`broker_options`)."""
    if url.startswith("unix://"):
        return "redis+socket://" + url.removeprefix("unix://")
    if is_sentinel(url):
        target = parse_sentinel(url)
        credentials = ""
        if target.password is not None:
            user = quote(target.username or "", safe="")
            credentials = f"{user}:{quote(target.password, safe='')}@"
        parts = [f"sentinel://{_hostport(host, port)}" for host, port in target.sentinels]
        parts[0] = f"sentinel://{credentials}{_hostport(*target.sentinels[0])}/{target.db}"
        return ";".join(parts)
    return url


def broker_options(url: str) -> dict[str, Any]:
    """kombu transport options that a Sentinel URL implies (none for a plain server)."""
    if not is_sentinel(url):
        return {}
    target = parse_sentinel(url)
    return {"master_name": target.master_name, "sentinel_kwargs": _sentinel_kwargs(target)}


def broker_ssl(url: str) -> dict[str, Any] | None:
    """Celery's ``broker_use_ssl`` for a ``sentinels://`` URL (certificates verified)."""
    if is_sentinel(url) and parse_sentinel(url).tls:
        import ssl

        return {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return None


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _sentinel_kwargs(target: SentinelTarget, timeout_s: float = 3.0) -> dict[str, Any]:
    """How to talk to the Sentinels themselves (their own password, TLS, short timeouts:
    one silent Sentinel must not hold up asking the next)."""
    kwargs: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if target.sentinel_password is not None:
        kwargs["password"] = target.sentinel_password
    if target.sentinel_username is not None:
        kwargs["username"] = target.sentinel_username
    if target.tls:
        kwargs["ssl"] = True
    return kwargs


class _FollowingConnection(redis.sentinel.SentinelManagedConnection):
    """A connection to the primary that asks the Sentinels for it on every reconnect.

    redis-py reconnects a dropped connection inside ``send_packed_command`` with the
    address it had — after a failover, the dead primary's, for as long as the command's
    retries last: a worker's outcome writes (a pipeline) kept failing for 30 s while its
    claims, on fresh connections, reached the new primary (docs/design.md §8)."""

    def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if not self._sock and self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
            retry_socket_connect = False  # the command's own retries ask the Sentinels again
        super().connect_check_health(check_health, retry_socket_connect)


class _FollowingSSLConnection(_FollowingConnection, redis.SSLConnection):
    """:class:`_FollowingConnection` over TLS (``rediss`` in a Sentinel URL)."""


def _data_kwargs(target: SentinelTarget) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"db": target.db}
    if target.password is not None:
        kwargs["password"] = target.password
    if target.username is not None:
        kwargs["username"] = target.username
    if target.tls:
        kwargs["ssl"] = True
    return kwargs


def primary_address(url: str, timeout_s: float = 3.0) -> tuple[str, int]:
    """The primary the Sentinels name now (asked afresh): StoreUnreachableError when no
    Sentinel answers or none knows the master."""
    target = parse_sentinel(url)
    sentinel: Any = redis.sentinel.Sentinel(
        list(target.sentinels), sentinel_kwargs=_sentinel_kwargs(target, timeout_s)
    )
    try:
        host, port = sentinel.discover_master(target.master_name)
    except (redis.RedisError, OSError) as exc:
        doing = f"no Sentinel named the primary of {target.master_name!r}"
        raise translate(exc, url, doing) from exc
    finally:
        for one in sentinel.sentinels:
            one.close()
    return str(host), int(port)


def connect(
    url: str, *, retries: int = WORKER_RETRIES, retry_s: float | None = None
) -> redis.Redis:
    """A client whose commands retry through connection loss and AOF loading: ``retries``
    times with backoff up to 4 s (a worker's patience, ~30 s), or, given ``retry_s``, for
    at most ``retry_s`` seconds with short socket timeouts (producers, the command line).
    A URL redis-py cannot use is a :class:`ConfigError`."""
    retry: Retry
    if retry_s is None:
        backoff = ExponentialBackoff(cap=4.0, base=0.05)
        retry = NotingRetry(backoff, retries, supported_errors=RETRY_ON)
        connect_timeout, read_timeout = 5.0, 10.0
    else:
        retry = BoundedRetry(retry_s)
        connect_timeout, read_timeout = SHORT_CONNECT_TIMEOUT_S, SHORT_READ_TIMEOUT_S
    options: dict[str, Any] = {
        "retry": retry,
        "retry_on_error": list(RETRY_ON),
        "socket_timeout": read_timeout,
        "socket_connect_timeout": connect_timeout,
        "health_check_interval": 30,
        "decode_responses": False,
    }
    try:
        if is_sentinel(url):
            # every new connection asks the Sentinels for the primary: after a failover the
            # retried command reaches the new one (an old primary that came back as a
            # replica answers READONLY, which redis-py turns into a reconnect)
            target = parse_sentinel(url)
            sentinel: Any = redis.sentinel.Sentinel(
                list(target.sentinels),
                sentinel_kwargs=_sentinel_kwargs(target, min(connect_timeout, 3.0)),
            )
            following = _FollowingSSLConnection if target.tls else _FollowingConnection
            client: redis.Redis = sentinel.master_for(
                target.master_name,
                redis_class=redis.Redis,
                connection_class=following,
                **_data_kwargs(target),
                **options,
            )
            return client
        return redis.Redis.from_url(url, **options)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"redis.url = {describe(url)!r}: not a usable Redis URL ({exc})") from exc


def connect_async(url: str, connect_timeout_s: float = 5.0) -> redis.asyncio.Redis:
    """An asyncio client (the intake's): a plain URL, or the primary a Sentinel URL names,
    looked up again on every new connection. redis-py's default retry policy, each failed
    attempt noted (worker.store.outcome)."""
    defaults = redis.asyncio.client
    backoff = ExponentialWithJitterBackoff(
        base=defaults.DEFAULT_RETRY_BASE, cap=defaults.DEFAULT_RETRY_CAP
    )
    retry = NotingAsyncRetry(backoff, defaults.DEFAULT_RETRY_COUNT)
    if is_sentinel(url):
        target = parse_sentinel(url)
        sentinel: Any = redis.asyncio.sentinel.Sentinel(
            list(target.sentinels),
            sentinel_kwargs=_sentinel_kwargs(target, min(connect_timeout_s, 3.0)),
        )
        client: redis.asyncio.Redis = sentinel.master_for(
            target.master_name,
            redis_class=redis.asyncio.Redis,
            socket_connect_timeout=connect_timeout_s,
            retry=retry,
            **_data_kwargs(target),
        )
        return client
    return redis.asyncio.Redis.from_url(url, socket_connect_timeout=connect_timeout_s, retry=retry)


def close(client: redis.Redis) -> None:
    """Close ``client``'s connections, and for a Sentinel client those to the Sentinels."""
    client.close()
    pool = client.connection_pool
    if isinstance(pool, redis.sentinel.SentinelConnectionPool):
        for sentinel in pool.sentinel_manager.sentinels:
            sentinel.close()


async def close_async(client: redis.asyncio.Redis) -> None:
    """:func:`close` for an asyncio client."""
    await client.aclose()
    pool = client.connection_pool
    if isinstance(pool, redis.asyncio.sentinel.SentinelConnectionPool):
        for sentinel in pool.sentinel_manager.sentinels:
            await sentinel.aclose()


def describe(url: str) -> str:
    """The URL with any password (in the address or as ``?password=``) masked, for
    messages and check-config."""
    return mask_url(url)


def describe_client(client: redis.Redis) -> str:
    """Which Redis a client talks to, as a URL without any password."""
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    if isinstance(pool, redis.sentinel.SentinelConnectionPool):
        addresses = [
            one.connection_pool.connection_kwargs for one in pool.sentinel_manager.sentinels
        ]
        hosts = ";".join(
            f"sentinel://{_hostport(a.get('host', '?'), a.get('port', 26379))}" for a in addresses
        )
        return f"{hosts}/{kwargs.get('db', 0)}?master_name={pool.service_name}"
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    scheme = "rediss" if issubclass(pool.connection_class, redis.SSLConnection) else "redis"
    host, port, db = kwargs.get("host", "localhost"), kwargs.get("port", 6379), kwargs.get("db", 0)
    return f"{scheme}://{host}:{port}/{db}"


# Redis 7 answers a script's refused write with this text as the whole error (redis-py:
# OutOfMemoryError); Redis 6.2 wraps it in "Error running script ...: -OOM command ...".
_OOM = "command not allowed when used memory > 'maxmemory'"


def translate(
    exc: BaseException,
    url: str | None = None,
    doing: str = "",
    *,
    lost: BaseException | None = None,
) -> ForwarderError:
    """The project's error for a redis-py failure, one line: :class:`StoreFullError` (out of
    memory), :class:`StoreUnreachableError`, :class:`ConfigError` for what no retry can fix
    (a database index the server does not have, refused credentials), else
    :class:`StoreError`. With ``lost`` (an earlier or this attempt of a write that may have
    reached Redis unanswered, worker.store.outcome), a :class:`StoreOutcomeUnknownError`.

    ``doing`` says what was being attempted ("could not enqueue"); ``url`` names the Redis
    tried (password masked)."""
    shown = describe(url) if url else ""
    where = f" at {shown}" if url else ""
    prefix = f"{doing}: " if doing else ""
    text = " ".join(str(exc).split())
    if lost is not None:
        sent = " ".join(str(lost).split()) or type(lost).__name__
        then = f"; then: {text}" if text and text != sent else ""
        return StoreOutcomeUnknownError(
            f"{prefix}the write may have reached Redis{where}, but its answer was lost "
            f"({sent}{then}), so the reports may be queued and delivered; retrying through "
            "report-forwarder is safe (it deduplicates), sending them elsewhere is not"
        )
    if isinstance(exc, redis.exceptions.OutOfMemoryError) or _OOM in text:
        return StoreFullError(
            f"{prefix}Redis{where} is out of memory (maxmemory reached, noeviction): nothing "
            "was written; free memory or raise maxmemory, then retry"
        )
    if isinstance(exc, redis.ResponseError) and "DB index is out of range" in text:
        return ConfigError(
            f"{prefix}redis.url = {shown or 'REDIS_URL'!r}: the server has no such database "
            f"({text}); use an index below its `databases` setting (16 by default)"
        )
    if isinstance(exc, redis.AuthenticationError | redis.exceptions.NoPermissionError):
        return ConfigError(
            f"{prefix}redis.url = {shown or 'REDIS_URL'!r}: Redis refused the credentials "
            f"({text}); check the user and password in the URL"
        )
    if isinstance(exc, redis.exceptions.InvalidResponse):
        return StoreUnreachableError(
            f"{prefix}something answered{where}, but not as a Redis server ({text}); "
            "check the host and port"
        )
    if isinstance(exc, redis.sentinel.MasterNotFoundError) and url and is_sentinel(url):
        return StoreUnreachableError(
            f"{prefix}Redis{where} is unreachable: {_no_master(text, url)}"
        )
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError | OSError):
        return StoreUnreachableError(f"{prefix}Redis{where} is unreachable ({text})")
    return StoreError(f"{prefix}Redis{where} failed the call ({type(exc).__name__}: {text})")


# redis-py's MasterNotFoundError names each Sentinel that failed by its client's repr (some
# 1,100 characters of connection settings), then " - " and the error; only the address and
# the error's last words are worth a line.
_SENTINEL_CLIENT = re.compile(r"<redis\.(?:asyncio\.)?client\.Redis\(")
_HOST_PORT = re.compile(r"\bhost=([^,()\s]+),port=(\d+)")
_ERROR_NOISE = re.compile(r"^(?:\w+:)*\s*(?:Error \d+ connecting to \S+\.\s+)?")


def _no_master(text: str, url: str) -> str:
    """``no Sentinel answered (127.0.0.1:26379, 127.0.0.1:26380: connection refused)``, or
    which answered without knowing the master, for MasterNotFoundError's ``text``."""
    target = parse_sentinel(url)
    failed: dict[str, str] = {}
    for segment in _SENTINEL_CLIENT.split(text)[1:]:
        found = _HOST_PORT.search(segment)
        _, dash, error = segment.rpartition(")> - ")
        if found is None or not dash:
            continue
        reason = _ERROR_NOISE.sub("", " ".join(error.split())).rstrip(" .,)") or "failed"
        reason = reason[:1].lower() + reason[1:80]
        failed[_hostport(found.group(1), int(found.group(2)))] = reason
    tried = [_hostport(host, port) for host, port in target.sentinels]
    groups: dict[str, list[str]] = {}
    for address in tried:
        groups.setdefault(failed.get(address, "answered, but knows no such master"), []).append(
            address
        )
    detail = "; ".join(f"{', '.join(addresses)}: {reason}" for reason, addresses in groups.items())
    if len(failed) >= len(tried):
        return f"no Sentinel answered ({detail})"
    return f"no Sentinel knows a master named {target.master_name!r} ({detail})"
