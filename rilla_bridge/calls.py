"""Per-call state in Redis while a call is in progress: the snapshots of its events, the
recordings resolved for it, what was last delivered, and the lock that serialises deliveries
of one call.

Events about one call may arrive in any order and more than once; each stores its snapshot
here and the delivery always sends the merge of all of them, read under the call's lock, so
Rilla never receives older data last. Every step that changes the state bumps its version
``v``; the state goes to history in a ``call`` record, and once history holds that version the
Redis copy is let go (``forget``), its call marked in a Bloom filter. A later event of a
forgotten call finds no state but its bits set: it reloads the state from history first
(``restore``), so nothing known is ever blanked. A new call finds no bits and never waits on
the database. (A false positive of the filter costs one history read that finds nothing.)
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import redis

from rilla_bridge import keys
from rilla_bridge.clock import Clock, ms
from rilla_bridge.scripts import Scripts
from rilla_bridge.settings import Settings

BLOOM_HASHES = 7              # with ~9.6 bits per call: about 1 % false positives
# A call's state outlives any history outage this long before Redis drops it regardless.
STATE_SAFETY_TTL = 7 * 86400

LOCKED, BUSY, STORED, RELOAD = 1, 0, 2, 3


class CallState:
    """A call's merged state and lock, and the filter of calls handed to history."""

    def __init__(self, client: redis.Redis, scripts: Scripts, clock: Clock,
                 settings: Settings) -> None:
        self.redis = client
        self.scripts = scripts
        self.clock = clock
        self.bits_total = max(1024, math.ceil(settings.seen_calls_capacity * 9.6))
        # One filter per history-retention period; a call is looked up in this one and the
        # last, so it is remembered at least as long as history keeps it.
        self.generation_seconds = max(1, settings.history_retention_days) * 86400

    # -- the filter of calls whose state went to history --------------------------------
    def bits(self, tenant: str, source: str, call_id: str) -> list[int]:
        digest = hashlib.sha256(f"{tenant}\0{source}\0{call_id}".encode()).digest()
        return [int.from_bytes(digest[4 * i:4 * i + 4], "big") % self.bits_total
                for i in range(BLOOM_HASHES)]

    def _generation(self) -> int:
        return int(self.clock.now() // self.generation_seconds)

    # -- a delivery's steps ---------------------------------------------------------------
    def snapshot_and_acquire(self, tenant: str, source: str, call_id: str, event_id: str,
                             snapshot: dict[str, Any], *, token: str, lease_ms: int,
                             want_lock: bool, check_history: bool = True
                             ) -> tuple[int, dict[str, Any] | None]:
        """Store the snapshot; with ``want_lock`` also take the lock. Returns (LOCKED, state),
        (BUSY, None) when another delivery holds the call, (STORED, None) when no lock was
        asked, or (RELOAD, None): the call's state is in history, ``restore`` it first."""
        gen = self._generation()
        reply = self.scripts.snapshot_acquire(
            keys=[keys.call(tenant, source, call_id), keys.call_lock(tenant, source, call_id),
                  keys.seen(gen), keys.seen(gen - 1)],
            args=[f"s:{event_id}", json.dumps(snapshot, separators=(",", ":")), token,
                  ms(self.clock.now()), lease_ms, "1" if want_lock else "0",
                  "1" if check_history else "0", STATE_SAFETY_TTL,
                  *self.bits(tenant, source, call_id)])
        code = int(reply[0])
        if code != LOCKED:
            return code, None
        flat = reply[1]
        return code, decode_call_state(dict(zip(flat[::2], flat[1::2], strict=True)))

    def restore(self, tenant: str, source: str, call_id: str,
                fields: Mapping[str, str] | None) -> bool:
        """Put the state history holds (its hash fields, ``None`` when history has none) back
        into Redis, unless an event recreated it meanwhile."""
        flat: list[str] = []
        for k, v in (fields or {}).items():
            flat += [k, v]
        return bool(self.scripts.restore(keys=[keys.call(tenant, source, call_id)],
                                         args=[STATE_SAFETY_TTL, *flat]))

    def forget(self, calls: Iterable[tuple[str, str, str, int]]) -> int:
        """History holds each (tenant, source, call id) at its version: drop the Redis copies
        unless they moved on or a delivery holds the call now (the history process calls this
        after each batch; one round trip). Returns how many went."""
        gen, now_ms = self._generation(), ms(self.clock.now())
        ttl = 2 * self.generation_seconds + 86400
        with self.redis.pipeline(transaction=False) as pipe:
            for tenant, source, call_id, version in calls:
                self.scripts.forget(
                    keys=[keys.call(tenant, source, call_id),
                          keys.call_lock(tenant, source, call_id), keys.seen(gen)],
                    args=[version, now_ms, ttl, *self.bits(tenant, source, call_id)],
                    client=pipe)
            return sum(int(x) for x in pipe.execute())

    def set_resolved(self, tenant: str, source: str, call_id: str, api_url: str,
                     media_url: str) -> None:
        """Remember the media URL a CallRail ``recording.json`` URL resolved to."""
        key = keys.call(tenant, source, call_id)
        with self.redis.pipeline() as pipe:
            pipe.hset(key, f"r:{api_url}", media_url)
            pipe.hincrby(key, "v", 1)
            pipe.expire(key, STATE_SAFETY_TTL)
            pipe.execute()

    def in_redis(self, tenant: str, source: str, call_id: str) -> bool:
        return bool(self.redis.exists(keys.call(tenant, source, call_id)))

    def maybe_in_history(self, tenant: str, source: str, call_id: str) -> bool:
        """Whether the call may have been handed to history (the filter never misses one)."""
        gen = self._generation()
        bits = self.bits(tenant, source, call_id)
        with self.redis.pipeline(transaction=False) as pipe:
            for g in (gen, gen - 1):
                for b in bits:
                    pipe.getbit(keys.seen(g), b)
            got = pipe.execute()
        n = len(bits)
        return all(got[:n]) or all(got[n:])


def decode_call_state(raw: Mapping[Any, Any]) -> dict[str, Any]:
    """A call hash as read from Redis: its snapshots, resolved recordings, last delivery."""
    snapshots: list[dict[str, Any]] = []
    resolved: dict[str, str] = {}
    out: dict[str, Any] = {"snapshots": snapshots, "resolved": resolved, "delivered": None}
    for k, v in raw.items():
        name = k.decode() if isinstance(k, bytes) else str(k)
        value = v.decode() if isinstance(v, bytes) else str(v)
        if name.startswith("s:"):
            snapshots.append(json.loads(value))
        elif name.startswith("r:"):
            resolved[name[2:]] = value
        elif name == "delivered":
            out["delivered"] = value
    return out
