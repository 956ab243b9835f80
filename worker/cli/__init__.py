"""CLI layer: ``report-forwarder`` and its commands. Maps the project's errors to exit
statuses in one place (0 success, 1 refused or nothing matched, 2 configuration or usage,
3 Redis unreachable or full) and to one line on stderr: never a traceback.

May import: every layer.
"""

from __future__ import annotations

from worker.cli.main import MAX_LINE_BYTES, SHOWN_REFUSALS, main

__all__ = ["MAX_LINE_BYTES", "SHOWN_REFUSALS", "main"]
