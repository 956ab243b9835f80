"""Terminal escapes in data never reach the terminal: what the command line prints from
Redis (dead letters, pauses), the API (error codes), a config file or the user has every
character that is not printable escaped (worker.cli.render), whatever is stored — old
entries and replays included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from worker.cli import main
from worker.cli.render import shown
from worker.store.keys import Keys
from worker.store.ledger import Ledger

# ESC, CSI, an unterminated OSC (it hides what follows), BEL, CR, NUL, DEL, C1 CSI and OSC,
# bidi override and isolate, line separator, zero-width joiner, BOM
HOSTILE = [
    "\x1b[2J\x1b[H",
    "\x1b]0;pwned",
    "\x07\r\x00\x7f",
    "\x9b31m\x9d0;t\x9c",
    "\u202eevil\u2066x\u2069",
    "a\u2028b\u200d\ufeff",
    "line\nbreak\tTAB",
]
FIELDS = ["error_code", "error", "captcha_type", "account"]


def _unprintable(text: str) -> list[str]:
    """The characters of ``text`` that are not printable, line breaks between lines aside."""
    return sorted({ch for line in text.split("\n") for ch in line if not ch.isprintable()})


def _dead_letter(client: redis.Redis, **fields: str | bytes) -> None:
    entry: dict[str, str | bytes] = {
        "task_id": "7",
        "captcha_type": "ImageToTextTask",
        "kind": "image",
        "account": "default",
        "reason": "rejected",
        "error_code": "ERROR_X",
        "http_status": "200",
        "attempts": "1",
        "failed_at": "1764460800",
        "error": "the API said no",
    }
    entry.update(fields)
    client.xadd(Keys().dead, entry)  # type: ignore[arg-type]


def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("field", FIELDS)
def test_dead_letters_list_escapes_control_characters_in_every_field(
    env: dict[str, str], redis_client: redis.Redis, field: str
) -> None:
    """`dead-letters list` in table mode prints no control, C1, bidi or separator character
    stored in a dead letter's error code, error, captcha type or account: each is escaped."""
    for value in HOSTILE:
        _dead_letter(redis_client, **{field: value})
    code, out, err = _cli(env, "dead-letters", "list")
    assert 0 == code
    assert [] == _unprintable(out) + _unprintable(err)
    assert len(HOSTILE) + 1 == len(out.splitlines())  # the header and one row each
    if field == "error_code":  # not a code the service knows: read as "other"
        assert len(HOSTILE) == out.count(" other ")
    elif field != "error":  # not a column of the table
        assert shown("\x1b]0;pwned")[:10] in out


@given(value=st.text(st.characters(codec=None), max_size=40) | st.binary(max_size=40))
@hypothesis_settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_dead_letters_list_and_show_print_no_control_character_whatever_is_stored(
    env: dict[str, str], redis_client: redis.Redis, value: str | bytes
) -> None:
    """Whatever text or bytes a dead letter's fields hold, `dead-letters list` and `show` print
    no character that is not printable, and never a traceback."""
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogatepass")  # as a Lua script could store it
    redis_client.delete(Keys().dead)
    _dead_letter(redis_client, error_code=value, captcha_type=value, account=value, error=value)
    code, out, err = _cli(env, "dead-letters", "list")
    assert (0, []) == (code, _unprintable(out + err))
    entry_id = out.splitlines()[1].split()[0]
    code, out, err = _cli(env, "dead-letters", "show", entry_id)
    assert (0, []) == (code, _unprintable(out + err))


def test_stats_escapes_a_paused_accounts_error_code(
    env: dict[str, str], redis_client: redis.Redis
) -> None:
    """`stats` (text) prints the error code a pause stored escaped, not as terminal escapes."""
    ledger = Ledger(redis_client, Keys(), "reports")
    ledger.pause("default", 600, json.dumps({"error_code": "".join(HOSTILE)}))
    code, out, err = _cli(env, "stats")
    assert 0 == code
    assert "PAUSED default" in out
    assert [] == _unprintable(out + err)


def test_check_config_and_accounts_escape_control_characters_from_the_config_file(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    """`check-config` and `accounts list` print a queue or provider name holding terminal
    escapes (from the config file) escaped."""
    del redis_client  # flushed
    hostile = json.dumps("".join(HOSTILE))
    path = tmp_path / "c.toml"
    path.write_text(
        f"[service]\nqueue = {hostile}\n"
        f'[providers.{hostile}]\nbase_url = "http://127.0.0.1:1"\ndeadline_s = 60\n'
        '[providers.capmonster]\n[providers.capmonster.endpoints]\nimage = "/x"\n'
        f'[providers.{hostile}.endpoints]\nimage = "/x"\n'
        f'[accounts.other]\nprovider = {hostile}\nkey_env = "OTHER_KEY"\nrate_limit = "1/s"\n'
    )
    for args in (["check-config"], ["accounts", "list"]):
        code, out, err = _cli(env | {"REPORT_FORWARDER_CONFIG": str(path)}, *args)
        assert 0 == code, err
        assert [] == _unprintable(out + err)
    assert "\\u001b]0;pwned" in out


def test_an_error_line_escapes_control_characters_from_the_user(env: dict[str, str]) -> None:
    """An error quoting what the user typed (a dead-letter id) is one line with no control
    character."""
    code, out, err = _cli(env, "dead-letters", "show", "1-0\x1b]0;x\u202e\x9b")
    assert 1 == code
    assert 1 == len(err.splitlines())
    assert [] == _unprintable(out + err)


@given(value=st.text(st.characters(codec=None), max_size=60))
def test_shown_leaves_no_unprintable_character_and_keeps_printable_text(value: str) -> None:
    """shown() escapes every character that is not printable and leaves printable text as is."""
    out = shown(value)
    assert all(ch.isprintable() for ch in out)
    if value.isprintable():
        assert value == out


def test_console_log_lines_escape_control_characters(tmp_path: Path) -> None:
    """A key=value (terminal) log line prints an error code holding terminal escapes
    escaped, as the JSON lines do."""
    import io

    from worker.observability import logs

    stream = io.StringIO()
    logs.configure("console", stream=stream, cache=False)
    logs.get_logger("worker.test").warning("report.dead_lettered", error_code="".join(HOSTILE))
    text = stream.getvalue()
    assert "report.dead_lettered" in text
    assert [] == _unprintable(text)
    assert 1 == len(text.splitlines())
