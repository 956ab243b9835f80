"""Redis calls with redis-py's errors turned into the project's (``store.translate``): the
ledger and the rate limiter run every script through :func:`call`, so nothing above them
sees a redis-py exception."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import redis

T = TypeVar("T")


def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``; a redis-py failure raises the project's error instead
    (StoreFullError, StoreUnreachableError, ConfigError or StoreError)."""
    try:
        return fn(*args, **kwargs)
    except redis.RedisError as exc:
        from .store import translate  # store reads settings; imported only on failure

        raise translate(exc) from exc
