"""The README's Quick start: its first command runs the demo on embedded defaults."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import cli_env

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```(?:sh|bash|console)?\n(.*?)```", section, re.S)
    assert block is not None, "Quick start has no code block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_quick_start_is_two_commands_demo_then_tests() -> None:
    """Quick start is exactly two commands: the demo, then the test suite."""
    commands = quick_start_commands()
    assert 2 == len(commands)
    assert commands[0].endswith("report-forwarder demo")
    assert "pytest" in commands[1]


@pytest.mark.timeout(240)
def test_demo_runs_on_embedded_defaults(tmp_path: Path) -> None:
    """`report-forwarder demo` with no REDIS_URL and no key starts its own Redis and
    sandbox, delivers every report to an outcome, prints the summary and exits 0."""
    home = tmp_path / "h"
    environ = cli_env({"REPORT_FORWARDER_HOME": str(home)})
    try:
        result = subprocess.run(
            [sys.executable, "-m", "worker", "demo", "--reports", "1000"],
            env=environ,
            capture_output=True,
            text=True,
            timeout=200,
            check=False,
        )
        assert 0 == result.returncode, result.stderr[-3000:]
        summary = result.stderr
        accepted = int(re.search(r"^accepted\s+(\d+)", summary, re.M).group(1))  # type: ignore[union-attr]
        total = int(re.search(r"^total\s+(\d+)", summary, re.M).group(1))  # type: ignore[union-attr]
        assert 1000 == total
        assert 900 < accepted < 1000
        assert "dead-lettered: rejected ERROR_NO_SUCH_CAPCHA_ID" in summary
        assert (home / "redis.sock").exists()
    finally:
        subprocess.run(
            [sys.executable, "-m", "worker", "redis", "stop"],
            env=environ,
            capture_output=True,
            timeout=60,
            check=False,
        )
    assert not (home / "redis.sock").exists()
