"""`enqueue --file` on hostile files, as real `python -m worker` runs against a real Redis:
bytes that are not UTF-8, a BOM, huge or deeply nested lines, and files of refused lines
whose report must stay bounded."""

from __future__ import annotations

import json
from pathlib import Path

import redis

from worker.cli import MAX_LINE_BYTES, SHOWN_REFUSALS

from .clirun import run_cli


def json_line(task_id: object, ctype: object = "image", **extra: object) -> bytes:
    return json.dumps({"taskId": task_id, "captchaType": ctype, **extra}).encode() + b"\n"


def test_a_line_that_is_not_utf8_is_one_refusal_and_every_other_line_is_queued(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    """5,000 good lines, one with a byte that is not UTF-8, 5,000 more: line 5001 is refused
    by number, the 10,000 others are all queued, the summary is printed and the exit is 1."""
    path = tmp_path / "mixed.jsonl"
    with path.open("wb") as out:
        out.writelines(json_line(n) for n in range(1, 5001))
        out.write(b'{"taskId": 99999, "captchaType": "im\xffage"}\n')
        out.writelines(json_line(n) for n in range(5001, 10001))
    result = run_cli(env, "enqueue", "--file", str(path))
    assert 1 == result.returncode, result.stderr
    assert "Traceback" not in result.stderr
    assert "line 5001: not UTF-8 text" in result.stderr
    assert "queued 10000, duplicates 0, refused 1" in result.stderr
    assert "refused by reason: not UTF-8 text 1" in result.stderr
    assert b"10000" == redis_client.get("rf:npending")


def test_csv_bad_bytes_are_refused_by_line_and_json_summary_counts_them(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    """In CSV too a line that is not UTF-8 is refused by number; --json carries it."""
    path = tmp_path / "mixed.csv"
    path.write_bytes(b"taskId,captchaType\n1,image\n2,\xc3\x28image\n3,token\n")
    result = run_cli(env, "enqueue", "--file", str(path), "--json")
    assert 1 == result.returncode, result.stderr
    doc = json.loads(result.stdout)
    assert (2, 0, 1) == (doc["queued"], doc["duplicates"], doc["refused_total"])
    assert 3 == doc["refused"][0]["line"]
    assert doc["refused"][0]["error"].startswith("not UTF-8 text")
    assert {"not UTF-8 text": 1} == doc["refused_by_reason"]
    assert b"2" == redis_client.get("rf:npending")


def test_a_utf8_bom_at_the_start_of_csv_or_json_lines_is_accepted(
    env: dict[str, str], redis_client: redis.Redis
) -> None:
    """A file saved with a UTF-8 BOM (as Windows editors do) reads like one without."""
    csv_result = run_cli(
        env, "enqueue", "-f", "-", stdin=b"\xef\xbb\xbftaskId,captchaType\n1,image\n2,token\n"
    )
    assert 0 == csv_result.returncode, csv_result.stderr
    assert "queued 2, duplicates 0, refused 0" in csv_result.stderr
    json_result = run_cli(env, "enqueue", "-f", "-", stdin=b"\xef\xbb\xbf" + json_line(3))
    assert 0 == json_result.returncode, json_result.stderr
    assert "queued 1, duplicates 0, refused 0" in json_result.stderr
    assert b"3" == redis_client.get("rf:npending")


def test_json_lines_account_null_means_the_default_account(
    env: dict[str, str], redis_client: redis.Redis
) -> None:
    """`"account": null` is the default account, as in Python and over HTTP."""
    result = run_cli(env, "enqueue", "-f", "-", "--json", stdin=json_line(7, account=None))
    assert 0 == result.returncode, result.stdout + result.stderr
    assert 1 == json.loads(result.stdout)["queued"]
    assert b"q" == redis_client.hget("rf:r:default:7", "s")


def test_huge_and_deep_lines_are_refused_without_stopping_the_file(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    """A 5,000-digit taskId, a line longer than the line cap, JSON nested beyond the parser's
    depth, an array and a non-JSON line are each one refusal; the good lines are queued."""
    path = tmp_path / "hostile.jsonl"
    with path.open("wb") as out:
        out.write(json_line(1))
        out.write(b'{"taskId": ' + b"9" * 5000 + b', "captchaType": "image"}\n')
        out.write(json_line("9" * 5000))
        out.write(b'{"taskId": 2, "captchaType": "' + b"x" * (MAX_LINE_BYTES * 3) + b'"}\n')
        out.write(b"[" * 60000 + b"\n")
        out.write(b"[1, 2]\n{oops\n")
        out.write(json_line(3))
    result = run_cli(env, "enqueue", "-f", str(path), "--json")
    assert 1 == result.returncode, result.stderr
    assert "Traceback" not in result.stderr
    doc = json.loads(result.stdout)
    assert 2 == doc["queued"]
    assert [2, 3, 4, 5, 6, 7] == [r["line"] for r in doc["refused"]]
    assert {
        "invalid taskId": 2,
        "line too long": 1,
        "not JSON": 2,
        "not a JSON object": 1,
    } == doc["refused_by_reason"]
    assert all(len(r["error"]) < 2100 for r in doc["refused"])
    assert b"2" == redis_client.get("rf:npending")


def test_a_large_file_of_refused_lines_gives_one_bounded_valid_json_document(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    """100,000 refused lines (several reasons): --json prints one valid document with the
    first SHOWN_REFUSALS refusals in full, counts by reason and totals, tens of kilobytes
    whatever the file's size; the plain report likewise shows SHOWN_REFUSALS lines."""
    path = tmp_path / "refused.jsonl"
    with path.open("wb") as out:
        for n in range(100_000):
            if n % 4 == 0:
                out.write(json_line(-n - 1))
            elif n % 4 == 1:
                out.write(json_line(n + 1, "NoSuchType"))
            elif n % 4 == 2:
                out.write(json_line(n + 1, account="nobody"))
            else:
                out.write(b'{"taskId": \xff}\n')
    result = run_cli(env, "enqueue", "-f", str(path), "--json")
    assert 1 == result.returncode, result.stderr[-2000:]
    assert len(result.stdout) < 64 * 1024
    doc = json.loads(result.stdout)
    assert (0, 0, 100_000) == (doc["queued"], doc["duplicates"], doc["refused_total"])
    assert SHOWN_REFUSALS == len(doc["refused"])
    assert list(range(1, SHOWN_REFUSALS + 1)) == [r["line"] for r in doc["refused"]]
    assert {
        "invalid taskId": 25_000,
        "unknown captchaType": 25_000,
        "unknown account": 25_000,
        "not UTF-8 text": 25_000,
    } == doc["refused_by_reason"]
    assert [] == redis_client.keys("*")

    plain = run_cli(env, "enqueue", "-f", str(path))
    assert 1 == plain.returncode
    lines = plain.stderr.splitlines()
    assert SHOWN_REFUSALS == sum(1 for line in lines if line.startswith("line "))
    assert len(lines) <= SHOWN_REFUSALS + 3
    assert "queued 0, duplicates 0, refused 100000" == lines[-1]
