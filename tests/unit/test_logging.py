"""The log chain: JSON or key=value lines, stdlib records through the same processors,
and a registered key masked in any letter case (the schema against a real worker is in
tests/integration/test_logging.py)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable

import pytest
import structlog
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from worker.observability import logs
from worker.observability.logs import REDACTED, configure, redact, register_secret

CLIENT_KEY = "test-client-key-5f3a9c"


def test_celery_records_are_rendered_as_json_lines() -> None:
    """A stdlib record from Celery goes through the same chain: one JSON object per line."""
    stream = io.StringIO()
    configure("json", "INFO", stream=stream, cache=False)
    logging.getLogger("celery.worker.consumer").warning("Connection to broker lost: %s", "x")
    structlog.get_logger("worker.x").info("report.accepted", task_id=5)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert ["Connection to broker lost: x", "report.accepted"] == [x["event"] for x in lines]
    assert {"warning", "info"} == {x["level"] for x in lines}


def test_console_format_is_key_value() -> None:
    """On a terminal (or with `console`), lines are readable key=value, not JSON."""
    stream = io.StringIO()
    configure("console", "INFO", stream=stream, cache=False)
    structlog.get_logger("worker.x").info("report.accepted", task_id=5, account="default")
    line = stream.getvalue()
    assert "report.accepted" in line
    assert "task_id=5" in line
    assert not line.lstrip().startswith("{")


def test_redaction_masks_a_registered_key_anywhere_in_a_line() -> None:
    """A configured key that reaches a log value is replaced by ****."""
    register_secret("supersecret-key-9999")
    event = redact(None, "info", {"event": "x", "error": "bad key supersecret-key-9999 here"})
    assert f"bad key {REDACTED} here" == event["error"]


# API-key-like strings: printable ASCII (quotes and backslashes included) but no "*", the
# mask's own letter, and long enough not to occur in a line's fixed text by chance
KEYS = st.text(
    st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="*"),
    min_size=12,
    max_size=64,
)


def mangle(key: str, flips: list[bool]) -> str:
    """``key`` with each letter's case set by ``flips`` (an echo that changed the case)."""
    return "".join(
        c.lower() if i < len(flips) and not flips[i] else c.upper() for i, c in enumerate(key)
    )


@pytest.mark.parametrize("echo", [str.upper, str.capitalize, str.swapcase, str.title])
def test_redaction_masks_a_registered_key_in_any_letter_case(echo: Callable[[str], str]) -> None:
    """A configured key that reaches a rendered log line upper-cased (or in any other
    case) is masked there as well."""
    stream = io.StringIO()
    configure("json", "INFO", stream=stream, cache=False)
    register_secret(CLIENT_KEY)
    structlog.get_logger("worker.x").warning(
        "report.dead_lettered", error=f"ERROR_KEY_DOES_NOT_EXIST: key {echo(CLIENT_KEY)} unknown"
    )
    (line,) = stream.getvalue().splitlines()
    assert CLIENT_KEY.lower() not in line.lower()
    assert f"ERROR_KEY_DOES_NOT_EXIST: key {REDACTED} unknown" == json.loads(line)["error"]


@hsettings(deadline=None, max_examples=200)
@given(key=KEYS, flips=st.lists(st.booleans(), max_size=64), before=st.text(" :=-", max_size=8))
def test_redaction_masks_any_key_in_any_case_mix(key: str, flips: list[bool], before: str) -> None:
    """Whatever the key and whatever the case of each of its letters in an echo, the
    redaction processor leaves no form of the key in any value."""
    echo = mangle(key, flips)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(logs, "_registry", logs._Secrets())  # this key only, for this example
        register_secret(key)
        event = redact(
            None,
            "info",
            {"event": "x", "error": f"key{before}{echo}{before}end", "json": json.dumps(echo)},
        )
    for value in event.values():
        assert key.lower() not in value.lower(), value
        assert json.dumps(key)[1:-1].lower() not in value.lower(), value
    assert f"key{before}{REDACTED}{before}end" == event["error"]


class _Writes(io.StringIO):
    """A stream that remembers each write call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


def test_lines_logged_together_go_out_in_one_write_even_when_the_block_raises() -> None:
    """A batch's outcome lines (docs/design.md §3.4): held while the block runs (nested
    blocks too), then written in one call, in order — also when the block raises; a line
    from another thread meanwhile is written at once."""
    import threading

    stream = _Writes()
    configure("json", "INFO", stream=stream, cache=False)
    log = structlog.get_logger("worker.x")

    def batch() -> None:
        with logs.together():
            log.info("report.accepted", task_id=1)
            with logs.together():
                log.info("report.accepted", task_id=2)
            other = threading.Thread(target=lambda: log.info("report.accepted", task_id=99))
            other.start()
            other.join()
            assert [json.loads(c)["task_id"] for c in stream.calls] == [99]
            raise RuntimeError("mid-batch")

    with pytest.raises(RuntimeError, match="mid-batch"):
        batch()
    assert len(stream.calls) == 2
    assert [json.loads(x)["task_id"] for x in stream.calls[1].splitlines()] == [1, 2]
    log.info("report.accepted", task_id=3)
    assert json.loads(stream.calls[-1])["task_id"] == 3
