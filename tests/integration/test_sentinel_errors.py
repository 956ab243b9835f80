"""When no Sentinel answers, the error is one short line naming each Sentinel tried and what
failed, not redis-py's 2,000-character dump of its connection objects. Real closed loopback
ports (nothing listens on them)."""

from __future__ import annotations

import pytest
import redis

from worker.errors import StoreUnreachableError
from worker.store import connection as store
from worker.testing.processes import free_port

from .clirun import run_cli

SECRET = "Zk4sentinelPW"


def _closed_sentinels_url(count: int) -> tuple[str, list[str]]:
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(count)]
    url = (
        f"sentinel://:{SECRET}data@{addresses[0]}"
        + "".join(f";sentinel://{a}" for a in addresses[1:])
        + f"/0?master_name=mymaster&sentinel_password={SECRET}sent"
    )
    return url, addresses


def _check(message: str, addresses: list[str]) -> None:
    assert 1 == len(message.splitlines()), message
    assert "no Sentinel answered" in message
    for address in addresses:
        assert address in message
    assert "connection refused" in message
    assert SECRET not in message
    assert "<redis." not in message
    shown_url = store.describe(_url_of(message))
    assert len(message) < 300 + len(shown_url) + 40 * len(addresses), message


def _url_of(message: str) -> str:
    start = message.index("sentinel://")
    return message[start:].split(" ", 1)[0]


@pytest.mark.parametrize("count", [1, 2, 3])
def test_primary_address_with_no_sentinel_answering_is_one_short_line(count: int) -> None:
    """primary_address() when every Sentinel's port is closed: StoreUnreachableError, one
    line naming each Sentinel and "connection refused", no password, bounded length."""
    url, addresses = _closed_sentinels_url(count)
    with pytest.raises(StoreUnreachableError) as caught:
        store.primary_address(url, timeout_s=1)
    _check(str(caught.value), addresses)


def test_a_command_with_no_sentinel_answering_is_one_short_line() -> None:
    """A client command through Sentinels that all refuse: translate() gives one short line
    naming each of them."""
    url, addresses = _closed_sentinels_url(2)
    client = store.connect(url, retry_s=0.5)
    try:
        with pytest.raises(redis.ConnectionError) as caught:
            client.ping()
    finally:
        store.close(client)
    error = store.translate(caught.value, url)
    assert isinstance(error, StoreUnreachableError)
    _check(str(error), addresses)


def test_the_cli_with_no_sentinel_answering_is_one_line_and_exit_3(env: dict[str, str]) -> None:
    """`stats` against Sentinels that all refuse: exit 3, one line on stderr naming them."""
    url, addresses = _closed_sentinels_url(2)
    result = run_cli(env | {"REDIS_URL": url, "REPORT_FORWARDER_CONNECT_RETRY_S": "0.5"}, "stats")
    assert 3 == result.returncode
    lines = result.stderr.strip().splitlines()
    assert 1 == len(lines), result.stderr
    _check(lines[0], addresses)
