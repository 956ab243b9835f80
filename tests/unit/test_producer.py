"""The producer's taskId parser against every value hypothesis can think of (the producer
against a real Redis is in tests/integration/test_producer.py, which shares these
strategies)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import settings as run_settings
from hypothesis import strategies as st

from worker.errors import ReportError
from worker.producer import MAX_TASK_ID, parse_task_id

HUGE = "9" * 5000


def _is_valid_task_id(value: object) -> bool:
    """The oracle: a positive int up to 2**63-1, or such a number as ASCII digits."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return 0 < value <= MAX_TASK_ID
    if isinstance(value, str):
        text = value.strip()
        significant = text.lstrip("0")
        return (
            text.isascii()
            and text.isdigit()
            and len(significant) <= 19
            and 0 < int(significant or "0") <= MAX_TASK_ID
        )
    return False


json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=20),
)
hostile_ids = st.one_of(
    st.integers(max_value=0),
    st.integers(min_value=MAX_TASK_ID + 1),
    st.integers(min_value=10**4300, max_value=10**4400),  # beyond str()'s digit limit
    st.sampled_from([HUGE, "-" + HUGE, 10**5000 - 1, 1 - 10**5000, float("nan"), float("inf")]),
    st.floats(),
    st.booleans(),
    st.binary(max_size=20),
    st.text(max_size=30),
    st.from_regex(r"\s*-?[0-9]{0,40}(\.[0-9]+)?\s*", fullmatch=True),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), json_leaves, max_size=3),
    st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=3), max_leaves=5),
).filter(lambda v: not _is_valid_task_id(v))


@given(task_id=hostile_ids)
@run_settings(max_examples=300, deadline=None)
def test_every_invalid_task_id_is_a_report_error(task_id: object) -> None:
    """Whatever the value (huge, negative, float, bool, bytes, nested, NaN...), an invalid
    taskId raises ReportError, with a message of bounded size."""
    with pytest.raises(ReportError, match="invalid taskId") as info:
        parse_task_id(task_id)
    assert len(str(info.value)) < 300


@given(task_id=st.one_of(st.integers(1, MAX_TASK_ID), st.integers(1, MAX_TASK_ID).map(str)))
def test_every_valid_task_id_is_accepted(task_id: int | str) -> None:
    """A positive integer up to 2**63-1, or its digits, is that taskId."""
    assert int(task_id) == parse_task_id(task_id)
