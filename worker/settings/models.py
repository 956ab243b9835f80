"""The settings models: rate limits, provider profiles, accounts and the effective
:class:`Settings`. Frozen; never a secret (an account names the environment variable that
holds its key, and :func:`client_key` reads it when a worker needs it). Built by
:mod:`worker.settings.loader`."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from worker.errors import ReportError
from worker.settings.captcha_types import CaptchaType, CaptchaTypes
from worker.settings.quoting import abbreviate, masked_url

# A producer's or the command line's patience with an unreachable Redis: retried for this
# long before it gives up (exit 3). Workers keep their own, longer patience (store.py).
DEFAULT_CONNECT_RETRY_S = 5.0
# How long one WAIT for replica acknowledgements may block (``redis.min_replicas_ack``); a
# caller retries within its own patience, so this bounds one round trip, not the wait.
DEFAULT_REPLICA_ACK_TIMEOUT_S = 1.0

_PERIODS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
}
_RATE = re.compile(r"^\s*(\d+)\s*(?:/|per)\s*(\d*)\s*([a-z]+)\s*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``amount`` requests in any sliding window of ``period_s`` seconds."""

    amount: int
    period_s: float

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        match = _RATE.match(text) if isinstance(text, str) else None
        if match is not None and max(len(match.group(1)), len(match.group(2))) > 9:
            match = None  # beyond any API's limit (and beyond int()'s digit limit)
        unit = _PERIODS.get(match.group(3).lower()) if match else None
        multiple = int(match.group(2) or 1) if match else 0
        if match is None or unit is None or int(match.group(1)) < 1 or multiple < 1:
            raise ValueError(
                f"{abbreviate(text)} is not a rate limit; expected e.g. '50/second', "
                "'600/minute', '5/10s'"
            )
        return cls(amount=int(match.group(1)), period_s=unit * multiple)

    def __str__(self) -> str:
        if self.period_s == 1:
            return f"{self.amount}/second"
        if self.period_s == 60:
            return f"{self.amount}/minute"
        return f"{self.amount}/{self.period_s:g}s"


@dataclass(frozen=True, slots=True)
class Provider:
    """A provider profile: base URL and endpoint per family or kind."""

    name: str
    base_url: str
    endpoints: Mapping[str, str]
    deadline_s: float
    # provider error codes -> our classification ("accepted", "rejected", "account_fault",
    # "transient"), on top of the built-in table
    error_codes: Mapping[str, str] = field(default_factory=dict)

    def path_for(self, ctype: CaptchaType) -> str | None:
        return self.endpoints.get(ctype.family) or self.endpoints.get(ctype.kind)


@dataclass(frozen=True, slots=True)
class Account:
    """A named account: producers choose it, workers read its key from ``key_env``."""

    name: str
    provider: Provider
    key_env: str
    rate_limit: RateLimit
    base_url: str
    deadline_s: float
    # base_url as logs and messages show it (its password and query values masked)
    shown_base_url: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shown_base_url", masked_url(self.base_url))

    def shown(self, url: str) -> str:
        """``url``, this account's base URL or one of its endpoints, as logs and messages
        show it (the base's password and query values masked)."""
        if self.shown_base_url is self.base_url:  # nothing to mask (masked_url's same string)
            return url
        base = self.base_url.rstrip("/")
        if url.startswith(base):
            return self.shown_base_url.rstrip("/") + url[len(base) :]
        return masked_url(url)

    def endpoint_for(self, ctype: CaptchaType) -> str:
        """Full URL for a report of ``ctype``; :class:`ReportError` if the provider has none."""
        path = self.provider.path_for(ctype)
        if path is None:
            supported = ", ".join(sorted(self.provider.endpoints))
            raise ReportError(
                f"account {self.name!r} (provider {self.provider.name!r}) cannot report "
                f"captchaType {ctype.name!r}: {self.provider.name} has no endpoint for "
                f"{ctype.family!r} reports (it has: {supported})"
            )
        return self.base_url.rstrip("/") + path


@dataclass(frozen=True)
class Settings:
    """The effective configuration. Never holds a secret."""

    redis_url: str
    key_prefix: str
    home: Path
    queue: str
    log_format: str
    log_level: str
    concurrency: int
    connect_timeout_s: float
    read_timeout_s: float
    report_deadline_s: float
    max_attempts: int
    backoff_base_s: float
    backoff_cap_s: float
    backoff_jitter: float
    account_pause_s: float
    dedup_ttl_s: int
    lease_s: float
    max_deliveries: int
    visibility_timeout_s: int
    restore_interval_s: int
    lost_grace_s: float
    sweep_interval_s: float
    dead_letter_max_entries: int
    dead_letter_max_age_s: int
    ratelimit_margin_s: float
    ratelimit_max_inline_wait_s: float
    accounts: Mapping[str, Account]
    captcha_types: CaptchaTypes
    sources: tuple[str, ...] = ()
    connect_retry_s: float = DEFAULT_CONNECT_RETRY_S
    # Writes that must survive a failover wait for this many replicas (WAIT); 0: none.
    min_replicas_ack: int = 0
    replica_ack_timeout_s: float = DEFAULT_REPLICA_ACK_TIMEOUT_S

    @property
    def embedded_redis(self) -> bool:
        return not self.redis_url

    def account(self, name: object) -> Account:
        """The account called ``name``, or :class:`ReportError` listing the known ones."""
        found = self.accounts.get(name) if isinstance(name, str) else None
        if found is None:
            raise ReportError(
                f"unknown account {abbreviate(name)}; configured accounts: "
                f"{', '.join(sorted(self.accounts))}"
            )
        return found


def client_key(account: Account, environ: Mapping[str, str] | None = None) -> str | None:
    """The account's API key from the environment, or None when unset or empty."""
    env = os.environ if environ is None else environ
    return env.get(account.key_env) or None


def default_home(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "report-forwarder"
