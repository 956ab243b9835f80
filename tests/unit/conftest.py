"""Unit tests: no processes, no Redis, no sockets — the whole folder runs in seconds. A test
here that connects or binds a socket or starts a process fails at once, saying so: it
belongs in tests/integration/, whose fixtures (Redis, the sandbox, workers) are not
visible here."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from typing import NoReturn

import pytest


def _refuse(what: str) -> Callable[..., NoReturn]:
    def refused(*args: object, **kwargs: object) -> NoReturn:
        raise AssertionError(f"a unit test may not {what}: it belongs in tests/integration/")

    return refused


@pytest.fixture(autouse=True)
def _no_sockets_or_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _refuse("connect a socket"))
    monkeypatch.setattr(socket.socket, "connect_ex", _refuse("connect a socket"))
    monkeypatch.setattr(socket.socket, "bind", _refuse("bind a socket"))
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("start a process"))
