"""Cluster-wide numbers from Redis: throughput, backlog, oldest queued age, dead letters,
paused accounts. Every worker on every host adds to the same per-minute counters, so these
figures are the whole fleet's without Prometheus."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Collection
from typing import Any

import redis

from worker.settings import Settings
from worker.settings.captcha_types import KINDS
from worker.settings.loader import ACCOUNT_NAME
from worker.store import limits
from worker.store.keys import Keys, split_ref
from worker.store.ledger import WORKER_TIMEOUT_S
from worker.store.messages import list_keys
from worker.store.vocabulary import COUNTED, OTHER, TERMINAL, known_code, provider_codes

WINDOWS_MIN = (1, 5, 15)
SPARK_SECONDS = 60
# A stats field as a worker writes it, "outcome|kind|error_code|account", is a few dozen
# bytes (an account name is at most 64 characters, a code of the bounded set a few dozen).
# A longer one is an older worker's, which wrote the API's code as sent (docs/design.md
# §1.1): it is read no further than its ends.
MAX_FIELD_BYTES = 1024


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def stats_field(raw: bytes, codes: Collection[str] = ()) -> str:
    """One field of a per-minute stats hash as it is counted and shown: its outcome, kind,
    error code and account each one of a bounded set, anything else ``other`` (an error
    code that is not :func:`~worker.store.vocabulary.known_code` with ``codes``, the
    providers' own, included). A field an older worker wrote with the API's code as sent —
    900 KB, a new one per answer, the key inside — is never decoded whole: only its first
    and last ``MAX_FIELD_BYTES // 2`` bytes are looked at, its code read as ``other``."""
    if len(raw) > MAX_FIELD_BYTES:
        head, tail = raw[: MAX_FIELD_BYTES // 2], raw[-(MAX_FIELD_BYTES // 2) :]
        outcome, _, rest = head.partition(b"|")
        kind = rest.partition(b"|")[0]
        code, account = b"|", tail.rpartition(b"|")[2]  # "|": no code holds it
    else:
        outcome, _, rest = raw.partition(b"|")
        kind, _, rest = rest.partition(b"|")
        code, _, account = rest.rpartition(b"|")
    outcome_s, kind_s, code_s, account_s = (
        part.decode("utf-8", "replace") for part in (outcome, kind, code, account)
    )
    return "|".join(
        (
            outcome_s if outcome_s in COUNTED else OTHER,
            kind_s if kind_s in KINDS or not kind_s else OTHER,
            code_s if not code_s or known_code(code_s, codes) else OTHER,
            account_s if ACCOUNT_NAME.match(account_s) or not account_s else OTHER,
        )
    )


def minute_counts(
    client: redis.Redis, keys: Keys, minutes: int, now: float, codes: Collection[str] = ()
) -> list[dict[str, int]]:
    """The per-minute counter hashes for the last ``minutes`` minutes, oldest first, each
    field read by :func:`stats_field` (``codes``: the providers' own error codes), so an
    older worker's many raw codes are counted together as ``other``."""
    current = int(now // 60)
    pipe = client.pipeline(transaction=False)
    for minute in range(current - minutes + 1, current + 1):
        pipe.hgetall(keys.stats(minute))
    rows = []
    for row in pipe.execute():
        counts: dict[str, int] = defaultdict(int)
        for field, value in row.items():
            counts[stats_field(field, codes)] += int(value)
        rows.append(dict(counts))
    return rows


def _orphaned(client: redis.Redis, keys: Keys, suspects: list[str]) -> int:
    """Pending reports whose message is in no list and held by no live worker (the sweep's
    suspects): normally 0, or a few for under ``lost_grace_s`` before the sweep hands them
    on. Anything else — above 0 for long — means reports are stranded: ops must see it."""
    count = 0
    for message_id in suspects[:1000]:
        entry = client.hget(keys.msgrefs, message_id)
        refs = _text(entry).split("|", 1)[1].split(",") if entry else []
        if not refs:
            continue
        pipe = client.pipeline(transaction=False)
        for ref in refs:
            account, task_id = split_ref(ref)
            pipe.hmget(keys.report(account, task_id), "s", "m")
        count += sum(
            1 for state, owner in pipe.execute() if state == b"q" and owner == message_id.encode()
        )
    return count


def _paused_accounts(
    client: redis.Redis, keys: Keys, paused: list[Any], now: float, codes: Collection[str]
) -> list[dict[str, Any]]:
    """The accounts paused now, with the error code that paused each (one of the bounded
    set: an older worker's pause may hold the API's code as sent, read as ``other``)."""
    found = []
    for account, until in paused:
        name = _text(account)
        if until <= now:
            continue
        reason = client.get(keys.paused_reason(name))
        code = (json.loads(reason) if reason else {}).get("error_code")
        if code is not None and not (isinstance(code, str) and known_code(code, codes)):
            code = OTHER
        found.append(
            {
                "account": name,
                "until": until,
                "remaining_s": round(until - now, 1),
                "error_code": code,
            }
        )
    return found


def snapshot(
    client: redis.Redis, settings: Settings, *, now: float | None = None
) -> dict[str, Any]:
    """Everything ``report-forwarder stats`` shows, as one JSON-able document."""
    now = time.time() if now is None else now
    keys = Keys(settings.key_prefix)
    urgent, normal = list_keys(settings.queue)
    pipe = client.pipeline(transaction=False)
    pipe.llen(urgent)
    pipe.llen(normal)
    pipe.get(keys.npending)
    pipe.zcard(keys.sched)
    pipe.zcard(keys.leases)
    pipe.zrange(keys.msgs, 0, 0)
    pipe.zrange(keys.umsgs, 0, 0)
    pipe.xlen(keys.dead)
    pipe.zrange(keys.paused, 0, -1, withscores=True)
    pipe.hgetall(keys.deadcount)
    pipe.hkeys(keys.suspect)
    pipe.zrange(keys.workers, 0, -1, withscores=True)
    pipe.time()
    second = int(now)
    for sec in range(second - SPARK_SECONDS, second):
        pipe.get(keys.throughput(sec))
    (depth_u, depth_n, npending, waiting, running, oldest_n, oldest_u, dead_total, paused,
     dead_by_reason, suspects, workers, redis_time, *per_second) = pipe.execute()  # fmt: skip
    depth = int(depth_u) + int(depth_n)
    rnow = redis_time[0] + redis_time[1] / 1e6
    live_workers = sum(1 for _, beat in workers if rnow - beat < WORKER_TIMEOUT_S)
    orphaned = _orphaned(client, keys, [_text(s) for s in suspects])

    oldest_age = None
    for oldest in (oldest_n, oldest_u):
        entry = client.hget(keys.msgrefs, oldest[0]) if oldest else None
        if entry:
            age = max(0.0, now - float(_text(entry).split("|", 1)[0]))
            oldest_age = age if oldest_age is None else max(oldest_age, age)

    codes = provider_codes(settings.accounts.values())
    rows = minute_counts(client, keys, max(WINDOWS_MIN), now, codes)
    windows: dict[str, Any] = {}
    for span in WINDOWS_MIN:
        by_outcome: dict[str, int] = defaultdict(int)
        by_kind: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        by_code: dict[str, int] = defaultdict(int)
        for row in rows[-span:]:
            for field, count in row.items():
                outcome, kind, code, _account = ([*field.split("|"), "", "", ""])[:4]
                by_outcome[outcome] += count
                by_kind[kind][outcome] += count
                if code:
                    by_code[code] += count
        done = sum(by_outcome.get(o, 0) for o in TERMINAL)
        windows[f"{span}m"] = {
            "by_outcome": dict(by_outcome),
            "by_kind": {k: dict(v) for k, v in by_kind.items()},
            "by_error_code": dict(by_code),
            "per_second": round(done / (span * 60), 3),
        }

    return {
        "at": now,
        "queue": settings.queue,
        "backlog": {
            "pending_reports": int(npending or 0),
            "queue_depth": int(depth),
            "waiting_retry": int(waiting),
            "in_flight": int(running),
            "oldest_queued_age_s": None if oldest_age is None else round(oldest_age, 3),
            "orphaned": orphaned,
        },
        "workers": live_workers,
        "throughput": windows,
        "dead_letters": {
            "total": int(dead_total),
            "by_reason": {_text(k): int(v) for k, v in dead_by_reason.items() if int(v) > 0},
        },
        "per_second_last_60s": [int(v or 0) for v in per_second],
        "paused_accounts": _paused_accounts(client, keys, paused, now, codes),
        "accounts": {
            name: {
                "provider": a.provider.name,
                **limits.usage(client, keys, a, settings.ratelimit_margin_s),
            }
            for name, a in settings.accounts.items()
        },
    }
