"""The CA certificates the worker's HTTPS calls trust, from the environment as requests
and OpenSSL read it: the first set of

1. ``REQUESTS_CA_BUNDLE``, then ``CURL_CA_BUNDLE`` (requests' order): a PEM file of CA
   certificates, or a directory of them (hashed names, as ``openssl rehash`` makes) —
   that alone is trusted;
2. ``SSL_CERT_FILE`` (a PEM file) and/or ``SSL_CERT_DIR`` (directories, ``:``-separated),
   OpenSSL's own: what they name replaces certifi's bundle or adds to it respectively;
3. neither: certifi's bundle.

An empty value counts as unset. A file or directory a variable names that cannot be used —
missing, unreadable, a file with no PEM certificate in it — is a :class:`ConfigError`
naming the variable and the path, never a quiet fall-back to certifi (which would refuse
every call through a TLS-inspecting proxy with a less helpful error much later).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

import certifi

from worker.errors import ConfigError

BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
OPENSSL_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR")
_ACCEPTED = "a readable PEM file of CA certificates, or a directory of them"


@dataclass(frozen=True, slots=True)
class Trust:
    """What TLS peers are verified against: a CA file and/or directories, and where they
    came from (the variables that named them, or ``certifi``)."""

    cafile: str | None
    capath: str | None
    source: str

    def describe(self) -> str:
        """One line for check-config: ``REQUESTS_CA_BUNDLE=/etc/ssl/corp.pem``."""
        if self.source == "certifi":
            return f"certifi ({self.cafile})"
        return self.source


def trust_from(environ: Mapping[str, str]) -> Trust:
    """The CA certificates ``environ`` names (module docstring); ConfigError if a named
    file or directory cannot be used."""
    for name in BUNDLE_VARIABLES:
        value = environ.get(name, "")
        if value:
            if _is_dir(value):
                return Trust(None, _directories(name, value), f"{name}={value}")
            return Trust(_bundle(name, value), None, f"{name}={value}")
    cafile, capath = environ.get("SSL_CERT_FILE", ""), environ.get("SSL_CERT_DIR", "")
    if not cafile and not capath:
        return Trust(certifi.where(), None, "certifi")
    source = ", ".join(f"{name}={environ[name]}" for name in OPENSSL_VARIABLES if environ.get(name))
    return Trust(
        _bundle("SSL_CERT_FILE", cafile) if cafile else certifi.where(),
        _directories("SSL_CERT_DIR", capath) if capath else None,
        source if cafile else f"certifi ({certifi.where()}), {source}",
    )


def _is_dir(path: str) -> bool:
    try:
        return os.path.isdir(path)
    except ValueError:  # a NUL byte: not a path at all, said by _bundle
        return False


def _bundle(name: str, path: str) -> str:
    """``path`` if it is a file of PEM CA certificates that OpenSSL loads."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=path)
    except FileNotFoundError:
        why = "no such file"
    except PermissionError:
        why = "not readable"
    except IsADirectoryError:
        why = "a directory"
    except ssl.SSLError:  # (an OSError too)
        why = "no PEM certificate in it"
    except OSError as exc:
        why = f"cannot be read ({exc.strerror or type(exc).__name__})"
    except ValueError:
        why = "not a path (it holds a NUL byte)"
    else:
        if context.cert_store_stats()["x509"] == 0:  # only CRLs
            why = "no certificate in it"
        else:
            return path
    raise ConfigError(f"{name}={path!r}: {why} (accepted: {_ACCEPTED}; or unset it)")


def _directories(name: str, value: str) -> str:
    """``value`` if each of its ``:``-separated directories can be listed."""
    for path in value.split(os.pathsep):
        if not path:
            continue
        if not _is_dir(path):
            why = "no such directory"
        elif not os.access(path, os.R_OK | os.X_OK):
            why = "not readable"
        else:
            continue
        raise ConfigError(f"{name}={value!r}: {path!r}: {why} (accepted: {_ACCEPTED}; or unset it)")
    return value
