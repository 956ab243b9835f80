"""Celery task messages, written by us rather than by ``apply_async``.

Producers and the sweeper push messages from inside Lua scripts, so that the ledger entry,
the dedup check and the message land in one atomic round trip (and a bulk enqueue in one
round trip per chunk). The message is exactly what kombu's Redis transport stores and a
Celery worker (protocol 2, JSON) consumes: the task id is also the kombu delivery tag, so
the sweeper can see whether a message sits in kombu's ``unacked`` hash. The body is plain
JSON (no base64) and carries only report refs (``account:taskId``) — never a key.
"""

from __future__ import annotations

import json
from functools import lru_cache

TASK_NAME = "report_forwarder.forward"
ID = "@ID@"
REFS = "@REFS@"
# kombu's Redis transport keeps one list per priority step and BRPOPs them in order, the
# plain queue name first: urgent messages (retries, deferred and recovered reports, all
# closer to their deadline) go there; new reports wait in the priority-9 list behind them.
URGENT_PRIORITY = 0
NORMAL_PRIORITY = 9
_SEP = "\x06\x16"  # kombu.transport.redis.Channel.sep


def list_key(queue: str, *, urgent: bool) -> str:
    """The Redis list kombu reads for ``queue`` at that priority."""
    return queue if urgent else f"{queue}{_SEP}{NORMAL_PRIORITY}"


def list_keys(queue: str) -> tuple[str, str]:
    """(urgent, normal) list keys of ``queue``."""
    return list_key(queue, urgent=True), list_key(queue, urgent=False)


@lru_cache(maxsize=64)
def template(queue: str, *, urgent: bool = False) -> str:
    """The message for ``queue`` with ``@ID@`` and ``@REFS@`` placeholders.

    ``@REFS@`` stands for ``\\"acct:1\\",\\"acct:2\\"`` (the refs, JSON-quoted inside the body
    string); refs contain only letters, digits, ``_.-:``, so they need no other escaping.
    """
    headers = {
        "lang": "py",
        "task": TASK_NAME,
        "id": ID,
        "root_id": ID,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "eta": None,
        "expires": None,
        "timelimit": [None, None],
        "argsrepr": "",
        "kwargsrepr": "",
        "origin": "report-forwarder",
        "ignore_result": True,
    }
    properties = {
        "correlation_id": ID,
        "reply_to": "",
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": queue},
        "priority": URGENT_PRIORITY if urgent else NORMAL_PRIORITY,
        "delivery_tag": ID,
    }
    message = {
        "body": "[[[" + REFS + "]], {}, {}]",
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": properties,
    }
    text = json.dumps(message, separators=(",", ":"))
    # json.dumps escaped the placeholder's context, not the placeholder itself
    assert text.count(REFS) == 1
    return text
