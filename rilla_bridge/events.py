"""Events still in progress, as Redis holds them (finished ones are only in history, SQL).

Events are written by ``rilla_bridge.lifecycle``, which owns every change of their status.
"""

from __future__ import annotations

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
    """Read access to the events in progress."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def get(self, event_id: str) -> dict[str, Any] | None:
        """The event's Redis record with its ``id`` (None once finished or unknown)."""
        raw = self.redis.hgetall(keys.event(event_id))
        if not raw:
            return None
        event = decode_event(raw)
        event["id"] = event_id
        return event
