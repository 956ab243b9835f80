"""Settings layer: what the service is configured to do, and nothing else.

Owns the settings models (accounts, providers, rate limits, the captcha-type table) and
their loader: checked-in TOML defaults < ``REPORT_FORWARDER_CONFIG`` < environment. A bad
value is a :class:`~worker.errors.ConfigError` naming the key, the value and where it came
from. Never holds a secret: an account names the environment variable holding its key.

May import: ``worker.errors``. Nothing above it.
"""

from __future__ import annotations

from worker.settings.loader import (
    MAX_CONCURRENCY,
    MIN_BACKOFF_S,
    builtin_providers,
    load_settings,
)
from worker.settings.models import (
    Account,
    Provider,
    RateLimit,
    Settings,
    client_key,
)
from worker.settings.quoting import abbreviate
from worker.settings.redis_url import mask_url

__all__ = [
    "MAX_CONCURRENCY",
    "MIN_BACKOFF_S",
    "Account",
    "Provider",
    "RateLimit",
    "Settings",
    "abbreviate",
    "builtin_providers",
    "client_key",
    "load_settings",
    "mask_url",
]
