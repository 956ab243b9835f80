"""Shared by every test: structlog configured uncached for each test (so that
``structlog.testing.capture_logs`` sees every line) and reset after it. The fixtures that
start things (Redis, the sandbox, workers) are in tests/integration/conftest.py, out of
the unit tests' reach."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog

from worker.observability import logs


@pytest.fixture(autouse=True)
def _test_logging() -> Iterator[None]:
    """Uncached loggers, so ``structlog.testing.capture_logs`` sees every line."""
    logs.configure("json", "DEBUG", cache=False)
    yield
    structlog.reset_defaults()
