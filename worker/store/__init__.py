"""Store layer: everything report-forwarder keeps in Redis, and the only place redis-py's
errors are seen.

Owns the connection (URL handling, the embedded server, clients that ride out a restart),
the key names, the Celery message template, the ledger and its Lua scripts, the rate
limiter's Redis side and the dead-letter stream. Every redis-py failure leaves this layer
as the project's :class:`~worker.errors.StoreError` (full, unreachable) or
:class:`~worker.errors.ConfigError` (a URL or database that cannot work).

May import: ``worker.settings``, ``worker.errors``. Nothing above it.
"""
