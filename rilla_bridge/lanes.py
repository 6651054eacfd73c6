"""Fair delivery across tenants: per-tenant lanes, slots under a cap, turns by weight.

Each tenant's waiting work is kept apart in Redis: a live lane (webhooks, retries that came
due, recovered work) and a bulk lane (replays, backfill, reconciliation). An event leaves its
lane only with a slot free under its tenant's cap (``max_inflight``, else
``TENANT_MAX_INFLIGHT``), in the same Lua step that writes its Celery message, so work over a
cap never passes through a worker. While Celery's queue is short, a step that gives a tenant
work or frees one of its slots dispatches its next event at once; when the queue is long
(``DISPATCH_QUEUE_MAX``: the workers are saturated), tenants wait their turn in ``rb:ready``
and the shared refill serves the one with the lowest pass, moving it on by ``1 / weight``:
a tenant with 50,000 waiting events and one with one event are served alike. Bulk work is
paced by one token bucket (``BULK_RATE_PER_SECOND``) and goes only when the tenant's live lane
is empty, so it never starves live events of its tenant or any other.

Slots are leases: taken for a while at dispatch, then held by the claiming worker and renewed
by its heartbeat (``workers/heartbeat.py``). A lease that lapses (a dead worker, a lost
message) frees the slot at once (lapsed entries do not count) and ``recover`` puts the event
back at the head of its lane.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis

from rilla_bridge import keys
from rilla_bridge.celery_messages import PROCESS_EVENT_TEMPLATE, QUEUE_EVENTS
from rilla_bridge.clock import Clock, ms
from rilla_bridge.scripts import Scripts
from rilla_bridge.settings import Settings
from rilla_bridge.tenants import Tenant

REFILL_CANDIDATES = 16   # tenants considered per refill call (the lowest passes)
MOVE_LIMIT = 500         # retries or lapsed leases moved per tenant per sweep


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Lanes:
    """The dispatch side of every step: keys and arguments of the dispatch block, the shared
    refill, due retries and lapsed leases. ``tenants`` is read live (it may be replaced)."""

    def __init__(self, client: redis.Redis, scripts: Scripts, clock: Clock, settings: Settings,
                 tenants: Mapping[str, Tenant]) -> None:
        self.redis = client
        self.scripts = scripts
        self.clock = clock
        self.settings = settings
        self.tenants = tenants
        # A dispatched event's slot is held this long before a worker claims it (its message
        # may wait behind others); a claimed one then lives on the worker's heartbeat.
        self.dispatch_lease_ms = ms(settings.visibility_timeout_seconds + 15)

    def cap(self, tenant: str) -> int:
        t = self.tenants.get(tenant)
        return (t.max_inflight if t and t.max_inflight else self.settings.tenant_max_inflight)

    def weight(self, tenant: str) -> float:
        t = self.tenants.get(tenant)
        return t.weight if t else 1.0

    def keys(self, tenant: str) -> list[str]:
        """The seven dispatch keys every dispatching script ends its KEYS with."""
        return [keys.lane(tenant), keys.bulk_lane(tenant), keys.inflight(tenant), keys.READY,
                keys.PAUSED, QUEUE_EVENTS, keys.BULK_BUCKET]

    def args(self, tenant: str) -> list[Any]:
        """The dispatch arguments every dispatching script ends its ARGV with."""
        return [tenant, self.cap(tenant), repr(self.weight(tenant)),
                self.settings.dispatch_queue_max, self.dispatch_lease_ms,
                repr(self.settings.bulk_rate_per_second), *PROCESS_EVENT_TEMPLATE]

    def pause(self, tenant: str) -> None:
        """Stop dispatching the tenant's events (they keep arriving and wait in its lanes;
        what is in flight finishes)."""
        self.redis.sadd(keys.PAUSED, tenant)

    def resume(self, tenant: str) -> int:
        """Dispatch the tenant's events again: it rejoins the round, and its waiting work
        drains through the refill (bulk work at its pace). Returns what went at once."""
        with self.redis.pipeline() as pipe:
            pipe.srem(keys.PAUSED, tenant)
            pipe.zrange(keys.READY, 0, 0, withscores=True)
            _, head = pipe.execute()
        self.redis.zadd(keys.READY, {tenant: head[0][1] if head else 0.0}, nx=True)
        return self.refill()

    def paused(self) -> set[str]:
        return {_text(t) for t in self.redis.smembers(keys.PAUSED)}

    def all_tenants(self) -> list[str]:
        """Configured tenants and any that still has work from before it was removed."""
        known = {_text(t) for t in self.redis.smembers(keys.TENANTS)}
        return sorted(known | set(self.tenants))

    def refill(self) -> int:
        """Fill Celery's queue up to its limit from the ready tenants, in turn."""
        names = [_text(t) for t in self.redis.zrange(keys.READY, 0, REFILL_CANDIDATES - 1)]
        if not names:
            return 0
        script_keys = [keys.READY, keys.PAUSED, QUEUE_EVENTS, keys.BULK_BUCKET]
        args: list[Any] = [ms(self.clock.now()), self.settings.dispatch_queue_max,
                           self.dispatch_lease_ms, repr(self.settings.bulk_rate_per_second),
                           len(names)]
        for t in names:
            script_keys += [keys.lane(t), keys.bulk_lane(t), keys.inflight(t)]
            args += [t, self.cap(t), repr(self.weight(t))]
        return int(self.scripts.dispatch(keys=script_keys, args=[*args,
                                                                 *PROCESS_EVENT_TEMPLATE]))

    def sweep(self) -> tuple[int, int, int]:
        """The scheduler's tick: retries whose time has come go back to the head of their
        lanes, events whose lease lapsed back to the head of the live lane, then the shared
        refill. Returns (due, recovered, dispatched by the refill). Three round trips,
        however many tenants."""
        now = self.clock.now()
        now_ms = ms(now)
        tenants = self.all_tenants()
        with self.redis.pipeline(transaction=False) as pipe:
            for t in tenants:
                self.scripts.due(keys=[keys.retry(t), keys.bulk_retry(t), *self.keys(t)],
                                 args=[repr(now), now_ms, MOVE_LIMIT, *self.args(t)],
                                 client=pipe)
            for t in tenants:
                pipe.zrangebyscore(keys.inflight(t), "-inf", now_ms, start=0, num=MOVE_LIMIT)
            replies = pipe.execute()
        due = sum(int(r) for r in replies[:len(tenants)])
        lapsed = {t: [_text(i) for i in ids]
                  for t, ids in zip(tenants, replies[len(tenants):], strict=True) if ids}
        recovered = 0
        if lapsed:
            with self.redis.pipeline(transaction=False) as pipe:
                for t, ids in lapsed.items():
                    self.scripts.recover(keys=[keys.HISTORY, *self.keys(t)],
                                         args=[now_ms, len(ids), *ids, *self.args(t)],
                                         client=pipe)
                recovered = sum(int(r) for r in pipe.execute())
        return due, recovered, self.refill()
