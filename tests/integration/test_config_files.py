"""Hostile config files, as REPORT_FORWARDER_CONFIG and as --config, in real subprocess runs:
nesting beyond the parser's stack, endless devices, a FIFO with no writer, a directory and a
file too big are each one line on stderr and exit 2. The subprocess timeout makes a hang or
an endless read fail the test (no timing assert)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from worker.errors import ConfigError
from worker.settings import load_settings

from .clirun import Run, run_cli

EXIT_CONFIG = 2
HANG = 60  # seconds: far beyond a refusal's, well inside the test's own timeout


def _deep(tmp_path: Path) -> str:
    path = tmp_path / "deep.toml"
    path.write_text("a = " + "[" * 500 + "]" * 500 + "\n")
    return str(path)


def _deep_inline(tmp_path: Path) -> str:
    path = tmp_path / "deep-inline.toml"
    path.write_text("[types]\nx = " + "{a = " * 500 + "1" + "}" * 500 + "\n")
    return str(path)


def _fifo(tmp_path: Path) -> str:
    path = tmp_path / "config.fifo"
    os.mkfifo(path)
    return str(path)


def _directory(tmp_path: Path) -> str:
    path = tmp_path / "config.d"
    path.mkdir()
    return str(path)


def _too_big(tmp_path: Path) -> str:
    path = tmp_path / "big.toml"
    path.write_text("# padding\n" * 110_000)  # 1.1 MB of comments: valid TOML, too big
    return str(path)


HOSTILE: dict[str, tuple[Callable[[Path], str], str]] = {
    "nested-arrays": (_deep, "nested too deeply"),
    "nested-inline-tables": (_deep_inline, "nested too deeply"),
    "dev-zero": (lambda _: "/dev/zero", "a character device, not a regular file"),
    "dev-urandom": (lambda _: "/dev/urandom", "a character device, not a regular file"),
    "fifo": (_fifo, "a FIFO, not a regular file"),
    "directory": (_directory, "a directory, not a regular file"),
    "too-big": (_too_big, "larger than 1 MiB"),
}


def _refused_in_one_line(result: Run, path: str, says: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert (EXIT_CONFIG, 1) == (result.returncode, len(lines)), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("error: ")
    assert path in lines[0] or "nested too deeply" in says
    assert says in lines[0]
    assert len(lines[0]) < 400


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_config_in_the_environment_is_one_line_and_exit_2(
    env: dict[str, str], tmp_path: Path, case: str
) -> None:
    """REPORT_FORWARDER_CONFIG naming deep nesting, /dev/zero, /dev/urandom, a FIFO, a
    directory or a file over 1 MiB: exit 2 and one line naming the file and what is wrong."""
    make, says = HOSTILE[case]
    path = make(tmp_path)
    result = run_cli(env | {"REPORT_FORWARDER_CONFIG": path}, "check-config", timeout=HANG)
    _refused_in_one_line(result, path, says)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_config_flag_is_one_line_and_exit_2(
    env: dict[str, str], tmp_path: Path, case: str
) -> None:
    """`--config` naming deep nesting, /dev/zero, /dev/urandom, a FIFO, a directory or a
    file over 1 MiB, before any command: exit 2 and one line naming what is wrong."""
    make, says = HOSTILE[case]
    path = make(tmp_path)
    result = run_cli(env, "--config", path, "stats", timeout=HANG)
    _refused_in_one_line(result, path, says)


def test_a_config_of_exactly_the_limit_loads(tmp_path: Path) -> None:
    """A config file of exactly 1 MiB (comments after real settings) still loads."""
    body = '[service]\nqueue = "big"\n'
    path = tmp_path / "limit.toml"
    path.write_text(body + "#" * ((1 << 20) - len(body) - 1) + "\n")
    assert 1 << 20 == path.stat().st_size
    assert "big" == load_settings(environ={"REPORT_FORWARDER_CONFIG": str(path)}).queue


@given(
    depth=st.integers(1, 3000),
    opener=st.sampled_from(["[", "{a = "]),
    where=st.sampled_from(["", "[types]\n", "[delivery]\n", "[accounts.default]\n"]),
    key=st.sampled_from(["x", "report_deadline_s", "api_url", "rate_limit"]),
)
@hypothesis_settings(max_examples=150, deadline=None)
def test_nesting_of_any_depth_anywhere_loads_or_is_a_config_error(
    tmp_path_factory: pytest.TempPathFactory, depth: int, opener: str, where: str, key: str
) -> None:
    """Arrays or inline tables nested to any depth under any key give Settings or a short
    ConfigError, never a RecursionError."""
    closer = "]" if opener == "[" else "}"
    inner = "1" if opener != "[" else ""
    path = tmp_path_factory.mktemp("nest") / "c.toml"
    path.write_text(f"{where}{key} = {opener * depth}{inner}{closer * depth}\n")
    message = ""
    try:
        load_settings(environ={"REPORT_FORWARDER_CONFIG": str(path)})
    except ConfigError as exc:
        message = str(exc)
    assert len(message) < 400
