"""A hostile or broken API answer, end to end through a real worker: whatever errorCode
and errorDescription it sends (any length under the answer cap, any characters, the
client key echoed anywhere in any letter case), what the service keeps and shows — the
/metrics text, the stats, the dead letters, every Redis value, the log lines — stays
bounded and holds no key (docs/design.md §1.1; classify itself: tests/unit/test_upstream.py)."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
import redis
import structlog
from celery.contrib.testing.worker import start_worker
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.key_echo import mangle
from worker.cli import main
from worker.delivery.celery_app import create_app, worker_options
from worker.delivery.runtime import Runtime
from worker.delivery.upstream import MAX_CODE_CHARS
from worker.observability.metrics import Metrics
from worker.observability.stats import snapshot
from worker.producer import Producer
from worker.settings import Settings
from worker.store.deadletters import DeadLetters
from worker.store.keys import Keys
from worker.store.vocabulary import (
    ACCOUNT_FAULT_CODES,
    OTHER,
    REJECTED_CODES,
    TRANSIENT_CODES,
)
from worker.testing.sandbox import Rule, Sandbox

from .conftest import CLIENT_KEY, all_redis_bytes, wait_until

# every answer scripted here is a rejection: its code is one of these, or "other"
LABELS = {*REJECTED_CODES, OTHER}
# what one dead report may leave in Redis, all told (its dead letter, its share of the
# stats and counters), and what every series of /metrics may take together
PER_REPORT_BYTES = 1500
METRICS_BYTES = 64_000
PLAUSIBLE = rf"[A-Z0-9_]{{1,{MAX_CODE_CHARS}}}"

# any characters: controls, bidi overrides and lone surrogates (sent JSON-escaped) included
HOSTILE = st.text(
    st.one_of(st.characters(), st.sampled_from(["\ud800", "\u202e", "\x1b", "\n"])), max_size=80
)
# ASCII that JSON does not escape, repeated up to ~900 KB: under the 1 MiB answer cap
LONG = st.builds(
    lambda s, n: s * n,
    st.text(st.characters(min_codepoint=32, max_codepoint=126, exclude_characters='"\\'),
            min_size=1, max_size=8),
    st.integers(1, 110_000),
)  # fmt: skip
SHORT_CODES = st.one_of(
    st.sampled_from(sorted(REJECTED_CODES)), st.from_regex(PLAUSIBLE, fullmatch=True), HOSTILE
).filter(lambda c: c and c not in ACCOUNT_FAULT_CODES | TRANSIENT_CODES)


@st.composite
def answers(draw: st.DrawFn) -> dict[str, Any]:
    """One error answer: its code and description (one of them possibly ~900 KB), its
    status, and the key (case-mangled) put into one of them, or into neither."""
    long = draw(st.sampled_from(["none", "errorCode", "errorDescription"]))
    code = draw(LONG if long == "errorCode" else SHORT_CODES)
    description = draw(LONG if long == "errorDescription" else HOSTILE)
    fields: dict[str, Any] = {"errorId": 1, "errorCode": code, "errorDescription": description}
    where = draw(st.sampled_from(["errorCode", "errorDescription", "nowhere"]))
    if where in fields:
        text = fields[where]
        cut = draw(st.integers(0, len(text)))
        echo = mangle(CLIENT_KEY, draw(st.lists(st.booleans(), max_size=len(CLIENT_KEY))))
        fields[where] = text[:cut] + echo + text[cut:]
    return {"fields": fields, "status": draw(st.sampled_from([200, 400, 403, 404, 500, 503]))}


_HALF = "E" * 450_000
BIG_CODE = {
    "fields": {"errorId": 1, "errorCode": _HALF + CLIENT_KEY.upper() + _HALF},
    "status": 400,
}
BIG_DESCRIPTION = {
    "fields": {"errorId": 1, "errorCode": "ERROR_X", "errorDescription": _HALF + CLIENT_KEY},
    "status": 200,
}


@pytest.fixture
def metered(settings: Settings, env: dict[str, str]) -> Iterator[tuple[Metrics, Runtime]]:
    """An in-process worker whose metrics live in a private registry."""
    metrics = Metrics(CollectorRegistry())
    runtime = Runtime(settings, settings.redis_url, env, metrics=metrics)
    metrics.watch(runtime.client, settings)
    app = create_app(runtime)
    with start_worker(app, perform_ping_check=False, **worker_options(settings.queue, 8)):
        yield metrics, runtime
    runtime.client.close()


def _code_labels(metrics: Metrics) -> list[str]:
    """The error_code label of every series of report_forwarder_reports_total."""
    text = generate_latest(metrics.registry).decode()
    return [
        sample.labels["error_code"]
        for family in text_string_to_metric_families(text)
        if family.name == "report_forwarder_reports"
        for sample in family.samples
        if sample.name == "report_forwarder_reports_total"
    ]


def _no_key(text: str) -> bool:
    return CLIENT_KEY.lower() not in text.lower()


def test_hostile_answers_leave_bounded_keyless_traces(
    metered: tuple[Metrics, Runtime],
    settings: Settings,
    sandbox: Sandbox,
    redis_client: redis.Redis,
    env: dict[str, str],
) -> None:
    """Error answers with any errorCode and errorDescription (up to ~900 KB, any
    characters, the key echoed in any case) leave /metrics, the stats, the dead letters,
    Redis and the log lines bounded in size and distinct codes, and free of the key; a
    plausible unknown code stays readable in its dead letter."""
    metrics, runtime = metered
    producer = Producer(settings, runtime.client)
    dead = DeadLetters(redis_client, Keys(settings.key_prefix))
    task_ids = itertools.count(1)
    sent: dict[int, dict[str, Any]] = {}
    lines: list[MutableMapping[str, Any]]

    @hsettings(
        max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(batch=st.lists(answers(), min_size=1, max_size=4))
    @example(batch=[BIG_CODE, BIG_DESCRIPTION])  # the review's measurement: ~900 KB each
    def deliver(batch: list[dict[str, Any]]) -> None:
        for answer in batch:
            task_id = next(task_ids)
            sent[task_id] = answer["fields"]
            body = json.dumps(answer["fields"])
            sandbox.add_rule(Rule(task_id=task_id, http_status=answer["status"], body=body))
            producer.enqueue(task_id, "image")
        wait_until(lambda: len(sent) == dead.count(), timeout=60)

        labels = _code_labels(metrics)
        assert set(labels) <= LABELS
        metrics_text = generate_latest(metrics.registry).decode()
        assert len(metrics_text) < METRICS_BYTES
        assert _no_key(metrics_text)
        stored = all_redis_bytes(redis_client)
        assert len(stored) < 20_000 + PER_REPORT_BYTES * len(sent)
        assert _no_key(stored.decode("utf-8", "replace"))
        stats = snapshot(redis_client, settings)
        assert set(stats["throughput"]["1m"]["by_error_code"]) <= LABELS
        assert len(json.dumps(stats)) < 20_000
        assert _no_key(json.dumps(stats))
        for letter in dead.iter():
            assert letter.error_code in LABELS
            assert len(letter.error) <= 400
            code = sent[letter.task_id]["errorCode"]
            if re.fullmatch(PLAUSIBLE, code):  # readable where a person reads one report
                assert letter.error.startswith(code)
        logged = json.dumps(lines, default=str)
        assert _no_key(logged)
        assert {x.get("error_code") for x in lines if x["event"].startswith("report.")} <= {
            *LABELS,
            None,
        }
        assert max(len(str(x.get("error", ""))) for x in lines) <= 400

    with structlog.testing.capture_logs() as lines:
        deliver()
    exports = [CliRunner().invoke(main, [*args], env=env) for args in EXPORTS]
    for result in exports:
        assert 0 == result.exit_code, result.output
        assert _no_key(result.output)
        assert len(result.output) < 2_000 * len(sent)
    assert set(json.loads(exports[0].stdout)["throughput"]["1m"]["by_error_code"]) <= LABELS


EXPORTS = (("stats", "--json"), ("dead-letters", "export"), ("dead-letters", "list", "--json"))


def test_many_distinct_unknown_codes_make_one_series(
    metered: tuple[Metrics, Runtime],
    settings: Settings,
    sandbox: Sandbox,
    redis_client: redis.Redis,
) -> None:
    """200 answers, each with its own unknown code, make one series and one stats field
    (``other``), each code kept in its own dead letter."""
    metrics, runtime = metered
    producer = Producer(settings, runtime.client)
    for task_id in range(1, 201):
        body = json.dumps({"errorId": 1, "errorCode": f"ERROR_NEW_{task_id}"})
        sandbox.add_rule(Rule(task_id=task_id, body=body))
    producer.enqueue_many([(task_id, "image") for task_id in range(1, 201)])
    dead = DeadLetters(redis_client, Keys(settings.key_prefix))
    wait_until(lambda: 200 == dead.count(), timeout=60)

    assert [OTHER] == _code_labels(metrics)
    assert {OTHER: 200} == snapshot(redis_client, settings)["throughput"]["15m"]["by_error_code"]
    assert {f"ERROR_NEW_{n}" for n in range(1, 201)} == {d.error for d in dead.iter()}
