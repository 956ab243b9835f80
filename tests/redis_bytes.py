"""Redis answers as the bytes they are, for the tests and the crash harness: their clients
never decode answers, while redis-py types every answer ``bytes | str`` (it cannot know)."""

from __future__ import annotations

import redis


def as_bytes(value: object) -> bytes:
    """``value``, checked to be bytes (an answer of a client that does not decode)."""
    assert isinstance(value, bytes), f"not bytes: {value!r}"
    return value


def optional_bytes(value: object) -> bytes | None:
    """``value`` as bytes, or None for a missing key or field."""
    return None if value is None else as_bytes(value)


def stream_entries(client: redis.Redis, key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of the stream ``key``, oldest first: (id, fields)."""
    return [
        (as_bytes(entry_id), {as_bytes(k): as_bytes(v) for k, v in (fields or {}).items()})
        for entry_id, fields in client.xrange(key) or []
    ]


def scored_members(client: redis.Redis, key: str) -> list[tuple[bytes, float]]:
    """The members of the sorted set ``key`` with their scores, lowest score first."""
    pairs: list[tuple[bytes, float]] = []
    for pair in client.zrange(key, 0, -1, withscores=True):
        assert isinstance(pair, tuple), f"not a (member, score) pair: {pair!r}"
        member, score = pair
        pairs.append((as_bytes(member), float(score)))
    return pairs
