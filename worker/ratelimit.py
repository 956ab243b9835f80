"""Global rate limiter per account, in Redis (placeholder: no limit yet)."""

from __future__ import annotations

import redis

from .config import Account
from .keys import Keys


class Limiter:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def acquire(self, account: Account) -> float:
        """Block until ``account`` may send one request; returns the seconds waited."""
        del account
        return 0.0
