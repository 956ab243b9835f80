"""What the command line shows a person: text from Redis, the API, a file or the user,
with every character that is not printable escaped the way ``dead-letters show`` and the
JSON log lines escape it (``\\u001b``, ``\\r``, ``\\u202e``), so an API's error code cannot
move the cursor, retitle the terminal, hide the rows after it or reverse a line.

:func:`shown` escapes one value (a line break too: a table cell stays in its row);
:func:`echo` writes text whose own line breaks are kept and everything else is escaped.
JSON output needs neither: ``json.dumps`` escapes the same characters.
"""

from __future__ import annotations

import click

from worker.settings.quoting import printable


def shown(value: object) -> str:
    """``str(value)`` with each character that is not printable (C0 and C1 controls, DEL,
    bidi and other format characters, line and paragraph separators, lone surrogates)
    written as its JSON escape (:func:`worker.settings.quoting.printable`)."""
    return printable(value if isinstance(value, str) else str(value))


def echo(text: str = "", *, err: bool = False, nl: bool = True) -> None:
    """``click.echo(text)``, each line of ``text`` passed through :func:`shown`."""
    if not text.isprintable():
        text = "\n".join(map(shown, text.split("\n")))
    click.echo(text, err=err, nl=nl)
