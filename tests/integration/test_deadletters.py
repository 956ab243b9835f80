"""Dead letters from the command line: list, show, filters, replay, purge, export."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import redis
from click.testing import CliRunner

from worker.cli import main
from worker.settings import Settings
from worker.store.keys import Keys
from worker.testing.sandbox import Rule, Sandbox

from .conftest import FAST_RECOVERY, Service, running_worker, wait_until


def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def _fill(service: Service, sandbox: Sandbox, redis_client: redis.Redis) -> None:
    """Three rejected image reports and one rejected token report."""
    for task_id in (1, 2, 3, 4):
        sandbox.add_rule(Rule(task_id=task_id, error_code="ERROR_NO_SUCH_CAPCHA_ID", times=1))
    for task_id, ctype in ((1, "image"), (2, "image"), (3, "ImageToTextTask"), (4, "HCaptchaTask")):
        service.producer.enqueue(task_id, ctype)
    wait_until(lambda: redis_client.xlen(Keys().dead) == 4)


def test_list_json_rows_carry_the_documented_fields(
    service: Service, sandbox: Sandbox, redis_client: redis.Redis, env: dict[str, str]
) -> None:
    """`dead-letters list --json --limit N` rows carry task_id, captcha_type, account, reason,
    error_code, http_status and attempts, newest first."""
    _fill(service, sandbox, redis_client)
    code, out, _ = _cli(env, "dead-letters", "list", "--json", "--limit", "3")
    assert 0 == code
    doc = json.loads(out)
    assert 4 == doc["total"]
    rows = doc["dead_letters"]
    assert 3 == len(rows)
    for row in rows:
        assert {
            "task_id",
            "captcha_type",
            "account",
            "reason",
            "error_code",
            "http_status",
            "attempts",
        } <= set(row)
        assert ("rejected", "ERROR_NO_SUCH_CAPCHA_ID", 200, 1, "default") == (
            row["reason"],
            row["error_code"],
            row["http_status"],
            row["attempts"],
            row["account"],
        )
    order = [tuple(int(part) for part in row["id"].split("-")) for row in rows]
    assert sorted(order, reverse=True) == order  # newest dead-lettered first


def test_filters_show_and_export(
    service: Service, sandbox: Sandbox, redis_client: redis.Redis, env: dict[str, str]
) -> None:
    """--type (name or kind), --reason and --since filter; show prints one; export is JSON lines."""
    _fill(service, sandbox, redis_client)
    _, out, _ = _cli(env, "dead-letters", "list", "--json", "--type", "token")
    assert [4] == [r["task_id"] for r in json.loads(out)["dead_letters"]]
    _, out, _ = _cli(env, "dead-letters", "list", "--json", "--type", "imagetotexttask")
    assert [3] == [r["task_id"] for r in json.loads(out)["dead_letters"]]
    _, out, _ = _cli(env, "dead-letters", "list", "--json", "--reason", "expired")
    assert [] == json.loads(out)["dead_letters"]
    _, out, _ = _cli(env, "dead-letters", "list", "--json", "--since", "1h")
    assert 4 == len(json.loads(out)["dead_letters"])
    _, out, _ = _cli(env, "dead-letters", "export")
    exported = [json.loads(line) for line in out.splitlines()]
    assert [1, 2, 3, 4] == sorted(r["task_id"] for r in exported)
    code, out, _ = _cli(env, "dead-letters", "show", exported[0]["id"])
    assert 0 == code
    assert exported[0] == json.loads(out)
    code, _, err = _cli(env, "dead-letters", "list", "--since", "soon")
    assert 1 == code
    assert "invalid age 'soon': expected e.g. 90s" in err


def test_list_replay_accepted_round_trip(
    service: Service, sandbox: Sandbox, redis_client: redis.Redis, env: dict[str, str]
) -> None:
    """Replaying dead letters queues them through the normal path; once the API accepts
    them they are gone from the dead letters and counted as accepted."""
    _fill(service, sandbox, redis_client)  # the rules answered an error once each
    code, out, _ = _cli(env, "dead-letters", "replay", "--type", "image")
    assert 0 == code
    assert "replayed 3, duplicates 0, kept 0" in out
    wait_until(lambda: sandbox.count(success=True) == 3)
    _, out, _ = _cli(env, "dead-letters", "list", "--json")
    assert [4] == [r["task_id"] for r in json.loads(out)["dead_letters"]]
    code, out, _ = _cli(env, "dead-letters", "replay", "--all", "--json")
    assert {"replayed": 1, "duplicates": 0, "refused": []} == json.loads(out)
    wait_until(lambda: sandbox.count(success=True) == 4)
    assert 0 == redis_client.xlen(Keys().dead)
    assert {1, 2, 3, 4} == {r.task_id for r in sandbox.requests() if r.success}


def test_replay_and_purge_need_a_selection_and_report_counts(
    service: Service, sandbox: Sandbox, redis_client: redis.Redis, env: dict[str, str]
) -> None:
    """Without ids, filters or --all nothing is touched; purge reports how many it removed."""
    _fill(service, sandbox, redis_client)
    code, _, err = _cli(env, "dead-letters", "purge")
    assert 1 == code
    assert "--all" in err
    code, _, err = _cli(env, "dead-letters", "replay", "9999999-0")
    assert (1, True) == (code, "no dead letter with id 9999999-0" in err)
    code, out, _ = _cli(env, "dead-letters", "purge", "--type", "token")
    assert (0, "purged 1") == (code, out.strip())
    code, out, _ = _cli(env, "dead-letters", "purge", "--all")
    assert (0, "purged 3") == (code, out.strip())
    assert 0 == redis_client.xlen(Keys().dead)


def test_dead_letter_stream_is_capped(
    make_settings: Callable[..., Settings],
    env: dict[str, str],
    redis_client: redis.Redis,
    sandbox: Sandbox,
) -> None:
    """The stream is trimmed to about max_entries (whole 100-entry nodes, oldest first)."""
    settings = make_settings(FAST_RECOVERY + "\n[dead_letters]\nmax_entries = 1\n")
    sandbox.add_rule(Rule(error_code="ERROR_NO_SUCH_CAPCHA_ID"))
    with running_worker(settings, env) as svc:
        svc.producer.enqueue_many([(n, "image") for n in range(1, 301)])
        wait_until(lambda: sandbox.count() == 300, timeout=30)
        wait_until(lambda: int(redis_client.get(Keys().npending) or 0) == 0)
    remaining = redis_client.xlen(Keys().dead)
    assert 1 <= remaining <= 200


def test_list_with_no_match_exits_1_as_documented(
    service: Service, sandbox: Sandbox, redis_client: redis.Redis, env: dict[str, str]
) -> None:
    """`dead-letters list` that matches nothing exits 1 ("nothing matched"), with --json
    too, where the document is still printed with an empty list; a match exits 0."""
    code, out, err = _cli(env, "dead-letters", "list")
    assert (1, "", "no dead letters match") == (code, out, err.strip())
    code, out, _ = _cli(env, "dead-letters", "list", "--json")
    assert (1, {"total": 0, "dead_letters": []}) == (code, json.loads(out))
    _fill(service, sandbox, redis_client)
    code, out, _ = _cli(env, "dead-letters", "list", "--json", "--reason", "expired")
    assert (1, []) == (code, json.loads(out)["dead_letters"])
    code, out, _ = _cli(env, "dead-letters", "list", "--reason", "rejected")
    assert 0 == code
    assert 5 == len(out.splitlines())  # the header and four rows


def test_since_beyond_the_epoch_lists_every_dead_letter(
    service: Service, sandbox: Sandbox, redis_client: redis.Redis, env: dict[str, str]
) -> None:
    """`--since 99999999999d` (or an age too long for a float) means every dead letter."""
    code, _, err = _cli(env, "dead-letters", "list", "--since", "99999999999d")
    assert (1, "no dead letters match") == (code, err.strip())
    _fill(service, sandbox, redis_client)
    for age in ("99999999999d", "9" * 400 + "w"):
        code, out, err = _cli(env, "dead-letters", "list", "--json", "--since", age)
        assert 0 == code, err
        assert 4 == len(json.loads(out)["dead_letters"])
        code, out, _ = _cli(env, "dead-letters", "export", "--since", age)
        assert (0, 4) == (code, len(out.splitlines()))


@pytest.mark.parametrize(
    "entry_id", ["99999999999999999999999-0", "1-99999999999999999999999", "18446744073709551616-0"]
)
def test_show_an_id_beyond_the_streams_range_is_refused_in_one_line(
    env: dict[str, str], redis_client: redis.Redis, entry_id: str
) -> None:
    """A dead-letter id whose parts do not fit a stream id (64 bits) is refused like any
    malformed id: one line, exit 1."""
    del redis_client  # flushed
    for args in (["show", entry_id], ["replay", entry_id], ["purge", entry_id]):
        code, _, err = _cli(env, "dead-letters", *args)
        assert 1 == code
        assert [f"error: invalid dead-letter id '{entry_id}': expected e.g. 1764460800000-0"] == (
            err.splitlines()
        )


@pytest.mark.parametrize(
    "extra", [["--reason", "expired"], ["--type", "token"], ["--all"], ["--since", "1h"]]
)
def test_ids_together_with_filters_or_all_are_a_usage_error(
    service: Service,
    sandbox: Sandbox,
    redis_client: redis.Redis,
    env: dict[str, str],
    extra: list[str],
) -> None:
    """`purge ID --reason R` (or replay, or with --all) is refused with exit 2 and touches
    nothing, rather than silently ignoring the filter."""
    _fill(service, sandbox, redis_client)
    _, out, _ = _cli(env, "dead-letters", "export")
    first = json.loads(out.splitlines()[0])["id"]
    for command in ("purge", "replay"):
        code, _, err = _cli(env, "dead-letters", command, first, *extra)
        assert 2 == code
        assert "not IDs together with filters or --all" in err
    assert 4 == redis_client.xlen(Keys().dead)
