"""The command line, through click's CliRunner against the real Redis and sandbox."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import redis
from click.testing import CliRunner, Result

from worker.cli import main
from worker.settings import Settings
from worker.store.keys import Keys
from worker.testing.sandbox import Sandbox

from .conftest import CLIENT_KEY, FAST_RECOVERY, running_worker, wait_until

Invoke = Callable[..., Result]


@pytest.fixture
def invoke(env: dict[str, str], redis_client: redis.Redis, tmp_path: object) -> Invoke:
    del redis_client  # flushed
    runner = CliRunner()

    def run(*args: str, input: str | None = None, **extra: str) -> Result:
        return runner.invoke(main, list(args), input=input, env=dict(env, **extra))

    return run


def test_enqueue_one_report(invoke: Invoke, redis_client: redis.Redis) -> None:
    """`enqueue TASK_ID CAPTCHA_TYPE` queues it and says so."""
    result = invoke("enqueue", "123", "RecaptchaV2Task")
    assert 0 == result.exit_code, result.output
    assert "queued" in result.stdout
    assert b"q" == redis_client.hget(Keys().report("default", 123), "s")


def test_duplicate_enqueue_exits_zero_and_says_duplicate(invoke: Invoke) -> None:
    """A second enqueue of the same task is reported as duplicate, not as an error."""
    assert 0 == invoke("enqueue", "5", "image").exit_code
    result = invoke("enqueue", "5", "image", "--json")
    assert 0 == result.exit_code
    assert {"result": "duplicate", "task_id": 5, "account": "default"} == json.loads(result.stdout)


@pytest.mark.parametrize("bad", ["-5", "abc", "0", "1e3", "--7"])
def test_invalid_id_gets_the_friendly_error_not_a_click_option_error(
    invoke: Invoke, redis_client: redis.Redis, bad: str
) -> None:
    """A negative or non-numeric id is refused like any invalid id, naming what is accepted."""
    result = invoke("enqueue", bad, "image")
    assert 1 == result.exit_code
    assert "invalid taskId" in result.stderr
    assert "positive integer" in result.stderr
    assert "No such option" not in result.output
    assert "Traceback" not in result.output
    assert [] == redis_client.keys("*")


def test_unknown_type_lists_accepted_names(invoke: Invoke, redis_client: redis.Redis) -> None:
    """An unknown type exits 1 with the accepted names and queues nothing."""
    result = invoke("enqueue", "9", "PuzzleTask")
    assert 1 == result.exit_code
    assert "unknown captchaType 'PuzzleTask'" in result.stderr
    assert "ImageToTextTask" in result.stderr
    assert [] == redis_client.keys("*")


def test_thousand_json_lines_from_stdin_arrive_in_full(
    invoke: Invoke, settings: Settings, env: dict[str, str], sandbox: Sandbox
) -> None:
    """`enqueue --file -` with 1,000 JSON lines queues every one and each reaches the API."""
    lines = "\n".join(json.dumps({"taskId": n, "captchaType": "token"}) for n in range(1, 1001))
    result = invoke("enqueue", "--file", "-", "--json", input=lines + "\n")
    assert 0 == result.exit_code, result.output
    assert {
        "queued": 1000,
        "duplicates": 0,
        "refused": [],
        "refused_total": 0,
        "refused_by_reason": {},
    } == json.loads(result.stdout)
    with running_worker(settings, env):
        wait_until(lambda: sandbox.count() >= 1000, timeout=60)
    assert set(range(1, 1001)) == {r.task_id for r in sandbox.requests()}


def test_csv_with_header_and_bad_lines_reported_by_line_number(
    invoke: Invoke, redis_client: redis.Redis, settings: Settings
) -> None:
    """CSV with a header is read; bad lines are named by line number, good ones queued, and
    the exit status is non-zero."""
    text = "taskId,captchaType\n1,image\n-2,image\n3,NoSuchType\n\n4,HCaptchaTask\nx\n"
    result = invoke("enqueue", "--file", "-", input=text)
    assert 1 == result.exit_code
    assert "line 3: invalid taskId '-2'" in result.stderr
    assert "line 4: unknown captchaType 'NoSuchType'" in result.stderr
    assert "line 7: expected 2 columns" in result.stderr
    assert "queued 2, duplicates 0, refused 3" in result.stderr
    assert b"2" == redis_client.get("rf:npending")


def test_json_lines_with_bad_json_and_accounts(invoke: Invoke, redis_client: redis.Redis) -> None:
    """Malformed JSON lines are named by line; an unknown account in a line is refused."""
    text = (
        '{"taskId": 1, "captchaType": "image"}\n{oops\n[1]\n'
        '{"taskId": 2, "captchaType": "image", "account": "x"}\n'
    )
    result = invoke("enqueue", "-f", "-", "--json", input=text)
    assert 1 == result.exit_code
    doc = json.loads(result.stdout)
    assert 1 == doc["queued"]
    assert [2, 3, 4] == [r["line"] for r in doc["refused"]]
    assert "unknown account 'x'" in doc["refused"][2]["error"]


def test_check_config_masks_the_key(invoke: Invoke) -> None:
    """check-config prints the effective settings and never the key itself."""
    result = invoke("check-config", "--json")
    assert 0 == result.exit_code, result.output
    doc = json.loads(result.stdout)
    assert "capmonster" == doc["accounts"]["default"]["provider"]
    assert CLIENT_KEY not in result.output
    assert doc["accounts"]["default"]["key"].startswith("****")


@pytest.mark.parametrize(
    ("var", "value", "key"),
    [
        ("REPORT_FORWARDER_REPORT_DEADLINE_S", "soon", "delivery.report_deadline_s"),
        ("REPORT_FORWARDER_ACCOUNT_PAUSE_S", "-1", "delivery.account_pause_s"),
        ("REPORT_FORWARDER_LOG_FORMAT", "xml", "service.log_format"),
        ("REPORT_FORWARDER_RATE_LIMIT", "fast", "accounts.default.rate_limit"),
        ("REDIS_URL", "http://nope", "redis.url"),
    ],
)
def test_bad_value_exits_2_naming_key_and_value(
    invoke: Invoke, var: str, value: str, key: str
) -> None:
    """A bad setting exits with status 2 and a message naming the key, the value and the
    variable it came from."""
    result = invoke("check-config", **{var: value})
    assert 2 == result.exit_code
    assert key in result.stderr
    assert repr(value) in result.stderr
    assert "Traceback" not in result.output


def test_stats_json_prints_once(invoke: Invoke) -> None:
    """`stats --json` prints one JSON document and exits."""
    invoke("enqueue", "1", "image")
    result = invoke("stats", "--json")
    assert 0 == result.exit_code, result.output
    doc = json.loads(result.stdout)
    assert 1 == doc["backlog"]["pending_reports"]
    assert 1 == doc["backlog"]["queue_depth"]


def test_worker_refuses_to_start_without_a_key(invoke: Invoke) -> None:
    """A worker with no key for an account exits 2 naming the variable to set."""
    result = invoke("worker", CAPMONSTER_CLIENT_KEY="")
    assert 2 == result.exit_code
    assert "CAPMONSTER_CLIENT_KEY" in result.stderr


del FAST_RECOVERY
