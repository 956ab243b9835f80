"""Quoting hostile input in messages: short, and never an exception of its own."""

from __future__ import annotations

import json
from urllib.parse import urlsplit, urlunsplit


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


def _masked_query_part(part: str) -> str:
    name, _, value = part.partition("=")
    return f"{name}=****" if name and value else "****"


def masked_url(url: str) -> str:
    """An API URL as logs, messages and check-config show it: a password in the address
    masked (``http://user:****@host``, the user kept, as Redis URLs are shown; a lone
    userinfo, often a token, masked whole) and every query value masked (``?key=****``; a
    part with no value, often a token itself, masked whole). The same string when there is
    nothing to mask."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(an unparsable URL)" if "@" in url or "?" in url else url
    netloc, query = parts.netloc, parts.query
    if "@" in netloc:
        credentials, _, host = netloc.rpartition("@")
        user, colon, _password = credentials.partition(":")
        netloc = f"{user}:****@{host}" if colon else f"****@{host}"
    if query:
        query = "&".join(map(_masked_query_part, query.split("&")))
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
