"""Several scheduler copies sweeping the same lanes at once, on a real Redis server, from real
threads: each due retry and each event whose lease lapsed is queued exactly once
(``lua/due.lua``, ``lua/recover.lua``, ``Lanes.sweep``)."""

from __future__ import annotations

import json
import threading

import pytest
import redis

from rilla_bridge import keys
from rilla_bridge.celery_messages import QUEUE_EVENTS, message_args
from rilla_bridge.clock import FakeClock
from tests.fakes import load, make_runtime
from workers.runtime import Runtime

pytestmark = pytest.mark.integration

COPIES = 4
EVENTS = 200


def race(rt: Runtime) -> list[tuple[int, int, int]]:
    """``Lanes.sweep`` in COPIES threads released together; what each one moved."""
    moved: list[tuple[int, int, int]] = []
    barrier = threading.Barrier(COPIES)

    def one() -> None:
        barrier.wait(10)
        moved.append(rt.lanes.sweep())

    threads = [threading.Thread(target=one) for _ in range(COPIES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(moved) == COPIES
    return moved


def queued_ids(client: redis.Redis) -> list[str]:
    out = []
    for m in client.lrange(QUEUE_EVENTS, 0, -1):
        args = message_args(m)
        assert args is not None
        out.append(str(args[0]))
    return out


def test_due_retries_and_lapsed_leases_are_queued_once(real_redis: redis.Redis) -> None:
    clock = FakeClock()
    rt = make_runtime(real_redis, clock, tenant_max_inflight=EVENTS * 2,
                      dispatch_queue_max=EVENTS * 2)
    body = load("callrail", "post_call")
    ids = []
    for i in range(EVENTS):
        body["resource_id"] = f"CAL{i:032d}"
        stored = rt.lifecycle.receive(source="callrail", tenant="acme", kind="post_call",
                                      body=json.dumps(body).encode(), call_id=None)
        ids.append(stored.event_id)
    assert sorted(queued_ids(real_redis)) == sorted(ids)   # each dispatched at once
    real_redis.delete(QUEUE_EVENTS)                         # ... and their messages lost
    half = ids[: EVENTS // 2]
    # Half wait for a retry (due now), half hold lapsed dispatch leases.
    with real_redis.pipeline() as pipe:
        for eid in half:
            pipe.zrem(keys.inflight("acme"), eid)
            pipe.zadd(keys.retry("acme"), {eid: clock.now() - 1})
        pipe.execute()
    clock.advance(rt.lanes.dispatch_lease_ms / 1000 + 1)
    moved = race(rt)
    assert sum(m[0] for m in moved) == len(half)                 # due retries, once
    assert sum(m[1] for m in moved) == EVENTS - len(half)        # recovered leases, once
    queued = queued_ids(real_redis)
    assert sorted(queued) == sorted(ids) and len(set(queued)) == EVENTS
    assert real_redis.zcard(keys.retry("acme")) == 0
