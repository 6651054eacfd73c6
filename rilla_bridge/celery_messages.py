"""Everything that knows Celery's message format: queue and task names, and the messages.

We put work on Celery's queues with one Redis write instead of Celery's publish path: the
dispatch step of ``rilla_bridge.lanes`` writes Celery protocol-2 messages (kombu's
Redis-transport envelope) straight onto kombu's Redis list inside the Lua script that takes
the event from its tenant's lane, so taking a slot and enqueueing are one atomic step. The
script builds the message from ``process_event_template()``: the message text cut at the
places where the event id, the tenant and the task id go.

The body is JSON text with ``body_encoding`` ``utf-8`` (kombu then passes it through as is)
rather than Celery's base64, so that a Lua script can write it without encoding. Checked
against the Celery and kombu versions that ``pyproject.toml`` pins to a range:
``tests/unit/rilla_bridge/test_celery_messages.py`` compares our message with the one Celery
itself publishes (and fails when Celery's differs), and the integration tests run real
workers on it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import uuid
from typing import Any

TASK_PROCESS_EVENT = "rilla_bridge.process_event"
TASK_CALLRAIL_JOB = "rilla_bridge.callrail_job"
QUEUE_EVENTS = "events"
QUEUE_CALLRAIL = "callrail"

_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"


def _envelope(task: str, args: list[Any], queue: str, task_id: str, tag: str, body: str,
              body_encoding: str, argsrepr: str) -> dict[str, Any]:
    return {
        "body": body,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": argsrepr,
            "kwargsrepr": "{}",
            "origin": _ORIGIN,
            "ignore_result": True,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": body_encoding,
            "delivery_tag": tag,
        },
    }


def task_message(task: str, args: list[Any], queue: str) -> str:
    """A kombu Redis-transport message for ``task(*args)`` routed to ``queue``, as Celery
    writes it (base64 body)."""
    task_id = str(uuid.uuid4())
    body = base64.b64encode(json.dumps([args, {}, _EMBED]).encode()).decode()
    return json.dumps(_envelope(task, args, queue, task_id, str(uuid.uuid4()), body, "base64",
                                repr(args)))


# Placeholders in the process_event template; none can occur in real message text.
_MARKS = {"@EID@": "id", "@TEN@": "tenant", "@TID@": "tid"}
_MARK_RE = re.compile("|".join(_MARKS))
SAFE_ARG = re.compile(r"[A-Za-z0-9_.:-]{1,200}")


def process_event_template() -> list[str]:
    """``process_event(event_id, tenant)``'s message cut into pieces: ``[text, name, text,
    name, ..., text]`` where each name is ``id``, ``tenant`` or ``tid`` (the task id, also the
    delivery tag). Joining the pieces with the values in place gives the message."""
    args = ["@EID@", "@TEN@"]
    body = json.dumps([args, {}, _EMBED])
    msg = _envelope(TASK_PROCESS_EVENT, args, QUEUE_EVENTS, "@TID@", "@TID@", body, "utf-8",
                    repr(args))
    text = json.dumps(msg)
    out: list[str] = []
    pos = 0
    for m in _MARK_RE.finditer(text):
        out += [text[pos:m.start()], _MARKS[m.group()]]
        pos = m.end()
    out.append(text[pos:])
    return out


PROCESS_EVENT_TEMPLATE = process_event_template()


def process_event_message(event_id: str, tenant: str, task_id: str) -> str:
    """The message the dispatch script writes, filled in by Python (tests, tools)."""
    if not (SAFE_ARG.fullmatch(event_id) and SAFE_ARG.fullmatch(tenant)
            and SAFE_ARG.fullmatch(task_id)):
        raise ValueError("event ids, tenant slugs and task ids are plain tokens")
    values = {"id": event_id, "tenant": tenant, "tid": task_id}
    parts = PROCESS_EVENT_TEMPLATE
    return "".join(p if i % 2 == 0 else values[p] for i, p in enumerate(parts))


def message_args(message: bytes | str) -> list[Any] | None:
    """The task arguments of a queued message we wrote (None for anything else)."""
    try:
        payload = json.loads(message)
        body = payload["body"]
        if payload["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    return args if isinstance(args, list) else None
