"""Per-call state in Redis: the snapshots of a call's events, the recordings resolved for it,
what was last delivered, and the lock that serialises deliveries of one call together with
the tenant's in-flight slots.

Events about one call may arrive in any order and more than once; each stores its snapshot
here and the delivery always sends the merge of all of them, read under the call's lock, so
Rilla never receives older data last.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import redis

from rilla_bridge import keys
from rilla_bridge.celery_messages import QUEUE_EVENTS
from rilla_bridge.clock import Clock, ms
from rilla_bridge.scripts import Scripts


class CallState:
    """Per-call merged state and the lock that serialises deliveries of one call."""

    def __init__(self, client: redis.Redis, scripts: Scripts, clock: Clock,
                 retention: int) -> None:
        self.redis = client
        self.scripts = scripts
        self.clock = clock
        self.retention = retention

    def snapshot_and_acquire(self, tenant: str, source: str, call_id: str, event_id: str,
                             snapshot: dict[str, Any], *, token: str, lease_ms: int,
                             max_inflight: int, want_lock: bool
                             ) -> tuple[int, dict[str, Any] | None]:
        """Store the snapshot; with ``want_lock``, also try the lock (1 taken, 0 call busy,
        -1 tenant at its cap; 2 = not asked). The call state is returned only when taken."""
        reply = self.scripts.snapshot_acquire(
            keys=[keys.call(tenant, source, call_id), keys.call_lock(tenant, source, call_id),
                  keys.inflight(tenant), keys.cap_wait(tenant), keys.cap_wait_messages(tenant)],
            args=[f"s:{event_id}", json.dumps(snapshot, separators=(",", ":")), self.retention,
                  token, lease_ms, max_inflight, "1" if want_lock else "0", event_id,
                  ms(self.clock.now())])
        code = int(reply[0])
        if code != 1:
            return code, None
        flat = reply[1]
        return code, decode_call_state(dict(zip(flat[::2], flat[1::2], strict=True)))

    def set_resolved(self, tenant: str, source: str, call_id: str, api_url: str,
                     media_url: str) -> None:
        """Remember the media URL a CallRail ``recording.json`` URL resolved to."""
        key = keys.call(tenant, source, call_id)
        with self.redis.pipeline() as pipe:
            pipe.hset(key, f"r:{api_url}", media_url)
            pipe.expire(key, self.retention)
            pipe.execute()

    def mark_delivered(self, pipe: Any, tenant: str, source: str, call_id: str,
                       fingerprint: str) -> None:
        """Queue on ``pipe``: Rilla now holds the data with this fingerprint."""
        pipe.hset(keys.call(tenant, source, call_id), "delivered", fingerprint)

    def known(self, tenant: str, source: str, call_id: str) -> bool:
        """Whether any event of this call has been seen (within the retention)."""
        return bool(self.redis.exists(keys.call(tenant, source, call_id)))

    def release(self, pipe: Any, tenant: str, source: str, call_id: str, token: str) -> None:
        """Free the call lock and the tenant slot, handing the slot to a waiting event."""
        self.scripts.release(
            keys=[keys.call_lock(tenant, source, call_id), keys.inflight(tenant),
                  keys.cap_wait(tenant), keys.cap_wait_messages(tenant), keys.RETRY,
                  keys.PENDING, QUEUE_EVENTS],
            args=[token, repr(self.clock.now())], client=pipe)


def decode_call_state(raw: Mapping[Any, Any]) -> dict[str, Any]:
    """A call hash as read from Redis: its snapshots, resolved recordings, last delivery."""
    snapshots: list[dict[str, Any]] = []
    resolved: dict[str, str] = {}
    out: dict[str, Any] = {"snapshots": snapshots, "resolved": resolved, "delivered": None}
    for k, v in raw.items():
        name = k.decode()
        if name.startswith("s:"):
            snapshots.append(json.loads(v))
        elif name.startswith("r:"):
            resolved[name[2:]] = v.decode()
        elif name == "delivered":
            out["delivered"] = v.decode()
    return out
