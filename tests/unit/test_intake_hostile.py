"""The intake's parsing of hostile input, without a server (the intake over real HTTP is in
tests/integration/test_intake_hostile.py)."""

from __future__ import annotations

from worker.intake.input import decode_json


def test_long_numbers_are_decoded_without_conversion() -> None:
    """The intake's decoder keeps a number of thousands of digits unconverted (Python would
    refuse to convert it) and still reads ordinary ones."""
    doc = decode_json(b'{"a": ' + b"1" * 10_000 + b', "b": 12, "c": 1e999999}')
    assert "<a number of 10000 characters>" == repr(doc["a"])
    assert (12, float("inf")) == (doc["b"], doc["c"])
