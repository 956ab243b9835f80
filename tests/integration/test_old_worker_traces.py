"""What an older worker left in Redis before error codes were bounded (docs/design.md §1.1)
— per-minute stats fields with the API's code as sent (~900 KB, 10,000 distinct, the key
inside) and dead letters holding such a code — is read bounded and keyless: the stats
function, ``stats --json``, the intake's /v1/stats and the dead-letters commands."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import requests
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from tests.key_echo import mangle
from worker.cli import main
from worker.intake import Intake
from worker.observability.stats import snapshot
from worker.settings import Settings
from worker.store.deadletters import MAX_TEXT_CHARS, DeadLetters
from worker.store.keys import Keys
from worker.store.vocabulary import (
    OTHER,
    REJECTED_CODES,
    TRANSIENT_CODES,
    known_code,
    provider_codes,
)

from .conftest import CLIENT_KEY
from .intake_support import Server

TEXT = st.characters(exclude_categories=["Cs"])  # what a worker could write to Redis
KNOWN = sorted(REJECTED_CODES | TRANSIENT_CODES | {"HTTP_503", "TIMEOUT"})
# a raw code as an older worker stored it: a known one, a plausible new one, any text,
# or one repeated up to ~900 KB; the key (case-mangled) put in it or not
RAW = st.one_of(
    st.sampled_from(KNOWN),
    st.from_regex(r"ERROR_[A-Z0-9_]{1,40}", fullmatch=True),
    st.text(TEXT, max_size=80),
    st.builds(lambda s, n: s * n, st.text(TEXT, min_size=1, max_size=8), st.integers(1, 110_000)),
)
STATS_BYTES = 20_000  # a whole snapshot, whatever the old fields


@st.composite
def raw_codes(draw: st.DrawFn) -> str:
    code = draw(RAW)
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(code)))
        echo = mangle(CLIENT_KEY, draw(st.lists(st.booleans(), max_size=len(CLIENT_KEY))))
        code = code[:cut] + echo + code[cut:]
    return code


MANY = [f"ERROR_NEW_{n}_{CLIENT_KEY}" for n in range(10_000)]  # 10,000 distinct, keyed
HUGE = ["E" * 450_000 + CLIENT_KEY.upper() + "E" * 450_000, "ERROR_NO_SUCH_CAPCHA_ID"]


@pytest.fixture
def intake(settings: Settings, env: dict[str, str]) -> Iterator[Server]:
    with Server(Intake(settings, settings.redis_url, environ=env)) as server:
        yield server


def _no_key(text: str) -> bool:
    return CLIENT_KEY.lower() not in text.lower()


def _old_stats(client: redis.Redis, settings: Settings, codes: list[str]) -> None:
    """Count one rejection per code in this minute's stats hash, as an older worker's
    bury (store/lua/prelude.lua ``count``) did: HINCRBY of ``reason|kind|code|account``."""
    key = Keys(settings.key_prefix).stats(int(time.time() // 60))
    pipe = client.pipeline(transaction=False)
    for code in codes:
        pipe.hincrby(key, f"rejected|image|{code}|default", 1)
    pipe.expire(key, 172800)
    pipe.execute()


def _assert_bounded(stats: dict[str, Any], codes: list[str], settings: Settings) -> None:
    """The 15-minute window of ``stats`` counts every code, each known one as itself and
    every other as ``other``, and the whole document is small and keyless."""
    window = stats["throughput"]["15m"]
    ours = provider_codes(settings.accounts.values())
    expected: dict[str, int] = {}
    for code in codes:
        shown = code if known_code(code, ours) else OTHER
        if code:
            expected[shown] = expected.get(shown, 0) + 1
    assert expected == window["by_error_code"]
    assert len(codes) == window["by_outcome"]["rejected"]
    text = json.dumps(stats)
    assert len(text) < STATS_BYTES
    assert _no_key(text)


def test_old_stats_fields_are_read_bounded_and_keyless(
    settings: Settings,
    env: dict[str, str],
    redis_client: redis.Redis,
    intake: Server,
) -> None:
    """Stats fields an older worker wrote with raw codes (huge, many distinct, holding the
    key) reach snapshot(), ``stats --json``, ``stats`` and /v1/stats as known codes and
    ``other`` only: at most one entry per known code plus one, small, without the key."""

    @hsettings(
        max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(codes=st.lists(raw_codes(), min_size=1, max_size=6))
    @example(codes=MANY)
    @example(codes=HUGE)
    def read(codes: list[str]) -> None:
        redis_client.flushall()
        _old_stats(redis_client, settings, codes)

        _assert_bounded(snapshot(redis_client, settings), codes, settings)
        as_json = CliRunner().invoke(main, ["stats", "--json"], env=env)
        assert 0 == as_json.exit_code, as_json.output
        _assert_bounded(json.loads(as_json.stdout), codes, settings)
        text = CliRunner().invoke(main, ["stats"], env=env)
        assert 0 == text.exit_code, text.output
        assert len(text.output) < STATS_BYTES
        assert _no_key(text.output)
        answer = requests.get(f"{intake.url}/v1/stats", timeout=30)
        assert 200 == answer.status_code
        _assert_bounded(answer.json(), codes, settings)

    read()


def test_old_dead_letters_are_read_bounded_and_keyless(
    settings: Settings, env: dict[str, str], redis_client: redis.Redis
) -> None:
    """Dead letters an older worker wrote with a raw error code (huge, holding the key)
    and a long error read, in list, show and export alike, with a known code or
    ``other`` and every text at most MAX_TEXT_CHARS characters, without the key in a code."""
    keys = Keys(settings.key_prefix)
    codes = [*HUGE, f"ERROR_NEW_{CLIENT_KEY}", "ERROR_ZERO_BALANCE", "\x1b[31mred"]
    for task_id, code in enumerate(codes, 1):
        redis_client.xadd(
            keys.dead,
            {"task_id": task_id, "account": "default", "captcha_type": "ImageToText",
             "kind": "image", "reason": "rejected", "error_code": code, "http_status": 400,
             "attempts": 1, "deliveries": 1, "enqueued_at": time.time(),
             "failed_at": time.time(), "error": ("x" * 600_000)},
        )  # fmt: skip
    letters = list(DeadLetters(redis_client, keys).iter(newest_first=False))
    assert [c if known_code(c) else OTHER for c in codes] == [d.error_code for d in letters]
    assert all(MAX_TEXT_CHARS == len(d.error) for d in letters)

    exported = CliRunner().invoke(main, ["dead-letters", "export"], env=env)
    assert 0 == exported.exit_code, exported.output
    rows = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [d.to_json() for d in letters] == rows
    shown = CliRunner().invoke(main, ["dead-letters", "show", letters[0].id], env=env)
    assert 0 == shown.exit_code, shown.output
    assert letters[0].to_json() == json.loads(shown.stdout)
    for args in (["list"], ["list", "--json"]):
        listed = CliRunner().invoke(main, ["dead-letters", *args], env=env)
        assert 0 == listed.exit_code, listed.output
        assert len(listed.output) < 2_000 * len(codes)
        assert _no_key(listed.output)
    assert _no_key(exported.stdout + shown.stdout)
