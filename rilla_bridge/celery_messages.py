"""Everything that knows Celery's message format: queue and task names, and the messages.

We put work on Celery's queues with one Redis write instead of Celery's publish path: intake
and the scheduler write Celery protocol-2 messages (kombu's Redis-transport envelope) straight
onto kombu's Redis lists inside the same Lua script that stores or moves the event, so storing
and enqueueing are one atomic step and cost one round trip.

Checked against the Celery and kombu versions that ``pyproject.toml`` pins to a range:
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
_EMBED_JSON = json.dumps(_EMBED)
_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"


def task_message(task: str, args: list[Any], queue: str, now: float) -> str:
    """A kombu Redis-transport message for ``task(*args)`` routed to ``queue``, queued at
    ``now`` (epoch seconds)."""
    task_id = str(uuid.uuid4())
    body = json.dumps([args, {}, _EMBED]).encode()
    message = {
        "body": base64.b64encode(body).decode(),
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
            "argsrepr": repr(args),
            "kwargsrepr": "{}",
            "origin": _ORIGIN,
            "ignore_result": True,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
            # When this copy was queued: the scheduler's sweeper uses the oldest queued
            # message's time to tell a lost event from one still waiting in a backlog.
            "rb_at": round(now, 3),
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(message)


def _process_event_template() -> str:
    """``task_message`` for process_event with its per-message values as format fields, so
    that intake (one message per webhook) fills in six values instead of encoding JSON."""
    msg = json.loads(task_message(TASK_PROCESS_EVENT, ["@EID@"], QUEUE_EVENTS, 0.0))
    headers, props = msg["headers"], msg["properties"]
    msg["body"] = "@BODY@"
    headers["id"] = headers["root_id"] = props["correlation_id"] = "@TID@"
    headers["argsrepr"] = "@ARGSREPR@"
    headers["rb_at"] = "@AT@"
    props["delivery_tag"] = "@TAG@"
    text = json.dumps(msg).replace("{", "{{").replace("}", "}}")
    for marker, field in (('"@AT@"', "{at}"), ("@BODY@", "{body}"), ("@TID@", "{tid}"),
                          ("@ARGSREPR@", "{argsrepr}"), ("@TAG@", "{tag}")):
        assert marker in text, marker
        text = text.replace(marker, field)
    return text


_PROCESS_EVENT = _process_event_template()
_SAFE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,200}")


def process_event_message(event_id: str, now: float) -> str:
    """The queue message for ``process_event(event_id)``: the same JSON as ``task_message``
    (the tests compare both with Celery's), from a template."""
    if not _SAFE_ID.fullmatch(event_id):   # anything JSON or repr would escape: the slow path
        return task_message(TASK_PROCESS_EVENT, [event_id], QUEUE_EVENTS, now)
    task_id, tag = uuid4_pair()
    body = f'[["{event_id}"], {{}}, {_EMBED_JSON}]'.encode()
    return _PROCESS_EVENT.format(
        at=repr(round(now, 3)), body=base64.b64encode(body).decode(), tid=task_id,
        argsrepr=f"['{event_id}']", tag=tag)


_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def uuid4_pair() -> tuple[str, str]:
    """Two random (version 4) UUIDs as text, from one urandom call: ``str(uuid.uuid4())``
    twice was a quarter of the cost of a message."""
    h = os.urandom(32).hex()
    v = _VARIANT
    return (f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{v[h[16]]}{h[17:20]}-{h[20:32]}",
            f"{h[32:40]}-{h[40:44]}-4{h[45:48]}-{v[h[48]]}{h[49:52]}-{h[52:]}")


def queued_at(message: bytes | str) -> float | None:
    """``rb_at`` of a message we wrote (None for messages from elsewhere)."""
    try:
        value = json.loads(message)["headers"].get("rb_at")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return float(value) if isinstance(value, int | float) else None
