"""The scheduler (``workers/scheduler.py``): due retries, the lost-work sweep, job leases shared
by several copies, and its loop, all on the runtime's clock (a ``FakeClock`` here)."""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Callable
from typing import Any

import fakeredis
import pytest
import redis

from rilla_bridge import keys
from rilla_bridge.celery_messages import QUEUE_EVENTS, process_event_message
from rilla_bridge.clock import FakeClock
from rilla_bridge.lifecycle import Outcome
from tests.fakes import FakeRilla, load, make_runtime
from workers import scheduler
from workers.pipeline import process_event
from workers.runtime import Runtime
from workers.scheduler import Job


@pytest.fixture
def rt(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> Runtime:
    return make_runtime(fake_redis, clock)


def ingest(rt: Runtime, body: dict[str, Any]) -> str:
    stored = rt.lifecycle.receive(source="callrail", tenant="acme", kind="post_call",
                                  body=json.dumps(body).encode(), call_id=None)
    return stored.event_id


def call(n: int) -> dict[str, Any]:
    return {**load("callrail", "post_call"), "resource_id": f"CAL{n:032x}"}


def queued_ids(rt: Runtime) -> list[str]:
    return [json.loads(m)["headers"]["argsrepr"].strip("[]'\"")
            for m in rt.redis.lrange(QUEUE_EVENTS, 0, -1)]


def status(rt: Runtime, eid: str) -> str | None:
    event = rt.store.get(eid)
    return None if event is None else str(event["status"])


# -- due retries ----------------------------------------------------------------------------

def test_move_due_retries_moves_only_due_ids_once(rt: Runtime, clock: FakeClock) -> None:
    due_id, later_id = ingest(rt, call(1)), ingest(rt, call(2))
    rt.redis.delete(QUEUE_EVENTS)
    rt.redis.zadd(keys.RETRY, {due_id: clock.now() + 5, later_id: clock.now() + 600})
    assert scheduler.move_due_retries(rt) == 0          # nothing is due yet
    clock.advance(5)
    assert scheduler.move_due_retries(rt) == 1
    assert scheduler.move_due_retries(rt) == 0          # moved once
    assert queued_ids(rt) == [due_id]
    assert rt.redis.zscore(keys.RETRY, due_id) is None
    assert rt.redis.zscore(keys.RETRY, later_id) == clock.now() + 595
    assert rt.redis.zscore(keys.PENDING, due_id) == clock.now()
    assert status(rt, due_id) == "queued"


def test_finished_event_requeued_by_a_stale_retry_leaves_nothing_pending(
        rt: Runtime, clock: FakeClock) -> None:
    """A duplicate copy that found the call busy must not keep a delivered event pending."""
    eid = ingest(rt, call(1))
    rt.redis.zadd(keys.RETRY, {eid: clock.now() + 1})  # the busy copy's retry
    assert process_event(rt, eid) == Outcome.DELIVERED
    rt.redis.delete(QUEUE_EVENTS)
    clock.advance(2)
    assert scheduler.move_due_retries(rt) == 0
    assert status(rt, eid) == "delivered"
    assert rt.redis.zcard(keys.RETRY) == 0 and queued_ids(rt) == []
    assert process_event(rt, eid) == Outcome.DONE_ALREADY    # a stray copy all the same
    assert isinstance(rt.rilla, FakeRilla) and len(rt.rilla.calls) == 1
    assert rt.redis.zscore(keys.PENDING, eid) is None
    clock.advance(100)
    assert scheduler.sweep_lost(rt) == 0


# -- the lost-work sweep ----------------------------------------------------------------------

def test_sweep_lost_requeues_lost_but_not_backlogged(rt: Runtime, clock: FakeClock) -> None:
    start = clock.now()
    lost = ingest(rt, call(1))            # pending from now on, its message is lost
    clock.advance(200)
    backlogged = ingest(rt, call(2))      # its message still waits in the queue
    rt.redis.delete(QUEUE_EVENTS)
    rt.redis.lpush(QUEUE_EVENTS, process_event_message(backlogged, clock.now()))
    clock.advance(300)
    # ``lost``: pending for 500 s, no message anywhere (its worker died).
    # ``backlogged``: pending for 300 s, but its message still waits in the queue: an event
    # queued after the oldest waiting message may be behind that backlog, so it is not lost.
    assert scheduler.sweep_lost(rt) == 1
    assert sorted(queued_ids(rt)) == sorted([lost, backlogged])
    assert rt.redis.zscore(keys.PENDING, lost) == clock.now()
    assert rt.redis.zscore(keys.PENDING, backlogged) == start + 200
    assert scheduler.sweep_lost(rt) == 0  # refreshed: not swept twice
    # The backlog drains; once the event is old enough and nothing holds it, it is swept too.
    rt.redis.delete(QUEUE_EVENTS)
    assert scheduler.sweep_lost(rt) == 1
    assert queued_ids(rt) == [backlogged]


def test_sweep_leaves_recently_queued_events(rt: Runtime, clock: FakeClock) -> None:
    ingest(rt, call(1))
    rt.redis.delete(QUEUE_EVENTS)
    clock.advance(rt.settings.stale_pending_seconds - 0.5)
    assert scheduler.sweep_lost(rt) == 0  # younger than STALE_PENDING_SECONDS
    clock.advance(1)
    assert scheduler.sweep_lost(rt) == 1


def test_sweep_ignores_messages_it_did_not_write(rt: Runtime, clock: FakeClock) -> None:
    """A foreign message (no ``rb_at``) at the queue's head makes every pending event look
    backlogged rather than lost: nothing is queued twice on a guess."""
    ingest(rt, call(1))
    rt.redis.delete(QUEUE_EVENTS)
    rt.redis.lpush(QUEUE_EVENTS, json.dumps({"headers": {}, "body": ""}))
    clock.advance(500)
    assert scheduler.sweep_lost(rt) == 0


# -- jobs, leases and the loop ----------------------------------------------------------------

def counting(name: str, every: float, runs: list[tuple[str, float]],
             label: str = "") -> Job:
    """Job ``name`` that notes (``label`` or its name, the time) on each run."""
    def run(r: Runtime) -> int:
        runs.append((label or name, r.clock.now()))
        return 1
    return Job(name, every, run)


def test_each_job_runs_in_one_copy_per_turn(rt: Runtime, clock: FakeClock) -> None:
    runs: list[tuple[str, float]] = []
    a = [counting("retries", 0.5, runs, "a")]     # the same job in two scheduler copies
    b = [counting("retries", 0.5, runs, "b")]
    t0 = clock.now()
    scheduler.tick(rt, a, "node-a")
    scheduler.tick(rt, b, "node-b")   # the lease is node-a's this turn
    assert len(runs) == 1
    clock.advance(0.25)
    scheduler.tick(rt, a, "node-a")   # not its time yet
    scheduler.tick(rt, b, "node-b")   # its time, but node-a's lease still runs
    assert len(runs) == 1
    clock.advance(0.25)
    scheduler.tick(rt, b, "node-b")   # node-a's lease lapsed: node-b takes this turn
    scheduler.tick(rt, a, "node-a")
    assert [(who, t - t0) for who, t in runs] == [("a", 0.0), ("b", 0.5)]
    assert rt.redis.hget(keys.scheduler_job("retries"), "owner") == b"node-b"


def test_a_failing_job_does_not_stop_the_others(rt: Runtime,
                                                caplog: pytest.LogCaptureFixture) -> None:
    runs: list[tuple[str, float]] = []

    def crash(r: Runtime) -> int:
        raise RuntimeError("boom")

    def redis_down(r: Runtime) -> int:
        raise redis.ConnectionError("gone")

    jobs = [Job("crash", 1.0, crash), Job("redis", 1.0, redis_down),
            counting("fine", 1.0, runs)]
    with caplog.at_level(logging.WARNING, logger="rilla_bridge.scheduler"):
        scheduler.tick(rt, jobs, "node")
    assert [name for name, _ in runs] == ["fine"]
    messages = {(r.getMessage(), getattr(r, "job", None)) for r in caplog.records}
    assert ("scheduler job crashed", "crash") in messages
    assert ("scheduler job failed", "redis") in messages


def test_run_forever_sleeps_on_the_runtimes_clock_until_told_to_stop(
        rt: Runtime, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    handlers: dict[int, Callable[..., None]] = {}
    monkeypatch.setattr(signal, "signal",
                        lambda signum, handler: handlers.__setitem__(signum, handler))
    runs: list[tuple[str, float]] = []
    t0 = clock.now()

    def every_second(r: Runtime) -> int:
        runs.append(("job", r.clock.now()))
        if len(runs) == 5:
            handlers[signal.SIGTERM](signal.SIGTERM, None)
        return 1

    scheduler.run_forever(rt, [Job("job", 1.0, every_second)], interval=0.25)
    assert [t - t0 for _, t in runs] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert clock.now() - t0 == 4.25          # one more sleep after the SIGTERM, then out
    assert set(handlers) == {signal.SIGTERM, signal.SIGINT}


def test_default_jobs() -> None:
    jobs = {j.name: j for j in scheduler.default_jobs()}
    assert set(jobs) == {"retries", "sweep", "callrail_dispatch", "reconcile"}
    assert jobs["retries"].run is scheduler.move_due_retries
    assert jobs["sweep"].run is scheduler.sweep_lost
