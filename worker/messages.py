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

TASK_NAME = "report_forwarder.forward"
ID = "@ID@"
REFS = "@REFS@"


def template(queue: str) -> str:
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
        "priority": 0,
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
