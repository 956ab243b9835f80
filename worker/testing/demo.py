"""``report-forwarder demo``: the whole pipeline on embedded defaults, in one process.

Starts (or reuses) the embedded Redis, the sandbox API on a free loopback port and an
in-process worker; queues a few thousand mixed reports — some scripted to be rejected,
some to fail transiently before they are accepted, and a few on an account whose balance
is zero (one call pauses it; the rest are dead-lettered without calling the API) — shows
live progress, then prints what became of them next to what the sandbox saw. It uses its
own queue and key prefix, so it never touches real reports.
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections import Counter
from typing import Any

import click

from worker.observability.logs import configure as configure_logging
from worker.producer import Producer
from worker.settings import load_settings
from worker.store import connection as store
from worker.store.keys import Keys
from worker.store.messages import list_keys
from worker.testing.sandbox import Rule, Sandbox

DEMO_PREFIX = "rf-demo"
DEMO_QUEUE = "reports-demo"
DEMO_KEY = "demo-key-not-a-secret"
BROKE_KEY = "demo-key-zero-balance"
TYPES = (
    "ImageToTextTask",
    "RecaptchaV2TaskProxyless",
    "HCaptchaTask",
    "TurnstileTask",
    "GeeTestTask",
    "image",
    "recaptcha",
    "ComplexImageTask",
)
TIMEOUT_S = 120.0


def _demo_config(home: str) -> str:
    path = os.path.join(home, "demo.toml")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(
            f"""
[redis]
key_prefix = "{DEMO_PREFIX}"
[service]
queue = "{DEMO_QUEUE}"
[delivery]
backoff_cap_s = 4.0
[accounts.default]
provider = "capmonster"
key_env = "REPORT_FORWARDER_DEMO_KEY"
rate_limit = "2000/second"
[accounts.broke]
provider = "capmonster"
key_env = "REPORT_FORWARDER_DEMO_BROKE_KEY"
rate_limit = "2000/second"
"""
        )
    return path


def _clear_namespace(client: Any) -> None:
    keys = list(client.scan_iter(match=f"{DEMO_PREFIX}:*", count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])
    client.delete(*list_keys(DEMO_QUEUE))


def run_demo(config_path: str | None, reports: int, concurrency: int, verbose: bool) -> int:
    from celery.contrib.testing.worker import start_worker

    from worker.delivery.celery_app import create_app, worker_options
    from worker.delivery.runtime import Runtime

    base = load_settings(config_path)
    configure_logging(base.log_format, "INFO" if verbose else "ERROR", cache=False)
    out = sys.stderr
    base.home.mkdir(parents=True, exist_ok=True)
    redis_url = store.resolve_url(base)
    where = "embedded Redis" if base.embedded_redis else store.describe(redis_url)
    with Sandbox() as sandbox:
        env = dict(os.environ)
        env.update(
            REPORT_FORWARDER_CONFIG=_demo_config(str(base.home)),
            REPORT_FORWARDER_API_URL=sandbox.url,
            REPORT_FORWARDER_DEMO_KEY=DEMO_KEY,
            REPORT_FORWARDER_DEMO_BROKE_KEY=BROKE_KEY,
            REDIS_URL=redis_url,
        )
        env.pop("REPORT_FORWARDER_RATE_LIMIT", None)
        settings = load_settings(environ=env)
        runtime = Runtime(settings, redis_url, env)
        _clear_namespace(runtime.client)
        plan = _script(sandbox, reports)
        click.echo(
            f"demo: {reports} reports through {where} -> sandbox API at {sandbox.url}, "
            f"{concurrency} worker threads",
            err=True,
        )
        producer = Producer(settings, runtime.client)
        started = time.monotonic()
        result = producer.enqueue_many(plan)
        enqueue_s = time.monotonic() - started
        click.echo(f"queued {result.queued} in {enqueue_s * 1000:.0f} ms", err=True)
        app = create_app(runtime)
        options = worker_options(settings.queue, concurrency)
        with start_worker(app, perform_ping_check=False, loglevel="ERROR", **options):
            done = _wait(runtime, len(plan), started, out)
        elapsed = time.monotonic() - started
        _summary(runtime, sandbox, len(plan), elapsed, out)
    return 0 if done else 1


def _script(sandbox: Sandbox, reports: int) -> list[dict[str, Any]]:
    """Mixed reports, and sandbox rules that make some of them fail."""
    rng = random.Random(7)
    base_id = int(time.time()) * 1000
    items: list[dict[str, Any]] = []
    sandbox.add_rule(Rule(client_key=BROKE_KEY, error_code="ERROR_ZERO_BALANCE"))
    for n in range(reports):
        task_id = base_id + n
        roll = rng.random()
        if roll < 0.05:
            sandbox.add_rule(Rule(task_id=task_id, error_code="ERROR_NO_SUCH_CAPCHA_ID"))
        elif roll < 0.07:
            sandbox.add_rule(Rule(task_id=task_id, http_status=503, times=1))
        elif roll < 0.08:
            sandbox.add_rule(Rule(task_id=task_id, error_code="ERROR_NO_SLOT_AVAILABLE", times=2))
        elif n == reports // 2:  # the API pushes back once: the whole account cools down 2 s
            sandbox.add_rule(Rule(task_id=task_id, http_status=429, retry_after=2, times=1))
        account = "broke" if n % 200 == 199 else "default"
        items.append({"taskId": task_id, "captchaType": rng.choice(TYPES), "account": account})
    return items


def _wait(runtime: Any, total: int, started: float, out: Any) -> bool:
    keys = Keys(runtime.settings.key_prefix)
    client = runtime.client
    tty = out.isatty()
    last_print = 0.0
    while True:
        pending = int(client.get(keys.npending) or 0)
        done = total - pending
        now = time.monotonic()
        if tty or now - last_print >= 2 or pending == 0:
            rate = done / max(now - started, 1e-6)
            line = f"{done}/{total} done, {pending} pending, {rate:,.0f} reports/s"
            click.echo(("\r" + line + "   ") if tty else line, err=True, nl=not tty)
            last_print = now
        if pending == 0:
            if tty:
                click.echo("", err=True)
            return True
        if now - started > TIMEOUT_S:
            click.echo(f"\ngave up after {TIMEOUT_S:.0f} s with {pending} pending", err=True)
            return False
        time.sleep(0.2)


def _summary(runtime: Any, sandbox: Sandbox, total: int, elapsed: float, out: Any) -> None:
    from worker.store.deadletters import DeadLetters

    keys = Keys(runtime.settings.key_prefix)
    letters = list(DeadLetters(runtime.client, keys).iter())
    outcomes = Counter(f"{d.reason} {d.error_code or ''}".strip() for d in letters)
    accepted = sandbox.count(success=True)
    seen = Counter(r.outcome for r in sandbox.requests())
    rows = [("accepted", accepted)] + [
        (f"dead-lettered: {name}", count) for name, count in outcomes.most_common()
    ]
    width = max(len(name) for name, _ in rows) + 2
    click.echo("", err=True)
    click.echo(f"{'outcome':<{width}}{'reports':>8}", err=True)
    for name, count in rows:
        click.echo(f"{name:<{width}}{count:>8}", err=True)
    click.echo(f"{'total':<{width}}{accepted + len(letters):>8}  (queued {total})", err=True)
    click.echo("", err=True)
    calls = ", ".join(f"{k} {v}" for k, v in seen.most_common())
    click.echo(f"API calls the sandbox saw: {sum(seen.values())} ({calls})", err=True)
    click.echo(
        f"throughput: {total / elapsed:,.0f} reports/s over {elapsed:.1f} s "
        "(including retries' 2 s backoff)",
        err=True,
    )
    config = runtime.settings.sources[-1]
    click.echo(
        f"see them: report-forwarder --config {config} dead-letters list   "
        f"(or: stats, dead-letters replay --reason account_paused)",
        err=True,
    )
    del out
