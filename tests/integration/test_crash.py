"""Crash runs (see crash_harness): every report ends with exactly one outcome, judged by what
the API double received, through worker SIGKILLs, a Redis SIGKILL, a Redis memory squeeze,
and a worker SIGKILL under a 60-second report deadline."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..crash_harness import run_once


def _assert_every_report_has_one_outcome(result: object) -> None:
    from ..crash_harness import RunResult

    assert isinstance(result, RunResult)
    assert [] == result.lost
    assert [] == result.double_outcomes
    assert 0 == result.left_pending
    assert result.reports == result.accepted + result.dead_lettered
    assert result.duplicate_calls <= result.bound  # only what was in flight at a fault
    assert 0 == result.workers_died  # the survivors rode out every fault


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_every_report_reaches_exactly_one_outcome_through_kills(tmp_path: Path) -> None:
    """3,000 reports, two worker SIGKILLs and one Redis SIGKILL mid-flight."""
    result = run_once(3000, seed=11, workdir=tmp_path, mode="kills")
    _assert_every_report_has_one_outcome(result)
    assert 3 == len(result.kills)
    assert 2 == len(result.recovery_s)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_no_report_is_stranded_when_redis_runs_out_of_memory(tmp_path: Path) -> None:
    """Redis out of memory for a few seconds mid-drain while producers keep enqueueing: once
    memory is back nothing is left pending; producers were told "out of memory", and
    everything they were told is queued is delivered."""
    result = run_once(3000, seed=12, workdir=tmp_path, mode="squeeze")
    _assert_every_report_has_one_outcome(result)
    assert result.refused_full > 0  # the squeeze met the producers
    assert result.worker_full_lines > 0  # and the workers


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_killed_workers_reports_are_back_in_seconds_within_a_60_s_deadline(
    tmp_path: Path,
) -> None:
    """Anti-Captcha's 60-s deadline, a worker SIGKILLed mid-run: its reports (in flight and
    prefetched) are put back by the heartbeat check — not by a lease running out or kombu's
    visibility timeout — and none expires untried. (The seconds it takes are measured by
    ``python -m tests.crash_harness --mode deadline``, not asserted here.)"""
    result = run_once(3000, seed=13, workdir=tmp_path, mode="deadline")
    _assert_every_report_has_one_outcome(result)
    assert 0 == result.expired_untried
    assert result.held_at_kills[0] > 0  # it held something when it died
    assert 1 == result.workers_declared_lost
    back = result.recovered_by.get("worker lost mid-flight", 0)
    assert back + result.recovered_by.get("worker lost", 0) >= 1
    assert 0 == result.recovered_by.get("lease expired", 0)
