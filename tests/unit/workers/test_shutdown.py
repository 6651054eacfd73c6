"""A worker that stops before its deliveries finish (SIGTERM past the grace, a delivery cut off
at Celery's time limit) hands them back to their tenant's lane at once
(``Lifecycle.hand_back``, ``lua/handback.lua``): slot and call lock freed, dispatched again in
the same step, taken by another worker at the same instant, no lease lapse waited for; the
stopping run can no longer settle the event. fakeredis and a ``FakeClock``: no time passes."""

from __future__ import annotations

import json
from typing import Any

import fakeredis
import gevent
import pytest
from greenlet import GreenletExit

from rilla_bridge import keys
from rilla_bridge.celery_messages import QUEUE_EVENTS, message_args
from rilla_bridge.clients.rilla import RillaResult
from rilla_bridge.clock import FakeClock
from rilla_bridge.history.records import Record
from rilla_bridge.lifecycle import Outcome
from tests.fakes import FakeRilla, load, make_runtime
from workers import pipeline, shutdown
from workers.runtime import Runtime

CALL = "CAL8d2e41b0c7f94a6e8b3d5c1f0a9e7264"       # the post_call fixture's call


@pytest.fixture
def rt(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> Runtime:
    return make_runtime(fake_redis, clock, delivery_lease_seconds=8.0)


def receive(rt: Runtime, body: dict[str, Any] | None = None) -> str:
    raw = json.dumps(body or load("callrail", "post_call")).encode()
    return rt.lifecycle.receive(source="callrail", tenant="acme", kind="post_call",
                                body=raw, call_id=None).event_id


def take(rt: Runtime) -> str:
    """The next queued message's event id (a worker takes it)."""
    raw = rt.redis.rpop(QUEUE_EVENTS)
    assert isinstance(raw, bytes)
    args = message_args(raw)
    assert args is not None
    return str(args[0])


def while_rilla_answers(rt: Runtime, meanwhile: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``meanwhile()`` while the delivery waits for Rilla (it holds event and lock)."""
    fake = rt.rilla
    assert isinstance(fake, FakeRilla)
    answer = fake.upsert

    def upsert(api_key: str, payload: Any) -> RillaResult:
        meanwhile()
        return answer(api_key, payload)

    monkeypatch.setattr(fake, "upsert", upsert)


def timeline(rt: Runtime, eid: str) -> list[dict[str, Any]]:
    entries: Any = rt.redis.xrange(keys.HISTORY)
    out: list[dict[str, Any]] = []
    for sid, fields in entries:
        r = Record.from_entry(sid, fields)
        if r.type == "step" and r.data["id"] == eid:
            out.extend(r.data["tl"])
    return out


def lock_held(rt: Runtime) -> bool:
    return bool(rt.redis.exists(keys.call_lock("acme", "callrail", CALL)))


def test_the_shutdown_deadline_hands_a_running_delivery_back_and_the_next_worker_takes_it(
        rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    eid = receive(rt)
    assert take(rt) == eid
    seen: dict[str, Any] = {}

    def deadline() -> None:                    # the worker's grace ends mid-request
        seen["held"] = rt.heartbeat.holding()
        seen["handed"] = pipeline.hand_back_all(rt, shutdown.REASON)
        seen["queued"] = rt.redis.llen(QUEUE_EVENTS)
        seen["lock"] = lock_held(rt)
        seen["in_flight"] = rt.redis.zcard(keys.inflight("acme"))

    while_rilla_answers(rt, deadline, monkeypatch)
    # The stopping run gets its answer after all: the event is no longer its own to settle.
    assert pipeline.process_event(rt, eid, "acme") == Outcome.HELD
    assert seen == {"held": 1, "handed": 1, "queued": 1, "lock": False, "in_flight": 1}
    assert rt.heartbeat.holding() == 0
    assert rt.redis.hget(keys.event(eid), "status") == b"queued"

    # Another worker, the same instant (no lease lapse waited for): delivered.
    monkeypatch.undo()
    assert take(rt) == eid
    assert pipeline.process_event(rt, eid, "acme") == Outcome.DELIVERED
    assert not rt.redis.exists(keys.event(eid))
    assert rt.lanes.sweep() == (0, 0, 0)       # nothing left for the lost-work sweep
    whats = [e["what"] for e in timeline(rt, eid)]
    assert whats.count("requeued") == 1 and whats[-1] == "delivered"
    assert next(e for e in timeline(rt, eid) if e["what"] == "requeued")["reason"] == (
        shutdown.REASON)


@pytest.mark.parametrize("cut_off", [gevent.Timeout, GreenletExit, SystemExit])
def test_a_delivery_cut_off_from_outside_goes_back_to_its_lane_at_once(
        rt: Runtime, monkeypatch: pytest.MonkeyPatch, cut_off: type[BaseException]) -> None:
    """Celery's time limit (gevent raises Timeout in the task) or a killed greenlet."""
    eid = receive(rt)
    assert take(rt) == eid

    def stop() -> None:
        raise cut_off()

    while_rilla_answers(rt, stop, monkeypatch)
    with pytest.raises(cut_off):
        pipeline.process_event(rt, eid, "acme")
    assert rt.heartbeat.holding() == 0 and not lock_held(rt)
    monkeypatch.undo()
    assert take(rt) == eid                     # dispatched again in the hand-back's step
    assert pipeline.process_event(rt, eid, "acme") == Outcome.DELIVERED


def test_an_error_of_our_own_is_left_to_the_lease(
        rt: Runtime, monkeypatch: pytest.MonkeyPatch, clock: FakeClock) -> None:
    """A bug is not retried in a tight loop: the lease's lapse is its pause."""
    eid = receive(rt)
    assert take(rt) == eid

    def boom() -> None:
        raise RuntimeError("a bug")

    while_rilla_answers(rt, boom, monkeypatch)
    with pytest.raises(RuntimeError):
        pipeline.process_event(rt, eid, "acme")
    assert rt.redis.llen(QUEUE_EVENTS) == 0 and lock_held(rt)
    clock.advance(8.1)
    assert rt.lanes.sweep()[1] == 1             # recovered by the sweep, after the lease


def test_hand_back_refuses_an_event_the_run_no_longer_holds(rt: Runtime) -> None:
    eid = receive(rt)
    assert take(rt) == eid
    claim = rt.lifecycle.claim(eid, "acme", "w1/run")
    assert claim.event is not None
    assert not rt.lifecycle.hand_back(eid, "acme", "w2/other", "x")
    assert rt.lifecycle.hand_back(eid, "acme", "w1/run", "x")
    assert not rt.lifecycle.hand_back(eid, "acme", "w1/run", "x")   # once
    assert rt.redis.lrange(QUEUE_EVENTS, 0, -1) and rt.redis.llen(keys.lane("acme")) == 0


def test_a_replayed_event_goes_back_to_the_bulk_lane(rt: Runtime) -> None:
    eid = receive(rt)
    rt.redis.hset(keys.event(eid), "lane", "replay")
    assert take(rt) == eid
    rt.lanes.pause("acme")                     # nothing dispatched: see where it waits
    assert rt.lifecycle.claim(eid, "acme", "w1/run").event is not None
    assert rt.lifecycle.hand_back(eid, "acme", "w1/run", "x")
    assert rt.redis.lrange(keys.bulk_lane("acme"), 0, -1) == [eid.encode()]
    assert rt.redis.llen(keys.lane("acme")) == 0


def test_at_deadline_hands_back_restores_and_exits_0_even_when_redis_fails() -> None:
    calls: list[Any] = []

    def hand_back_all(reason: str) -> int:
        calls.append(("hand_back", reason))
        return 3

    assert shutdown.at_deadline(hand_back_all, lambda: calls.append("restore"),
                                lambda code: calls.append(("exit", code))) == 3
    assert calls == [("hand_back", shutdown.REASON), "restore", ("exit", 0)]

    def failing(*_: Any) -> Any:
        raise ConnectionError("redis away")

    calls.clear()
    assert shutdown.at_deadline(failing, failing, lambda code: calls.append(code)) == 0
    assert calls == [0]


def test_arm_hands_back_what_runs_after_the_grace_and_exits_0_once(
        rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside gevent the deadline is a timer thread (a worker runs it as a greenlet)."""
    import threading

    import workers.runtime

    monkeypatch.setattr(workers.runtime, "runtime", lambda: rt)
    monkeypatch.setattr(shutdown, "_armed", False)
    eid = receive(rt)
    assert take(rt) == eid
    claim = rt.lifecycle.claim(eid, "acme", "w1/run")
    assert claim.event is not None
    rt.heartbeat.hold(eid, "acme", "w1/run")
    exited = threading.Event()
    codes: list[int] = []

    def exit_(code: int) -> None:
        codes.append(code)
        exited.set()

    shutdown.arm(0.01, exit_)
    shutdown.arm(0.01, exit_)                  # a second SIGTERM arms nothing more
    assert exited.wait(5)
    assert codes == [0] and rt.heartbeat.holding() == 0
    assert take(rt) == eid                     # back in the queue for another worker
