"""The settings loader: checked-in TOML defaults < REPORT_FORWARDER_CONFIG file < environment.

``load_settings(environ=os.environ)`` returns a frozen :class:`Settings`. A bad value raises
:class:`~worker.errors.ConfigError` naming the key, the value and where it came from; the CLI
turns that into exit status 2. Secrets are never part of ``Settings``: an account names the
environment variable holding its key, and :func:`client_key` reads it when a worker needs it.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from worker.errors import ConfigError
from worker.settings.api_url import check_api_url
from worker.settings.captcha_types import CaptchaTypes
from worker.settings.models import (
    DEFAULT_CONNECT_RETRY_S,
    DEFAULT_REPLICA_ACK_TIMEOUT_S,
    Account,
    Provider,
    RateLimit,
    Settings,
    default_home,
)
from worker.settings.quoting import abbreviate
from worker.settings.redis_url import check_redis_url

DEFAULT_FILES = ("report-forwarder.toml", "providers.toml", "captcha-types.toml")
ACCOUNT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MIN_BACKOFF_S = 2.0  # CapMonster asks clients to wait at least 2 s between calls
MAX_CONCURRENCY = 1024  # threads per worker process, in the file as on the command line
MAX_NUMBER = 1e9  # no setting means anything beyond this (31 years, a billion entries)
MAX_CONFIG_BYTES = 1 << 20  # the checked-in files are under 10 KB together

# Keys a file may set besides those in the checked-in defaults (documented there, commented
# out because their default lives in code).
OPTIONAL_KEYS = ("redis.connect_retry_s", "redis.min_replicas_ack", "redis.replica_ack_timeout_s")
ACCOUNT_KEYS = ("provider", "key_env", "rate_limit", "api_url", "deadline_s")
PROVIDER_KEYS = ("base_url", "deadline_s", "endpoints", "error_codes")
FREE_TABLES = ("types", "families")  # any name = value

# env var -> (dotted key, kind of value)
ENV_OVERRIDES: dict[str, str] = {
    "REDIS_URL": "redis.url",
    "REPORT_FORWARDER_HOME": "service.home",
    "REPORT_FORWARDER_LOG_FORMAT": "service.log_format",
    "REPORT_FORWARDER_REPORT_DEADLINE_S": "delivery.report_deadline_s",
    "REPORT_FORWARDER_ACCOUNT_PAUSE_S": "delivery.account_pause_s",
    "REPORT_FORWARDER_RATE_LIMIT": "accounts.default.rate_limit",
    "REPORT_FORWARDER_API_URL": "api_url_override",
    "REPORT_FORWARDER_CONNECT_RETRY_S": "redis.connect_retry_s",
    "REPORT_FORWARDER_MIN_REPLICAS_ACK": "redis.min_replicas_ack",
}


def load_settings(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build :class:`Settings` from the defaults, an optional file and ``environ``."""
    env = dict(os.environ if environ is None else environ)
    raw: dict[str, Any] = {}
    sources = []
    builtin = []
    for name in DEFAULT_FILES:
        text = resources.files("worker.defaults").joinpath(name).read_text("utf-8")
        builtin.append((f"(built-in) {name}", _parse_toml(text, f"(built-in) {name}")))
    schema = _schema(doc for _, doc in builtin)
    for where, doc in builtin:
        _check_keys(doc, where, schema)
        _merge(raw, doc)
    sources.append("built-in defaults")
    file = path or env.get("REPORT_FORWARDER_CONFIG")
    if file:
        doc = _parse_toml(_read_config(file), str(file))
        _check_keys(doc, str(file), schema)
        _merge(raw, doc)
        sources.append(str(file))
    origin: dict[str, str] = {}
    for var, dotted in ENV_OVERRIDES.items():
        if env.get(var, "") != "":
            _set_dotted(raw, dotted, env[var])
            origin[dotted] = var
    return _build(raw, origin, env, tuple(sources))


def _read_config(file: str | os.PathLike[str]) -> str:
    """The text of the config file, or ConfigError naming it, what is wrong and what is
    accepted: a regular file of at most MAX_CONFIG_BYTES, opened without blocking (a FIFO
    with no writer, a terminal) and checked after opening, so /dev/zero, /dev/urandom, a
    FIFO or a directory is one line, not a hang, a memory blow-up or a traceback."""
    shown = f"REPORT_FORWARDER_CONFIG = {str(file)!r}"  # or --config, its flag
    accepted = f"a regular file of UTF-8 TOML text, at most {MAX_CONFIG_BYTES >> 20} MiB"
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot read it ({exc.strerror or exc})") from exc
    except ValueError as exc:  # an embedded NUL
        raise ConfigError(f"{shown}: not a usable path ({exc})") from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(
                f"{shown}: {_file_kind(mode)}, not a regular file; expected {accepted}"
            )
        chunks, size = [], 0
        while size <= MAX_CONFIG_BYTES:  # the size as read, not as stat says (it may grow)
            chunk = os.read(fd, MAX_CONFIG_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot read it ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{shown}: larger than {MAX_CONFIG_BYTES >> 20} MiB; expected {accepted}")
    data = b"".join(chunks)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{shown}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "TOML files are UTF-8"
        ) from exc


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def _schema(docs: Any) -> dict[str, set[str]]:
    """Section -> the keys it may hold: those of the checked-in defaults, plus OPTIONAL_KEYS."""
    schema: dict[str, set[str]] = {}
    for doc in docs:
        for section, table in doc.items():
            keys = schema.setdefault(section, set())
            if isinstance(table, Mapping) and section not in ("accounts", "providers"):
                keys.update(table)
    for dotted in OPTIONAL_KEYS:
        section, key = dotted.split(".", 1)
        schema.setdefault(section, set()).add(key)
    return schema


def _check_keys(doc: Mapping[str, Any], where: str, schema: Mapping[str, set[str]]) -> None:
    """Refuse a key no setting reads (a typo would otherwise be silently ignored), naming
    the nearest valid one, and a section that is not a table."""

    def unknown(dotted: str, known: Any) -> ConfigError:
        near = difflib.get_close_matches(dotted.rsplit(".", 1)[-1], sorted(known), n=1)
        parent = dotted.rsplit(".", 1)[0] if "." in dotted else ""
        hint = (
            f"did you mean {(parent + '.' if parent else '') + near[0]!r}?"
            if near
            else f"known keys{f' in [{parent}]' if parent else ''}: {', '.join(sorted(known))}"
        )
        return ConfigError(f"{where}: unknown key {dotted!r}; {hint}")

    for section, table in doc.items():
        if section not in schema:
            raise unknown(section, schema)
        if not isinstance(table, Mapping):
            raise ConfigError(
                f"{where}: {section} = {abbreviate(table)}: expected a table [{section}]"
            )
        if section in FREE_TABLES:
            continue
        if section in ("accounts", "providers"):
            allowed = ACCOUNT_KEYS if section == "accounts" else PROVIDER_KEYS
            for name, entry in table.items():
                if not isinstance(entry, Mapping):
                    raise ConfigError(
                        f"{where}: {section}.{name} = {abbreviate(entry)}: "
                        f"expected a table [{section}.{name}]"
                    )
                for key in entry:
                    if key not in allowed:
                        raise unknown(f"{section}.{name}.{key}", allowed)
            continue
        for key in table:
            if key not in schema[section]:
                raise unknown(f"{section}.{key}", schema[section])


def _parse_toml(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from exc
    except RecursionError as exc:  # tomllib recurses once per level of arrays and tables
        raise ConfigError(
            f"{where}: arrays or inline tables nested too deeply; expected a config file "
            "nested a few levels deep"
        ) from exc


def _merge(into: dict[str, Any], other: Mapping[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


class _Reader:
    """Reads typed values out of the merged tables, naming key, value and origin on error."""

    def __init__(self, raw: Mapping[str, Any], origin: Mapping[str, str]) -> None:
        self.raw = raw
        self.origin = origin

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.raw
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node

    def fail(self, dotted: str, value: Any, expected: str) -> ConfigError:
        where = f" (from {self.origin[dotted]})" if dotted in self.origin else ""
        return ConfigError(f"{dotted} = {abbreviate(value)}{where}: expected {expected}")

    def number(
        self,
        dotted: str,
        *,
        minimum: float = 0.0,
        maximum: float = MAX_NUMBER,
        integer: bool = False,
        default: Any = None,
    ) -> Any:
        value = self.get(dotted, default)
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError, OverflowError):
            number = math.nan
        ok = math.isfinite(number) and minimum <= number <= maximum
        if integer:
            ok = ok and number.is_integer()
        if not ok:
            kind = "an integer" if integer else "a number"
            raise self.fail(dotted, value, f"{kind} from {minimum:g} to {maximum:g}")
        return int(number) if integer else number

    def string(self, dotted: str, *, choices: tuple[str, ...] | None = None) -> str:
        value = self.get(dotted, "")
        if not isinstance(value, str) or (choices is not None and value not in choices):
            expected = f"one of {', '.join(choices)}" if choices else "a string"
            raise self.fail(dotted, value, expected)
        return value


def _build(
    raw: dict[str, Any], origin: Mapping[str, str], env: Mapping[str, str], sources: tuple[str, ...]
) -> Settings:
    r = _Reader(raw, origin)
    types_table = r.get("types", {})
    families = r.get("families", {})
    if not isinstance(types_table, Mapping) or not isinstance(families, Mapping):
        raise ConfigError("[types] and [families] must be tables of name = family / kind")
    for section, table in (("types", types_table), ("families", families)):
        for key, value in table.items():
            if not isinstance(value, str):
                raise ConfigError(f"{section}.{key} = {abbreviate(value)}: expected a string")
    captcha_types = CaptchaTypes(types_table, families)

    report_deadline_s = r.number("delivery.report_deadline_s", minimum=1)
    api_url_override = r.string("api_url_override")
    providers = _providers(r)
    accounts = _accounts(r, providers, report_deadline_s, api_url_override)

    home = r.string("service.home") or str(default_home(env))
    key_prefix = r.string("redis.key_prefix")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", key_prefix):
        raise r.fail("redis.key_prefix", key_prefix, "1-32 letters, digits, '_', '.' or '-'")
    redis_url = r.string("redis.url")
    if redis_url:
        check_redis_url(r.fail, redis_url)
    log_level = r.string("service.log_level").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise r.fail("service.log_level", log_level, "DEBUG, INFO, WARNING or ERROR")
    settings = Settings(
        redis_url=redis_url,
        key_prefix=key_prefix,
        home=Path(home).expanduser(),
        queue=r.string("service.queue") or "reports",
        log_format=r.string("service.log_format", choices=("auto", "json", "console")),
        log_level=log_level,
        concurrency=r.number(
            "worker.concurrency", minimum=1, maximum=MAX_CONCURRENCY, integer=True
        ),
        connect_timeout_s=r.number("worker.connect_timeout_s", minimum=0.1),
        read_timeout_s=r.number("worker.read_timeout_s", minimum=0.1),
        report_deadline_s=report_deadline_s,
        max_attempts=r.number("delivery.max_attempts", minimum=1, integer=True),
        backoff_base_s=r.number("delivery.backoff_base_s", minimum=MIN_BACKOFF_S),
        backoff_cap_s=r.number("delivery.backoff_cap_s", minimum=MIN_BACKOFF_S),
        backoff_jitter=r.number("delivery.backoff_jitter", minimum=0),
        account_pause_s=r.number("delivery.account_pause_s", minimum=1),
        dedup_ttl_s=r.number("delivery.dedup_ttl_s", minimum=60, integer=True),
        lease_s=r.number("recovery.lease_s", minimum=5),
        max_deliveries=r.number("recovery.max_deliveries", minimum=1, integer=True),
        visibility_timeout_s=r.number("recovery.visibility_timeout_s", minimum=10, integer=True),
        restore_interval_s=r.number("recovery.restore_interval_s", minimum=1, integer=True),
        lost_grace_s=r.number("recovery.lost_grace_s", minimum=1),
        sweep_interval_s=r.number("recovery.sweep_interval_s", minimum=0.05),
        dead_letter_max_entries=r.number("dead_letters.max_entries", minimum=1, integer=True),
        dead_letter_max_age_s=r.number("dead_letters.max_age_s", minimum=60, integer=True),
        ratelimit_margin_s=r.number("ratelimit.margin_ms", minimum=0) / 1000,
        ratelimit_max_inline_wait_s=r.number("ratelimit.max_inline_wait_s", minimum=0.1),
        accounts=accounts,
        captcha_types=captcha_types,
        sources=sources,
        connect_retry_s=r.number(
            "redis.connect_retry_s", maximum=300, default=DEFAULT_CONNECT_RETRY_S
        ),
        min_replicas_ack=r.number("redis.min_replicas_ack", maximum=16, integer=True, default=0),
        replica_ack_timeout_s=r.number(
            "redis.replica_ack_timeout_s",
            minimum=0.01,
            maximum=3,
            default=DEFAULT_REPLICA_ACK_TIMEOUT_S,
        ),
    )
    min_visibility = settings.lease_s + settings.read_timeout_s + settings.connect_timeout_s
    if settings.visibility_timeout_s <= min_visibility:
        raise r.fail(
            "recovery.visibility_timeout_s",
            settings.visibility_timeout_s,
            f"more than lease_s + both HTTP timeouts ({min_visibility:g} s)",
        )
    return settings


def builtin_providers() -> dict[str, Provider]:
    """The provider profiles of the checked-in ``config/providers.toml`` (the sandbox plays
    them; the intake answers the CapMonster one's paths)."""
    text = resources.files("worker.defaults").joinpath("providers.toml").read_text("utf-8")
    return _providers(_Reader(_parse_toml(text, "(built-in) providers.toml"), {}))


def _providers(r: _Reader) -> dict[str, Provider]:
    table = r.get("providers", {})
    providers = {}
    for name in table:
        endpoints = r.get(f"providers.{name}.endpoints", {})
        if not isinstance(endpoints, Mapping) or not endpoints:
            raise r.fail(f"providers.{name}.endpoints", endpoints, "a table of family = path")
        for key, path in endpoints.items():
            if not isinstance(path, str) or not path.startswith("/"):
                raise r.fail(f"providers.{name}.endpoints.{key}", path, "a path starting with /")
        codes = r.get(f"providers.{name}.error_codes", {})
        if not isinstance(codes, Mapping):
            raise r.fail(f"providers.{name}.error_codes", codes, "a table of ERROR_CODE = outcome")
        allowed = ("accepted", "rejected", "account_fault", "transient")
        for code, outcome in codes.items():
            if outcome not in allowed:
                raise r.fail(f"providers.{name}.error_codes.{code}", outcome, f"one of {allowed}")
        base_url = r.string(f"providers.{name}.base_url")
        check_api_url(r.fail, f"providers.{name}.base_url", base_url)
        providers[name] = Provider(
            name=name,
            base_url=base_url,
            endpoints=dict(endpoints),
            deadline_s=r.number(f"providers.{name}.deadline_s", minimum=1),
            error_codes=dict(codes),
        )
    return providers


def _accounts(
    r: _Reader, providers: Mapping[str, Provider], report_deadline_s: float, api_url_override: str
) -> dict[str, Account]:
    table = r.get("accounts", {})
    if not isinstance(table, Mapping) or not table:
        raise ConfigError("[accounts] is empty: configure at least [accounts.default]")
    if api_url_override:
        check_api_url(r.fail, "api_url_override", api_url_override)
    accounts = {}
    for name in table:
        if not ACCOUNT_NAME.match(name):
            raise ConfigError(
                f"accounts.{name}: account names are 1-64 letters, digits, '_', '.' or '-'"
            )
        prefix = f"accounts.{name}"
        provider_name = r.string(f"{prefix}.provider")
        provider = providers.get(provider_name)
        if provider is None:
            raise r.fail(f"{prefix}.provider", provider_name, f"one of {', '.join(providers)}")
        key_env = r.string(f"{prefix}.key_env")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_env):
            raise r.fail(f"{prefix}.key_env", key_env, "the NAME of an environment variable")
        try:
            rate_limit = RateLimit.parse(r.get(f"{prefix}.rate_limit", ""))
        except ValueError as exc:
            raise r.fail(
                f"{prefix}.rate_limit", r.get(f"{prefix}.rate_limit"), "e.g. '50/second'"
            ) from exc
        # capped by the provider's task lifetime: after it a report can only be rejected
        deadline = min(report_deadline_s, provider.deadline_s)
        if r.get(f"{prefix}.deadline_s") is not None:
            deadline = min(r.number(f"{prefix}.deadline_s", minimum=1), provider.deadline_s)
        base_url = api_url_override or r.string(f"{prefix}.api_url") or provider.base_url
        check_api_url(r.fail, f"{prefix}.api_url", base_url)
        accounts[name] = Account(
            name=name,
            provider=provider,
            key_env=key_env,
            rate_limit=rate_limit,
            base_url=base_url,
            deadline_s=deadline,
        )
    return accounts
