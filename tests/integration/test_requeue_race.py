"""Several schedulers moving the same due retries and lost events at once, on a real Redis
server, from real threads: each event is queued exactly once (``lua/requeue.lua``)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import pytest
import redis

from rilla_bridge import keys
from rilla_bridge.celery_messages import QUEUE_EVENTS
from rilla_bridge.clock import FakeClock
from tests.fakes import load, make_runtime
from workers import scheduler
from workers.runtime import Runtime

pytestmark = pytest.mark.integration

COPIES = 4
EVENTS = 200


def race(rt: Runtime, move: Callable[[Runtime], int]) -> list[int]:
    """Run ``move`` in COPIES threads released together; what each one moved."""
    moved: list[int] = []
    barrier = threading.Barrier(COPIES)

    def one() -> None:
        barrier.wait(10)
        moved.append(move(rt))

    threads = [threading.Thread(target=one) for _ in range(COPIES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(moved) == COPIES
    return moved


def seed(real_redis: redis.Redis) -> tuple[Runtime, FakeClock, list[str]]:
    clock = FakeClock()
    rt = make_runtime(real_redis, clock)
    ids = [rt.lifecycle.receive(
        source="callrail", tenant="acme", kind="post_call", call_id=None,
        body=json.dumps({**load("callrail", "post_call"),
                         "resource_id": f"CAL{i:032x}"}).encode()).event_id
           for i in range(EVENTS)]
    real_redis.delete(QUEUE_EVENTS)
    return rt, clock, ids


def queued(rt: Runtime) -> list[str]:
    return [json.loads(m)["headers"]["argsrepr"].strip("[]'\"")
            for m in rt.redis.lrange(QUEUE_EVENTS, 0, -1)]


def test_due_retries_moved_concurrently_are_queued_once(real_redis: redis.Redis) -> None:
    rt, clock, ids = seed(real_redis)
    real_redis.zadd(keys.RETRY, {i: clock.now() + 1 for i in ids})
    clock.advance(1)
    assert sum(race(rt, scheduler.move_due_retries)) == EVENTS
    assert sorted(queued(rt)) == sorted(ids)
    assert real_redis.zcard(keys.RETRY) == 0 and real_redis.zcard(keys.PENDING) == EVENTS


def test_lost_events_swept_concurrently_are_queued_once(real_redis: redis.Redis) -> None:
    rt, clock, ids = seed(real_redis)
    clock.advance(rt.settings.stale_pending_seconds + 1)
    assert sum(race(rt, scheduler.sweep_lost)) == EVENTS
    assert sorted(queued(rt)) == sorted(ids)
