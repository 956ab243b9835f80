"""The README's Quick start is two commands: the demo, then the tests (the demo itself is
run in tests/integration/test_readme.py)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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
