"""A worker process's heartbeat (``workers/heartbeat.py``): what it holds, the renewal of the
event leases and call locks it holds (``lua/renew.lua``), and what happens without it: the
leases lapse after ``DELIVERY_LEASE_SECONDS``, the slot counts as free at once, and the sweep
puts the event back in its lane. fakeredis and a ``FakeClock``; the background loop is driven
by hand (no thread waits)."""

from __future__ import annotations

import json
import logging
from typing import Any

import fakeredis
import pytest
import redis

from rilla_bridge import keys
from rilla_bridge.celery_messages import QUEUE_EVENTS, message_args
from rilla_bridge.clients.rilla import RillaResult
from rilla_bridge.clock import FakeClock, ms
from rilla_bridge.history.records import Record
from rilla_bridge.lifecycle import NONE_KEY, ClaimCode, Outcome
from tests.fakes import FakeRilla, load, make_runtime
from workers.heartbeat import Heartbeat
from workers.pipeline import process_event
from workers.runtime import Runtime

LEASE = 8.0
CALL = "CAL8d2e41b0c7f94a6e8b3d5c1f0a9e7264"       # the post_call fixture's call


@pytest.fixture
def rt(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> Runtime:
    return make_runtime(fake_redis, clock, delivery_lease_seconds=LEASE)


def receive(rt: Runtime, body: dict[str, Any] | None = None) -> str:
    raw = json.dumps(body or load("callrail", "post_call")).encode()
    stored = rt.lifecycle.receive(source="callrail", tenant="acme", kind="post_call",
                                  body=raw, call_id=None)
    assert not stored.duplicate
    return stored.event_id


def take(rt: Runtime) -> str:
    raw = rt.redis.rpop(QUEUE_EVENTS)
    assert isinstance(raw, bytes)
    args = message_args(raw)
    assert args is not None and args[1] == "acme"
    return str(args[0])


def lease_end(rt: Runtime, eid: str) -> float | None:
    return rt.redis.zscore(keys.inflight("acme"), eid)


def lock_until(rt: Runtime) -> int:
    raw = rt.redis.hget(keys.call_lock("acme", "callrail", CALL), "until")
    assert raw is not None
    return int(raw)


def during_upsert(rt: Runtime, meanwhile: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``meanwhile()`` while the delivery waits for Rilla (it holds the event and the
    call's lock then)."""
    fake = rt.rilla
    assert isinstance(fake, FakeRilla)
    answer = fake.upsert

    def upsert(api_key: str, payload: Any) -> RillaResult:
        meanwhile()
        return answer(api_key, payload)

    monkeypatch.setattr(fake, "upsert", upsert)


def requeued(rt: Runtime, eid: str) -> int:
    entries: Any = rt.redis.xrange(keys.HISTORY)
    return sum(1 for sid, f in entries
               if (r := Record.from_entry(sid, f)).type == "step" and r.data["id"] == eid
               and any(e["what"] == "requeued" for e in r.data["tl"]))


# -- what it holds ---------------------------------------------------------------------------

def test_hold_hold_lock_and_release(rt: Runtime) -> None:
    hb = rt.heartbeat
    assert hb.holding() == 0 and hb.beat() == 0        # nothing held: no round trip
    hb.hold("ev_1", "acme", hb.run_token())
    hb.hold_lock("ev_1", "rb:lock:call:acme:callrail:C1", "tok")
    hb.hold_lock("ev_other", "rb:lock:x", "tok")       # not held: ignored
    assert hb.holding() == 1
    hb.release("ev_1")
    hb.release("ev_1")                                   # twice: harmless
    assert hb.holding() == 0


def test_tokens_are_per_process_and_unique(fake_redis: fakeredis.FakeRedis,
                                           clock: FakeClock) -> None:
    a, b = (make_runtime(fake_redis, clock).heartbeat for _ in range(2))
    assert a.token != b.token and a.token.count(":") == 2


def test_each_run_has_a_claim_token_of_its_own(rt: Runtime) -> None:
    """Two copies of one message in one process are two runs: only one may hold the event."""
    hb = rt.heartbeat
    runs = {hb.run_token() for _ in range(50)}
    assert len(runs) == 50
    for run in runs:
        process, _, which = run.rpartition("/")
        assert process == hb.token and len(which) == 8


def test_another_run_of_the_same_process_is_held_off(rt: Runtime, clock: FakeClock) -> None:
    eid = receive(rt)
    first, second = rt.heartbeat.run_token(), rt.heartbeat.run_token()
    assert rt.lifecycle.claim(eid, "acme", first).code == ClaimCode.CLAIMED
    assert rt.lifecycle.claim(eid, "acme", second).code == ClaimCode.HELD
    assert process_event(rt, eid, "acme") == Outcome.HELD    # a duplicate message meanwhile
    assert rt.heartbeat.holding() == 0                        # ...holds nothing
    assert rt.redis.hget(keys.event(eid), "claimed_by") == first.encode()
    # The first run's heartbeat keeps it; the duplicate's would renew nothing.
    rt.heartbeat.hold(eid, "acme", second)
    clock.advance(5)
    assert rt.heartbeat.beat() == 0
    rt.heartbeat.hold(eid, "acme", first)
    assert rt.heartbeat.beat() == 1
    assert lease_end(rt, eid) == ms(clock.now() + LEASE)


# -- renewing --------------------------------------------------------------------------------

def test_beat_renews_the_event_lease_and_the_call_lock(rt: Runtime, clock: FakeClock,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    eid = receive(rt)
    take(rt)
    seen: list[tuple[Any, ...]] = []

    def slow_rilla() -> None:
        # The delivery holds its slot and the call's lock, each until a lease from now.
        start = clock.now()
        assert lease_end(rt, eid) == ms(start + LEASE) == lock_until(rt)
        assert rt.heartbeat.holding() == 1
        for _ in range(3):                      # a slow Rilla: 3 x 5 s, beating every 5 s
            clock.advance(5)
            assert rt.heartbeat.beat() == 1
            seen.append((lease_end(rt, eid), lock_until(rt),
                         rt.redis.hget(keys.event(eid), "claim_until")))
            assert rt.lanes.sweep()[1] == 0     # nothing lapsed: not recovered
        lock_ttl = rt.redis.pttl(keys.call_lock("acme", "callrail", CALL))
        assert ms(LEASE) < lock_ttl <= ms(LEASE) + 60_000

    during_upsert(rt, slow_rilla, monkeypatch)
    assert process_event(rt, eid, "acme") == Outcome.DELIVERED
    t = [ms(clock.now() - 10 + LEASE), ms(clock.now() - 5 + LEASE), ms(clock.now() + LEASE)]
    assert seen == [(t[0], t[0], str(t[0]).encode()), (t[1], t[1], str(t[1]).encode()),
                    (t[2], t[2], str(t[2]).encode())]
    assert rt.heartbeat.holding() == 0 and requeued(rt, eid) == 0
    assert rt.redis.zcard(keys.inflight("acme")) == 0


def test_without_beats_the_lease_lapses_and_the_slot_is_free_at_once(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    rt = make_runtime(fake_redis, clock, delivery_lease_seconds=LEASE, tenant_max_inflight=1)
    eid = receive(rt)
    take(rt)
    other = {**load("callrail", "post_call"), "resource_id": "CALother"}
    checks: list[str] = []

    def stuck() -> None:
        clock.advance(LEASE - 0.001)
        waiting = receive(rt, other)              # the cap (1) is still taken
        assert rt.redis.llen(QUEUE_EVENTS) == 0
        clock.advance(0.002)
        # Lapsed: the slot counts as free at once (before any sweep), so the next step of
        # the tenant dispatches...
        assert rt.lanes.refill() == 0             # (the tenant left the round when capped)
        third = receive(rt, {**other, "resource_id": "CALthird"})
        assert [json.loads(m)["headers"]["argsrepr"] for m in
                rt.redis.lrange(QUEUE_EVENTS, 0, -1)] == [repr([waiting, "acme"])]
        assert rt.redis.lrange(keys.lane("acme"), 0, -1) == [third.encode()]
        # ...and the sweep puts the stuck event back at the head of its lane.
        assert rt.lanes.sweep() == (0, 1, 0)
        assert rt.redis.lrange(keys.lane("acme"), 0, -1) == [eid.encode(), third.encode()]
        assert requeued(rt, eid) == 1
        checks.append("done")

    during_upsert(rt, stuck, monkeypatch)
    assert process_event(rt, eid, "acme") == Outcome.DELIVERED
    assert checks == ["done"]


def test_beat_renews_nothing_another_worker_took_over(fake_redis: fakeredis.FakeRedis,
                                                     clock: FakeClock) -> None:
    rt = make_runtime(fake_redis, clock, delivery_lease_seconds=LEASE)
    eid = receive(rt)
    run = rt.heartbeat.run_token()
    assert rt.lifecycle.claim(eid, "acme", run).code == ClaimCode.CLAIMED
    rt.heartbeat.hold(eid, "acme", run)
    lock = keys.call_lock("acme", "callrail", "CAL1")
    fake_redis.hset(lock, mapping={"token": "theirs", "until": 1})
    rt.heartbeat.hold_lock(eid, lock, "mine")
    clock.advance(LEASE)
    assert rt.lifecycle.claim(eid, "acme", "other-worker").code == ClaimCode.CLAIMED
    taken = lease_end(rt, eid)
    clock.advance(1)
    assert rt.heartbeat.beat() == 0
    assert lease_end(rt, eid) == taken
    assert rt.redis.hget(keys.event(eid), "claimed_by") == b"other-worker"
    assert fake_redis.hget(lock, "until") == b"1"          # another delivery's lock
    assert rt.redis.pttl(lock) == -1


def test_beat_does_not_bring_back_a_finished_events_slot(rt: Runtime) -> None:
    eid = receive(rt)
    run = rt.heartbeat.run_token()
    assert rt.lifecycle.claim(eid, "acme", run).code == ClaimCode.CLAIMED
    rt.heartbeat.hold(eid, "acme", run)
    rt.redis.delete(keys.event(eid))                       # finished meanwhile
    rt.redis.zrem(keys.inflight("acme"), eid)
    assert rt.heartbeat.beat() == 0
    assert rt.redis.zcard(keys.inflight("acme")) == 0     # ZADD XX: never re-added
    assert not rt.redis.exists(NONE_KEY)


def test_one_beat_renews_everything_the_process_holds(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    rt = make_runtime(fake_redis, clock, delivery_lease_seconds=LEASE)
    ids = [receive(rt, {**load("callrail", "post_call"), "resource_id": f"CAL{n}"})
           for n in range(3)]
    ids.append(rt.lifecycle.receive(source="callrail", tenant="beta", kind="post_call",
                                    body=b'{"resource_id": "CALb"}', call_id=None).event_id)
    for eid, tenant in zip(ids, ["acme"] * 3 + ["beta"], strict=True):
        run = rt.heartbeat.run_token()
        assert rt.lifecycle.claim(eid, tenant, run).code == ClaimCode.CLAIMED
        rt.heartbeat.hold(eid, tenant, run)
    clock.advance(5)
    calls: list[Any] = []
    real = rt.scripts.renew

    def renew(**kw: Any) -> Any:
        calls.append(kw)
        return real(**kw)

    monkeypatch.setattr(rt.scripts, "renew", renew)
    assert rt.heartbeat.beat() == 4
    (call,) = calls
    # KEYS: per event its hash, its tenant's in-flight zset, its call lock (none held here);
    # ARGV: now, the lease, then per event its id, its run's claim token, its lock token.
    assert call["keys"][:3] == [keys.event(ids[0]), keys.inflight("acme"), NONE_KEY]
    assert call["keys"][9:] == [keys.event(ids[3]), keys.inflight("beta"), NONE_KEY]
    assert call["args"][:2] == [ms(clock.now()), ms(LEASE)]
    assert call["args"][2] == ids[0] and call["args"][4] == ""
    assert call["args"][3].encode() == rt.redis.hget(keys.event(ids[0]), "claimed_by")
    assert len(call["args"]) == 2 + 3 * 4
    assert rt.redis.zscore(keys.inflight("beta"), ids[3]) == ms(clock.now() + LEASE)


# -- the background loop ---------------------------------------------------------------------

class Ticks:
    """Stands in for the loop's wait: ``n`` ticks pass at once, then it is told to stop."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(float(timeout or 0))
        self.n -= 1
        return self.n < 0


def test_the_loop_beats_every_third_of_a_lease_and_logs_an_outage_once(
        rt: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    hb = rt.heartbeat
    answers: list[BaseException | int] = [1, redis.ConnectionError("down"),
                                          redis.TimeoutError("slow"), 1, 1]

    def beat() -> int:
        a = answers.pop(0)
        if isinstance(a, BaseException):
            raise a
        return a

    ticks = Ticks(5)
    monkeypatch.setattr(hb, "beat", beat)
    monkeypatch.setattr(hb, "_stopping", ticks)
    with caplog.at_level(logging.WARNING, logger="rilla_bridge.worker"):
        hb._run()
    assert answers == [] and ticks.waits == [LEASE / 3] * 6
    assert [r.getMessage() for r in caplog.records] == [
        "heartbeat could not renew leases", "heartbeat renewing leases again"]


def test_start_is_idempotent_and_stop_ends_the_thread(rt: Runtime) -> None:
    hb = rt.heartbeat
    hb.start()
    thread = hb._thread
    assert thread is not None and thread.is_alive() and thread.daemon
    hb.start()
    assert hb._thread is thread
    hb.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_a_heartbeat_of_its_own(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    rt = make_runtime(fake_redis, clock)
    hb = Heartbeat(fake_redis, rt.scripts, clock, 3.0)
    eid = receive(rt)
    run = hb.run_token()
    assert rt.lifecycle.claim(eid, "acme", run).code == ClaimCode.CLAIMED
    hb.hold(eid, "acme", run)
    clock.advance(1)
    assert hb.beat() == 1
    assert rt.redis.zscore(keys.inflight("acme"), eid) == ms(clock.now() + 3.0)
