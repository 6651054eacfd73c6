"""Reading received events: an event's record and its timeline (what the command line shows).

Events are written by ``rilla_bridge.lifecycle``, which owns every change of their status.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from rilla_bridge import keys


def decode_event(raw: dict[Any, Any]) -> dict[str, Any]:
    """An event hash as read from Redis: text fields decoded, the body left as bytes."""
    out: dict[str, Any] = {}
    for k, v in raw.items():
        name = k.decode()
        out[name] = v if name == "body" else v.decode("utf-8", "replace")
    return out


class EventStore:
    """Read access to the event records and timelines in Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def get(self, event_id: str) -> dict[str, Any] | None:
        raw = self.redis.hgetall(keys.event(event_id))
        return decode_event(raw) if raw else None

    def timeline(self, event_id: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.redis.lrange(keys.timeline(event_id), 0, -1)]
