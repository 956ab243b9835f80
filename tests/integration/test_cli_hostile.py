"""Hostile command lines: each known traceback is one line with its exit status, and a
property-based run drives every command with generated arguments, against a real Redis
and against an unreachable one: never a traceback, exit status always 0, 1, 2 or 3."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner, Result
from hypothesis import given
from hypothesis import settings as run_settings
from hypothesis import strategies as st

from worker.cli import main
from worker.testing.processes import RedisProcess, free_port

from .clirun import run_cli


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert 1 == len(lines), text
    return lines[0]


# --- the known tracebacks, each now one line --------------------------------------------------


def test_a_config_file_that_is_not_utf8_is_one_line_and_exit_2(
    env: dict[str, str], tmp_path: Path
) -> None:
    """`--config` naming a file with bytes that are not UTF-8: exit 2, one line."""
    path = tmp_path / "c.toml"
    path.write_bytes(b"[delivery]\n# \xff\xfe\n")
    result = run_cli(env, "--config", str(path), "check-config")
    assert 2 == result.returncode
    assert "not UTF-8 text" in one_line(result.stderr)


def test_error_codes_not_a_table_is_one_line_and_exit_2(
    env: dict[str, str], tmp_path: Path
) -> None:
    """`error_codes = "x"` in a provider profile: exit 2, one line naming the key."""
    path = tmp_path / "c.toml"
    path.write_text('[providers.capmonster]\nerror_codes = "x"\n')
    result = run_cli(env | {"REPORT_FORWARDER_CONFIG": str(path)}, "stats")
    assert 2 == result.returncode
    assert "providers.capmonster.error_codes = 'x'" in one_line(result.stderr)


@pytest.mark.parametrize("args", [["stats"], ["enqueue", "1", "image"], ["redis", "start"]])
def test_a_home_that_is_a_file_is_one_line_and_exit_2(
    env: dict[str, str], tmp_path: Path, args: list[str]
) -> None:
    """With the embedded Redis, REPORT_FORWARDER_HOME naming a regular file (or a folder
    under one) is a configuration error naming it."""
    home = tmp_path / "home-file"
    home.write_text("")
    embedded = {k: v for k, v in env.items() if k != "REDIS_URL"}
    for where in (home, home / "sub"):
        result = run_cli(embedded | {"REPORT_FORWARDER_HOME": str(where)}, *args)
        assert 2 == result.returncode, result.stderr
        line = one_line(result.stderr)
        assert f"REPORT_FORWARDER_HOME = '{where}'" in line


def test_an_unwritable_home_is_one_line_and_exit_2(env: dict[str, str], tmp_path: Path) -> None:
    """A home that cannot be written (a read-only folder; as root, a place under /proc)
    is a configuration error, not a PermissionError traceback."""
    if os.geteuid() == 0:
        home = Path("/proc/report-forwarder-test-home")
    else:
        home = tmp_path / "read-only"
        home.mkdir(mode=0o500)
    embedded = {k: v for k, v in env.items() if k != "REDIS_URL"}
    result = run_cli(embedded | {"REPORT_FORWARDER_HOME": str(home)}, "stats")
    assert 2 == result.returncode, result.stderr
    assert "REPORT_FORWARDER_HOME" in one_line(result.stderr)


def test_enqueue_a_5000_digit_task_id_is_one_line_and_exit_1(env: dict[str, str]) -> None:
    """`enqueue <5,000 digits> image`: the friendly invalid-taskId line, exit 1."""
    result = run_cli(env, "enqueue", "9" * 5000, "image", "--json")
    assert 1 == result.returncode
    line = one_line(result.stderr)
    assert line.startswith("error: invalid taskId '9999")
    assert len(line) < 300


@pytest.mark.parametrize(
    "args",
    [
        ["dead-letters", "list", "--since", "99999999999d"],
        ["dead-letters", "show", "99999999999999999999999-0"],
    ],
)
def test_dead_letter_arguments_beyond_redis_range_are_one_line(
    env: dict[str, str], redis_client: redis.Redis, args: list[str]
) -> None:
    """An age beyond the epoch and an id beyond a stream id's 64 bits are answered in one
    line with exit 1 (nothing matched / invalid id), not a Redis error traceback."""
    del redis_client  # flushed: no dead letters
    result = run_cli(env, *args)
    assert 1 == result.returncode
    assert one_line(result.stderr).startswith(("no dead letters match", "error: invalid"))


# --- every command, generated arguments --------------------------------------------------------

SPECIAL = [
    "",
    " ",
    "-",
    "--",
    "-5",
    "0",
    "1",
    "1e3",
    "nan",
    "-inf",
    "9" * 5000,
    "99999999999d",
    "9" * 400 + "w",
    "99999999999999999999999-0",
    "18446744073709551616-0",
    "1-0",
    "1764460800000-0",
    "default",
    "image",
    "token",
    "rejected",
    "--json",
    "--all",
    "--limit",
    "--reason",
    "--type",
    "--account",
    "--since",
    "--file",
    "-f",
    "--help",
    "--watch",
    "\x00",
    "\udcff\udcfe",  # how Python spells argv bytes that are not UTF-8
    "١٢٣",
    "ｉｍａｇｅ",
    "\u202e",
    "a" * 300,
]
hostile_args = st.one_of(
    st.sampled_from(SPECIAL),
    st.text(max_size=12),
    st.integers().map(str),
    st.from_regex(r"-{0,2}[0-9]{1,30}(-[0-9]{1,25})?[smhdw]?", fullmatch=True),
)
filters = st.lists(
    st.tuples(st.sampled_from(["--reason", "--type", "--account", "--since"]), hostile_args),
    max_size=2,
).map(lambda pairs: [part for pair in pairs for part in pair])


FILE = "<file>"  # stands for a file of generated bytes, written by the test


@st.composite
def command_lines(draw: st.DrawFn) -> tuple[list[str], bytes]:
    """A command line for one of the commands, with hostile arguments, and the bytes of
    the file that FILE in it stands for."""
    content = draw(st.binary(max_size=200)) + b"\n" + draw(st.binary(max_size=50))
    kind = draw(st.integers(0, 13))
    some = st.lists(hostile_args, max_size=3)
    if kind == 0:
        args = ["enqueue", draw(hostile_args), draw(hostile_args)]
        args += draw(st.sampled_from([[], ["--json"], ["--account", draw(hostile_args)]]))
    elif kind == 1:
        args = ["enqueue", "--file", FILE, *draw(st.sampled_from([[], ["--json"]]))]
    elif kind == 2:
        args = ["dead-letters", "list", *draw(filters), *draw(some)]
    elif kind == 3:
        args = ["dead-letters", "show", draw(hostile_args)]
    elif kind in (4, 5):
        verb = "replay" if kind == 4 else "purge"
        args = ["dead-letters", verb, *draw(some), *draw(filters)]
    elif kind == 6:
        args = ["dead-letters", "export", *draw(filters)]
    elif kind == 7:
        args = ["accounts", draw(st.sampled_from(["list", "resume"])), *draw(some)]
    elif kind == 8:
        args = ["stats", *draw(st.sampled_from([[], ["--json"]]))]
    elif kind == 9:
        args = ["check-config", *draw(st.sampled_from([[], ["--json"]]))]
    elif kind == 10:
        args = ["redis", draw(st.sampled_from(["status", "stop"]))]
    elif kind == 11:  # long-running commands: only arguments that stop them at once
        args = draw(
            st.sampled_from(
                [
                    ["worker", "--concurrency", "0"],
                    ["worker", "--concurrency", "1025"],
                    ["serve", "--port", "0"],
                    ["sandbox", "--port", "-1"],
                    ["demo", "--reports", "1"],
                    ["redis", "start", "--bogus"],
                    ["worker", "--help"],
                ]
            )
        )
    elif kind == 12:  # a config file of generated bytes
        args = ["--config", FILE, draw(st.sampled_from(["check-config", "stats"]))]
    else:  # anything at all, but never a long-running command
        args = draw(st.lists(hostile_args, max_size=4))
        if {"worker", "serve", "sandbox", "demo", "redis", "stats"} & set(args):
            args = ["--version"]
    return args, content


@pytest.fixture(scope="module")
def fuzz_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path_factory.mktemp("fuzz-redis"), appendonly=False).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _run(command: tuple[list[str], bytes], url: str, scratch: Path) -> Result:
    """Invoke the CLI in-process (CliRunner) with FILE written out."""
    args, content = command
    (scratch / "file").write_bytes(content)
    args = [str(scratch / "file") if a == FILE else a for a in args]
    environ = {
        "REDIS_URL": url,
        "REPORT_FORWARDER_HOME": str(scratch / "home"),
        "REPORT_FORWARDER_CONNECT_RETRY_S": "0",
        "REPORT_FORWARDER_LOG_FORMAT": "json",
        "REPORT_FORWARDER_CONFIG": "",
        "CAPMONSTER_CLIENT_KEY": "",  # so that nothing could start a worker
    }
    result = CliRunner().invoke(main, args, env=environ, catch_exceptions=True)
    shown = repr(args)[:300]
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{shown} raised {result.exception!r}") from result.exception
    assert result.exit_code in (0, 1, 2, 3), (shown, result.exit_code, result.output[-500:])
    assert "Traceback" not in result.output, (shown, result.output[-2000:])
    return result


@given(command=command_lines())
@run_settings(max_examples=250, deadline=None)
def test_every_command_with_generated_arguments_against_a_real_redis(
    fuzz_redis: RedisProcess, scratch: Path, command: tuple[list[str], bytes]
) -> None:
    """Any generated command line against a real Redis: no traceback, exit 0 to 3."""
    _run(command, fuzz_redis.url, scratch)


@given(command=command_lines())
@run_settings(max_examples=150, deadline=None)
def test_every_command_with_generated_arguments_against_an_unreachable_redis(
    scratch: Path, command: tuple[list[str], bytes]
) -> None:
    """The same against a Redis that is not there: no traceback, exit 0 to 3, and the
    password of its URL never shown."""
    result = _run(command, f"redis://:pw-7f3e@127.0.0.1:{_CLOSED_PORT}/0", scratch)
    assert "pw-7f3e" not in result.output


_CLOSED_PORT = free_port()
