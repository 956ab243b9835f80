"""CLI layer: ``report-forwarder`` and its commands. Maps the project's errors to exit
statuses in one place (0 success, 1 refused or nothing matched, 2 configuration or usage,
3 Redis unreachable or full) and to one line on stderr: never a traceback.

One module per command group, each registering its commands on the one group in
``app``: ``worker_cmd`` (worker), ``enqueue`` (enqueue, reading files through
``readers``), ``deadletters``, ``accounts``, ``stats``, and ``ops`` (check-config, serve,
sandbox, redis, demo). Importing this package imports them all, so that every command is
registered; each keeps what is slow to import (Celery above all) inside its command.

May import: every layer.
"""

from __future__ import annotations

# Imported for what importing does: each module registers its commands on ``main``.
from worker.cli import accounts, deadletters, enqueue, ops, stats, worker_cmd  # noqa: F401
from worker.cli.app import main
from worker.cli.enqueue import SHOWN_REFUSALS
from worker.cli.readers import MAX_LINE_BYTES

__all__ = ["MAX_LINE_BYTES", "SHOWN_REFUSALS", "main"]
