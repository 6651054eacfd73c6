"""Delivery behaviour of one event (workers/pipeline.py, workers/state.py, workers/scheduler.py)
and the dead-letter store (rilla_bridge/dlq.py), against fakeredis and a stub Rilla client."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from rilla_bridge import redis_conn as keys
from rilla_bridge.dlq import Selector
from rilla_bridge.rilla import RillaResult
from rilla_bridge.settings import Settings
from rilla_bridge.taskqueue import QUEUE_EVENTS, process_event_message
from rilla_bridge.tenants import parse_tenants
from workers import pipeline, scheduler
from workers.pipeline import Outcome, Runtime, process_event, retry_delay

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ACME_KEY = "acme-rilla-key-000001"
BETA_KEY = "beta-rilla-key-000002"
CALL = "CAL8d2e41b0c7f94a6e8b3d5c1f0a9e7264"       # post_call / pre_call / spam fixtures
CALL_NOREC = "CAL3b7e90d1a4c24f6b8e5a0d2c9f1b7e38"  # no recording, then call_modified brings one

TENANTS = f"""
[tenants.acme]
rilla_api_key = "{ACME_KEY}"
default_user_email = "office@acme.example"
[tenants.acme.users]
"mike@acme.example" = "mike.r@acme.example"
[tenants.acme.callrail]
signing_key = "acme-signing-key-0001"

[tenants.beta]
rilla_api_key = "{BETA_KEY}"
[tenants.beta.callrail]
signing_key = "beta-signing-key-0002"
[tenants.beta.callingly]
webhook_token = "beta-callingly-token-02"
"""


def load(source: str, name: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((FIXTURES / source / f"{name}.json").read_bytes())
    return body


class FakeRilla:
    """Answers from a script (then 200); ``users`` (if set) is the org's allowed rep emails."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.script: list[RillaResult] = []
        self.users: set[str] | None = None

    def _answer(self) -> RillaResult:
        return self.script.pop(0) if self.script else RillaResult("ok", 200, "Successfully")

    def upsert(self, api_key: str, payload: dict[str, Any]) -> RillaResult:
        self.calls.append(("upsert", api_key, json.loads(json.dumps(payload))))
        if self.users is not None and payload.get("user_email") not in self.users:
            return RillaResult("permanent", 422, "User email is not in Rilla")
        return self._answer()

    def delete(self, api_key: str, event_id: str) -> RillaResult:
        self.calls.append(("delete", api_key, event_id))
        return self._answer()

    @property
    def upserts(self) -> list[dict[str, Any]]:
        return [c[2] for c in self.calls if c[0] == "upsert"]


def make_runtime(client: fakeredis.FakeRedis, **settings: Any) -> Runtime:
    values: dict[str, Any] = {"retry_base_seconds": 5.0, "retry_max_delay_seconds": 60.0,
                              "retry_max_age_seconds": 3600.0, "stale_pending_seconds": 10}
    values.update(settings)
    return Runtime(settings=Settings(**values), redis=client,
                   tenants=parse_tenants(TENANTS, env={}), rilla=FakeRilla())  # type: ignore[arg-type]


@pytest.fixture
def rt(fake_redis: fakeredis.FakeRedis) -> Iterator[Runtime]:
    fake_redis.flushall()
    yield make_runtime(fake_redis)


def rilla(rt: Runtime) -> FakeRilla:
    assert isinstance(rt.rilla, FakeRilla)
    return rt.rilla


def ingest(rt: Runtime, body: dict[str, Any] | bytes, kind: str = "post_call",
           tenant: str = "acme", source: str = "callrail") -> str:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    stored = rt.store.intake(source=source, tenant=tenant, kind=kind, body=raw, call_id=None)
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
    out = []
    for m in rt.redis.lrange(QUEUE_EVENTS, 0, -1):
        out.append(json.loads(m)["headers"]["argsrepr"].strip("[]'\""))
    return out


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


# -- permanent failures -------------------------------------------------------------------

@pytest.mark.parametrize(("code", "body"), [
    (422, "User email is not in Rilla"), (400, "Missing some required parameters in the body"),
    (404, "Not Found")])
def test_permanent_answer_is_dead_lettered_at_once(rt: Runtime, code: int, body: str) -> None:
    rilla(rt).script = [RillaResult("permanent", code, body)]
    before = time.time()
    eid, outcome = run(rt, load("callrail", "post_call"))
    assert outcome == Outcome.DEAD
    assert len(rilla(rt).calls) == 1
    assert rt.redis.zcard(keys.RETRY) == 0
    assert rt.redis.zscore(keys.PENDING, eid) is None
    assert status(rt, eid) == "dead"
    entry = rt.dlq.get(eid)
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
    assert before <= entry["first_failure_at"] <= entry["failed_at"] <= time.time()
    assert whats(rt, eid) == ["attempt", "dead_lettered"]


# -- retryable failures -------------------------------------------------------------------

@pytest.mark.parametrize("result", [
    RillaResult("retryable", 500, "Internal Server Error"),
    RillaResult("retryable", None, "", error="read timeout after 20.0s: POST /custom/appointment"),
    RillaResult("retryable", 429, "Too Many Requests"),
])
def test_retryable_answer_schedules_a_growing_retry(rt: Runtime, result: RillaResult) -> None:
    base = rt.settings.retry_base_seconds
    rilla(rt).script = [result] * 4
    eid = ingest(rt, load("callrail", "post_call"))
    delays = []
    for n in range(1, 5):
        before = time.time()
        assert process_event(rt, eid) == Outcome.RETRY
        due = rt.redis.zscore(keys.RETRY, eid)
        assert due is not None
        delay = due - before
        ceiling = min(rt.settings.retry_max_delay_seconds, base * 2 ** (n - 1))
        assert ceiling / 2 - 0.05 <= delay <= ceiling + 0.05, (n, delay)
        delays.append(delay)
        assert status(rt, eid) == "retry_scheduled"
        assert rt.redis.zscore(keys.PENDING, eid) is None  # waiting in rb:retry, not lost
        assert rt.dlq.get(eid) is None
        # Due now: the scheduler moves it back onto the queue.
        rt.redis.zadd(keys.RETRY, {eid: time.time() - 1})
        assert scheduler.move_due_retries(rt) == 1
        assert status(rt, eid) == "queued"
    assert delays[-1] > delays[0]
    event = rt.store.get(eid)
    assert event is not None and event["attempts"] == "4"
    retries = [e for e in rt.store.timeline(eid) if e["what"] == "retry_scheduled"]
    assert len(retries) == 4
    # Then Rilla answers: delivered.
    assert process_event(rt, eid) == Outcome.DELIVERED
    assert len(rilla(rt).calls) == 5


def test_retry_after_is_honoured(rt: Runtime) -> None:
    rilla(rt).script = [RillaResult("retryable", 429, "slow down", retry_after=40.0)]
    before = time.time()
    eid, outcome = run(rt, load("callrail", "post_call"))
    assert outcome == Outcome.RETRY
    due = rt.redis.zscore(keys.RETRY, eid)
    assert due is not None and due - before >= 40.0


def test_dead_lettered_after_retry_max_age(rt: Runtime) -> None:
    rilla(rt).script = [RillaResult("retryable", 503, "Service Unavailable")] * 2
    eid, outcome = run(rt, load("callrail", "post_call"))
    assert outcome == Outcome.RETRY
    # The first attempt was longer ago than RETRY_MAX_AGE_SECONDS.
    rt.redis.hset(keys.event_key(eid), "first_attempt_at", repr(time.time() - 3601))
    rt.redis.zadd(keys.RETRY, {eid: time.time() - 1})
    scheduler.move_due_retries(rt)
    assert process_event(rt, eid) == Outcome.DEAD
    entry = rt.dlq.get(eid)
    assert entry is not None
    assert entry["reason_code"] == "retries_exhausted"
    assert entry["attempts"] == 2 and entry["status_code"] == 503
    assert entry["response_body"] == "Service Unavailable"
    assert "gave up after 2 attempts" in entry["reason"]
    assert rt.redis.zcard(keys.RETRY) == 0
    assert status(rt, eid) == "dead"


def test_last_retry_is_not_scheduled_past_max_age(rt: Runtime) -> None:
    rilla(rt).script = [RillaResult("retryable", 500, "x")]
    eid = ingest(rt, load("callrail", "post_call"))
    rt.redis.hset(keys.event_key(eid), mapping={"attempts": 8,
                                                "first_attempt_at": repr(time.time() - 3590)})
    assert process_event(rt, eid) == Outcome.RETRY
    due = rt.redis.zscore(keys.RETRY, eid)
    assert due is not None and due - time.time() <= 10.5


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
    entry = rt.dlq.get(eid)
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
    entry = rt.dlq.get(eid)
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
    assert rt.dlq.count() == 0


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
    eid, outcome = run(rt, load("callrail", "pre_call"), kind="pre_call")
    assert outcome == Outcome.SKIPPED
    # Delivering the call's merged state again now changes nothing: the pre-call's
    # placeholders (no agent, no recording, caller-ID name) did not win.
    event = rt.store.get(eid)
    assert event is not None
    assert pipeline.deliver(rt, event, rt.tenants["acme"], CALL) == Outcome.UNCHANGED
    assert len(rilla(rt).calls) == 1
    state = rt.calls.get("acme", "callrail", CALL)
    from rilla_bridge.transform import merge_snapshots
    merged = merge_snapshots(state["snapshots"])
    assert merged["customer_name"] == "Jordan Pike"
    assert merged["recording"]


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
    # A late post-call of the spam call does not bring the appointment back.
    _, outcome = run(rt, {**load("callrail", "post_call"), "waveforms": "late"})
    assert outcome == Outcome.UNCHANGED
    assert [c[0] for c in rilla(rt).calls] == ["upsert", "delete"]


# -- the per-call lock and the tenant cap ---------------------------------------------------

def test_busy_call_lock_requeues_without_an_attempt(rt: Runtime) -> None:
    assert rt.calls.acquire("acme", "callrail", CALL, "other-worker", 30_000, 32) == 1
    before = time.time()
    eid, outcome = run(rt, load("callrail", "post_call"))
    assert outcome == Outcome.BUSY
    assert rilla(rt).calls == []
    due = rt.redis.zscore(keys.RETRY, eid)
    assert due is not None and before + 0.9 <= due <= time.time() + 2.1
    event = rt.store.get(eid)
    assert event is not None and event["status"] == "waiting"
    assert "attempts" not in event
    assert "another delivery of this call" in rt.store.timeline(eid)[-1]["reason"]
    # The holder releases; the retry runs and delivers.
    rt.calls.release(rt.redis, "acme", "callrail", CALL, "other-worker")
    rt.redis.zadd(keys.RETRY, {eid: time.time() - 1})
    assert scheduler.move_due_retries(rt) == 1
    assert process_event(rt, eid) == Outcome.DELIVERED
    event = rt.store.get(eid)
    assert event is not None and event["attempts"] == "1"


def test_tenant_in_flight_cap(fake_redis: fakeredis.FakeRedis) -> None:
    fake_redis.flushall()
    rt = make_runtime(fake_redis, tenant_max_inflight=1)
    assert rt.calls.acquire("acme", "callrail", "CALother", "tok", 30_000, 1) == 1
    eid, outcome = run(rt, load("callrail", "post_call"))
    assert outcome == Outcome.BUSY
    assert "in-flight cap" in rt.store.timeline(eid)[-1]["reason"]
    assert rilla(rt).calls == []
    # Another tenant is not held back.
    _, outcome = run(rt, {**load("callrail", "post_call"), "agent_email": "a@beta.example"},
                     tenant="beta")
    assert outcome == Outcome.DELIVERED
    # The lock of the refused call is not left behind.
    assert rt.redis.get(keys.call_lock_key("acme", "callrail", CALL)) is None
    rt.calls.release(rt.redis, "acme", "callrail", "CALother", "tok")
    rt.redis.zadd(keys.RETRY, {eid: time.time() - 1})
    scheduler.move_due_retries(rt)
    assert process_event(rt, eid) == Outcome.DELIVERED


def test_capped_event_waits_and_a_freed_slot_queues_it(fake_redis: fakeredis.FakeRedis) -> None:
    """At the cap an event waits on the tenant's list (one safety retry far ahead), and the
    release of a slot queues it at once: no bouncing through the retry set."""
    fake_redis.flushall()
    rt = make_runtime(fake_redis, tenant_max_inflight=1)
    wait, msgs = keys.cap_wait_key("acme"), keys.cap_wait_messages_key("acme")
    assert rt.calls.acquire("acme", "callrail", "CALother", "tok", 30_000, 1) == 1
    eid, outcome = run(rt, load("callrail", "post_call"))
    assert outcome == Outcome.BUSY and status(rt, eid) == "waiting"
    assert rt.redis.zscore(wait, eid) is not None and rt.redis.hexists(msgs, eid)
    due = rt.redis.zscore(keys.RETRY, eid)
    assert due is not None and due > time.time() + pipeline.CAP_WAIT_SAFETY_SECONDS - 1
    rt.redis.delete(QUEUE_EVENTS)   # intake's copy, already run above

    rt.calls.release(rt.redis, "acme", "callrail", "CALother", "tok")
    assert queued_ids(rt) == [eid]                     # queued by the freed slot
    assert rt.redis.zscore(keys.RETRY, eid) is None    # the safety copy is gone
    assert rt.redis.zscore(keys.PENDING, eid) is not None
    assert status(rt, eid) == "queued"
    assert rt.redis.zcard(wait) == 0 and rt.redis.hlen(msgs) == 0
    rt.redis.delete(QUEUE_EVENTS)
    assert process_event(rt, eid) == Outcome.DELIVERED
    assert queued_ids(rt) == []                        # its own release: nobody waiting


def test_freed_slot_goes_to_the_longest_waiting_unfinished_event(
        fake_redis: fakeredis.FakeRedis) -> None:
    fake_redis.flushall()
    rt = make_runtime(fake_redis, tenant_max_inflight=1)
    assert rt.calls.acquire("acme", "callrail", "CALhold", "tok", 30_000, 1) == 1
    ids = []
    for i in range(3):
        body = {**load("callrail", "post_call"), "resource_id": f"CALwait{i}"}
        eid, outcome = run(rt, body)
        assert outcome == Outcome.BUSY
        ids.append(eid)
        time.sleep(0.002)   # distinct wait-since times (milliseconds)
    rt.redis.delete(QUEUE_EVENTS)   # intake's copies, already run above
    rt.redis.hset(keys.event_key(ids[0]), "status", "delivered")   # finished meanwhile
    rt.calls.release(rt.redis, "acme", "callrail", "CALhold", "tok")
    assert queued_ids(rt) == [ids[1]]                  # the first is skipped, not queued
    assert rt.redis.zrange(keys.cap_wait_key("acme"), 0, -1) == [ids[2].encode()]
    # A release whose slot had already lapsed (lease ran out) hands nothing on.
    rt.calls.release(rt.redis, "acme", "callrail", "CALgone", "not-in-flight")
    assert queued_ids(rt) == [ids[1]]


def _capped(rt: Runtime, name: str) -> str:
    eid, outcome = run(rt, {**load("callrail", "post_call"), "resource_id": name})
    assert outcome == Outcome.BUSY
    return eid


def test_only_a_still_waiting_event_is_woken(fake_redis: fakeredis.FakeRedis) -> None:
    """A wait-list entry of an event that went on another way (its safety retry ran, it got
    a retryable answer and waits for its backoff) must not be woken: that would skip the
    backoff. The entry is dropped and the next real waiter gets the slot."""
    fake_redis.flushall()
    rt = make_runtime(fake_redis, tenant_max_inflight=1)
    assert rt.calls.acquire("acme", "callrail", "CALhold", "tok", 30_000, 1) == 1
    first, second = _capped(rt, "CALstale"), _capped(rt, "CALreal")
    rt.redis.hset(keys.event_key(first), "status", "retry_scheduled")   # moved on meanwhile
    backoff = time.time() + 300
    rt.redis.zadd(keys.RETRY, {first: backoff})
    rt.redis.delete(QUEUE_EVENTS)
    rt.calls.release(rt.redis, "acme", "callrail", "CALhold", "tok")
    assert queued_ids(rt) == [second]
    assert rt.redis.zscore(keys.RETRY, first) == backoff        # its backoff is kept
    assert status(rt, first) == "retry_scheduled"
    assert whats(rt, second)[-1] == "queued"                    # the wake is in the timeline


def test_event_that_gets_a_slot_leaves_the_wait_list(fake_redis: fakeredis.FakeRedis) -> None:
    fake_redis.flushall()
    rt = make_runtime(fake_redis, tenant_max_inflight=1)
    assert rt.calls.acquire("acme", "callrail", "CALhold", "tok", 30_000, 1) == 1
    eid = _capped(rt, "CALlate")
    rt.redis.zadd(keys.RETRY, {eid: time.time() - 1})          # its safety retry runs first
    rt.redis.zrem(keys.inflight_key("acme"), "tok")           # the holder's lease ran out
    assert scheduler.move_due_retries(rt) == 1
    assert process_event(rt, eid) == Outcome.DELIVERED
    assert rt.redis.zcard(keys.cap_wait_key("acme")) == 0
    assert rt.redis.hlen(keys.cap_wait_messages_key("acme")) == 0


def test_release_between_the_cap_check_and_the_wait_is_not_missed(
        fake_redis: fakeredis.FakeRedis) -> None:
    """The cap check and the wait are two steps; a slot freed between them is found by the
    wait step itself, which then wakes the waiter."""
    fake_redis.flushall()
    rt = make_runtime(fake_redis, tenant_max_inflight=1)
    eid = ingest(rt, load("callrail", "post_call"))
    rt.redis.delete(QUEUE_EVENTS)
    # the cap was full when checked; the slot is free again when the event starts to wait
    woken = rt.calls.wait_for_slot("acme", eid, due=time.time() + 60, entry="{}",
                                   counter=Outcome.BUSY, max_inflight=1, retention=600)
    assert woken and queued_ids(rt) == [eid] and status(rt, eid) == "queued"
    assert rt.redis.zscore(keys.RETRY, eid) is None


def test_a_woken_event_capped_again_keeps_its_place(fake_redis: fakeredis.FakeRedis) -> None:
    fake_redis.flushall()
    rt = make_runtime(fake_redis, tenant_max_inflight=1)
    assert rt.calls.acquire("acme", "callrail", "CALhold", "tok", 30_000, 1) == 1
    first = _capped(rt, "CALfirst")
    time.sleep(0.01)
    second = _capped(rt, "CALsecond")
    rt.redis.delete(QUEUE_EVENTS)
    rt.calls.release(rt.redis, "acme", "callrail", "CALhold", "tok")
    assert queued_ids(rt) == [first]
    # A newcomer takes the slot before the woken event runs: it is capped again...
    assert rt.calls.acquire("acme", "callrail", "CALnew", "tok2", 30_000, 1) == 1
    assert process_event(rt, first) == Outcome.BUSY
    # ...and is still ahead of the event that began waiting after it.
    assert rt.redis.zrange(keys.cap_wait_key("acme"), 0, -1) == [first.encode(),
                                                                 second.encode()]


# -- scheduler ----------------------------------------------------------------------------

def test_move_due_retries_moves_only_due_ids_once(rt: Runtime) -> None:
    due_id = ingest(rt, load("callrail", "post_call"))
    later_id = ingest(rt, load("callrail", "outbound_post_call"))
    rt.redis.delete(QUEUE_EVENTS)
    rt.redis.zadd(keys.RETRY, {due_id: time.time() - 5, later_id: time.time() + 600})
    # Two schedulers that read the same due ids before either moves them.
    args: list[Any] = [repr(time.time()), repr(time.time()), due_id,
                       process_event_message(due_id)]
    move = rt.calls._requeue
    assert int(move(keys=[keys.RETRY, keys.PENDING, QUEUE_EVENTS], args=args)) == 1
    assert int(move(keys=[keys.RETRY, keys.PENDING, QUEUE_EVENTS], args=args)) == 0
    assert scheduler.move_due_retries(rt) == 0
    assert queued_ids(rt) == [due_id]
    assert rt.redis.zscore(keys.RETRY, later_id) is not None
    assert rt.redis.zscore(keys.PENDING, due_id) is not None


def test_move_due_retries_concurrently(rt: Runtime) -> None:
    ids = [ingest(rt, {**load("callrail", "post_call"), "resource_id": f"CAL{i:032x}"})
           for i in range(40)]
    rt.redis.delete(QUEUE_EVENTS)
    rt.redis.zadd(keys.RETRY, {i: time.time() - 1 for i in ids})
    moved: list[int] = []
    barrier = threading.Barrier(4)

    def one() -> None:
        barrier.wait()
        moved.append(scheduler.move_due_retries(rt))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sum(moved) == 40
    assert sorted(queued_ids(rt)) == sorted(ids)


def test_sweep_lost_requeues_lost_but_not_backlogged(rt: Runtime) -> None:
    now = time.time()
    lost = ingest(rt, load("callrail", "post_call"))
    backlogged = ingest(rt, load("callrail", "outbound_post_call"))
    rt.redis.delete(QUEUE_EVENTS)
    # ``lost``: pending for 500 s, no message anywhere (its worker died).
    # ``backlogged``: pending for 300 s, but its message is still waiting in the queue.
    rt.redis.zadd(keys.PENDING, {lost: now - 500, backlogged: now - 300})
    message = json.loads(process_event_message(backlogged))
    message["headers"]["rb_at"] = now - 300
    rt.redis.lpush(QUEUE_EVENTS, json.dumps(message))
    assert scheduler.sweep_lost(rt) == 1
    assert sorted(queued_ids(rt)) == sorted([lost, backlogged])
    score = rt.redis.zscore(keys.PENDING, lost)
    assert score is not None and score >= now
    assert rt.redis.zscore(keys.PENDING, backlogged) == pytest.approx(now - 300)
    assert scheduler.sweep_lost(rt) == 0  # refreshed: not swept twice
    # The backlog drains; once the event is old enough and nothing holds it, it is swept too.
    rt.redis.delete(QUEUE_EVENTS)
    assert scheduler.sweep_lost(rt) == 1
    assert queued_ids(rt) == [backlogged]


def test_sweep_leaves_recently_queued_events(rt: Runtime) -> None:
    ingest(rt, load("callrail", "post_call"))
    rt.redis.delete(QUEUE_EVENTS)
    assert scheduler.sweep_lost(rt) == 0  # younger than STALE_PENDING_SECONDS


def test_finished_event_requeued_by_a_stale_retry_leaves_nothing_pending(rt: Runtime) -> None:
    """A duplicate copy that found the call busy must not keep a delivered event pending."""
    eid = ingest(rt, load("callrail", "post_call"))
    rt.redis.zadd(keys.RETRY, {eid: time.time() - 1})  # the busy copy's retry
    assert process_event(rt, eid) == Outcome.DELIVERED
    scheduler.move_due_retries(rt)
    assert status(rt, eid) == "delivered"
    process_event(rt, eid)
    assert len(rilla(rt).calls) == 1
    assert rt.redis.zscore(keys.PENDING, eid) is None
    rt.redis.delete(QUEUE_EVENTS)
    rt.redis.zadd(keys.PENDING, {eid: time.time() - 100}, xx=True)
    assert scheduler.sweep_lost(rt) == 0


# -- dead letters: list, replay, delete -----------------------------------------------------

def _dead_letters(rt: Runtime) -> dict[str, str]:
    rilla(rt).script = [RillaResult("permanent", 422, "User email is not in Rilla")]
    a, _ = run(rt, load("callrail", "post_call"))
    b, _ = run(rt, {**load("callrail", "post_call"), "resource_id": "CAL" + "1" * 32,
                    "start_time": "soon", "datetime": ""})
    b2, _ = run(rt, {**load("callrail", "outbound_post_call"), "agent_email": ""},
                tenant="beta")
    cg = load("callingly", "call_completed")
    c, _ = run(rt, {**cg, "user": {**cg["user"], "email": None}}, kind="call_completed",
               tenant="beta", source="callingly")
    return {"rejected": a, "start": b, "norep": b2, "callingly": c}


def test_dlq_list_filters(rt: Runtime) -> None:
    ids = _dead_letters(rt)
    assert rt.dlq.get(ids["start"]) is not None, rt.store.get(ids["start"])
    every = list(rt.dlq.iter(Selector()))
    assert {e["id"] for e in every} == set(ids.values())
    acme = {e["id"] for e in rt.dlq.iter(Selector(tenant="acme"))}
    assert acme == {ids["rejected"], ids["start"]}
    assert [e["id"] for e in rt.dlq.iter(Selector(source="callingly"))] == [ids["callingly"]]
    rejected = [e["id"] for e in rt.dlq.iter(Selector(reason="rilla_rejected"))]
    assert rejected == [ids["rejected"]]
    assert [e["id"] for e in rt.dlq.iter(Selector(reason="START TIME"))] == [ids["start"]]
    assert {e["id"] for e in rt.dlq.iter(Selector(tenant="beta", reason="transform"))} == {
        ids["norep"], ids["callingly"]}
    row = next(rt.dlq.iter(Selector(reason="rilla_rejected")))
    assert row["status_code"] == 422 and row["attempts"] == 1
    assert row["event_id"] == f"callrail-{CALL}" and row["failed_at"] > 0


def test_replay_queues_exactly_once_then_delivers(rt: Runtime) -> None:
    ids = _dead_letters(rt)
    eid = ids["rejected"]
    rt.redis.delete(QUEUE_EVENTS)
    assert rt.dlq.replay(eid) is True
    assert rt.dlq.replay(eid) is False  # second replay: no-op
    assert queued_ids(rt) == [eid]
    assert rt.dlq.get(eid) is None
    assert eid not in {e["id"] for e in rt.dlq.iter(Selector())}
    event = rt.store.get(eid)
    assert event is not None and event["status"] == "queued" and event["attempts"] == "0"
    assert json.loads(event["body"]) == load("callrail", "post_call")
    assert rt.redis.zscore(keys.PENDING, eid) is not None
    assert whats(rt, eid)[-1] == "replayed"
    assert process_event(rt, eid) == Outcome.DELIVERED
    assert process_event(rt, eid) == Outcome.DONE_ALREADY
    assert len(rilla(rt).upserts) == 2  # the 422 and the replay


def test_dlq_delete(rt: Runtime) -> None:
    ids = _dead_letters(rt)
    assert rt.dlq.delete(ids["start"]) is True
    assert rt.dlq.delete(ids["start"]) is False
    assert rt.dlq.get(ids["start"]) is None
    assert rt.dlq.count() == 3
    assert rt.dlq.replay(ids["start"]) is False


def test_replay_after_fixing_tenants_delivers_with_new_user(rt: Runtime) -> None:
    rilla(rt).users = {"dana.w@beta.example"}
    body = load("callingly", "call_completed")
    eid, outcome = run(rt, body, kind="call_completed", tenant="beta", source="callingly")
    assert outcome == Outcome.DEAD
    entry = rt.dlq.get(eid)
    assert entry is not None and entry["status_code"] == 422
    assert json.loads(entry["payload"])["user_email"] == "dana@sunvalleyroofing.example"
    # The operator adds a users entry to the tenants file; the worker reloads it.
    fixed = TENANTS.replace(
        '[tenants.beta.callrail]',
        '[tenants.beta.users]\n"dana@sunvalleyroofing.example" = "dana.w@beta.example"\n'
        '[tenants.beta.callrail]')
    rt.tenants = parse_tenants(fixed, env={})
    assert rt.dlq.replay(eid)
    assert process_event(rt, eid) == Outcome.DELIVERED
    assert rilla(rt).upserts[-1]["user_email"] == "dana.w@beta.example"
    assert rilla(rt).upserts[-1]["event_id"] == "callingly-41872219"
    assert rt.dlq.count() == 0


def test_tenant_removed_from_file_is_dead_lettered(rt: Runtime) -> None:
    eid = ingest(rt, load("callrail", "post_call"))
    del rt.tenants["acme"]
    assert process_event(rt, eid) == Outcome.DEAD
    entry = rt.dlq.get(eid)
    assert entry is not None and entry["reason_code"] == "config"
    assert rilla(rt).calls == []


def test_missing_event_record(rt: Runtime) -> None:
    rt.redis.zadd(keys.PENDING, {"ev_gone": time.time()})
    assert process_event(rt, "ev_gone") == Outcome.MISSING
    assert rt.redis.zscore(keys.PENDING, "ev_gone") is None


# -- the CallRail quota guard is not on the ordinary path (issue 4) ----------------------

def test_delivery_that_needs_no_callrail_call_never_touches_the_guard(
        fake_redis: fakeredis.FakeRedis) -> None:
    from workers import callrail_jobs

    fake_redis.flushall()
    rt = make_runtime(fake_redis)
    rt.tenants = parse_tenants(TENANTS.replace(
        'signing_key = "acme-signing-key-0001"',
        'signing_key = "acme-signing-key-0001"\naccount_id = "111111111"\n'
        'api_key = "acme-callrail-api-key-01"'), env={})
    callrail_jobs.attach(rt)   # as a worker does: recording lookups go through the guard
    assert rt.recording_lookup is not None

    _, outcome = run(rt, load("callrail", "post_call"))   # an app.callrail.com recording
    assert outcome == Outcome.DELIVERED
    assert fake_redis.keys("rb:cr:*") == []   # nothing queued, counted or granted
    assert fake_redis.llen("callrail") == 0

    body = load("callrail", "post_call")      # the same call shape, API recording URL
    body["resource_id"] = "CALapi0001"
    body["recording"] = "https://api.callrail.com/v3/a/111111111/calls/CALapi0001/recording.json"
    _, outcome = run(rt, body)
    assert outcome == Outcome.WAITING         # for its recording lookup
    assert fake_redis.keys("rb:cr:*")         # this one does go through the guard
