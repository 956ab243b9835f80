"""Redis calls with redis-py's errors turned into the project's (``store.translate``): the
ledger and the rate limiter run every script through :func:`call`, so nothing above them
sees a redis-py exception."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import redis

from worker.store.connection import describe_client, translate

T = TypeVar("T")


def call(fn: Callable[..., T], *args: Any, on: redis.Redis | None = None, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``; a redis-py failure raises the project's error instead
    (StoreFullError, StoreUnreachableError, ConfigError or StoreError), naming the Redis
    that ``on`` (the client) talks to."""
    try:
        return fn(*args, **kwargs)
    except redis.RedisError as exc:
        raise translate(exc, describe_client(on) if on is not None else None) from exc
