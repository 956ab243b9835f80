"""worker.settings against generated config files: a thousand of them, so it runs with the
full suite rather than in the seconds of tests/unit/ (which holds the other settings tests,
tests/unit/test_config.py)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from worker.errors import ConfigError
from worker.settings import load_settings


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(value), repr(value))
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    assert isinstance(value, list)
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


KNOWN_TABLES = {
    "redis": ["url", "key_prefix", "connect_retry_s", "urll"],
    "service": ["home", "queue", "log_format", "log_level"],
    "worker": ["concurrency", "connect_timeout_s", "read_timeout_s"],
    "delivery": ["report_deadline_s", "max_attempts", "backoff_base_s", "dedup_ttl_s"],
    "recovery": ["lease_s", "visibility_timeout_s", "max_deliveries", "sweep_interval_s"],
    "ratelimit": ["margin_ms", "max_inline_wait_s"],
    "dead_letters": ["max_entries", "max_age_s"],
    "accounts.default": ["provider", "key_env", "rate_limit", "api_url", "deadline_s"],
    "accounts.x": ["provider", "key_env", "rate_limit", "deadline_s"],
    "providers.capmonster": ["base_url", "deadline_s", "endpoints", "error_codes"],
    "providers.p2": ["base_url", "deadline_s"],
    "providers.p2.endpoints": ["image", "token", "x"],
    "providers.p2.error_codes": ["ERROR_X"],
    "types": ["Foo", "image"],
    "families": ["foo", "image"],
}
toml_values = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.booleans(),
    st.text(max_size=12),
    st.lists(st.integers(-5, 5), max_size=3),
    st.sampled_from(
        [
            "50/second",
            "1/s",
            "capmonster",
            "p2",
            "/x",
            "image",
            "token",
            "rejected",
            "K_ENV",
            "http://x.test",
            "redis://h/0",
            "1e9",
            "",
            "json",
            "INFO",
            "9" * 60,
        ]
    ),
)
toml_docs = st.dictionaries(
    st.sampled_from(sorted(KNOWN_TABLES)),
    st.one_of(
        st.just("not-a-table"),
        st.lists(st.tuples(st.integers(0, 10), toml_values), max_size=4),
    ),
    max_size=6,
)


# table -> its (key index, value) pairs, or the text "not-a-table"
TomlDoc = dict[str, str | list[tuple[int, object]]]


def _render_toml(doc: TomlDoc) -> str:
    lines: list[str] = []
    for table, entries in sorted(doc.items()):
        if isinstance(entries, str):  # "not-a-table"
            if "." not in table:
                lines.insert(0, f"{table} = 5")
            continue
        lines.append(f"[{table}]")
        seen = set()
        for index, value in entries:
            key = KNOWN_TABLES[table][index % len(KNOWN_TABLES[table])]
            if key not in seen:
                seen.add(key)
                lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


@given(doc=toml_docs)
@hypothesis_settings(max_examples=1000, deadline=None)
def test_any_config_file_loads_or_is_a_config_error(doc: TomlDoc) -> None:
    """Whatever a TOML config file holds (wrong types, huge or non-finite numbers, typos,
    sections that are not tables), loading it gives Settings or a ConfigError — never
    another exception."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "c.toml"
        path.write_text(_render_toml(doc), encoding="utf-8")
        message = ""
        try:
            load_settings(environ={"REPORT_FORWARDER_CONFIG": str(path)})
        except ConfigError as exc:
            message = str(exc)
        assert len(message) < 3000
