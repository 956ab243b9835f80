"""Intake layer: the HTTP intake (``report-forwarder serve``) — a CapMonster-compatible
report endpoint, bulk JSON, health, metrics and the live status page, on uvicorn.

Owns the ASGI app and its batcher, the parsing of hostile input, and the connection
deadlines and caps.

May import: ``worker.producer``, ``worker.observability``, ``worker.store``,
``worker.settings``, ``worker.errors``. Never ``worker.delivery`` or ``worker.cli``.
"""

from __future__ import annotations

from worker.intake.app import Intake, clean_token, is_loopback, serve

__all__ = ["Intake", "clean_token", "is_loopback", "serve"]
