"""Quoting hostile input in messages: short, and never an exception of its own."""

from __future__ import annotations

import json


def abbreviate(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for messages that quote input
    (never raises, even for an integer too long for ``repr``)."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit for str()
        return f"<an integer of {value.bit_length() if isinstance(value, int) else '?'} bits>"
    except RecursionError:  # lists or tables nested beyond the interpreter's stack
        return f"<a {type(value).__name__} nested too deeply to quote>"
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def printable(text: str) -> str:
    """``text`` with each character that is not printable (C0 and C1 controls, DEL, bidi
    and other format characters, line and paragraph separators, lone surrogates) written
    as its JSON escape (``\\u001b``, ``\\n``, ``\\u202e``): what a terminal shows is text,
    never an escape sequence."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else json.dumps(ch)[1:-1] for ch in text)
