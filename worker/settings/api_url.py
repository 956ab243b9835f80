"""API URLs in settings (an account's ``api_url``, a provider's ``base_url``,
``REPORT_FORWARDER_API_URL``): an endpoint's path (``/reportIncorrectImageCaptcha``) is
appended to them, so a URL it cannot be appended to is refused at start-up (a ConfigError,
exit 2) in one line naming the key, showing the URL with its secrets masked, and saying
what is accepted."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from worker.settings.quoting import masked_url

ACCEPTED = (
    "an http:// or https:// URL: host, optional :port and /path prefix, optional "
    "user:password@ (the endpoint's path is appended to it)"
)


def shown_api_url(url: str) -> str:
    """``url`` as an error message shows it: :func:`masked_url` (the password and query
    values masked), a fragment masked (``#****``), and when an ``@`` stands outside the
    address as parsed (a password holding ``/``, ``?`` or ``#`` unencoded, which the parse
    cuts short) everything before the last ``@`` masked too."""
    scheme, sep, rest = url.partition("://")
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        netloc = ""
    if sep and "@" in rest and rest.count("@") != netloc.count("@"):
        url = f"{scheme}://****@{rest.rpartition('@')[2]}"
    shown = masked_url(url)
    return shown.partition("#")[0] + "#****" if "#" in shown else shown


def api_url_problem(url: str) -> str | None:
    """What keeps an endpoint's path from being appended to ``url``, or None."""
    if not url.startswith(("http://", "https://")):
        return "the scheme must be http:// or https://"
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        return "it holds whitespace or a control character"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # its text may quote the URL's secrets: not shown
        if "port" in str(exc).lower():
            return "its port is not a number from 1 to 65535"
        return "not a URL: its host part cannot be parsed"
    if url.count("@") != parts.netloc.count("@") or parts.netloc.count("@") > 1:
        return "an '@' outside user:password@ (percent-encode '@', '/', '?', '#' in them)"
    if "?" in url:
        return "a query (?...) is not accepted: the endpoint's path would follow it"
    if "#" in url:
        return "a fragment (#...) is not accepted: the endpoint's path would follow it"
    if not parts.hostname:
        return "it names no host"
    if port == 0:
        return "its port is not a number from 1 to 65535"
    return None


def check_api_url(fail: Callable[[str, object, str], Exception], dotted: str, url: str) -> None:
    """Raise ``fail(dotted, shown URL, expected)`` if an endpoint's path cannot be appended
    to ``url`` (:func:`api_url_problem`)."""
    problem = api_url_problem(url)
    if problem is not None:
        raise fail(dotted, shown_api_url(url), f"{ACCEPTED}; {problem}")
