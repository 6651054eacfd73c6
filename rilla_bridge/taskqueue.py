"""Putting work on Celery's queues with one Redis write instead of Celery's publish path.

The web process and the scheduler write Celery protocol-2 messages straight onto kombu's
Redis lists inside the same Lua script that stores the event, so storing and enqueueing are
one atomic step and cost one round trip. ``tests/unit/test_taskqueue.py`` checks the message
against what Celery itself produces, and the integration tests run a real worker on it.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import uuid
from typing import Any

TASK_PROCESS_EVENT = "rilla_bridge.process_event"
TASK_CALLRAIL_JOB = "rilla_bridge.callrail_job"
QUEUE_EVENTS = "events"
QUEUE_CALLRAIL = "callrail"

_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"


def task_message(task: str, args: list[Any], queue: str) -> str:
    """A kombu Redis-transport message for ``task(*args)`` routed to ``queue``."""
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
            "rb_at": round(time.time(), 3),
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


def process_event_message(event_id: str) -> str:
    return task_message(TASK_PROCESS_EVENT, [event_id], QUEUE_EVENTS)


def queued_at(message: bytes | str) -> float | None:
    """``rb_at`` of a message we wrote (None for messages from elsewhere)."""
    try:
        value = json.loads(message)["headers"].get("rb_at")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return float(value) if isinstance(value, int | float) else None
