"""Run the command line as a real subprocess (``python -m worker``), bytes in, text out."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

from .conftest import cli_env


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str


def run_cli(env: dict[str, str], *args: str, stdin: bytes = b"", timeout: float = 120) -> Run:
    """``python -m worker ARGS`` with ``env`` over the real environment (PATH etc.)."""
    proc = subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=cli_env(env),
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return Run(
        proc.returncode,
        proc.stdout.decode("utf-8", "replace"),
        proc.stderr.decode("utf-8", "replace"),
    )
