"""No report is lost through worker SIGKILLs and a Redis SIGKILL/restart (see crash_harness)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .crash_harness import CONCURRENCY, run_once


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_every_report_reaches_exactly_one_outcome_through_kills(tmp_path: Path) -> None:
    """3,000 reports, two worker SIGKILLs and one Redis SIGKILL mid-flight: none lost, none
    with two outcomes, and no more duplicate API calls than were in flight at the kills."""
    result = run_once(3000, seed=11, workdir=tmp_path)
    assert [] == result.lost
    assert [] == result.double_outcomes
    assert 3000 == result.accepted + result.dead_lettered
    assert 3 == len(result.kills)
    assert result.duplicate_calls <= len(result.kills) * CONCURRENCY
    assert 0 == result.workers_died  # the survivors rode out the Redis restart
