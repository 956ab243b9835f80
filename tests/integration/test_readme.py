"""The README's Quick start: its first command runs the demo on embedded defaults (the
Quick start's shape is checked in tests/unit/test_readme.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import cli_env


def _count(label: str, summary: str) -> int:
    """The number on the demo summary's ``label`` line."""
    match = re.search(rf"^{label}\s+(\d+)", summary, re.M)
    assert match is not None, f"no {label!r} line in the summary:\n{summary}"
    return int(match.group(1))


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
        accepted, total = _count("accepted", summary), _count("total", summary)
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
