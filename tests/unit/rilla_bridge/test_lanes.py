"""Fair delivery across tenants (``rilla_bridge/lanes.py`` and ``lua/lib/dispatch.lua``):
per-tenant lanes, slots under a cap taken at dispatch, turns by weight while Celery's queue is
full, the bulk lane's pace, paused tenants, and the sweep (due retries, lapsed leases, the
shared refill). fakeredis and a ``FakeClock``; a "worker" here takes a message off the queue
by hand."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import fakeredis
import pytest

from rilla_bridge import keys
from rilla_bridge.celery_messages import PROCESS_EVENT_TEMPLATE, QUEUE_EVENTS, message_args
from rilla_bridge.clock import FakeClock, ms
from rilla_bridge.history.records import Record
from rilla_bridge.lanes import Lanes
from rilla_bridge.lifecycle import ClaimCode, Lifecycle, Outcome, Status, make_lifecycle
from rilla_bridge.settings import Settings
from rilla_bridge.tenants import Tenant, parse_tenants

TENANTS = """
[tenants.acme]
rilla_api_key = "acme-rilla-key-000001"

[tenants.beta]
rilla_api_key = "beta-rilla-key-000002"
weight = 2

[tenants.gamma]
rilla_api_key = "gamma-rilla-key-00003"
max_inflight = 2

[tenants.small]
rilla_api_key = "small-rilla-key-00004"
"""
LEASE = 8.0                     # DELIVERY_LEASE_SECONDS (the default)
DISPATCH_LEASE = 60 + 15        # VISIBILITY_TIMEOUT_SECONDS + 15: a dispatched event's lease


def make(client: fakeredis.FakeRedis, clock: FakeClock, tenants: dict[str, Tenant] | None = None,
         **settings: Any) -> Lifecycle:
    return make_lifecycle(client, clock, Settings(**settings),
                          parse_tenants(TENANTS, env={}) if tenants is None else tenants)


@pytest.fixture
def lc(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> Lifecycle:
    return make(fake_redis, clock)


class Bodies:
    """Distinct bodies, so that no event is a duplicate of another."""

    n = 0

    @classmethod
    def next(cls) -> bytes:
        cls.n += 1
        return json.dumps({"resource_id": f"CAL{cls.n}"}).encode()


def receive(lc: Lifecycle, tenant: str = "acme", lane: str = "live") -> str:
    stored = lc.receive(source="callrail", tenant=tenant, kind="post_call", body=Bodies.next(),
                        call_id=None, lane=lane)
    assert not stored.duplicate
    return stored.event_id


def queued(lc: Lifecycle) -> list[list[Any]]:
    """The queue's messages' task arguments, in the order workers take them."""
    raw: list[bytes] = lc.redis.lrange(QUEUE_EVENTS, 0, -1)  # type: ignore[assignment]
    return [message_args(m) or [] for m in reversed(raw)]


def queued_ids(lc: Lifecycle) -> list[str]:
    return [str(args[0]) for args in queued(lc)]


def take(lc: Lifecycle) -> list[Any]:
    """A worker takes the next message off the queue (kombu pops the oldest)."""
    raw = lc.redis.rpop(QUEUE_EVENTS)
    assert isinstance(raw, bytes)
    args = message_args(raw)
    assert args is not None
    return args


def finish(lc: Lifecycle, eid: str, tenant: str, worker: str = "w1") -> None:
    claim = lc.claim(eid, tenant, worker)
    assert claim.code == ClaimCode.CLAIMED and claim.event is not None
    lc.finish(claim.event, Status.DELIVERED, Outcome.DELIVERED, [], worker=worker)


def lane(lc: Lifecycle, tenant: str = "acme", bulk: bool = False) -> list[str]:
    key = keys.bulk_lane(tenant) if bulk else keys.lane(tenant)
    ids: Any = lc.redis.lrange(key, 0, -1)
    return [i.decode() for i in ids]


def ready(lc: Lifecycle) -> dict[str, float]:
    turns: Any = lc.redis.zrange(keys.READY, 0, -1, withscores=True)
    return {k.decode(): s for k, s in turns}


def live_slots(lc: Lifecycle, tenant: str) -> int:
    return int(lc.redis.zcount(keys.inflight(tenant), ms(lc.clock.now()), "+inf"))


def steps(lc: Lifecycle, eid: str) -> list[dict[str, Any]]:
    entries: Any = lc.redis.xrange(keys.HISTORY)
    return [r.data for r in (Record.from_entry(s, f) for s, f in entries)
            if r.type == "step" and r.data.get("id") == eid]


# -- configuration ---------------------------------------------------------------------------

def test_caps_weights_and_the_dispatch_keys_and_arguments(lc: Lifecycle) -> None:
    lanes = lc.lanes
    assert (lanes.cap("acme"), lanes.cap("gamma"), lanes.cap("removed")) == (128, 2, 128)
    assert (lanes.weight("acme"), lanes.weight("beta"), lanes.weight("removed")) == (1.0, 2.0,
                                                                                    1.0)
    assert lanes.keys("gamma") == ["rb:lane:gamma", "rb:lane:gamma:bulk", "rb:inflight:gamma",
                                   "rb:ready", "rb:paused", QUEUE_EVENTS, "rb:bulk"]
    assert lanes.args("beta") == ["beta", 128, "2.0", 400, DISPATCH_LEASE * 1000, "50.0",
                                  *PROCESS_EVENT_TEMPLATE]


def test_the_tenants_are_read_live(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    """The worker updates its tenants (a reload): the new cap and weight apply."""
    tenants = parse_tenants(TENANTS, env={})
    lc = make(fake_redis, clock, tenants)
    tenants.update(parse_tenants(TENANTS.replace("max_inflight = 2", "max_inflight = 5")
                                 .replace("weight = 2", "weight = 0.5"), env={}))
    assert (lc.lanes.cap("gamma"), lc.lanes.weight("beta")) == (5, 0.5)


# -- slots under a cap -----------------------------------------------------------------------

def test_a_tenant_at_its_cap_keeps_further_events_in_its_lane(lc: Lifecycle) -> None:
    ids = [receive(lc, "gamma") for _ in range(5)]     # gamma: max_inflight = 2
    assert queued_ids(lc) == ids[:2]
    assert lane(lc, "gamma") == ids[2:]
    assert live_slots(lc, "gamma") == 2
    assert "gamma" not in ready(lc)                     # capped: out of the round
    # Another tenant is not held back by it.
    other = receive(lc, "acme")
    assert queued_ids(lc) == [*ids[:2], other]
    # A freed slot dispatches the tenant's next event, and only one.
    assert take(lc) == [ids[0], "gamma"]
    finish(lc, ids[0], "gamma")
    assert queued_ids(lc) == [ids[1], other, ids[2]]
    assert lane(lc, "gamma") == ids[3:] and live_slots(lc, "gamma") == 2


def test_a_lapsed_slot_counts_as_free_at_once(lc: Lifecycle, clock: FakeClock) -> None:
    """A dead worker's slot frees by the clock alone: no sweep needs to run first."""
    first, second = receive(lc, "gamma"), receive(lc, "gamma")
    lc.redis.delete(QUEUE_EVENTS)                       # their messages are lost
    third = receive(lc, "gamma")
    assert lane(lc, "gamma") == [third]
    clock.advance(DISPATCH_LEASE - 0.001)
    assert live_slots(lc, "gamma") == 2
    clock.advance(0.002)
    fourth = receive(lc, "gamma")
    assert queued_ids(lc) == [third] and live_slots(lc, "gamma") == 1
    assert lc.lanes.refill() == 1                        # both slots were free
    assert queued_ids(lc) == [third, fourth]
    assert lc.redis.zcard(keys.inflight("gamma")) == 4  # the lapsed ones until the sweep
    assert lc.lanes.sweep() == (0, 2, 0)                # recovered: they wait for a slot
    assert sorted(lane(lc, "gamma")) == sorted([first, second])   # (equal leases: any order)


# -- turns while the queue is full -----------------------------------------------------------

def test_a_full_queue_makes_tenants_wait_their_turn(fake_redis: fakeredis.FakeRedis,
                                                    clock: FakeClock) -> None:
    lc = make(fake_redis, clock, dispatch_queue_max=4)
    a = [receive(lc, "acme") for _ in range(4)]
    # Dispatched at once while the queue is under half full; then acme joins the round.
    assert queued_ids(lc) == a[:2] and lane(lc) == a[2:]
    assert ready(lc) == {"acme": 0.0}
    # The shared refill fills the queue up to its limit, in turn.
    assert lc.lanes.refill() == 2
    assert queued_ids(lc) == a and ready(lc) == {}
    assert lc.lanes.refill() == 0
    b = receive(lc, "acme")
    assert lc.lanes.refill() == 0 and lane(lc) == [b]    # no room
    take(lc)
    assert lc.lanes.refill() == 1 and queued_ids(lc)[-1] == b


def test_refill_serves_tenants_by_pass_and_weight(fake_redis: fakeredis.FakeRedis,
                                                  clock: FakeClock) -> None:
    """beta (weight 2) gets twice the turns of acme (weight 1) while both have work."""
    lc = make(fake_redis, clock, dispatch_queue_max=4, tenant_max_inflight=10_000)
    for _ in range(60):
        receive(lc, "acme")
        receive(lc, "beta")
    assert ready(lc) == {"acme": 0.0, "beta": 0.0}
    assert lc.lanes.refill() == 2                       # the queue is full (4)
    order = []
    for _ in range(60):
        take(lc)
        assert lc.lanes.refill() == 1
        order.append(str(queued(lc)[-1][1]))
    assert Counter(order) == {"beta": 40, "acme": 20}
    # Evenly spread, not in bursts: every three turns, two of beta's and one of acme's.
    for i in range(0, 60, 3):
        assert Counter(order[i:i + 3]) == {"beta": 2, "acme": 1}, order


def test_a_tenant_with_one_event_is_served_like_one_with_a_thousand(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    lc = make(fake_redis, clock, dispatch_queue_max=4, tenant_max_inflight=10_000)
    for _ in range(1000):
        receive(lc, "acme")
    assert lc.lanes.refill() == 2
    for _ in range(10):                       # acme alone for a while
        take(lc)
        lc.lanes.refill()
    assert len(lane(lc, "acme")) == 1000 - 14
    mine = receive(lc, "small")
    assert ready(lc)["small"] == ready(lc)["acme"] == 12   # at the round's front, no credit
    got = []
    for _ in range(2):                        # one round: each ready tenant once
        take(lc)
        lc.lanes.refill()
        got.append(queued_ids(lc)[-1])
    assert mine in got
    assert "small" not in ready(lc)           # nothing more to do: out of the round


def test_refill_skips_tenants_at_their_cap(fake_redis: fakeredis.FakeRedis,
                                           clock: FakeClock) -> None:
    lc = make(fake_redis, clock, dispatch_queue_max=2)
    receive(lc, "acme")                                   # queue 1: the rest wait
    g = [receive(lc, "gamma") for _ in range(4)]
    a = receive(lc, "acme")
    assert set(ready(lc)) == {"acme", "gamma"}
    lc.redis.delete(QUEUE_EVENTS)
    assert lc.lanes.refill() == 2
    lc.redis.delete(QUEUE_EVENTS)
    assert lc.lanes.refill() == 1                         # gamma's cap (2) is reached
    assert set(queued_ids(lc)) <= {a, *g}
    assert len(lane(lc, "gamma")) == 2 and "gamma" not in ready(lc)


# -- paused tenants --------------------------------------------------------------------------

def test_a_paused_tenant_is_not_dispatched(lc: Lifecycle, clock: FakeClock) -> None:
    lc.redis.sadd(keys.PAUSED, "acme")
    ids = [receive(lc, "acme") for _ in range(3)]
    other = receive(lc, "beta")
    assert queued_ids(lc) == [other]
    assert lane(lc) == ids and "acme" not in ready(lc)
    assert lc.lanes.sweep() == (0, 0, 0) and queued_ids(lc) == [other]
    # A retry that comes due waits in the lane too.
    lc.redis.zadd(keys.retry("acme"), {"ev_retry": clock.now()})
    assert lc.lanes.sweep() == (1, 0, 0)
    assert lane(lc) == ["ev_retry", *ids] and queued_ids(lc) == [other]


def test_a_resumed_tenant_is_served_by_the_refill(fake_redis: fakeredis.FakeRedis,
                                                  clock: FakeClock) -> None:
    lc = make(fake_redis, clock, dispatch_queue_max=4)
    lc.redis.sadd(keys.PAUSED, "acme")
    ids = [receive(lc, "acme") for _ in range(3)]
    # Resumed: out of the paused set and back in the round (at its front), then the shared
    # refill serves it in turn.
    lc.redis.srem(keys.PAUSED, "acme")
    lc.redis.zadd(keys.READY, {"acme": 0}, nx=True)
    assert lc.lanes.sweep() == (0, 0, 3)
    assert queued_ids(lc) == ids and lane(lc) == []


def test_a_resumed_tenants_next_webhook_sends_its_backlog_first(lc: Lifecycle) -> None:
    lc.redis.sadd(keys.PAUSED, "acme")
    old = receive(lc, "acme")
    lc.redis.srem(keys.PAUSED, "acme")
    new = receive(lc, "acme")
    assert queued_ids(lc) == [old] and lane(lc) == [new]
    assert lc.lanes.refill() == 1 and queued_ids(lc) == [old, new]


# -- the bulk lane ---------------------------------------------------------------------------

def test_bulk_goes_only_when_the_live_lane_is_empty(fake_redis: fakeredis.FakeRedis,
                                                    clock: FakeClock) -> None:
    lc = make(fake_redis, clock, tenant_max_inflight=1)
    first = receive(lc)                                      # takes the slot
    bulk = [receive(lc, lane="backfill") for _ in range(2)]
    live = [receive(lc) for _ in range(2)]
    assert lane(lc, bulk=True) == bulk and lane(lc) == live
    order = []
    running = first
    for _ in range(4):
        take(lc)
        finish(lc, running, "acme")
        running = queued_ids(lc)[-1]
        order.append(running)
    assert order == [*live, *bulk]


def test_bulk_is_paced_by_the_token_bucket(fake_redis: fakeredis.FakeRedis,
                                           clock: FakeClock) -> None:
    lc = make(fake_redis, clock, bulk_rate_per_second=2.0)
    ids = [receive(lc, lane="reconcile") for _ in range(6)]
    # One second of burst (2 events), then the tenant waits in the round for the pace.
    assert queued_ids(lc) == ids[:2] and lane(lc, bulk=True) == ids[2:]
    assert "acme" in ready(lc)
    assert lc.lanes.refill() == 0
    clock.advance(0.4)
    assert lc.lanes.refill() == 0
    clock.advance(0.2)
    assert lc.lanes.refill() == 1
    clock.advance(10)                                        # the burst is capped at 1 s
    assert lc.lanes.refill() == 2
    assert queued_ids(lc) == ids[:5]
    # A live event does not wait for the pace.
    live = receive(lc)
    assert queued_ids(lc)[-1] == live
    clock.advance(0.6)
    assert lc.lanes.sweep() == (0, 0, 1)
    assert queued_ids(lc)[-1] == ids[5] and "acme" not in ready(lc)


def test_the_bulk_pace_is_shared_by_all_tenants(fake_redis: fakeredis.FakeRedis,
                                                clock: FakeClock) -> None:
    lc = make(fake_redis, clock, bulk_rate_per_second=2.0)
    a = [receive(lc, "acme", lane="backfill") for _ in range(2)]
    b = [receive(lc, "beta", lane="backfill") for _ in range(2)]
    assert queued_ids(lc) == a and lane(lc, "beta", bulk=True) == b
    clock.advance(1)
    assert lc.lanes.refill() == 2 and queued_ids(lc) == [*a, *b]


def test_a_bulk_rate_under_one_per_second_still_dispatches(fake_redis: fakeredis.FakeRedis,
                                                           clock: FakeClock) -> None:
    """BULK_RATE_PER_SECOND = 0.5: one event every two seconds (the bucket holds at least
    one whole token, or no bulk event would ever go)."""
    lc = make(fake_redis, clock, bulk_rate_per_second=0.5)
    start = clock.now()
    ids = [receive(lc, lane="backfill") for _ in range(3)]
    sent_at = []
    for _ in range(6):
        clock.advance(1)
        if lc.lanes.refill():
            sent_at.append(clock.now() - start)
    assert sent_at == [1.0, 3.0, 5.0]
    assert queued_ids(lc) == ids


# -- the sweep -------------------------------------------------------------------------------

def test_due_retries_go_to_the_head_of_their_lane(fake_redis: fakeredis.FakeRedis,
                                                  clock: FakeClock) -> None:
    lc = make(fake_redis, clock, tenant_max_inflight=1)
    first = receive(lc)
    take(lc)
    claim = lc.claim(first, "acme", "w1")
    assert claim.event is not None
    lc.retry(claim.event, 5, Status.RETRY_SCHEDULED, Outcome.RETRY, [], worker="w1")
    second, third = receive(lc), receive(lc)       # the second takes the freed slot
    assert lane(lc) == [third]
    clock.advance(4)
    assert lc.lanes.sweep() == (0, 0, 0)
    clock.advance(1)
    assert lc.lanes.sweep() == (1, 0, 0)
    assert lane(lc) == [first, third]              # older than what waits there
    assert lc.redis.zcard(keys.retry("acme")) == 0
    take(lc)
    finish(lc, second, "acme")
    assert queued_ids(lc) == [first]


def test_lapsed_leases_are_recovered_to_the_head_of_the_live_lane(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    lc = make(fake_redis, clock, tenant_max_inflight=1)
    lost = receive(lc, lane="backfill")                # dispatched; its message gets lost
    waiting = receive(lc)
    lc.redis.delete(QUEUE_EVENTS)
    clock.advance(DISPATCH_LEASE)
    due, recovered, refilled = lc.lanes.sweep()
    assert (due, recovered, refilled) == (0, 1, 0)
    # Back at the head of the live lane, whatever lane it came from, and dispatched again.
    assert queued_ids(lc) == [lost] and lane(lc) == [waiting]
    (step,) = steps(lc, lost)
    # No status change (null) and no columns: an empty Lua table, which cjson writes as {}
    # (Redis) or [] (fakeredis); the history writer reads either as nothing to set.
    assert step.pop("set") in ({}, [])
    assert step == {"id": lost, "at": clock.now(), "status": None, "tl": [
        {"t": clock.now(), "what": "requeued",
         "reason": "its lease lapsed: the worker holding it stopped"}]}
    # A worker claimed it and died: its claim's lease lapses too.
    take(lc)
    assert lc.claim(lost, "acme", "w1").code == ClaimCode.CLAIMED
    clock.advance(LEASE)
    assert lc.lanes.sweep()[1] == 1
    assert queued_ids(lc) == [lost] and len(steps(lc, lost)) == 2
    # The next worker takes it over from the dead one.
    assert lc.claim(lost, "acme", "w2").code == ClaimCode.CLAIMED


def test_recover_checks_each_lease_again(lc: Lifecycle, clock: FakeClock) -> None:
    """Read just before the script, a lease may have been renewed since: it is left alone."""
    eid = receive(lc)
    args = [ms(clock.now()), 1, eid, *lc.lanes.args("acme")]
    assert int(lc.scripts.recover(keys=[keys.HISTORY, *lc.lanes.keys("acme")],
                                  args=args)) == 0
    assert steps(lc, eid) == [] and lc.redis.zscore(keys.inflight("acme"), eid) is not None


def test_the_sweep_walks_tenants_no_longer_in_the_file(fake_redis: fakeredis.FakeRedis,
                                                       clock: FakeClock) -> None:
    tenants = parse_tenants(TENANTS, env={})
    lc = make(fake_redis, clock, tenants)
    eid = receive(lc, "small")
    lc.redis.delete(QUEUE_EVENTS)
    del tenants["small"]
    assert lc.lanes.all_tenants() == ["acme", "beta", "gamma", "small"]
    clock.advance(DISPATCH_LEASE)
    assert lc.lanes.sweep() == (0, 1, 0)
    assert queued_ids(lc) == [eid]        # its worker dead-letters it (tenant unknown)


def test_refill_with_nobody_ready_does_nothing(lc: Lifecycle) -> None:
    assert lc.lanes.refill() == 0
    assert lc.lanes.sweep() == (0, 0, 0)


def test_lanes_share_their_scripts_and_settings(fake_redis: fakeredis.FakeRedis,
                                                clock: FakeClock) -> None:
    lc = make(fake_redis, clock, visibility_timeout_seconds=30)
    assert isinstance(lc.lanes, Lanes) and lc.lanes.scripts is lc.scripts
    assert lc.lanes.dispatch_lease_ms == 45_000
    eid = receive(lc)
    assert lc.redis.zscore(keys.inflight("acme"), eid) == ms(clock.now()) + 45_000
