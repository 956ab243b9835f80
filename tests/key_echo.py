"""Answers that echo an API key back, as a careless or hostile server would, shared by the
pure test of ``classify`` (tests/unit/test_upstream.py) and the same over real HTTP
(tests/integration/test_upstream.py)."""

from __future__ import annotations

import json

from hypothesis import strategies as st

# API-key-like strings: printable ASCII (quotes and backslashes included) but no "*", the
# mask's own letter, and long enough not to occur in a detail's fixed text by chance
KEYS = st.text(
    st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="*"),
    min_size=12,
    max_size=64,
)
FLIPS = st.lists(st.booleans(), max_size=64)
WHERE = st.sampled_from(["description", "html", "request"])
PADS = st.integers(0, 400)


def mangle(key: str, flips: list[bool]) -> str:
    """``key`` with each letter's case set by ``flips``."""
    return "".join(
        c.lower() if i < len(flips) and not flips[i] else c.upper() for i, c in enumerate(key)
    )


def echoing_answer(
    key: str, flips: list[bool], where: str, pad: int, task_id: int
) -> tuple[int, bytes]:
    """(HTTP status, body) of an answer echoing ``key``, its letters' case changed by
    ``flips``, after ``pad`` spaces: in the API's error description, in an HTML page, or
    as the request body it was sent (the key JSON-escaped)."""
    if where == "description":
        status = 200
        body = json.dumps(
            {
                "errorId": 1,
                "errorCode": "ERROR_KEY_DOES_NOT_EXIST",
                "errorDescription": " " * pad + mangle(key, flips),
            }
        )
    elif where == "html":
        status, body = 400, "<pre>" + " " * pad + mangle(key, flips) + "</pre>"
    else:
        status = 502
        body = " " * pad + mangle(json.dumps({"clientKey": key, "taskId": task_id}), flips)
    return status, body.encode()


def assert_key_absent(detail: str, key: str) -> None:
    """Neither the key, nor its first half, nor its JSON-escaped form is in ``detail``,
    in any letter case."""
    text = detail.lower()
    assert key.lower() not in text
    assert key[: len(key) // 2].lower() not in text
    assert json.dumps(key)[1:-1].lower() not in text
