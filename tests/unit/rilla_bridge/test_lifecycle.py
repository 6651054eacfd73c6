"""The steps of an event's life (``rilla_bridge/lifecycle.py``) on their own: finishing, retry
scheduling, re-queueing due and lost events, the tenant's wait list and its wake, replay, and
the dead-letter store (``rilla_bridge/dlq.py``). fakeredis and a ``FakeClock``."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import fakeredis
import pytest

from rilla_bridge import keys
from rilla_bridge.calls import CallState
from rilla_bridge.celery_messages import QUEUE_EVENTS, process_event_message
from rilla_bridge.clock import FakeClock
from rilla_bridge.dlq import Selector
from rilla_bridge.lifecycle import (
    TERMINAL,
    Lifecycle,
    Outcome,
    Status,
    new_event_id,
    retry_delay,
    timeline_entry,
)
from rilla_bridge.scripts import Scripts
from rilla_bridge.settings import Settings

RETENTION = 3600


@pytest.fixture
def lc(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> Lifecycle:
    return Lifecycle(fake_redis, Scripts(fake_redis), clock,
                     Settings(event_retention_seconds=RETENTION))


def receive(lc: Lifecycle, n: int = 1, tenant: str = "acme", source: str = "callrail",
            kind: str = "post_call") -> str:
    body = json.dumps({"resource_id": f"CAL{n}", "n": n}).encode()
    stored = lc.receive(source=source, tenant=tenant, kind=kind, body=body, call_id=f"CAL{n}")
    assert not stored.duplicate
    return stored.event_id


def hash_of(lc: Lifecycle, key: str) -> dict[bytes, bytes]:
    """HGETALL, typed: fakeredis answers bytes."""
    found: dict[bytes, bytes] = lc.redis.hgetall(key)  # type: ignore[assignment]
    return found


def record(lc: Lifecycle, eid: str) -> dict[str, str]:
    raw = hash_of(lc, keys.event(eid))
    return {k.decode(): v.decode() for k, v in raw.items() if k != b"body"}


def whats(lc: Lifecycle, eid: str) -> list[str]:
    return [json.loads(e)["what"] for e in lc.redis.lrange(keys.timeline(eid), 0, -1)]


def stats(lc: Lifecycle) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in hash_of(lc, keys.STATS).items()}


def queued_ids(lc: Lifecycle) -> list[str]:
    """Event ids of the queue's messages, the next to run last (kombu pops from the right)."""
    return [json.loads(m)["headers"]["argsrepr"].strip("[]'\"")
            for m in lc.redis.lrange(QUEUE_EVENTS, 0, -1)]


def event(lc: Lifecycle, eid: str) -> dict[str, Any]:
    raw = hash_of(lc, keys.event(eid))
    return {k.decode(): (v if k == b"body" else v.decode()) for k, v in raw.items()}


# -- ids, timeline entries, backoff --------------------------------------------------------

def test_event_ids_are_time_ordered_and_unguessable(clock: FakeClock) -> None:
    first, same_ms = new_event_id(clock.now()), new_event_id(clock.now())
    later = new_event_id(clock.advance(0.001))
    assert re.fullmatch(r"ev_[0-9a-f]{12}[0-9a-f]{16}", first)
    assert first != same_ms and first[:15] == same_ms[:15]
    assert sorted([later, first]) == [first, later]


def test_timeline_entry_is_compact_json_with_the_time_in_milliseconds() -> None:
    entry = timeline_entry(1_767_225_600.123456, "attempt", n=1, status=500)
    assert entry == '{"t":1767225600.123,"what":"attempt","n":1,"status":500}'


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


# -- a worker starts, an event finishes ------------------------------------------------------

def test_start_refreshes_a_pending_score_and_forget_drops_it(lc: Lifecycle,
                                                              clock: FakeClock) -> None:
    eid = receive(lc)
    clock.advance(30)
    assert lc.start(eid)[b"status"] == b"queued"
    assert lc.redis.zscore(keys.PENDING, eid) == clock.now()
    assert lc.start("ev_gone") == {}
    assert lc.redis.zscore(keys.PENDING, "ev_gone") is None    # not added by a start
    lc.forget(eid)
    assert lc.redis.zscore(keys.PENDING, eid) is None


@pytest.mark.parametrize("status", list(Status))
def test_finish_writes_status_timeline_and_counter_together(lc: Lifecycle, clock: FakeClock,
                                                            status: Status) -> None:
    eid = receive(lc)
    lc.finish(eid, status, "some_outcome", lc.entry(str(status), why="test"), {"reason": "r"})
    assert record(lc, eid)["status"] == str(status) and record(lc, eid)["reason"] == "r"
    assert json.loads(lc.redis.lindex(keys.timeline(eid), -1) or b"{}") == {
        "t": clock.now(), "what": str(status), "why": "test"}
    assert 0 < lc.redis.ttl(keys.timeline(eid)) <= RETENTION
    assert stats(lc) == {"some_outcome": 1}
    pending = lc.redis.zscore(keys.PENDING, eid) is not None
    assert pending == (status not in TERMINAL)


def test_skip(lc: Lifecycle) -> None:
    eid = receive(lc)
    assert lc.skip(eid, "a pre-call") == Outcome.SKIPPED
    assert (record(lc, eid)["status"], record(lc, eid)["reason"]) == ("skipped", "a pre-call")
    assert whats(lc, eid) == ["skipped"] and stats(lc) == {Outcome.SKIPPED: 1}
    assert lc.redis.zscore(keys.PENDING, eid) is None


# -- retries and re-queueing ---------------------------------------------------------------

def test_schedule_retry_moves_the_event_from_pending_to_the_retry_set(
        lc: Lifecycle, clock: FakeClock) -> None:
    eid = receive(lc)
    out = lc.schedule_retry(eid, 12.5, Status.RETRY_SCHEDULED,
                            lc.entry("retry_scheduled", in_s=12.5), Outcome.RETRY,
                            {"last_status": "500"})
    assert out == Outcome.RETRY
    assert lc.redis.zscore(keys.RETRY, eid) == clock.now() + 12.5
    assert lc.redis.zscore(keys.PENDING, eid) is None
    rec = record(lc, eid)
    assert (rec["status"], rec["last_status"]) == ("retry_scheduled", "500")
    assert float(rec["next_attempt_at"]) == clock.now() + 12.5
    assert whats(lc, eid) == ["retry_scheduled"] and stats(lc) == {Outcome.RETRY: 1}


def test_requeue_due_moves_each_due_event_once(lc: Lifecycle, clock: FakeClock) -> None:
    due_id, later_id = receive(lc, 1), receive(lc, 2)
    lc.redis.delete(QUEUE_EVENTS)
    lc.redis.zadd(keys.RETRY, {due_id: clock.now() - 5, later_id: clock.now() + 600})
    # Two schedulers that read the same due ids before either moves them.
    now = clock.now()
    script_keys = [keys.RETRY, keys.PENDING, QUEUE_EVENTS, keys.event(due_id),
                   keys.cap_wait("acme"), keys.cap_wait_messages("acme")]
    args = [repr(now), repr(now), due_id, process_event_message(due_id, now)]
    assert int(lc.scripts.requeue(keys=script_keys, args=args)) == 1
    assert int(lc.scripts.requeue(keys=script_keys, args=args)) == 0
    assert lc.requeue_due(keys.RETRY, now) == 0
    assert queued_ids(lc) == [due_id]
    assert lc.redis.zscore(keys.RETRY, later_id) is not None
    assert lc.redis.zscore(keys.PENDING, due_id) == now
    assert record(lc, due_id)["status"] == "queued"


def test_requeue_due_drops_finished_events_from_both_sets(lc: Lifecycle,
                                                          clock: FakeClock) -> None:
    ids = {status: receive(lc, n) for n, status in enumerate(TERMINAL)}
    for status, eid in ids.items():
        lc.redis.hset(keys.event(eid), "status", str(status))
        lc.redis.zadd(keys.RETRY, {eid: clock.now() + 600})    # even one not due yet
    lc.redis.delete(QUEUE_EVENTS)
    assert lc.requeue_due(keys.RETRY, clock.now() + 1000) == 0
    assert lc.redis.zcard(keys.RETRY) == 0 and queued_ids(lc) == []
    assert not any(lc.redis.zscore(keys.PENDING, eid) for eid in ids.values())


def test_requeue_due_of_a_vanished_record_queues_it_without_a_stub(
        lc: Lifecycle, clock: FakeClock) -> None:
    lc.redis.zadd(keys.RETRY, {"ev_expired": clock.now() - 1})
    assert lc.requeue_due(keys.RETRY, clock.now()) == 1      # the worker reports it missing
    assert queued_ids(lc) == ["ev_expired"]
    assert not lc.redis.exists(keys.event("ev_expired"))


def test_requeue_due_from_pending_refreshes_the_score(lc: Lifecycle, clock: FakeClock) -> None:
    old, young = receive(lc, 1), receive(lc, 2)
    lc.redis.zadd(keys.PENDING, {old: clock.now() - 100})
    lc.redis.delete(QUEUE_EVENTS)
    assert lc.requeue_due(keys.PENDING, clock.now() - 50) == 1
    assert queued_ids(lc) == [old]
    assert lc.redis.zscore(keys.PENDING, old) == clock.now()
    assert lc.redis.zscore(keys.PENDING, young) == clock.now()


def test_requeue_due_takes_at_most_limit_events_per_call(lc: Lifecycle,
                                                         clock: FakeClock) -> None:
    ids = [receive(lc, n) for n in range(5)]
    lc.redis.zadd(keys.RETRY, {eid: clock.now() - 1 for eid in ids})
    assert lc.requeue_due(keys.RETRY, clock.now(), limit=3) == 3
    assert lc.requeue_due(keys.RETRY, clock.now(), limit=3) == 2


def test_requeue_after_a_recording_lookup(lc: Lifecycle, clock: FakeClock) -> None:
    eid = receive(lc)
    assert lc.wait_for_recording(eid) == Outcome.WAITING
    assert lc.redis.zscore(keys.PENDING, eid) == clock.now() + 3600   # swept if lost
    assert record(lc, eid)["status"] == "waiting_recording"
    assert stats(lc) == {Outcome.WAITING: 1}
    lc.redis.delete(QUEUE_EVENTS)
    clock.advance(20)
    lc.requeue(eid, "recording resolved")
    assert queued_ids(lc) == [eid]
    assert lc.redis.zscore(keys.PENDING, eid) == clock.now()
    assert record(lc, eid)["status"] == "queued"
    last = json.loads(lc.redis.lindex(keys.timeline(eid), -1) or b"{}")
    assert last == {"t": clock.now(), "what": "queued", "note": "recording resolved"}


# -- the tenant's wait list ------------------------------------------------------------------

def wait(lc: Lifecycle, eid: str, due_in: float = 45.0, max_inflight: int = 1) -> bool:
    return lc.wait_for_slot("acme", eid, due=lc.clock.now() + due_in,
                            entry=lc.entry("waiting", reason="cap"),
                            max_inflight=max_inflight)


def take_slot(lc: Lifecycle, token: str, lease_s: float = 30.0) -> CallState:
    calls = CallState(lc.redis, lc.scripts, lc.clock, RETENTION)
    got, _ = calls.snapshot_and_acquire("acme", "callrail", f"CAL{token}", f"ev_{token}", {},
                                        token=token, lease_ms=int(lease_s * 1000),
                                        max_inflight=1, want_lock=True)
    assert got == 1
    return calls


def test_waiting_for_a_slot(lc: Lifecycle, clock: FakeClock) -> None:
    take_slot(lc, "tok")
    eid = receive(lc)
    lc.redis.delete(QUEUE_EVENTS)
    assert wait(lc, eid) is False
    rec = record(lc, eid)
    assert rec["status"] == "waiting"
    assert float(rec["next_attempt_at"]) == float(rec["waiting_since"]) + 45
    assert float(rec["waiting_since"]) == clock.now()
    assert lc.redis.zscore(keys.RETRY, eid) == clock.now() + 45     # the safety retry
    assert lc.redis.zscore(keys.PENDING, eid) is None
    assert lc.redis.zscore(keys.cap_wait("acme"), eid) == clock.now()
    assert lc.redis.hexists(keys.cap_wait_messages("acme"), eid)
    assert whats(lc, eid) == ["waiting"] and stats(lc) == {Outcome.BUSY: 1}
    assert queued_ids(lc) == []


def test_release_between_the_cap_check_and_the_wait_is_not_missed(
        lc: Lifecycle, clock: FakeClock) -> None:
    """The cap check and the wait are two steps; a slot freed between them is found by the
    wait step itself, which then wakes the waiter."""
    eid = receive(lc)
    lc.redis.delete(QUEUE_EVENTS)
    # the cap was full when checked; the slot is free again when the event starts to wait
    assert wait(lc, eid) is True
    assert queued_ids(lc) == [eid]
    assert lc.redis.zscore(keys.RETRY, eid) is None
    assert lc.redis.zscore(keys.PENDING, eid) == clock.now()
    assert lc.redis.zcard(keys.cap_wait("acme")) == 0


def test_a_lapsed_slot_is_free_again_by_the_clock(lc: Lifecycle, clock: FakeClock) -> None:
    take_slot(lc, "tok", lease_s=30)
    first, second = receive(lc, 1), receive(lc, 2)
    lc.redis.delete(QUEUE_EVENTS)
    clock.advance(29.999)
    assert wait(lc, first) is False
    clock.advance(0.002)
    assert wait(lc, second) is True        # the killed holder's lease ran out meanwhile
    assert queued_ids(lc) == [first]       # and the longest waiter is queued
    assert lc.redis.zcard(keys.inflight("acme")) == 0


def test_waiting_again_keeps_the_place_in_line(lc: Lifecycle, clock: FakeClock) -> None:
    take_slot(lc, "tok", lease_s=600)
    first, second = receive(lc, 1), receive(lc, 2)
    since = clock.now()
    wait(lc, first)
    clock.advance(1)
    wait(lc, second)
    clock.advance(1)
    wait(lc, first)                        # woken, capped again by a newcomer
    assert lc.redis.zrange(keys.cap_wait("acme"), 0, -1) == [first.encode(), second.encode()]
    assert float(record(lc, first)["waiting_since"]) == since
    assert whats(lc, first) == ["waiting", "waiting"]


def test_a_freed_slot_queues_the_longest_waiter_next(lc: Lifecycle, clock: FakeClock) -> None:
    calls = take_slot(lc, "tok", lease_s=600)
    waiters = [receive(lc, n) for n in range(3)]
    for eid in waiters:
        wait(lc, eid)
        clock.advance(0.5)
    lc.redis.delete(QUEUE_EVENTS)
    other = receive(lc, 9, tenant="beta")       # another tenant's message, queued before
    with lc.redis.pipeline() as pipe:
        calls.release(pipe, "acme", "callrail", "CALtok", "tok")
        pipe.execute()
    # The woken event's message is at the consuming end: it runs before ``other``.
    assert queued_ids(lc) == [other, waiters[0]]
    assert lc.redis.zscore(keys.RETRY, waiters[0]) is None
    assert lc.redis.zscore(keys.PENDING, waiters[0]) == clock.now()
    assert lc.redis.zrange(keys.cap_wait("acme"), 0, -1) == [w.encode() for w in waiters[1:]]
    assert not lc.redis.hexists(keys.cap_wait_messages("acme"), waiters[0])
    assert record(lc, waiters[0])["status"] == "waiting"      # the wake has no event key
    assert not lc.redis.exists(keys.call_lock("acme", "callrail", "CALtok"))


def test_a_due_safety_retry_takes_the_event_off_the_wait_list(lc: Lifecycle,
                                                              clock: FakeClock) -> None:
    take_slot(lc, "tok", lease_s=600)
    first, second = receive(lc, 1), receive(lc, 2)
    wait(lc, first, due_in=30)
    wait(lc, second, due_in=90)
    lc.redis.delete(QUEUE_EVENTS)
    clock.advance(30)
    assert lc.requeue_due(keys.RETRY, clock.now()) == 1
    assert queued_ids(lc) == [first]
    assert record(lc, first)["status"] == "queued"
    assert lc.redis.zrange(keys.cap_wait("acme"), 0, -1) == [second.encode()]
    assert lc.redis.hkeys(keys.cap_wait_messages("acme")) == [second.encode()]


# -- dead letters ----------------------------------------------------------------------------

def dead(lc: Lifecycle, n: int, reason_code: str, reason: str, *, tenant: str = "acme",
         source: str = "callrail", **kw: Any) -> str:
    eid = receive(lc, n, tenant=tenant, source=source)
    lc.dead_letter(event(lc, eid), reason_code, reason, **kw)
    lc.clock.sleep(1)
    return eid


def test_dead_letter_keeps_everything_and_finishes_the_event(
        lc: Lifecycle, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    eid = receive(lc)
    lc.redis.hset(keys.event(eid), mapping={"attempts": 3,
                                            "first_attempt_at": repr(clock.now() - 100)})
    payload = {"event_id": "callrail-CAL1", "user_email": "x@acme.example"}
    with caplog.at_level(logging.WARNING, logger="rilla_bridge.lifecycle"):
        out = lc.dead_letter(event(lc, eid), "rilla_rejected", "Rilla answered 422: " + "x" * 2000,
                             rilla_event_id="callrail-CAL1", status_code=422,
                             response_body="User email is not in Rilla", payload=payload)
    assert out == Outcome.DEAD
    entry = lc.dlq.get(eid)
    assert entry is not None
    assert (entry["tenant"], entry["source"], entry["kind"], entry["call_id"]) == (
        "acme", "callrail", "post_call", "CAL1")
    assert (entry["reason_code"], entry["status_code"], entry["attempts"]) == (
        "rilla_rejected", 422, 3)
    assert entry["reason"].startswith("Rilla answered 422: ") and len(entry["reason"]) == 1000
    assert entry["response_body"] == "User email is not in Rilla"
    assert json.loads(entry["payload"]) == payload and entry["event_id"] == "callrail-CAL1"
    assert json.loads(entry["body"]) == {"resource_id": "CAL1", "n": 1}
    assert (entry["first_failure_at"], entry["failed_at"]) == (clock.now() - 100, clock.now())
    assert lc.redis.zscore(keys.DLQ_INDEX, eid) == clock.now()
    rec = record(lc, eid)
    assert rec["status"] == "dead" and len(rec["reason"]) == 300
    assert lc.redis.zscore(keys.PENDING, eid) is None
    assert whats(lc, eid) == ["dead_lettered"] and stats(lc) == {Outcome.DEAD: 1}
    (log,) = [r for r in caplog.records if r.name == "rilla_bridge.lifecycle"]
    assert log.getMessage() == "dead-lettered" and log.levelno == logging.WARNING
    extra = vars(log)
    assert (extra["event"], extra["tenant"], extra["reason_code"]) == (
        eid, "acme", "rilla_rejected")


def test_dead_letter_of_an_event_never_attempted(lc: Lifecycle, clock: FakeClock) -> None:
    eid = dead(lc, 1, "transform", "no usable start time")
    entry = lc.dlq.get(eid)
    assert entry is not None
    assert entry["status_code"] is None and entry["attempts"] == 0
    assert entry["payload"] == "" and entry["response_body"] == ""
    assert entry["first_failure_at"] == entry["failed_at"] == clock.now() - 1


def test_dead_letters_listed_oldest_first_and_filtered(lc: Lifecycle) -> None:
    ids = {
        "rejected": dead(lc, 1, "rilla_rejected", "Rilla answered 422: User email is not in "
                         "Rilla", status_code=422),
        "start": dead(lc, 2, "transform", "no usable start time in the call"),
        "norep": dead(lc, 3, "transform", "no rep email", tenant="beta"),
        "callingly": dead(lc, 4, "transform", "no rep email", tenant="beta",
                          source="callingly"),
    }
    every = list(lc.dlq.iter(Selector()))
    assert [e["id"] for e in every] == list(ids.values())
    assert all("body" not in e and "payload" not in e for e in every)
    assert {e["id"] for e in lc.dlq.iter(Selector(tenant="acme"))} == {
        ids["rejected"], ids["start"]}
    assert [e["id"] for e in lc.dlq.iter(Selector(source="callingly"))] == [ids["callingly"]]
    assert [e["id"] for e in lc.dlq.iter(Selector(reason="rilla_rejected"))] == [
        ids["rejected"]]
    assert [e["id"] for e in lc.dlq.iter(Selector(reason="START TIME"))] == [ids["start"]]
    assert {e["id"] for e in lc.dlq.iter(Selector(tenant="beta", reason="transform"))} == {
        ids["norep"], ids["callingly"]}
    assert list(lc.dlq.iter(Selector(tenant="nobody"))) == []
    row = next(lc.dlq.iter(Selector(reason="rilla_rejected")))
    assert row["status_code"] == 422 and row["attempts"] == 0
    assert isinstance(row["failed_at"], float)
    assert [e["id"] for e in lc.dlq.iter(Selector(), batch=1)] == list(ids.values())
    assert lc.dlq.count() == 4


def test_dead_letter_delete(lc: Lifecycle) -> None:
    eid, other = dead(lc, 1, "transform", "a"), dead(lc, 2, "transform", "b")
    assert lc.dlq.delete(eid) is True
    assert lc.dlq.delete(eid) is False
    assert lc.dlq.get(eid) is None
    assert [e["id"] for e in lc.dlq.iter(Selector())] == [other]
    assert lc.dlq.count() == 1
    assert lc.replay(eid) is False


def test_replay_restores_the_event_from_its_dead_letter_once(lc: Lifecycle,
                                                             clock: FakeClock) -> None:
    eid = receive(lc)
    received_at = record(lc, eid)["received_at"]
    lc.redis.hset(keys.event(eid), mapping={"attempts": 4, "last_status": "422"})
    lc.dead_letter(event(lc, eid), "rilla_rejected", "Rilla answered 422", status_code=422)
    lc.redis.delete(QUEUE_EVENTS)
    clock.advance(3600)
    assert lc.replay(eid) is True
    assert lc.replay(eid) is False          # the entry is gone: a second replay is a no-op
    assert queued_ids(lc) == [eid]
    assert lc.dlq.get(eid) is None and lc.dlq.count() == 0
    rec = record(lc, eid)
    assert rec == {"id": eid, "tenant": "acme", "source": "callrail", "kind": "post_call",
                   "received_at": received_at, "call_id": "CAL1", "status": "queued",
                   "replayed_at": repr(clock.now()), "attempts": "0"}
    assert json.loads(event(lc, eid)["body"]) == {"resource_id": "CAL1", "n": 1}
    assert lc.redis.zscore(keys.PENDING, eid) == clock.now()
    assert whats(lc, eid) == ["dead_lettered", "replayed"]
    assert 0 < lc.redis.ttl(keys.event(eid)) <= RETENTION


def test_replay_of_an_event_whose_record_expired(lc: Lifecycle, clock: FakeClock) -> None:
    """Dead letters are kept until replayed; the event's record only for its retention."""
    eid = dead(lc, 1, "transform", "no rep email")
    lc.redis.delete(keys.event(eid), keys.timeline(eid))
    assert lc.replay(eid) is True
    assert json.loads(event(lc, eid)["body"]) == {"resource_id": "CAL1", "n": 1}
    assert record(lc, eid)["status"] == "queued" and whats(lc, eid) == ["replayed"]
