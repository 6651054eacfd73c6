"""What a worker does with one event (``workers/pipeline.py``): delivered, skipped, retried,
dead-lettered; the per-call lock and the tenant's in-flight cap. fakeredis, ``FakeRilla`` and a
``FakeClock``: time moves only when a test says so."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import fakeredis
import pytest

from rilla_bridge import keys
from rilla_bridge.calls import decode_call_state
from rilla_bridge.celery_messages import QUEUE_CALLRAIL, QUEUE_EVENTS
from rilla_bridge.clients.rilla import RillaResult
from rilla_bridge.clock import FakeClock
from rilla_bridge.lifecycle import Outcome
from rilla_bridge.tenants import parse_tenants
from rilla_bridge.transform.merge import merge_snapshots
from tests.fakes import ACME_KEY, TENANTS, FakeRilla, load, make_runtime
from workers import pipeline, scheduler
from workers.pipeline import process_event
from workers.runtime import Runtime

CALL = "CAL8d2e41b0c7f94a6e8b3d5c1f0a9e7264"       # post_call / pre_call / spam fixtures
CALL_NOREC = "CAL3b7e90d1a4c24f6b8e5a0d2c9f1b7e38"  # no recording, then call_modified brings one
LEASE_S = 3.05 + 20.0 + 15   # a delivery's lease: the Rilla timeouts + 15 s (default settings)


@pytest.fixture
def rt(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> Runtime:
    return make_runtime(fake_redis, clock)


@pytest.fixture
def capped(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> Runtime:
    """A runtime whose tenants may have one delivery in flight each."""
    return make_runtime(fake_redis, clock, tenant_max_inflight=1)


def rilla(rt: Runtime) -> FakeRilla:
    assert isinstance(rt.rilla, FakeRilla)
    return rt.rilla


def ingest(rt: Runtime, body: dict[str, Any] | bytes, kind: str = "post_call",
           tenant: str = "acme", source: str = "callrail") -> str:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    stored = rt.lifecycle.receive(source=source, tenant=tenant, kind=kind, body=raw,
                                  call_id=None)
    assert not stored.duplicate
    return stored.event_id


def run(rt: Runtime, body: dict[str, Any] | bytes, kind: str = "post_call",
        tenant: str = "acme", source: str = "callrail") -> tuple[str, str]:
    eid = ingest(rt, body, kind, tenant, source)
    return eid, process_event(rt, eid)


def status(rt: Runtime, eid: str) -> str:
    event = rt.store.get(eid)
    assert event is not None
    return str(event["status"])


def whats(rt: Runtime, eid: str) -> list[str]:
    return [e["what"] for e in rt.store.timeline(eid)]


def queued_ids(rt: Runtime) -> list[str]:
    """Event ids of the queue's messages, the next to run last (kombu pops from the right)."""
    return [json.loads(m)["headers"]["argsrepr"].strip("[]'\"")
            for m in rt.redis.lrange(QUEUE_EVENTS, 0, -1)]


def due(rt: Runtime, eid: str) -> float:
    score = rt.redis.zscore(keys.RETRY, eid)
    assert score is not None, f"{eid} has no retry"
    return float(score)


def hold_slot(rt: Runtime, call_id: str, token: str, lease_s: float = 30.0) -> None:
    """Another worker delivers ``call_id`` of acme: it holds that call's lock and a slot."""
    got, _ = rt.calls.snapshot_and_acquire(
        "acme", "callrail", call_id, f"ev_{token}",
        {"rank": 0, "received_at": rt.clock.now(), "fields": {}}, token=token,
        lease_ms=int(lease_s * 1000), max_inflight=rt.settings.tenant_max_inflight,
        want_lock=True)
    assert got == 1


def release_slot(rt: Runtime, call_id: str, token: str) -> None:
    rt.calls.release(rt.redis, "acme", "callrail", call_id, token)


def on_first_upsert(monkeypatch: pytest.MonkeyPatch, rt: Runtime,
                    meanwhile: Callable[[], None]) -> None:
    """Run ``meanwhile`` while the first upsert is in flight (its delivery holds the lock)."""
    fake = rilla(rt)
    answer = fake.upsert
    done: list[bool] = []

    def upsert(api_key: str, payload: Any) -> RillaResult:
        if not done:
            done.append(True)
            meanwhile()
        return answer(api_key, payload)

    monkeypatch.setattr(fake, "upsert", upsert)


# -- delivered ----------------------------------------------------------------------------

def test_delivered_on_200_with_the_right_payload(rt: Runtime) -> None:
    eid, outcome = run(rt, load("callrail", "post_call"))
    assert outcome == Outcome.DELIVERED
    assert len(rilla(rt).calls) == 1
    op, key, payload = rilla(rt).calls[0]
    assert (op, key) == ("upsert", ACME_KEY)
    assert payload["event_id"] == f"callrail-{CALL}"
    assert payload["user_email"] == "mike.r@acme.example"  # through the users mapping
    assert payload["start_time"] == "2025-04-02 16:03:12"  # -05:00 -> UTC
    assert payload["end_time"] == "2025-04-02 16:08:24"    # + 312 s
    assert payload["media_url"].startswith("https://app.callrail.com/calls/")
    assert payload["recording_type"] == "CALL_AUDIO"
    assert "Jordan Pike" in payload["title"]
    assert payload["customer"]["name"] == "Jordan Pike"
    assert status(rt, eid) == "delivered"
    assert whats(rt, eid) == ["attempt", "delivered"]
    assert rt.redis.zscore(keys.PENDING, eid) is None
    assert rt.redis.zcard(keys.RETRY) == 0
    event = rt.store.get(eid)
    assert event is not None and json.loads(event["last_payload"]) == payload
    assert event["last_attempt_at"] == event["first_attempt_at"] == repr(rt.clock.now())
    assert rilla(rt).appointments[ACME_KEY][payload["event_id"]] == payload


# -- permanent failures -------------------------------------------------------------------

@pytest.mark.parametrize(("code", "body"), [
    (422, "User email is not in Rilla"), (400, "Missing some required parameters in the body"),
    (404, "Not Found")])
def test_permanent_answer_is_dead_lettered_at_once(rt: Runtime, clock: FakeClock, code: int,
                                                   body: str) -> None:
    rilla(rt).fail(code, body=body)
    eid, outcome = run(rt, load("callrail", "post_call"))
    assert outcome == Outcome.DEAD
    assert len(rilla(rt).calls) == 1
    assert rt.redis.zcard(keys.RETRY) == 0
    assert rt.redis.zscore(keys.PENDING, eid) is None
    assert status(rt, eid) == "dead"
    entry = rt.lifecycle.dlq.get(eid)
    assert entry is not None
    assert entry["status_code"] == code
    assert entry["response_body"] == body
    assert entry["reason_code"] == "rilla_rejected"
    assert str(code) in entry["reason"] and body in entry["reason"]
    assert entry["attempts"] == 1
    assert json.loads(entry["payload"]) == rilla(rt).upserts[0]
    assert json.loads(entry["body"]) == load("callrail", "post_call")
    assert entry["event_id"] == f"callrail-{CALL}"
    assert (entry["tenant"], entry["source"]) == ("acme", "callrail")
    assert entry["first_failure_at"] == entry["failed_at"] == clock.now()
    assert whats(rt, eid) == ["attempt", "dead_lettered"]


def test_a_rep_rilla_does_not_know_is_dead_lettered_with_rillas_answer(rt: Runtime) -> None:
    rilla(rt).users = {"office@acme.example"}
    eid, outcome = run(rt, load("callrail", "post_call"))
    assert outcome == Outcome.DEAD
    entry = rt.lifecycle.dlq.get(eid)
    assert entry is not None
    assert (entry["status_code"], entry["response_body"]) == (422, "User email is not in Rilla")


# -- retryable failures -------------------------------------------------------------------

@pytest.mark.parametrize("result", [
    RillaResult("retryable", 500, "Internal Server Error"),
    RillaResult("retryable", None, "", error="read timeout after 20.0s: POST /custom/appointment"),
    RillaResult("retryable", 429, "Too Many Requests"),
])
def test_retryable_answer_schedules_a_growing_retry(rt: Runtime, clock: FakeClock,
                                                    result: RillaResult) -> None:
    base = rt.settings.retry_base_seconds
    rilla(rt).script = [result] * 4
    eid = ingest(rt, load("callrail", "post_call"))
    delays = []
    for n in range(1, 5):
        started = clock.now()
        assert process_event(rt, eid) == Outcome.RETRY
        delay = due(rt, eid) - started
        ceiling = min(rt.settings.retry_max_delay_seconds, base * 2 ** (n - 1))
        assert ceiling / 2 <= delay <= ceiling, (n, delay)
        delays.append(delay)
        assert status(rt, eid) == "retry_scheduled"
        assert rt.redis.zscore(keys.PENDING, eid) is None  # waiting in rb:retry, not lost
        assert rt.lifecycle.dlq.get(eid) is None
        # Not a moment before it is due; then the scheduler queues it again.
        clock.advance(delay - 0.01)
        assert scheduler.move_due_retries(rt) == 0
        clock.advance(0.02)
        assert scheduler.move_due_retries(rt) == 1
        assert status(rt, eid) == "queued"
    assert delays[-1] > delays[0]
    event = rt.store.get(eid)
    assert event is not None and event["attempts"] == "4"
    retries = [e for e in rt.store.timeline(eid) if e["what"] == "retry_scheduled"]
    assert [r["in_s"] for r in retries] == [round(d, 2) for d in delays]
    # Then Rilla answers: delivered.
    assert process_event(rt, eid) == Outcome.DELIVERED
    assert len(rilla(rt).calls) == 5


def test_retry_after_is_honoured(rt: Runtime, clock: FakeClock) -> None:
    rilla(rt).fail(429, body="slow down", retry_after="40")
    eid, outcome = run(rt, load("callrail", "post_call"))
    assert outcome == Outcome.RETRY
    assert due(rt, eid) - clock.now() >= 40.0


def test_dead_lettered_after_retry_max_age(rt: Runtime, clock: FakeClock) -> None:
    rilla(rt).fail(503, count=2)
    eid, outcome = run(rt, load("callrail", "post_call"))
    assert outcome == Outcome.RETRY
    clock.advance(3601)   # RETRY_MAX_AGE_SECONDS (3600) since the first attempt
    assert scheduler.move_due_retries(rt) == 1
    assert process_event(rt, eid) == Outcome.DEAD
    entry = rt.lifecycle.dlq.get(eid)
    assert entry is not None
    assert entry["reason_code"] == "retries_exhausted"
    assert entry["attempts"] == 2 and entry["status_code"] == 503
    assert entry["response_body"] == "Service Unavailable"
    assert "gave up after 2 attempts over 3601s" in entry["reason"]
    assert entry["first_failure_at"] == clock.now() - 3601
    assert rt.redis.zcard(keys.RETRY) == 0
    assert status(rt, eid) == "dead"


def test_last_retry_is_not_scheduled_past_max_age(rt: Runtime, clock: FakeClock) -> None:
    rilla(rt).fail(500, count=8)
    eid = ingest(rt, load("callrail", "post_call"))
    first = clock.now()
    for _ in range(7):
        assert process_event(rt, eid) == Outcome.RETRY
        clock.advance(due(rt, eid) - clock.now() + 0.01)
        assert scheduler.move_due_retries(rt) == 1
    clock.advance(first + 3590 - clock.now())   # ten seconds of the max age (3600 s) left
    # Attempt 8 would back off 30..60 s: it is due when the max age is reached instead.
    assert process_event(rt, eid) == Outcome.RETRY
    assert due(rt, eid) - clock.now() == pytest.approx(10.01)


# -- untransformable ----------------------------------------------------------------------

@pytest.mark.parametrize(("tenant", "change", "words"), [
    ("beta", {"agent_email": ""}, "no rep email"),
    ("acme", {"start_time": "yesterday afternoon", "datetime": ""}, "no usable start time"),
    ("acme", {"start_time": "", "datetime": ""}, "no usable start time"),
    ("acme", {"campaign": "x" * 5000}, "custom field 'campaign'"),
])
def test_untransformable_event_is_dead_lettered_without_calling_rilla(
        rt: Runtime, tenant: str, change: dict[str, Any], words: str) -> None:
    body = {**load("callrail", "post_call"), **change}
    eid, outcome = run(rt, body, tenant=tenant)
    assert outcome == Outcome.DEAD
    assert rilla(rt).calls == []
    entry = rt.lifecycle.dlq.get(eid)
    assert entry is not None
    assert entry["reason_code"] == "transform"
    assert words in entry["reason"]
    assert entry["status_code"] is None and entry["attempts"] == 0
    assert status(rt, eid) == "dead"
    assert rt.redis.zscore(keys.PENDING, eid) is None


@pytest.mark.parametrize("body", [b"[1, 2]", b"not json", b'{"resource_id": ""}', b"{}"])
def test_malformed_body_is_dead_lettered(rt: Runtime, body: bytes) -> None:
    eid, outcome = run(rt, body)
    assert outcome == Outcome.DEAD
    entry = rt.lifecycle.dlq.get(eid)
    assert entry is not None and entry["reason_code"] == "transform" and entry["reason"]
    assert rilla(rt).calls == []


# -- skipped ------------------------------------------------------------------------------

@pytest.mark.parametrize(("fixture", "kind", "words"), [
    ("post_call_no_recording", "post_call", "no recording"),
    ("pre_call", "pre_call", "pre_call"),
    ("call_routing_complete", "call_routing_complete", "call_routing_complete"),
    ("text_received", "text_received", "text"),
    ("form_submission", "form_submission", "form"),
    ("convert_assist", "post_call", "Convert Assist"),
])
def test_skipped_outcomes_are_recorded_with_reason(rt: Runtime, fixture: str, kind: str,
                                                   words: str) -> None:
    eid, outcome = run(rt, load("callrail", fixture), kind=kind)
    assert outcome == Outcome.SKIPPED
    assert rilla(rt).calls == []
    event = rt.store.get(eid)
    assert event is not None and event["status"] == "skipped"
    assert words in event["reason"]
    assert whats(rt, eid) == ["skipped"]
    assert rt.redis.zscore(keys.PENDING, eid) is None
    assert rt.lifecycle.dlq.count() == 0


# -- duplicates, ordering, spam -----------------------------------------------------------

def test_same_event_twice_posts_once(rt: Runtime) -> None:
    eid, outcome = run(rt, load("callrail", "post_call"))
    assert outcome == Outcome.DELIVERED
    assert process_event(rt, eid) == Outcome.DONE_ALREADY
    assert len(rilla(rt).calls) == 1
    assert rt.redis.zscore(keys.PENDING, eid) is None


def test_unchanged_merged_state_is_not_posted_again(rt: Runtime) -> None:
    run(rt, load("callrail", "post_call"))
    # The same call again as another event (a field we do not map differs).
    eid2, outcome = run(rt, {**load("callrail", "post_call"), "waveforms": "w"})
    assert outcome == Outcome.UNCHANGED
    assert len(rilla(rt).calls) == 1
    assert status(rt, eid2) == "delivered"
    assert whats(rt, eid2) == ["delivered"]
    assert rt.redis.zscore(keys.PENDING, eid2) is None


def test_later_call_modified_brings_the_recording(rt: Runtime) -> None:
    _, outcome = run(rt, load("callrail", "post_call_no_recording"))
    assert outcome == Outcome.SKIPPED
    _, outcome = run(rt, load("callrail", "call_modified_recording"), kind="call_modified")
    assert outcome == Outcome.DELIVERED
    (payload,) = rilla(rt).upserts
    assert payload["event_id"] == f"callrail-{CALL_NOREC}"
    assert payload["media_url"].startswith(f"https://app.callrail.com/calls/{CALL_NOREC}/")


def test_pre_call_after_post_call_never_overwrites(rt: Runtime) -> None:
    run(rt, load("callrail", "post_call"))
    _, outcome = run(rt, load("callrail", "pre_call"), kind="pre_call")
    assert outcome == Outcome.SKIPPED
    # The pre-call's placeholders (no agent, no recording, caller-ID name) did not win in the
    # call's merged state...
    state = decode_call_state(rt.redis.hgetall(keys.call("acme", "callrail", CALL)))
    assert len(state["snapshots"]) == 2
    merged = merge_snapshots(state["snapshots"])
    assert merged["customer_name"] == "Jordan Pike"
    assert merged["recording"]
    # ...so delivering that state again changes nothing.
    _, outcome = run(rt, {**load("callrail", "post_call"), "waveforms": "again"})
    assert outcome == Outcome.UNCHANGED
    assert len(rilla(rt).calls) == 1


def test_call_modified_after_post_call_is_delivered_on_top(rt: Runtime) -> None:
    run(rt, load("callrail", "post_call"))
    body = {**load("callrail", "post_call"), "tags": ["new-customer", "booked"],
            "changes": ["tags"]}
    _, outcome = run(rt, body, kind="call_modified")
    assert outcome == Outcome.DELIVERED
    assert rilla(rt).upserts[-1]["custom_fields"]["tags"] == "new-customer, booked"
    # The older post-call arriving again afterwards sends nothing older.
    _, outcome = run(rt, {**load("callrail", "post_call"), "waveforms": "again"})
    assert outcome == Outcome.UNCHANGED
    assert len(rilla(rt).calls) == 2


def test_spam_deletes_the_appointment(rt: Runtime) -> None:
    run(rt, load("callrail", "post_call"))
    eid, outcome = run(rt, load("callrail", "call_modified_spam"), kind="call_modified")
    assert outcome == Outcome.DELIVERED
    assert rilla(rt).calls[-1] == ("delete", ACME_KEY, f"callrail-{CALL}")
    assert "deleted" in whats(rt, eid)
    assert rilla(rt).appointments[ACME_KEY] == {}
    # A late post-call of the spam call does not bring the appointment back.
    _, outcome = run(rt, {**load("callrail", "post_call"), "waveforms": "late"})
    assert outcome == Outcome.UNCHANGED
    assert [c[0] for c in rilla(rt).calls] == ["upsert", "delete"]


def test_spam_for_a_call_rilla_never_had_is_deleted_all_the_same(rt: Runtime) -> None:
    eid, outcome = run(rt, load("callrail", "call_modified_spam"), kind="call_modified")
    assert outcome == Outcome.DELIVERED        # Rilla's 404: nothing to delete is deleted
    assert rilla(rt).calls == [("delete", ACME_KEY, f"callrail-{CALL}")]
    attempt = rt.store.timeline(eid)[0]
    assert (attempt["what"], attempt["op"], attempt["status"]) == ("attempt", "delete", 404)


# -- the per-call lock --------------------------------------------------------------------

def test_an_event_of_a_call_being_delivered_waits_without_an_attempt(
        rt: Runtime, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    first = ingest(rt, load("callrail", "post_call"))
    second = ingest(rt, {**load("callrail", "post_call"), "tags": ["booked"],
                         "changes": ["tags"]}, kind="call_modified")
    outcomes: list[str] = []
    on_first_upsert(monkeypatch, rt, lambda: outcomes.append(process_event(rt, second)))
    assert process_event(rt, first) == Outcome.DELIVERED
    assert outcomes == [Outcome.BUSY]                  # while the first held the call's lock
    assert len(rilla(rt).calls) == 1
    started = clock.now()
    assert started + pipeline.BUSY_REQUEUE_SECONDS <= due(rt, second) < started + 2.0
    event = rt.store.get(second)
    assert event is not None and event["status"] == "waiting"
    assert "attempts" not in event
    assert "another delivery of this call" in rt.store.timeline(second)[-1]["reason"]
    assert rt.redis.zscore(keys.PENDING, second) is None
    # The first delivery released the lock; the retry runs and delivers the newer state.
    clock.advance(2.0)
    assert scheduler.move_due_retries(rt) == 1
    assert process_event(rt, second) == Outcome.DELIVERED
    event = rt.store.get(second)
    assert event is not None and event["attempts"] == "1"
    assert rilla(rt).upserts[-1]["custom_fields"]["tags"] == "booked"


class WorkerKilled(BaseException):
    """The worker process dies mid-delivery (no ``finally`` of ours gets to release)."""


def test_a_killed_workers_call_lock_lapses_by_the_clock(
        rt: Runtime, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    eid = ingest(rt, load("callrail", "post_call"))

    def killed() -> None:
        monkeypatch.setattr(rt.calls, "release", lambda *a, **kw: None)
        raise WorkerKilled

    on_first_upsert(monkeypatch, rt, killed)
    with pytest.raises(WorkerKilled):
        process_event(rt, eid)
    monkeypatch.undo()
    assert status(rt, eid) == "queued"
    assert rt.redis.zcard(keys.inflight("acme")) == 1           # the dead worker's slot
    # Celery hands the message out again: the lock is still within its lease.
    assert process_event(rt, eid) == Outcome.BUSY
    clock.advance(2.0)
    assert scheduler.move_due_retries(rt) == 1
    assert process_event(rt, eid) == Outcome.BUSY
    # Once the lease has run out by the clock, the lock and the slot are free again.
    clock.advance(LEASE_S)
    assert scheduler.move_due_retries(rt) == 1
    assert process_event(rt, eid) == Outcome.DELIVERED
    assert rt.redis.zcard(keys.inflight("acme")) == 0
    assert not rt.redis.exists(keys.call_lock("acme", "callrail", CALL))


# -- the tenant's in-flight cap -----------------------------------------------------------

def _capped(rt: Runtime, name: str) -> str:
    eid, outcome = run(rt, {**load("callrail", "post_call"), "resource_id": name})
    assert outcome == Outcome.BUSY
    return eid


def test_tenant_in_flight_cap(capped: Runtime, clock: FakeClock) -> None:
    rt = capped
    hold_slot(rt, "CALother", "tok")
    eid, outcome = run(rt, load("callrail", "post_call"))
    assert outcome == Outcome.BUSY
    assert "in-flight cap" in rt.store.timeline(eid)[-1]["reason"]
    assert rilla(rt).calls == []
    # Another tenant is not held back.
    _, outcome = run(rt, {**load("callrail", "post_call"), "agent_email": "a@beta.example"},
                     tenant="beta")
    assert outcome == Outcome.DELIVERED
    # The lock of the refused call is not left behind.
    assert not rt.redis.exists(keys.call_lock("acme", "callrail", CALL))
    release_slot(rt, "CALother", "tok")
    rt.redis.delete(QUEUE_EVENTS)
    assert process_event(rt, eid) == Outcome.DELIVERED


def test_capped_event_waits_and_a_freed_slot_queues_it(capped: Runtime,
                                                       clock: FakeClock) -> None:
    """At the cap an event waits on the tenant's list (one safety retry far ahead), and the
    release of a slot queues it at once: no bouncing through the retry set."""
    rt = capped
    wait, msgs = keys.cap_wait("acme"), keys.cap_wait_messages("acme")
    hold_slot(rt, "CALother", "tok")
    eid, outcome = run(rt, load("callrail", "post_call"))
    assert outcome == Outcome.BUSY and status(rt, eid) == "waiting"
    assert rt.redis.zscore(wait, eid) is not None and rt.redis.hexists(msgs, eid)
    assert due(rt, eid) >= clock.now() + pipeline.CAP_WAIT_SAFETY_SECONDS
    assert rt.redis.zscore(keys.PENDING, eid) is None
    rt.redis.delete(QUEUE_EVENTS)   # intake's copy, already run above
    timeline = whats(rt, eid)

    release_slot(rt, "CALother", "tok")
    assert queued_ids(rt) == [eid]                     # queued by the freed slot
    assert rt.redis.zscore(keys.RETRY, eid) is None    # the safety copy is gone
    assert rt.redis.zscore(keys.PENDING, eid) == clock.now()
    assert rt.redis.zcard(wait) == 0 and rt.redis.hlen(msgs) == 0
    # The wake touches no event record: the worker that takes the message moves it on.
    assert status(rt, eid) == "waiting" and whats(rt, eid) == timeline
    rt.redis.delete(QUEUE_EVENTS)
    assert process_event(rt, eid) == Outcome.DELIVERED
    assert queued_ids(rt) == []                        # its own release: nobody waiting


def test_freed_slot_goes_to_the_longest_waiting_event(capped: Runtime,
                                                      clock: FakeClock) -> None:
    rt = capped
    hold_slot(rt, "CALhold", "tok")
    ids = []
    for i in range(3):
        ids.append(_capped(rt, f"CALwait{i}"))
        clock.advance(0.01)    # distinct wait-since times
    rt.redis.delete(QUEUE_EVENTS)   # intake's copies, already run above
    release_slot(rt, "CALhold", "tok")
    assert queued_ids(rt) == [ids[0]]
    assert rt.redis.zrange(keys.cap_wait("acme"), 0, -1) == [i.encode() for i in ids[1:]]
    # A release whose slot had already lapsed (lease ran out) hands nothing on.
    release_slot(rt, "CALgone", "not-in-flight")
    assert queued_ids(rt) == [ids[0]]


def test_a_safety_retry_takes_the_event_off_the_wait_list(capped: Runtime,
                                                          clock: FakeClock) -> None:
    """An event whose safety retry fired is no waiter any more: a slot freed later goes to
    the next real waiter, and the event's own backoff (it got a retryable answer) is kept."""
    rt = capped
    wait = keys.cap_wait("acme")
    hold_slot(rt, "CALhold", "tok", lease_s=3600)
    first = _capped(rt, "CALfirst")               # safety retry due in 30..60 s
    clock.advance(60)
    second = _capped(rt, "CALsecond")             # due in 90 s at the earliest
    rt.redis.delete(QUEUE_EVENTS)
    assert scheduler.move_due_retries(rt) == 1    # only the first one's
    assert queued_ids(rt) == [first]
    assert rt.redis.zrange(wait, 0, -1) == [second.encode()]
    assert not rt.redis.hexists(keys.cap_wait_messages("acme"), first)
    rt.redis.delete(QUEUE_EVENTS)
    release_slot(rt, "CALhold", "tok")            # the slot goes to the waiter
    assert queued_ids(rt) == [second]
    rt.redis.delete(QUEUE_EVENTS)
    rilla(rt).fail(500)
    assert process_event(rt, first) == Outcome.RETRY
    backoff = due(rt, first)
    assert queued_ids(rt) == []                   # its release finds nobody waiting
    assert process_event(rt, second) == Outcome.DELIVERED
    assert due(rt, first) == backoff and status(rt, first) == "retry_scheduled"


def test_event_that_gets_a_slot_leaves_the_wait_list(capped: Runtime,
                                                     clock: FakeClock) -> None:
    rt = capped
    hold_slot(rt, "CALhold", "tok", lease_s=20)
    eid = _capped(rt, "CALlate")
    clock.advance(25)          # the holder's lease ran out; the safety retry is not due yet
    assert process_event(rt, eid) == Outcome.DELIVERED      # another copy of its message
    assert rt.redis.zcard(keys.cap_wait("acme")) == 0
    assert rt.redis.hlen(keys.cap_wait_messages("acme")) == 0
    # Its safety retry, due later, finds it finished: dropped, not queued.
    rt.redis.delete(QUEUE_EVENTS)
    clock.advance(60)
    assert scheduler.move_due_retries(rt) == 0
    assert rt.redis.zcard(keys.RETRY) == 0 and queued_ids(rt) == []


def test_a_woken_event_capped_again_keeps_its_place(capped: Runtime,
                                                    clock: FakeClock) -> None:
    rt = capped
    hold_slot(rt, "CALhold", "tok")
    first = _capped(rt, "CALfirst")
    clock.advance(0.01)
    second = _capped(rt, "CALsecond")
    rt.redis.delete(QUEUE_EVENTS)
    release_slot(rt, "CALhold", "tok")
    assert queued_ids(rt) == [first]
    # A newcomer takes the slot before the woken event runs: it is capped again...
    hold_slot(rt, "CALnew", "tok2")
    assert process_event(rt, first) == Outcome.BUSY
    # ...and is still ahead of the event that began waiting after it.
    assert rt.redis.zrange(keys.cap_wait("acme"), 0, -1) == [first.encode(), second.encode()]


# -- configuration, replay, vanished records ------------------------------------------------

def test_replay_queues_exactly_once_then_delivers(rt: Runtime) -> None:
    rilla(rt).fail(422, body="User email is not in Rilla")
    eid, outcome = run(rt, load("callrail", "post_call"))
    assert outcome == Outcome.DEAD
    rt.redis.delete(QUEUE_EVENTS)
    assert rt.lifecycle.replay(eid) is True
    assert rt.lifecycle.replay(eid) is False  # second replay: no-op
    assert queued_ids(rt) == [eid]
    assert process_event(rt, eid) == Outcome.DELIVERED
    assert process_event(rt, eid) == Outcome.DONE_ALREADY
    assert len(rilla(rt).upserts) == 2  # the 422 and the replay
    assert whats(rt, eid) == ["attempt", "dead_lettered", "replayed", "attempt", "delivered"]


def test_replay_after_fixing_tenants_delivers_with_new_user(rt: Runtime) -> None:
    rilla(rt).users = {"dana.w@beta.example"}
    body = load("callingly", "call_completed")
    eid, outcome = run(rt, body, kind="call_completed", tenant="beta", source="callingly")
    assert outcome == Outcome.DEAD
    entry = rt.lifecycle.dlq.get(eid)
    assert entry is not None and entry["status_code"] == 422
    assert json.loads(entry["payload"])["user_email"] == "dana@sunvalleyroofing.example"
    # The operator adds a users entry to the tenants file; the worker reloads it.
    fixed = TENANTS.replace(
        '[tenants.beta.callrail]',
        '[tenants.beta.users]\n"dana@sunvalleyroofing.example" = "dana.w@beta.example"\n'
        '[tenants.beta.callrail]')
    rt.tenants.update(parse_tenants(fixed, env={}))
    assert rt.lifecycle.replay(eid)
    assert process_event(rt, eid) == Outcome.DELIVERED
    assert rilla(rt).upserts[-1]["user_email"] == "dana.w@beta.example"
    assert rilla(rt).upserts[-1]["event_id"] == "callingly-41872219"
    assert rt.lifecycle.dlq.count() == 0


def test_tenant_removed_from_file_is_dead_lettered(rt: Runtime) -> None:
    eid = ingest(rt, load("callrail", "post_call"))
    del rt.tenants["acme"]
    assert process_event(rt, eid) == Outcome.DEAD
    entry = rt.lifecycle.dlq.get(eid)
    assert entry is not None and entry["reason_code"] == "config"
    assert "'acme'" in entry["reason"]
    assert rilla(rt).calls == []


def test_missing_event_record(rt: Runtime, clock: FakeClock) -> None:
    rt.redis.zadd(keys.PENDING, {"ev_gone": clock.now()})
    assert process_event(rt, "ev_gone") == Outcome.MISSING
    assert rt.redis.zscore(keys.PENDING, "ev_gone") is None


def test_a_worker_taking_an_event_refreshes_its_pending_score(
        rt: Runtime, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """So that the lost-work sweep does not take a running event for a lost one."""
    eid = ingest(rt, load("callrail", "post_call"))
    clock.advance(500)
    seen: list[float | None] = []
    on_first_upsert(monkeypatch, rt, lambda: seen.append(rt.redis.zscore(keys.PENDING, eid)))
    assert process_event(rt, eid) == Outcome.DELIVERED
    assert seen == [clock.now()]


# -- the CallRail quota guard is not on the ordinary path ------------------------------------

API_TENANTS = TENANTS.replace(
    'signing_key = "acme-signing-key-0001"',
    'signing_key = "acme-signing-key-0001"\naccount_id = "111111111"\n'
    'api_key = "acme-callrail-api-key-01"')


def test_delivery_that_needs_no_callrail_call_never_touches_the_guard(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    rt = make_runtime(fake_redis, clock, tenants=API_TENANTS)
    _, outcome = run(rt, load("callrail", "post_call"))   # an app.callrail.com recording
    assert outcome == Outcome.DELIVERED
    assert fake_redis.keys("rb:cr:*") == []   # nothing queued, counted or granted
    assert fake_redis.llen(QUEUE_CALLRAIL) == 0

    body = load("callrail", "post_call")      # the same call shape, API recording URL
    body["resource_id"] = "CALapi0001"
    body["recording"] = "https://api.callrail.com/v3/a/111111111/calls/CALapi0001/recording.json"
    eid, outcome = run(rt, body)
    assert outcome == Outcome.WAITING         # for its recording lookup
    assert fake_redis.keys("rb:cr:*")         # this one does go through the guard
    assert status(rt, eid) == "waiting_recording"
    assert rt.redis.zscore(keys.PENDING, eid) == clock.now() + 3600
    assert rilla(rt).upserts[-1]["event_id"] != "callrail-CALapi0001"
    assert rt.redis.zcard(keys.inflight("acme")) == 0          # its slot is not kept


def test_an_api_recording_of_a_tenant_without_api_access_is_dead_lettered(
        rt: Runtime) -> None:
    body = load("callrail", "post_call")
    body["recording"] = f"https://api.callrail.com/v3/a/111111111/calls/{CALL}/recording.json"
    eid, outcome = run(rt, body)
    assert outcome == Outcome.DEAD
    entry = rt.lifecycle.dlq.get(eid)
    assert entry is not None and entry["reason_code"] == "transform"
    assert "recording.json" in entry["reason"] and "'acme'" in entry["reason"]
    assert rilla(rt).calls == []
    assert rt.redis.keys("rb:cr:*") == []
