"""The steps of an event's life (``rilla_bridge/lifecycle.py``) on their own: receive (with its
dedup and its dispatch), claim, finish, skip, dead letter, retry, requeue, replay, the
operators' records, and what a worker whose lease lapsed may still do. Every step is checked
in Redis (the event exists only while unfinished) and in the history records it appends to
``rb:history``. fakeredis and a ``FakeClock``."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any

import fakeredis
import pytest
import redis

from rilla_bridge import keys
from rilla_bridge.calls import LOCKED, CallState
from rilla_bridge.celery_messages import QUEUE_EVENTS, message_args
from rilla_bridge.clock import FakeClock
from rilla_bridge.history.records import Record
from rilla_bridge.lifecycle import (
    REPLAY_MARKER_SECONDS,
    CallRef,
    Claim,
    ClaimCode,
    Lifecycle,
    Outcome,
    Status,
    dedup_digest,
    make_lifecycle,
    new_event_id,
    retry_delay,
)
from rilla_bridge.settings import Settings
from rilla_bridge.tenants import parse_tenants
from tests.fakes import TENANTS

DEDUP = 600
LEASE = 8.0                     # DELIVERY_LEASE_SECONDS (the default)
DISPATCH_LEASE = 60 + 15        # a dispatched, unclaimed event: VISIBILITY_TIMEOUT + 15 s


def make(client: fakeredis.FakeRedis, clock: FakeClock, **settings: Any) -> Lifecycle:
    values: dict[str, Any] = {"dedup_window_seconds": DEDUP, "retry_base_seconds": 5.0,
                              "retry_max_delay_seconds": 60.0}
    values.update(settings)
    return make_lifecycle(client, clock, Settings(**values), parse_tenants(TENANTS, env={}))


@pytest.fixture
def lc(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> Lifecycle:
    return make(fake_redis, clock)


@pytest.fixture
def capped(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> Lifecycle:
    """Tenants may have one event in flight each."""
    return make(fake_redis, clock, tenant_max_inflight=1)


def body_of(n: int) -> bytes:
    return json.dumps({"resource_id": f"CAL{n}", "n": n}).encode()


def receive(lc: Lifecycle, n: int = 1, tenant: str = "acme", source: str = "callrail",
            kind: str = "post_call", lane: str = "live") -> str:
    stored = lc.receive(source=source, tenant=tenant, kind=kind, body=body_of(n),
                        call_id=f"CAL{n}", lane=lane)
    assert not stored.duplicate
    return stored.event_id


def claimed(lc: Lifecycle, eid: str, worker: str = "w1", tenant: str = "acme") -> dict[str, Any]:
    claim = lc.claim(eid, tenant, worker)
    assert claim.code == ClaimCode.CLAIMED and claim.event is not None, claim
    return claim.event


def fields(lc: Lifecycle, eid: str) -> dict[str, str]:
    """The event's Redis hash without its body ({} once it is finished)."""
    raw: dict[bytes, bytes] = lc.redis.hgetall(keys.event(eid))  # type: ignore[assignment]
    return {k.decode(): v.decode() for k, v in raw.items() if k != b"body"}


def history(lc: Lifecycle) -> list[Record]:
    entries: Any = lc.redis.xrange(keys.HISTORY)
    return [Record.from_entry(sid, f) for sid, f in entries]


def recs(lc: Lifecycle, kind: str, eid: str | None = None) -> list[dict[str, Any]]:
    """The ``d`` of every history record of type ``kind`` (of event ``eid``), oldest first."""
    return [r.data for r in history(lc)
            if r.type == kind and (eid is None or r.data.get("id") == eid)]


def whats(lc: Lifecycle, eid: str) -> list[str]:
    return [e["what"] for step in recs(lc, "step", eid) for e in step["tl"]]


def stats(lc: Lifecycle) -> dict[str, int]:
    """The outcome counters in ``rb:stats`` (all for tenant acme here), by outcome."""
    out: dict[str, int] = {}
    for k, v in all_stats(lc).items():
        kind, _, rest = k.partition("|")
        if kind == "outcome":
            outcome, tenant = rest.split("|")
            assert tenant == "acme"
            out[outcome] = int(v)
    return out


def all_stats(lc: Lifecycle) -> dict[str, float]:
    raw: dict[bytes, bytes] = lc.redis.hgetall(keys.STATS)  # type: ignore[assignment]
    return {k.decode(): float(v) for k, v in raw.items()}


def queued(lc: Lifecycle) -> list[list[Any]]:
    """The queue's messages' task arguments, in the order workers take them."""
    raw: list[bytes] = lc.redis.lrange(QUEUE_EVENTS, 0, -1)  # type: ignore[assignment]
    return [message_args(m) or [] for m in reversed(raw)]


def lane(lc: Lifecycle, tenant: str = "acme", bulk: bool = False) -> list[str]:
    key = keys.bulk_lane(tenant) if bulk else keys.lane(tenant)
    ids: Any = lc.redis.lrange(key, 0, -1)
    return [i.decode() for i in ids]


def inflight(lc: Lifecycle, tenant: str = "acme") -> dict[str, float]:
    leases: Any = lc.redis.zrange(keys.inflight(tenant), 0, -1, withscores=True)
    return {k.decode(): s for k, s in leases}


# -- ids, dedup digests, backoff -------------------------------------------------------------

def test_event_ids_are_time_ordered_and_unguessable(clock: FakeClock) -> None:
    first, same_ms = new_event_id(clock.now()), new_event_id(clock.now())
    later = new_event_id(clock.advance(0.001))
    assert re.fullmatch(r"ev_[0-9a-f]{12}[0-9a-f]{16}", first)
    assert first != same_ms and first[:15] == same_ms[:15]
    assert sorted([later, first]) == [first, later]


def test_dedup_digest_is_the_body_per_tenant_and_source_never_the_kind() -> None:
    d = dedup_digest("callrail", "acme", b"{}")
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", d)
    assert dedup_digest("callrail", "acme", b"{}") == d
    assert len({d, dedup_digest("callingly", "acme", b"{}"), dedup_digest("callrail", "beta",
                b"{}"), dedup_digest("callrail", "acme", b"{ }")}) == 4
    # The separators keep (source, tenant) pairs apart that would concatenate alike.
    assert dedup_digest("a", "bc", b"x") != dedup_digest("ab", "c", b"x")


def test_retry_delay_bounds() -> None:
    s = Settings(retry_base_seconds=5, retry_max_delay_seconds=3600)
    for attempts in range(1, 30):
        ceiling = min(3600, 5 * 2 ** (attempts - 1))
        samples = [retry_delay(s, attempts, None) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in samples), attempts
        assert len(set(samples)) > 1  # jittered
    first = [retry_delay(s, 1, None) for _ in range(200)]
    assert min(first) >= 2.5 and max(first) <= 5.0
    assert max(retry_delay(s, 40, None) for _ in range(50)) <= 3600
    # Retry-After: never earlier, but never past the cap on one delay.
    assert all(retry_delay(s, 1, 120.0) >= 120.0 for _ in range(20))
    assert retry_delay(s, 1, 99999.0) == 3600
    # Very many attempts (tiny cap, long max age) must not overflow.
    tiny = Settings(retry_base_seconds=0.5, retry_max_delay_seconds=1,
                    retry_max_age_seconds=86400)
    assert 0.5 <= retry_delay(tiny, 5000, None) <= 1


# -- received --------------------------------------------------------------------------------

def test_receive_stores_records_and_dispatches_at_once(lc: Lifecycle, clock: FakeClock) -> None:
    eid = receive(lc)
    ev = fields(lc, eid)
    assert ev == {"tenant": "acme", "source": "callrail", "kind": "post_call",
                  "call_id": "CAL1", "received_at": repr(clock.now()), "lane": "live",
                  "status": "queued"}
    assert lc.redis.hget(keys.event(eid), "body") == body_of(1)
    # Its history record, with the raw body beside it.
    (rec,) = [r for r in history(lc) if r.type == "received"]
    assert rec.data == {"id": eid, "tenant": "acme", "source": "callrail", "kind": "post_call",
                        "call_id": "CAL1", "received_at": clock.now(), "size": len(body_of(1)),
                        "sha256": hashlib.sha256(body_of(1)).hexdigest(), "status": "queued",
                        "note": "", "lane": "live", "kept": True}
    assert rec.body == body_of(1)
    # Unfinished: in its tenant's open set; the tenant is known to the sweeps.
    assert lc.redis.zscore(keys.open_events("acme"), eid) == clock.now()
    assert lc.redis.smembers(keys.TENANTS) == {b"acme"}
    # The tenant has a slot free: dispatched in the same step, its slot under a lease.
    assert queued(lc) == [[eid, "acme"]]
    assert inflight(lc) == {eid: (clock.now() + DISPATCH_LEASE) * 1000}
    assert lane(lc) == [] and lc.redis.zcard(keys.READY) == 0


def test_a_lead_event_is_recorded_without_its_body_and_not_queued(lc: Lifecycle,
                                                                  clock: FakeClock) -> None:
    raw = b'{"lead": {"secret": "x"}}'
    stored = lc.receive(source="callingly", tenant="beta", kind="lead_created", body=raw,
                        call_id=None, keep=False, note="lead: not kept")
    assert not stored.duplicate
    (rec,) = history(lc)
    assert (rec.type, rec.body) == ("received", None)
    assert rec.data["id"] == stored.event_id
    assert (rec.data["status"], rec.data["kept"], rec.data["note"]) == (
        "skipped", False, "lead: not kept")
    assert rec.data["sha256"] == hashlib.sha256(raw).hexdigest()
    assert rec.data["call_id"] is None
    assert not lc.redis.exists(keys.event(stored.event_id))
    assert queued(lc) == [] and lc.redis.zcard(keys.open_events("beta")) == 0
    assert lc.redis.llen(keys.lane("beta")) == 0
    # Repeated, it is a duplicate of the first all the same.
    again = lc.receive(source="callingly", tenant="beta", kind="lead_created", body=raw,
                       call_id=None, keep=False)
    assert (again.event_id, again.duplicate) == (stored.event_id, True)


def test_a_repeated_body_is_a_duplicate_whatever_its_kind(lc: Lifecycle) -> None:
    first = lc.receive(source="callrail", tenant="acme", kind="post_call", body=body_of(1),
                       call_id="CAL1")
    for kind in ("post_call", "call_modified", "pre_call"):
        again = lc.receive(source="callrail", tenant="acme", kind=kind, body=body_of(1),
                           call_id="CAL1")
        assert (again.event_id, again.duplicate) == (first.event_id, True)
    assert len(recs(lc, "received")) == 1 and len(queued(lc)) == 1
    assert lc.redis.keys("rb:ev:*") == [keys.event(first.event_id).encode()]
    dd = keys.dedup(dedup_digest("callrail", "acme", body_of(1)))
    assert lc.redis.get(dd) == first.event_id.encode()
    assert lc.redis.ttl(dd) == DEDUP
    # Another tenant, another source, another body: new events.
    for source, tenant, body in (("callrail", "beta", body_of(1)),
                                 ("callingly", "acme", body_of(1)),
                                 ("callrail", "acme", body_of(2))):
        other = lc.receive(source=source, tenant=tenant, kind="post_call", body=body,
                           call_id=None)
        assert not other.duplicate and other.event_id != first.event_id


def test_receive_on_a_single_connection_tries_once_more_after_a_closed_socket(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The web process's own connection meets the closed socket of a restarted Redis once."""
    intake_conn = fakeredis.FakeRedis()           # the web thread's own connection
    lc = make_lifecycle(fake_redis, clock, Settings(), parse_tenants(TENANTS, env={}),
                        intake_client=lambda: intake_conn)
    real = lc.scripts.intake
    clients: list[Any] = []

    def flaky(*, keys: Any, args: Any, client: Any = None) -> Any:
        clients.append(client)
        if len(clients) == 1:
            raise redis.ConnectionError("Connection closed by server.")
        return real(keys=keys, args=args, client=client)

    monkeypatch.setattr(lc.scripts, "intake", flaky)
    stored = lc.receive(source="callrail", tenant="acme", kind="post_call", body=b"{}",
                        call_id=None)
    assert clients == [intake_conn, intake_conn] and not stored.duplicate
    assert intake_conn.exists(keys.event(stored.event_id))
    intake_conn.close()
    # Without a connection of its own (the pool checks connections), the error is the caller's.
    monkeypatch.setattr(lc, "_intake_client", None)
    clients.clear()
    with pytest.raises(redis.ConnectionError):
        lc.receive(source="callrail", tenant="acme", kind="post_call", body=b"{ }",
                   call_id=None)
    assert clients == [None]


# -- a worker claims it ----------------------------------------------------------------------

def test_claim_of_a_dispatched_event(lc: Lifecycle, clock: FakeClock) -> None:
    eid = receive(lc)
    clock.advance(2)
    claim = lc.claim(eid, "acme", "w1")
    assert (claim.code, claim.queue_length, claim.tenants_ready) == (ClaimCode.CLAIMED, 1, 0)
    assert claim.event is not None
    until = int((clock.now() + LEASE) * 1000)
    assert claim.event == {"id": eid, "tenant": "acme", "source": "callrail",
                           "kind": "post_call", "call_id": "CAL1",
                           "received_at": repr(clock.now() - 2), "lane": "live",
                           "status": "in_flight", "body": body_of(1), "claimed_by": "w1",
                           "claim_until": str(until)}
    # The slot's lease is the worker's now (renewed by its heartbeat).
    assert inflight(lc) == {eid: until}


def test_claim_gone_stale_held_and_lapsed(capped: Lifecycle, clock: FakeClock) -> None:
    lc = capped
    first, second = receive(lc, 1), receive(lc, 2)       # the cap (1): the second waits
    assert lane(lc) == [second]
    # An unknown (finished) event: gone, and its stray slot entry goes with it.
    lc.redis.zadd(keys.inflight("acme"), {"ev_gone": 1})
    assert lc.claim("ev_gone", "acme", "w1") == Claim(ClaimCode.GONE, None, 1, 0)
    assert "ev_gone" not in inflight(lc)
    # A copy of a message for an event that is not dispatched (waiting in its lane): stale.
    assert lc.claim(second, "acme", "w1").code == ClaimCode.STALE
    assert fields(lc, second)["status"] == "queued"
    # Held by another live worker.
    claimed(lc, first, "w1")
    clock.advance(LEASE - 0.001)
    assert lc.claim(first, "acme", "w2").code == ClaimCode.HELD
    assert fields(lc, first)["claimed_by"] == "w1"
    # The holder's lease lapsed (no heartbeat): another worker may take it over.
    clock.advance(0.002)
    event = claimed(lc, first, "w2")
    assert event["claimed_by"] == "w2"
    assert inflight(lc) == {first: int((clock.now() + LEASE) * 1000)}


def test_claim_reports_the_queue_and_the_tenants_waiting_for_room(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    lc = make(fake_redis, clock, dispatch_queue_max=2)
    ids = [receive(lc, n) for n in range(3)]
    # Dispatched at once while the queue is short (under half its limit), then the tenant
    # waits its turn for room.
    assert queued(lc) == [[ids[0], "acme"]] and lane(lc) == ids[1:]
    claim = lc.claim(ids[0], "acme", "w1")
    assert (claim.queue_length, claim.tenants_ready) == (1, 1)


# -- finished --------------------------------------------------------------------------------

def test_finish_removes_the_event_and_writes_its_history(lc: Lifecycle,
                                                         clock: FakeClock) -> None:
    eid = receive(lc)
    event = claimed(lc, eid)
    clock.advance(1.5)
    out = lc.finish(event, Status.DELIVERED, Outcome.DELIVERED,
                    [lc.entry("attempt", n=1, status=200, ms=300), lc.entry("delivered")],
                    worker="w1", fields={"attempts": 1, "last_status": 200})
    assert out == Outcome.DELIVERED
    assert not lc.redis.exists(keys.event(eid))
    assert inflight(lc) == {} and lc.redis.zcard(keys.open_events("acme")) == 0
    (step,) = recs(lc, "step", eid)
    now = clock.now()
    assert step == {"id": eid, "at": now, "status": "delivered",
                    "set": {"attempts": 1, "last_status": 200, "finished_at": now},
                    "tl": [{"t": now, "what": "attempt", "n": 1, "status": 200, "ms": 300},
                           {"t": now, "what": "delivered"}]}
    assert stats(lc) == {Outcome.DELIVERED: 1}
    # per tenant: Rilla's answer and its time, in the 0.5 s bucket of the histogram
    assert all_stats(lc) == {"outcome|delivered|acme": 1, "rilla|200|acme": 1,
                             "latency|0.5|acme": 1, "latency_sum|acme": 0.3,
                             "latency_count|acme": 1}
    assert recs(lc, "call") == [] and recs(lc, "dead") == []


def test_finish_with_the_call_records_its_state_and_frees_its_lock(lc: Lifecycle,
                                                                   clock: FakeClock) -> None:
    calls = CallState(lc.redis, lc.scripts, clock, lc.settings)
    eid = receive(lc)
    event = claimed(lc, eid)
    got, _ = calls.snapshot_and_acquire("acme", "callrail", "CAL1", eid,
                                        {"rank": 2, "received_at": 0, "fields": {}},
                                        token="tok", lease_ms=8000, want_lock=True)
    assert got == LOCKED
    lc.finish(event, Status.DELIVERED, Outcome.DELIVERED, [lc.entry("delivered")],
              worker="w1", call=CallRef("acme", "callrail", "CAL1", "tok"), delivered="fp1")
    state = lc.redis.hgetall(keys.call("acme", "callrail", "CAL1"))
    assert state[b"delivered"] == b"fp1" and state[b"v"] == b"2"
    assert not lc.redis.exists(keys.call_lock("acme", "callrail", "CAL1"))
    (call,) = recs(lc, "call")
    assert call == {"tenant": "acme", "source": "callrail", "call_id": "CAL1", "version": 2,
                    "state": {f"s:{eid}": '{"rank":2,"received_at":0,"fields":{}}',
                              "v": "2", "delivered": "fp1"}}
    # The step comes first: the call record states what the step left behind.
    assert [r.type for r in history(lc)] == ["received", "step", "call"]


def test_a_lock_of_another_delivery_is_not_freed(lc: Lifecycle, clock: FakeClock) -> None:
    calls = CallState(lc.redis, lc.scripts, clock, lc.settings)
    calls.snapshot_and_acquire("acme", "callrail", "CAL1", "ev_other", {}, token="theirs",
                               lease_ms=8000, want_lock=True)
    event = claimed(lc, receive(lc))
    lc.skip(event, "a pre-call", worker="w1", call=CallRef("acme", "callrail", "CAL1", "mine"))
    assert lc.redis.hget(keys.call_lock("acme", "callrail", "CAL1"), "token") == b"theirs"
    # A call touched without its lock (a merged pre-call) is recorded all the same.
    assert [c["call_id"] for c in recs(lc, "call")] == ["CAL1"]


def test_skip(lc: Lifecycle, clock: FakeClock) -> None:
    eid = receive(lc)
    assert lc.skip(claimed(lc, eid), "a pre-call", worker="w1") == Outcome.SKIPPED
    (step,) = recs(lc, "step", eid)
    assert (step["status"], step["set"]) == ("skipped", {"reason": "a pre-call",
                                                         "finished_at": clock.now()})
    assert step["tl"] == [{"t": clock.now(), "what": "skipped", "reason": "a pre-call"}]
    assert stats(lc) == {Outcome.SKIPPED: 1} and not lc.redis.exists(keys.event(eid))


def test_a_finish_dispatches_the_tenants_next_event(capped: Lifecycle) -> None:
    lc = capped
    first, second, third = (receive(lc, n) for n in range(3))
    other = receive(lc, 9, tenant="beta")         # another tenant has a slot of its own
    assert queued(lc) == [[first, "acme"], [other, "beta"]]
    assert lane(lc) == [second, third]
    lc.redis.delete(QUEUE_EVENTS)
    lc.finish(claimed(lc, first), Status.DELIVERED, Outcome.DELIVERED, [], worker="w1")
    assert queued(lc) == [[second, "acme"]] and lane(lc) == [third]
    assert list(inflight(lc)) == [second]


# -- dead letters ----------------------------------------------------------------------------

def test_dead_letter_keeps_everything_spec_lists(lc: Lifecycle, clock: FakeClock,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    eid = receive(lc)
    event = {**claimed(lc, eid), "attempts": "3", "first_attempt_at": repr(clock.now() - 100)}
    payload = {"event_id": "callrail-CAL1", "user_email": "x@acme.example"}
    with caplog.at_level(logging.WARNING, logger="rilla_bridge.lifecycle"):
        out = lc.dead_letter(event, "rilla_rejected", "Rilla answered 422: " + "x" * 2000,
                             worker="w1", rilla_event_id="callrail-CAL1", status_code=422,
                             response_body="User email is not in Rilla" + "y" * 3000,
                             payload=payload)
    assert out == Outcome.DEAD
    (dead,) = recs(lc, "dead")
    now = clock.now()
    reason = ("Rilla answered 422: " + "x" * 2000)[:1000]
    assert dead == {"id": eid, "tenant": "acme", "source": "callrail", "kind": "post_call",
                    "call_id": "CAL1", "rilla_event_id": "callrail-CAL1",
                    "reason_code": "rilla_rejected", "reason": reason, "status_code": 422,
                    "response_body": ("User email is not in Rilla" + "y" * 3000)[:2000],
                    "attempts": 3, "first_failure_at": now - 100, "failed_at": now,
                    "payload": payload}
    (step,) = recs(lc, "step", eid)
    assert step["status"] == "dead" and step["set"]["reason"] == reason[:300]
    assert step["tl"] == [{"t": now, "what": "dead_lettered", "reason": reason[:300],
                           "code": "rilla_rejected"}]
    assert not lc.redis.exists(keys.event(eid)) and stats(lc) == {Outcome.DEAD: 1}
    (log,) = [r for r in caplog.records if r.name == "rilla_bridge.lifecycle"]
    assert log.getMessage() == "dead-lettered" and log.levelno == logging.WARNING
    extra = vars(log)
    assert (extra["event"], extra["tenant"], extra["reason_code"]) == (
        eid, "acme", "rilla_rejected")


def test_dead_letter_of_an_event_never_attempted(lc: Lifecycle, clock: FakeClock) -> None:
    eid = receive(lc)
    lc.dead_letter(claimed(lc, eid), "transform", "no usable start time", worker="w1")
    (dead,) = recs(lc, "dead")
    assert (dead["status_code"], dead["attempts"], dead["payload"]) == (None, 0, None)
    assert dead["response_body"] == "" and dead["rilla_event_id"] == ""
    assert dead["first_failure_at"] == dead["failed_at"] == clock.now()


def test_a_dead_letter_names_the_last_payload_sent_by_an_earlier_attempt(
        lc: Lifecycle, clock: FakeClock) -> None:
    eid = receive(lc)
    sent = {"event_id": "callrail-CAL1", "title": "first try"}
    first = clock.now()
    lc.retry(claimed(lc, eid), 5, Status.RETRY_SCHEDULED, Outcome.RETRY, [], worker="w1",
             keep={"attempts": "1", "first_attempt_at": repr(first),
                   "last_payload": json.dumps(sent)})
    clock.advance(6)
    assert lc.lanes.sweep()[0] == 1
    event = claimed(lc, eid)
    assert (event["attempts"], event["last_payload"]) == ("1", json.dumps(sent))
    lc.dead_letter(event, "transform", "no rep email", worker="w1")
    (dead,) = recs(lc, "dead")
    assert (dead["payload"], dead["attempts"], dead["first_failure_at"]) == (sent, 1, first)


# -- retries ---------------------------------------------------------------------------------

def test_retry_keeps_the_event_in_its_tenants_retry_set(lc: Lifecycle, clock: FakeClock) -> None:
    eid = receive(lc)
    out = lc.retry(claimed(lc, eid), 12.5, Status.RETRY_SCHEDULED, Outcome.RETRY,
                   [lc.entry("retry_scheduled", in_s=12.5)], worker="w1",
                   keep={"attempts": "1", "first_attempt_at": "1.5"},
                   fields={"last_status": 500})
    assert out == Outcome.RETRY
    due = clock.now() + 12.5
    assert lc.redis.zscore(keys.retry("acme"), eid) == due
    ev = fields(lc, eid)
    assert (ev["status"], ev["attempts"], ev["first_attempt_at"]) == (
        "retry_scheduled", "1", "1.5")
    assert "claimed_by" not in ev and "claim_until" not in ev
    assert inflight(lc) == {}                                   # its slot is free
    assert lc.redis.zscore(keys.open_events("acme"), eid) is not None   # still unfinished
    (step,) = recs(lc, "step", eid)
    assert (step["status"], step["set"]) == ("retry_scheduled", {"last_status": 500,
                                                                 "next_attempt_at": due})
    assert stats(lc) == {Outcome.RETRY: 1}


def test_a_bulk_event_retries_in_its_bulk_retry_set(lc: Lifecycle, clock: FakeClock) -> None:
    eid = receive(lc, lane="reconcile")
    assert fields(lc, eid)["lane"] == "reconcile"
    lc.retry(claimed(lc, eid), 3, Status.WAITING, Outcome.BUSY, [], worker="w1")
    assert lc.redis.zscore(keys.bulk_retry("acme"), eid) == clock.now() + 3
    assert lc.redis.zcard(keys.retry("acme")) == 0
    clock.advance(3)
    assert lc.lanes.sweep()[0] == 1
    assert queued(lc)[-1] == [eid, "acme"]       # back by the bulk lane (the bucket allows)


def test_requeue_puts_a_waiting_event_at_the_head_of_its_lane(capped: Lifecycle,
                                                              clock: FakeClock) -> None:
    lc = capped
    first = receive(lc, 1)
    lc.retry(claimed(lc, first), 3600, Status.WAITING_RECORDING, Outcome.WAITING, [],
             worker="w1")
    second, third = receive(lc, 2), receive(lc, 3)   # the second takes the slot
    assert lane(lc) == [third]
    clock.advance(20)
    assert lc.requeue(first, "acme", "recording resolved") is True
    assert lane(lc) == [first, third]                # ahead of what came after it
    assert lc.redis.zcard(keys.retry("acme")) == 0
    assert fields(lc, first)["status"] == "queued"
    assert recs(lc, "step", first)[-1] == {
        "id": first, "at": clock.now(), "status": "queued", "set": {},
        "tl": [{"t": clock.now(), "what": "queued", "note": "recording resolved"}]}
    # Only a waiting event goes: not one in its lane, in flight or unknown.
    for eid in (first, second, "ev_unknown"):
        assert lc.requeue(eid, "acme", "again") is False
    assert len(recs(lc, "step", first)) == 2
    # The slot frees: the requeued event goes next.
    lc.redis.delete(QUEUE_EVENTS)
    lc.finish(claimed(lc, second), Status.DELIVERED, Outcome.DELIVERED, [], worker="w1")
    assert queued(lc) == [[first, "acme"]]


def test_requeue_dispatches_at_once_when_a_slot_is_free(lc: Lifecycle) -> None:
    eid = receive(lc)
    lc.retry(claimed(lc, eid), 3600, Status.WAITING_RECORDING, Outcome.WAITING, [],
             worker="w1")
    lc.redis.delete(QUEUE_EVENTS)
    assert lc.requeue(eid, "acme", "recording resolved")
    assert queued(lc) == [[eid, "acme"]] and eid in inflight(lc)


# -- a worker whose lease lapsed ---------------------------------------------------------------

def lapse_and_take_over(lc: Lifecycle, clock: FakeClock, eid: str) -> dict[str, Any]:
    """w1 claimed ``eid`` and stopped renewing; the sweep recovers it and w2 claims it."""
    clock.advance(LEASE + 0.001)
    assert lc.lanes.sweep() == (0, 1, 0)        # recovered, and dispatched again at once
    assert whats(lc, eid) == ["requeued"]
    return claimed(lc, eid, "w2")


@pytest.mark.parametrize("settle", ["finish", "retry", "dead_letter"])
def test_a_lapsed_workers_settle_only_adds_history(lc: Lifecycle, clock: FakeClock,
                                                   settle: str) -> None:
    eid = receive(lc)
    stale = claimed(lc, eid, "w1")
    lapse_and_take_over(lc, clock, eid)
    before = fields(lc, eid)
    if settle == "finish":
        lc.finish(stale, Status.DELIVERED, Outcome.DELIVERED, [lc.entry("delivered")],
                  worker="w1", call=CallRef("acme", "callrail", "CAL1"), delivered="fp")
    elif settle == "retry":
        lc.retry(stale, 5, Status.RETRY_SCHEDULED, Outcome.RETRY, [], worker="w1",
                 keep={"attempts": "9"})
    else:
        lc.dead_letter(stale, "rilla_rejected", "422", worker="w1")
    # The event, its slot and its place are w2's: untouched.
    assert fields(lc, eid) == before and before["claimed_by"] == "w2"
    assert inflight(lc) == {eid: int((clock.now() + LEASE) * 1000)}
    assert lc.redis.zcard(keys.retry("acme")) == 0
    assert lc.redis.zscore(keys.open_events("acme"), eid) is not None
    # w1's step is history all the same; nothing else of it is.
    assert len(recs(lc, "step", eid)) == 2
    assert recs(lc, "dead") == [] and recs(lc, "call") == [] and stats(lc) == {}


def test_a_lapsed_workers_dead_letter_after_the_other_delivered_is_no_dead_letter(
        lc: Lifecycle, clock: FakeClock) -> None:
    """w2 took over and delivered; w1 (its lease lapsed mid-delivery) then fails: the event
    is finished and gone, and no dead letter may claim otherwise."""
    eid = receive(lc)
    stale = claimed(lc, eid, "w1")
    taken = lapse_and_take_over(lc, clock, eid)
    lc.finish(taken, Status.DELIVERED, Outcome.DELIVERED, [], worker="w2")
    lc.dead_letter(stale, "rilla_rejected", "Rilla answered 422", worker="w1")
    assert recs(lc, "dead") == []
    assert stats(lc) == {Outcome.DELIVERED: 1}
    # w1's step is history (its attempt happened): requeued, w2's delivery, w1's failure.
    assert whats(lc, eid) == ["requeued", "dead_lettered"]
    assert len(recs(lc, "step", eid)) == 3
    assert not lc.redis.exists(keys.event(eid))


# -- replay ----------------------------------------------------------------------------------

def dead_row(lc: Lifecycle, clock: FakeClock, n: int = 1) -> dict[str, Any]:
    """A dead letter's row as history has it (its event finished in Redis)."""
    received_at = clock.now()
    eid = receive(lc, n)
    lc.dead_letter(claimed(lc, eid), "rilla_rejected", "Rilla answered 422", worker="w1")
    lc.redis.delete(QUEUE_EVENTS)
    assert not lc.redis.exists(keys.event(eid))
    return {"id": eid, "tenant": "acme", "source": "callrail", "kind": "post_call",
            "call_id": f"CAL{n}", "received_at": received_at, "body": body_of(n)}


def test_replay_runs_a_dead_letter_again_from_its_raw_event(lc: Lifecycle,
                                                            clock: FakeClock) -> None:
    row = dead_row(lc, clock)
    eid = row["id"]
    clock.advance(600)
    assert lc.replay(row, "cli:ops") is True
    assert fields(lc, eid) == {"tenant": "acme", "source": "callrail", "kind": "post_call",
                               "call_id": "CAL1", "received_at": repr(row["received_at"]),
                               "lane": "replay", "status": "queued"}
    assert lc.redis.hget(keys.event(eid), "body") == body_of(1)
    assert lc.redis.zscore(keys.open_events("acme"), eid) == clock.now()
    # By the bulk lane, at its pace (the bucket has room): dispatched at once.
    assert queued(lc) == [[eid, "acme"]] and lane(lc, bulk=True) == []
    step = recs(lc, "step", eid)[-1]
    assert step == {"id": eid, "at": clock.now(), "status": "queued",
                    "set": {"reason": None, "finished_at": None, "attempts": 0},
                    "tl": [{"t": clock.now(), "what": "replayed", "by": "cli:ops"}]}
    assert recs(lc, "handled") == [{"id": eid, "how": "replayed", "at": clock.now(),
                                    "by": "cli:ops"}]
    # Refused while it is in progress...
    assert lc.replay(row, "cli:ops") is False
    # ...and, once finished again, within the hour after a replay.
    lc.finish(claimed(lc, eid), Status.DELIVERED, Outcome.DELIVERED, [], worker="w1")
    assert lc.replay(row, "cli:ops") is False
    marker = keys.replayed(eid)
    assert 0 < lc.redis.ttl(marker) <= REPLAY_MARKER_SECONDS == 3600
    assert len(recs(lc, "handled")) == 1
    lc.redis.delete(marker)            # the hour is over (Redis's own expiry)
    assert lc.replay(row, "cli:ops") is True


def test_a_replay_waits_in_the_bulk_lane_behind_nothing_live(fake_redis: fakeredis.FakeRedis,
                                                             clock: FakeClock) -> None:
    lc = make(fake_redis, clock, tenant_max_inflight=1)
    row = dead_row(lc, clock)
    live = receive(lc, 2)                               # takes the slot
    assert lc.replay(row, "cli:ops")
    assert lane(lc, bulk=True) == [row["id"]] and lane(lc) == []
    third = receive(lc, 3)                               # a later live event goes first
    lc.redis.delete(QUEUE_EVENTS)
    lc.finish(claimed(lc, live), Status.DELIVERED, Outcome.DELIVERED, [], worker="w1")
    assert queued(lc) == [[third, "acme"]]


# -- operators -------------------------------------------------------------------------------

def test_delete_dead_letters_and_the_audit_log(lc: Lifecycle, clock: FakeClock) -> None:
    assert lc.delete_dead_letters(["ev_a", "ev_b"], "cli:ops") == 2
    assert recs(lc, "handled") == [
        {"id": "ev_a", "how": "deleted", "at": clock.now(), "by": "cli:ops"},
        {"id": "ev_b", "how": "deleted", "at": clock.now(), "by": "cli:ops"}]
    assert lc.delete_dead_letters([], "cli:ops") == 0
    lc.audit("cli:ops", "dlq delete", {"tenant": "acme", "all": True}, 2, "2 of 2")
    assert recs(lc, "audit") == [{"at": clock.now(), "actor": "cli:ops",
                                  "action": "dlq delete",
                                  "selection": {"tenant": "acme", "all": True}, "count": 2,
                                  "detail": "2 of 2"}]


def test_every_step_is_one_history_record_each_in_order(lc: Lifecycle, clock: FakeClock) -> None:
    """A whole life, as the history writer reads it: received, then one step per change."""
    eid = receive(lc)
    lc.retry(claimed(lc, eid), 1, Status.RETRY_SCHEDULED, Outcome.RETRY,
             [lc.entry("retry_scheduled", in_s=1)], worker="w1")
    clock.advance(1)
    lc.lanes.sweep()
    lc.finish(claimed(lc, eid), Status.DELIVERED, Outcome.DELIVERED, [lc.entry("delivered")],
              worker="w1")
    assert [(r.type, r.data.get("status")) for r in history(lc)] == [
        ("received", "queued"), ("step", "retry_scheduled"), ("step", "delivered")]
    assert whats(lc, eid) == ["retry_scheduled", "delivered"]
    assert lc.redis.keys("rb:ev:*") == []
