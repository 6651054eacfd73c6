"""What a worker does with one dispatched event (``workers/pipeline.py``): claim, parse, merge
into the call's state under its lock, build, deliver, settle; every outcome with the history
records it leaves (``rb:history``), the call's lock, leases that lapse, a call reloaded from
history, replays. fakeredis, ``FakeRilla`` and a ``FakeClock``: time moves only when a test
says so. A "worker" here takes the oldest message off the ``events`` queue by hand."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from typing import Any

import fakeredis
import pytest
import redis

from rilla_bridge import keys
from rilla_bridge.calls import decode_call_state
from rilla_bridge.celery_messages import QUEUE_CALLRAIL, QUEUE_EVENTS, message_args
from rilla_bridge.clients.rilla import RillaResult
from rilla_bridge.clock import FakeClock, ms
from rilla_bridge.history.records import Record
from rilla_bridge.lifecycle import ClaimCode, Outcome
from rilla_bridge.providers import callingly, callrail
from rilla_bridge.tenants import Tenant, parse_tenants
from rilla_bridge.transform.merge import merge_snapshots
from tests.fakes import ACME_KEY, TENANTS, FakeRilla, load, make_runtime
from workers import pipeline
from workers.pipeline import process_event
from workers.runtime import Runtime

CALL = "CAL8d2e41b0c7f94a6e8b3d5c1f0a9e7264"       # post_call / pre_call / spam fixtures
CALL_NOREC = "CAL3b7e90d1a4c24f6b8e5a0d2c9f1b7e38"  # no recording, then call_modified brings one
LEASE = 8.0                                         # DELIVERY_LEASE_SECONDS (the default)


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


# -- webhooks in, messages out -----------------------------------------------------------------

def ingest(rt: Runtime, body: dict[str, Any] | bytes, kind: str = "post_call",
           tenant: str = "acme", source: str = "callrail") -> str:
    """Store a webhook as intake does (with its call id)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    call_id = None
    if isinstance(body, dict):
        call_id = (callrail if source == "callrail" else callingly).call_id(kind, body)
    stored = rt.lifecycle.receive(source=source, tenant=tenant, kind=kind, body=raw,
                                  call_id=call_id)
    assert not stored.duplicate
    return stored.event_id


def take(rt: Runtime) -> tuple[str, str]:
    """A worker takes the oldest message off the queue: its (event id, tenant)."""
    raw = rt.redis.rpop(QUEUE_EVENTS)
    assert isinstance(raw, bytes), "no message on the queue"
    args = message_args(raw)
    assert args is not None and len(args) == 2
    return str(args[0]), str(args[1])


def queued_ids(rt: Runtime) -> list[str]:
    """The queue's event ids in the order workers take them."""
    raw: list[bytes] = rt.redis.lrange(QUEUE_EVENTS, 0, -1)  # type: ignore[assignment]
    return [str((message_args(m) or [""])[0]) for m in reversed(raw)]


def work(rt: Runtime) -> tuple[str, str]:
    """Take the next message and run it: (event id, outcome)."""
    eid, tenant = take(rt)
    return eid, process_event(rt, eid, tenant)


def run(rt: Runtime, body: dict[str, Any] | bytes, kind: str = "post_call",
        tenant: str = "acme", source: str = "callrail") -> tuple[str, str]:
    """Receive a webhook and run its message (the next one on the queue)."""
    eid = ingest(rt, body, kind, tenant, source)
    taken, outcome = work(rt)
    assert taken == eid
    return eid, outcome


def due_now(rt: Runtime) -> None:
    """The scheduler's sweep, expecting one due retry to be dispatched."""
    assert rt.lanes.sweep()[0] == 1


# -- history --------------------------------------------------------------------------------

def history(rt: Runtime) -> list[Record]:
    entries: Any = rt.redis.xrange(keys.HISTORY)
    return [Record.from_entry(sid, f) for sid, f in entries]


def recs(rt: Runtime, kind: str, eid: str | None = None) -> list[dict[str, Any]]:
    return [r.data for r in history(rt)
            if r.type == kind and (eid is None or r.data.get("id") == eid)]


def steps(rt: Runtime, eid: str) -> list[dict[str, Any]]:
    return recs(rt, "step", eid)


def timeline(rt: Runtime, eid: str) -> list[dict[str, Any]]:
    return [e for s in steps(rt, eid) for e in s["tl"]]


def whats(rt: Runtime, eid: str) -> list[str]:
    return [e["what"] for e in timeline(rt, eid)]


def status(rt: Runtime, eid: str) -> str:
    """The event's status as history has it (its last step that set one)."""
    found = [s["status"] for s in steps(rt, eid) if s.get("status")]
    assert found, f"{eid} has no step with a status"
    return str(found[-1])


def dead(rt: Runtime, eid: str) -> dict[str, Any]:
    (found,) = recs(rt, "dead", eid)
    return found


def call_records(rt: Runtime, call_id: str = CALL) -> list[dict[str, Any]]:
    return [c for c in recs(rt, "call") if c["call_id"] == call_id]


def finished(rt: Runtime, eid: str, tenant: str = "acme") -> bool:
    """Gone from Redis, everywhere (history has it)."""
    return (not rt.redis.exists(keys.event(eid))
            and rt.redis.zscore(keys.open_events(tenant), eid) is None
            and rt.redis.zscore(keys.inflight(tenant), eid) is None
            and rt.redis.zscore(keys.retry(tenant), eid) is None
            and eid.encode() not in rt.redis.lrange(keys.lane(tenant), 0, -1))


def event(rt: Runtime, eid: str) -> dict[str, Any]:
    found = rt.store.get(eid)
    assert found is not None, f"{eid} is not in Redis"
    return found


def retry_due(rt: Runtime, eid: str, tenant: str = "acme") -> float:
    score = rt.redis.zscore(keys.retry(tenant), eid)
    assert score is not None, f"{eid} has no retry"
    return float(score)


def stats(rt: Runtime) -> dict[str, int]:
    """The outcome counters in ``rb:stats``, by outcome (summed over tenants)."""
    raw: dict[bytes, bytes] = rt.redis.hgetall(keys.STATS)  # type: ignore[assignment]
    out: dict[str, int] = {}
    for k, v in raw.items():
        kind, _, rest = k.decode().partition("|")
        if kind == "outcome":
            outcome = rest.split("|")[0]
            out[outcome] = out.get(outcome, 0) + int(float(v))
    return out


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

def test_smoke_one_post_call_from_webhook_to_history(rt: Runtime) -> None:
    eid = ingest(rt, load("callrail", "post_call"))
    (message,) = rt.redis.lrange(QUEUE_EVENTS, 0, -1)
    assert message_args(message) == [eid, "acme"]
    assert eid.encode() in rt.redis.zrange(keys.inflight("acme"), 0, -1)
    assert process_event(rt, eid, "acme") == Outcome.DELIVERED
    assert [r.type for r in history(rt)] == ["received", "step", "call"]
    assert rt.redis.keys("rb:ev:*") == []


def test_delivered_on_200_with_the_right_payload(rt: Runtime, clock: FakeClock) -> None:
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
    assert rilla(rt).appointments[ACME_KEY][payload["event_id"]] == payload
    # Its history: one step with the attempt and the outcome, then the call's state.
    now = clock.now()
    (step,) = steps(rt, eid)
    assert step["status"] == "delivered" and step["at"] == now
    assert step["set"] == {"attempts": 1, "first_attempt_at": now, "last_attempt_at": now,
                           "last_status": 200, "last_payload": json.dumps(payload),
                           "finished_at": now}
    attempt, delivered = step["tl"]
    assert {k: attempt[k] for k in ("t", "what", "n", "op", "status")} == {
        "t": now, "what": "attempt", "n": 1, "op": "upsert", "status": 200}
    assert "Successfully created appointment" in attempt["body"]
    assert isinstance(attempt["ms"], float)
    assert delivered == {"t": now, "what": "delivered"}
    (call,) = call_records(rt)
    assert (call["tenant"], call["source"], call["version"]) == ("acme", "callrail", 2)
    assert set(call["state"]) == {f"s:{eid}", "v", "delivered"}
    assert json.loads(call["state"][f"s:{eid}"])["rank"] == 2
    # Finished: gone from Redis, with its slot and the call's lock; counted.
    assert finished(rt, eid)
    assert not rt.redis.exists(keys.call_lock("acme", "callrail", CALL))
    assert stats(rt) == {Outcome.DELIVERED: 1}
    assert rt.heartbeat.holding() == 0


def test_a_freed_slot_dispatches_the_tenants_next_event(capped: Runtime) -> None:
    rt = capped
    first = ingest(rt, load("callrail", "post_call"))
    second = ingest(rt, {**load("callrail", "post_call"), "resource_id": "CALsecond"})
    other = ingest(rt, {**load("callingly", "call_completed")}, kind="call_completed",
                   tenant="beta", source="callingly")
    # At its cap the tenant's next event waits in its lane, not on the queue; the other
    # tenant is not held back.
    assert queued_ids(rt) == [first, other]
    assert rt.redis.lrange(keys.lane("acme"), 0, -1) == [second.encode()]
    assert work(rt) == (first, Outcome.DELIVERED)
    assert queued_ids(rt) == [other, second]            # the freed slot went to it at once
    assert work(rt)[0] == other
    assert work(rt) == (second, Outcome.DELIVERED)
    assert queued_ids(rt) == []


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
    entry = dead(rt, eid)
    assert entry["status_code"] == code
    assert entry["response_body"] == body
    assert entry["reason_code"] == "rilla_rejected"
    assert str(code) in entry["reason"] and body in entry["reason"]
    assert entry["attempts"] == 1
    assert entry["payload"] == rilla(rt).upserts[0]
    assert entry["rilla_event_id"] == f"callrail-{CALL}"
    assert (entry["tenant"], entry["source"], entry["kind"], entry["call_id"]) == (
        "acme", "callrail", "post_call", CALL)
    assert entry["first_failure_at"] == entry["failed_at"] == clock.now()
    assert status(rt, eid) == "dead" and whats(rt, eid) == ["attempt", "dead_lettered"]
    assert steps(rt, eid)[-1]["set"]["last_status"] == code
    # The raw event is history's (its ``received`` record), not the dead letter's.
    (received,) = [r for r in history(rt) if r.type == "received"]
    assert json.loads(received.body or b"") == load("callrail", "post_call")
    assert finished(rt, eid) and stats(rt) == {Outcome.DEAD: 1}


def test_a_rep_rilla_does_not_know_is_dead_lettered_with_rillas_answer(rt: Runtime) -> None:
    rilla(rt).users = {"office@acme.example"}
    eid, outcome = run(rt, load("callrail", "post_call"))
    assert outcome == Outcome.DEAD
    entry = dead(rt, eid)
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
    first = clock.now()
    delays = []
    for n in range(1, 5):
        started = clock.now()
        assert work(rt) == (eid, Outcome.RETRY)
        delay = retry_due(rt, eid) - started
        ceiling = min(rt.settings.retry_max_delay_seconds, base * 2 ** (n - 1))
        assert ceiling / 2 <= delay <= ceiling, (n, delay)
        delays.append(delay)
        assert status(rt, eid) == "retry_scheduled"
        kept = event(rt, eid)
        assert (kept["status"], kept["attempts"]) == ("retry_scheduled", str(n))
        assert float(kept["first_attempt_at"]) == first
        assert json.loads(kept["last_payload"]) == rilla(rt).upserts[-1]
        assert "claimed_by" not in kept
        assert rt.redis.zcard(keys.inflight("acme")) == 0    # its slot is free meanwhile
        assert recs(rt, "dead") == [] and queued_ids(rt) == []
        # Not a moment before it is due; then the sweep puts it back and dispatches it.
        clock.advance(delay - 0.01)
        assert rt.lanes.sweep() == (0, 0, 0)
        clock.advance(0.02)
        due_now(rt)
        assert queued_ids(rt) == [eid]
    assert delays[-1] > delays[0]
    retries = [e for e in timeline(rt, eid) if e["what"] == "retry_scheduled"]
    assert [r["in_s"] for r in retries] == [round(d, 2) for d in delays]
    assert [r["after"] for r in retries] == [result.status or result.error] * 4
    assert [s["set"]["next_attempt_at"] for s in steps(rt, eid)] == [
        pytest.approx(retry_due) for retry_due in
        [r["t"] + r["in_s"] for r in retries]]
    # Then Rilla answers: delivered, the fifth attempt.
    assert work(rt) == (eid, Outcome.DELIVERED)
    assert len(rilla(rt).calls) == 5
    assert steps(rt, eid)[-1]["set"]["attempts"] == 5
    assert steps(rt, eid)[-1]["set"]["first_attempt_at"] == first
    assert finished(rt, eid)


def test_retry_after_is_honoured(rt: Runtime, clock: FakeClock) -> None:
    rilla(rt).fail(429, body="slow down", retry_after="40")
    eid, outcome = run(rt, load("callrail", "post_call"))
    assert outcome == Outcome.RETRY
    assert retry_due(rt, eid) - clock.now() >= 40.0
    clock.advance(39.9)
    assert rt.lanes.sweep()[0] == 0


def test_dead_lettered_after_retry_max_age(rt: Runtime, clock: FakeClock) -> None:
    rilla(rt).fail(503, count=2)
    eid, outcome = run(rt, load("callrail", "post_call"))
    assert outcome == Outcome.RETRY
    clock.advance(3601)   # RETRY_MAX_AGE_SECONDS (3600) since the first attempt
    due_now(rt)
    assert work(rt) == (eid, Outcome.DEAD)
    entry = dead(rt, eid)
    assert entry["reason_code"] == "retries_exhausted"
    assert entry["attempts"] == 2 and entry["status_code"] == 503
    assert entry["response_body"] == "Service Unavailable"
    assert "gave up after 2 attempts over 3601s" in entry["reason"]
    assert entry["first_failure_at"] == clock.now() - 3601
    assert entry["payload"] == rilla(rt).upserts[-1]
    assert status(rt, eid) == "dead" and finished(rt, eid)


def test_last_retry_is_not_scheduled_past_max_age(rt: Runtime, clock: FakeClock) -> None:
    rilla(rt).fail(500, count=8)
    eid = ingest(rt, load("callrail", "post_call"))
    first = clock.now()
    for _ in range(7):
        assert work(rt) == (eid, Outcome.RETRY)
        clock.advance(retry_due(rt, eid) - clock.now() + 0.01)
        due_now(rt)
    clock.advance(first + 3590 - clock.now())   # ten seconds of the max age (3600 s) left
    # Attempt 8 would back off 30..60 s: it is due when the max age is reached instead.
    assert work(rt) == (eid, Outcome.RETRY)
    assert retry_due(rt, eid) - clock.now() == pytest.approx(10.01)


# -- untransformable ----------------------------------------------------------------------

@pytest.mark.parametrize(("tenant", "change", "words"), [
    ("beta", {"agent_email": ""}, "no rep email"),
    ("acme", {"start_time": "yesterday afternoon", "datetime": ""}, "no usable start time"),
    ("acme", {"start_time": "", "datetime": ""}, "no usable start time"),
])
def test_untransformable_event_is_dead_lettered_without_calling_rilla(
        rt: Runtime, tenant: str, change: dict[str, Any], words: str) -> None:
    body = {**load("callrail", "post_call"), **change}
    eid, outcome = run(rt, body, tenant=tenant)
    assert outcome == Outcome.DEAD
    assert rilla(rt).calls == []
    entry = dead(rt, eid)
    assert entry["reason_code"] == "transform"
    assert words in entry["reason"]
    assert entry["status_code"] is None and entry["attempts"] == 0
    assert entry["payload"] is None
    assert entry["rilla_event_id"] == f"callrail-{CALL}"
    assert status(rt, eid) == "dead" and finished(rt, eid, tenant)
    assert not rt.redis.exists(keys.call_lock(tenant, "callrail", CALL))


def test_what_the_transform_mended_is_noted_on_the_timeline(rt: Runtime) -> None:
    """An optional field too long for Rilla is shortened, not worth a recorded call."""
    eid, outcome = run(rt, {**load("callrail", "post_call"), "campaign": "x" * 5000})
    assert outcome == Outcome.DELIVERED
    campaign = rilla(rt).upserts[0]["custom_fields"]["campaign"]
    assert campaign.endswith("…") and len(campaign) < 5000
    note, attempt, delivered = timeline(rt, eid)
    assert (note["what"], attempt["what"], delivered["what"]) == ("note", "attempt", "delivered")
    assert "custom field 'campaign' shortened from 5000 characters" in note["text"]


@pytest.mark.parametrize(("change", "sent", "text"), [
    ({"duration": "1e9"}, {"end_time": "2025-04-02 16:03:12"},
     "duration '1e9' is not a number of seconds (0 to a day): the end time is the start time"),
    ({"agent_email": "mike at acme"}, {"user_email": "office@acme.example"},
     "agent_email 'mike at acme' is not an email address: the call goes to the tenant's "
     "default_user_email"),
])
def test_a_call_with_a_bad_optional_value_is_delivered_with_a_note(
        rt: Runtime, change: dict[str, Any], sent: dict[str, Any], text: str) -> None:
    eid, outcome = run(rt, {**load("callrail", "post_call"), **change})
    assert outcome == Outcome.DELIVERED
    (payload,) = rilla(rt).upserts
    assert {k: payload[k] for k in sent} == sent
    assert [(e["what"], e.get("text")) for e in timeline(rt, eid)] == [
        ("note", text), ("attempt", None), ("delivered", None)]


def test_a_recording_on_an_internal_host_is_dead_lettered_by_name(rt: Runtime) -> None:
    body = {**load("callrail", "post_call"), "recording": "https://169.254.169.254/latest/"}
    eid, outcome = run(rt, body)
    assert outcome == Outcome.DEAD and rilla(rt).calls == []
    entry = dead(rt, eid)
    assert entry["reason_code"] == "transform"
    assert entry["reason"].startswith("recording URL names the non-public address "
                                      "169.254.169.254: only https URLs on public hosts")


@pytest.mark.parametrize("body", [b"[1, 2]", b"not json", b'{"resource_id": ""}', b"{}"])
def test_malformed_body_is_dead_lettered(rt: Runtime, body: bytes) -> None:
    eid, outcome = run(rt, body)
    assert outcome == Outcome.DEAD
    entry = dead(rt, eid)
    assert entry["reason_code"] == "transform" and entry["reason"]
    assert rilla(rt).calls == [] and finished(rt, eid)


def editable(rt: Runtime) -> dict[str, Tenant]:
    """The test runtime's tenants are a plain dict: a test edits the file in place."""
    assert isinstance(rt.tenants, dict)
    return rt.tenants


def test_tenant_removed_from_file_is_dead_lettered(rt: Runtime) -> None:
    eid = ingest(rt, load("callrail", "post_call"))
    del editable(rt)["acme"]
    assert work(rt) == (eid, Outcome.DEAD)
    entry = dead(rt, eid)
    assert entry["reason_code"] == "config"
    assert "'acme'" in entry["reason"] and "replay" in entry["reason"]
    assert rilla(rt).calls == [] and finished(rt, eid)


# -- skipped ------------------------------------------------------------------------------

@pytest.mark.parametrize(("fixture", "kind", "words"), [
    ("post_call_no_recording", "post_call", "no recording"),
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
    (step,) = steps(rt, eid)
    assert step["status"] == "skipped" and words in step["set"]["reason"]
    assert whats(rt, eid) == ["skipped"]
    assert recs(rt, "dead") == [] and finished(rt, eid)
    assert stats(rt) == {Outcome.SKIPPED: 1}


def test_a_pre_call_is_merged_into_the_call_and_skipped(rt: Runtime) -> None:
    eid, outcome = run(rt, load("callrail", "pre_call"), kind="pre_call")
    assert outcome == Outcome.SKIPPED
    (step,) = steps(rt, eid)
    assert "pre_call event: merged into the call's state" in step["set"]["reason"]
    state = decode_call_state(rt.redis.hgetall(keys.call("acme", "callrail", CALL)))
    assert len(state["snapshots"]) == 1
    # Stored without taking the call's lock; its state goes to history all the same.
    assert not rt.redis.exists(keys.call_lock("acme", "callrail", CALL))
    (call,) = call_records(rt)
    assert call["version"] == 1 and f"s:{eid}" in call["state"]


# -- duplicates, stale copies, ordering, spam ---------------------------------------------------

def test_the_same_message_twice_posts_once(rt: Runtime) -> None:
    eid, outcome = run(rt, load("callrail", "post_call"))
    assert outcome == Outcome.DELIVERED
    assert process_event(rt, eid, "acme") == Outcome.MISSING     # finished: gone
    assert len(rilla(rt).calls) == 1 and len(steps(rt, eid)) == 1


def test_a_copy_of_an_event_not_dispatched_or_held_elsewhere_does_nothing(
        capped: Runtime) -> None:
    rt = capped
    first = ingest(rt, load("callrail", "post_call"))
    waiting = ingest(rt, {**load("callrail", "post_call"), "resource_id": "CALwaiting"})
    # A stray copy of a message for an event still in its lane (not dispatched): stale.
    assert process_event(rt, waiting, "acme") == Outcome.STALE
    assert event(rt, waiting)["status"] == "queued" and steps(rt, waiting) == []
    # Another live worker holds the first: its copy here does nothing.
    assert rt.lifecycle.claim(first, "acme", "another-worker").code == ClaimCode.CLAIMED
    assert process_event(rt, first, "acme") == Outcome.HELD
    assert event(rt, first)["claimed_by"] == "another-worker"
    assert rilla(rt).calls == [] and steps(rt, first) == [] and stats(rt) == {}
    # Unknown events (and stray slot entries of them) are gone.
    rt.redis.zadd(keys.inflight("acme"), {"ev_gone": 1})
    assert process_event(rt, "ev_gone", "acme") == Outcome.MISSING
    assert rt.redis.zscore(keys.inflight("acme"), "ev_gone") is None


def test_unchanged_merged_state_is_not_posted_again(rt: Runtime, clock: FakeClock) -> None:
    run(rt, load("callrail", "post_call"))
    # The same call again as another event (a field we do not map differs).
    eid2, outcome = run(rt, {**load("callrail", "post_call"), "waveforms": "w"})
    assert outcome == Outcome.UNCHANGED
    assert len(rilla(rt).calls) == 1
    (step,) = steps(rt, eid2)
    assert step["status"] == "delivered" and step["set"] == {"finished_at": clock.now()}
    assert step["tl"] == [{"t": clock.now(), "what": "delivered",
                           "note": "Rilla already has this exact data"}]
    assert finished(rt, eid2) and stats(rt) == {Outcome.DELIVERED: 1, Outcome.UNCHANGED: 1}


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
    assert [c["version"] for c in call_records(rt)] == [2, 3, 4]


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
    assert steps(rt, eid)[-1]["set"]["last_payload"] is None
    # A late post-call of the spam call does not bring the appointment back.
    _, outcome = run(rt, {**load("callrail", "post_call"), "waveforms": "late"})
    assert outcome == Outcome.UNCHANGED
    assert [c[0] for c in rilla(rt).calls] == ["upsert", "delete"]


def test_spam_for_a_call_rilla_never_had_is_deleted_all_the_same(rt: Runtime) -> None:
    eid, outcome = run(rt, load("callrail", "call_modified_spam"), kind="call_modified")
    assert outcome == Outcome.DELIVERED        # Rilla's 404: nothing to delete is deleted
    assert rilla(rt).calls == [("delete", ACME_KEY, f"callrail-{CALL}")]
    attempt = timeline(rt, eid)[0]
    assert (attempt["what"], attempt["op"], attempt["status"]) == ("attempt", "delete", 404)


# -- the per-call lock --------------------------------------------------------------------

def test_an_event_of_a_call_being_delivered_waits_without_an_attempt(
        rt: Runtime, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    first = ingest(rt, load("callrail", "post_call"))
    second = ingest(rt, {**load("callrail", "post_call"), "tags": ["booked"],
                         "changes": ["tags"]}, kind="call_modified")
    outcomes: list[tuple[str, str]] = []
    on_first_upsert(monkeypatch, rt, lambda: outcomes.append(work(rt)))
    assert work(rt) == (first, Outcome.DELIVERED)
    assert outcomes == [(second, Outcome.BUSY)]        # while the first held the call's lock
    assert len(rilla(rt).calls) == 1
    started = clock.now()
    assert started + pipeline.BUSY_REQUEUE_SECONDS <= retry_due(rt, second) < started + 2.0
    kept = event(rt, second)
    assert kept["status"] == "waiting" and "attempts" not in kept
    (step,) = steps(rt, second)
    assert step["status"] == "waiting"
    assert step["tl"] == [{"t": started, "what": "waiting",
                           "reason": "another delivery of this call"}]
    assert stats(rt) == {Outcome.BUSY: 1, Outcome.DELIVERED: 1}
    # The first delivery released the lock; the retry runs and delivers the newer state.
    clock.advance(2.0)
    due_now(rt)
    assert work(rt) == (second, Outcome.DELIVERED)
    assert steps(rt, second)[-1]["set"]["attempts"] == 1
    assert rilla(rt).upserts[-1]["custom_fields"]["tags"] == "booked"


def test_the_worker_holds_the_event_and_the_calls_lock_in_its_heartbeat(
        rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    eid = ingest(rt, load("callrail", "post_call"))
    seen: list[tuple[str, str, str]] = []

    def look() -> None:
        held = rt.heartbeat._held[eid]
        lock = keys.call_lock("acme", "callrail", CALL)
        token = rt.redis.hget(lock, "token")
        assert isinstance(token, bytes)
        seen.append((held.tenant, held.lock_key, held.lock_token))
        assert (held.lock_key, held.lock_token) == (lock, token.decode())

    on_first_upsert(monkeypatch, rt, look)
    assert work(rt) == (eid, Outcome.DELIVERED)
    assert len(seen) == 1 and seen[0][0] == "acme"
    assert rt.heartbeat.holding() == 0


class WorkerKilled(BaseException):
    """The worker process dies mid-delivery (SIGKILL: no code of ours runs any more, so
    neither a settle nor the hand-back of a stopping worker, see test_shutdown.py)."""


def test_a_killed_workers_event_and_lock_come_back_after_a_lease(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    rt = make_runtime(fake_redis, clock)
    eid = ingest(rt, load("callrail", "post_call"))
    monkeypatch.setattr(pipeline, "hand_back", lambda *a: False)   # SIGKILL: nothing runs

    def killed() -> None:
        raise WorkerKilled

    on_first_upsert(monkeypatch, rt, killed)
    with pytest.raises(WorkerKilled):
        work(rt)
    assert event(rt, eid)["status"] == "in_flight"
    assert rt.redis.exists(keys.call_lock("acme", "callrail", CALL))
    # Another worker process gets a copy of the message: the dead one's lease still runs.
    other = make_runtime(fake_redis, clock)
    assert process_event(other, eid, "acme") == Outcome.HELD
    clock.advance(LEASE - 0.001)
    assert rt.lanes.sweep()[1] == 0
    # Its lease lapses (no heartbeat): the sweep puts it back and dispatches it again; the
    # next worker takes the call's lock, lapsed by the same clock.
    clock.advance(0.001)
    assert rt.lanes.sweep()[1] == 1
    assert whats(rt, eid) == ["requeued"]
    taken, tenant = take(other)
    assert process_event(other, taken, tenant) == Outcome.DELIVERED
    assert finished(rt, eid)
    assert not rt.redis.exists(keys.call_lock("acme", "callrail", CALL))
    assert len(rilla(other).upserts) == 1


# -- a worker whose lease lapsed while it delivered -------------------------------------------

def test_a_lapsed_workers_late_settle_leaves_the_new_workers_event_alone(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    slow = make_runtime(fake_redis, clock)
    fresh = make_runtime(fake_redis, clock)
    eid = ingest(slow, load("callrail", "post_call"))
    run = fresh.heartbeat.run_token()            # the other worker's run of the event

    def stalled() -> None:
        clock.advance(LEASE + 1)                 # no heartbeat got through meanwhile
        assert slow.lanes.sweep()[1] == 1        # recovered and dispatched again...
        taken, tenant = take(fresh)
        assert fresh.lifecycle.claim(taken, tenant, run).code == \
            ClaimCode.CLAIMED                    # ...and another worker has it now

    on_first_upsert(monkeypatch, slow, stalled)
    assert work(slow)[0] == eid
    # The slow worker's settle added its step, and nothing else: the event is the other's.
    kept = event(slow, eid)
    assert kept["claimed_by"] == run
    assert fake_redis.zscore(keys.inflight("acme"), eid) == ms(clock.now() + LEASE)
    assert whats(slow, eid) == ["requeued", "attempt", "delivered"]
    late = steps(slow, eid)[-1]                  # no status: the event did not end so
    assert late["status"] is None and not late["set"]
    assert stats(slow) == {} and call_records(slow) == []
    # A copy of the message in the other worker's process is a run of its own: held off...
    assert process_event(fresh, eid, "acme") == Outcome.HELD
    assert event(fresh, eid)["claimed_by"] == run
    # ...while the run that claimed it takes it to the end.
    monkeypatch.setattr(fresh.heartbeat, "run_token", lambda: run)
    assert process_event(fresh, eid, "acme") == Outcome.DELIVERED
    assert finished(fresh, eid) and stats(fresh) == {Outcome.DELIVERED: 1}


def test_a_lapsed_workers_failure_after_the_other_delivered_is_no_dead_letter(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    slow = make_runtime(fake_redis, clock)
    fresh = make_runtime(fake_redis, clock)
    eid = ingest(slow, load("callrail", "post_call"))
    rilla(slow).fail(422, body="User email is not in Rilla")

    def stalled() -> None:
        clock.advance(LEASE + 1)
        assert slow.lanes.sweep()[1] == 1
        assert work(fresh) == (eid, Outcome.DELIVERED)

    on_first_upsert(monkeypatch, slow, stalled)
    work(slow)
    assert recs(slow, "dead") == []
    assert stats(slow) == {Outcome.DELIVERED: 1}
    assert finished(slow, eid)


# -- a call whose state went to history ------------------------------------------------------

def history_of_calls(rt: Runtime, answers: list[Any] | None = None
                     ) -> tuple[Runtime, list[tuple[str, str, str]]]:
    """A runtime whose ``call_history`` reads the calls' latest ``call`` records from the
    stream (what the SQL history holds), or gives the scripted ``answers`` (an exception is
    raised) first; and the list of its lookups."""
    asked: list[tuple[str, str, str]] = []

    def call_history(tenant: str, source: str, call_id: str) -> dict[str, str] | None:
        asked.append((tenant, source, call_id))
        if answers:
            a = answers.pop(0)
            if isinstance(a, BaseException):
                raise a
            return dict(a) if a is not None else None
        found = [c for c in recs(rt, "call") if (c["tenant"], c["source"], c["call_id"]) == (
            tenant, source, call_id)]
        return dict(found[-1]["state"]) if found else None

    return dataclasses.replace(rt, call_history=call_history), asked


def hand_to_history(rt: Runtime, call_id: str = CALL) -> int:
    """The history process wrote the call's latest state: the Redis copy goes."""
    version = int(call_records(rt, call_id)[-1]["version"])
    assert rt.calls.forget([("acme", "callrail", call_id, version)]) == 1
    assert not rt.calls.in_redis("acme", "callrail", call_id)
    assert rt.calls.maybe_in_history("acme", "callrail", call_id)
    return version


def test_a_later_event_of_a_forgotten_call_merges_with_its_history(rt: Runtime) -> None:
    rt, asked = history_of_calls(rt)
    run(rt, load("callrail", "post_call"))
    version = hand_to_history(rt)
    # A call_modified that names only its tags (its other fields empty).
    late = {"resource_id": CALL, "customer_name": "", "agent_email": "", "recording": "",
            "start_time": load("callrail", "post_call")["start_time"],
            "tags": ["booked"], "changes": ["tags"]}
    _, outcome = run(rt, late, kind="call_modified")
    assert outcome == Outcome.DELIVERED
    assert asked == [("acme", "callrail", CALL)]
    first, second = rilla(rt).upserts
    assert second["custom_fields"]["tags"] == "booked"
    # Nothing history had was blanked by the empty fields.
    for field in ("title", "customer", "user_email", "media_url", "start_time", "end_time"):
        assert second[field] == first[field], field
    assert call_records(rt)[-1]["version"] == version + 2     # its snapshot, then delivered
    assert len(decode_call_state(
        rt.redis.hgetall(keys.call("acme", "callrail", CALL)))["snapshots"]) == 2
    # The same data once more is recognised as delivered (the fingerprint came back too).
    hand_to_history(rt)
    _, outcome = run(rt, {**load("callrail", "post_call"), "tags": ["booked"],
                          "waveforms": "again"})
    assert outcome == Outcome.UNCHANGED and len(rilla(rt).upserts) == 2
    assert len(asked) == 2


def test_a_pre_call_of_a_forgotten_call_is_merged_after_the_reload_too(rt: Runtime) -> None:
    rt, asked = history_of_calls(rt)
    run(rt, load("callrail", "post_call"))
    hand_to_history(rt)
    _, outcome = run(rt, load("callrail", "pre_call"), kind="pre_call")
    assert outcome == Outcome.SKIPPED and len(asked) == 1
    state = decode_call_state(rt.redis.hgetall(keys.call("acme", "callrail", CALL)))
    assert merge_snapshots(state["snapshots"])["customer_name"] == "Jordan Pike"


def test_history_unavailable_the_event_waits_and_tries_again(
        rt: Runtime, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    rt, asked = history_of_calls(rt, [ConnectionError("database down")])
    run(rt, load("callrail", "post_call"))
    hand_to_history(rt)
    with caplog.at_level(logging.WARNING, logger="rilla_bridge.worker"):
        eid, outcome = run(rt, {**load("callrail", "post_call"), "tags": ["booked"]},
                           kind="call_modified")
    assert outcome == Outcome.NO_HISTORY == "history_unavailable"
    assert [r.getMessage() for r in caplog.records] == [
        "history unavailable for a call's earlier events"]
    wait = retry_due(rt, eid) - clock.now()
    assert pipeline.NO_HISTORY_RETRY_SECONDS <= wait <= 2 * pipeline.NO_HISTORY_RETRY_SECONDS
    assert event(rt, eid)["status"] == "waiting" and status(rt, eid) == "waiting"
    assert "history database" in timeline(rt, eid)[-1]["reason"]
    assert not rt.calls.in_redis("acme", "callrail", CALL)     # nothing stored half-way
    assert len(rilla(rt).upserts) == 1 and stats(rt)[Outcome.NO_HISTORY] == 1
    # The database answers again: the event reloads the call and is delivered on top.
    clock.advance(wait)
    due_now(rt)
    assert work(rt) == (eid, Outcome.DELIVERED)
    assert len(asked) == 2
    assert rilla(rt).upserts[-1]["custom_fields"]["tags"] == "booked"
    assert rilla(rt).upserts[-1]["title"] == rilla(rt).upserts[0]["title"]


def test_a_false_positive_of_the_filter_proceeds_as_a_new_call(rt: Runtime) -> None:
    """The filter says "maybe in history", history has no such call: one read, then on."""
    rt, asked = history_of_calls(rt, [None])
    gen = int(rt.clock.now() // rt.calls.generation_seconds)
    for bit in rt.calls.bits("acme", "callrail", CALL):
        rt.redis.setbit(keys.seen(gen), bit, 1)
    assert rt.calls.maybe_in_history("acme", "callrail", CALL)
    _, outcome = run(rt, load("callrail", "post_call"))
    assert outcome == Outcome.DELIVERED and asked == [("acme", "callrail", CALL)]
    assert call_records(rt)[-1]["version"] == 2
    # A call the filter does not know never asks history.
    _, outcome = run(rt, {**load("callrail", "post_call"), "resource_id": "CALfresh"})
    assert outcome == Outcome.DELIVERED and len(asked) == 1


# -- the dead letter's last payload ----------------------------------------------------------

def test_a_dead_letter_keeps_the_last_payload_sent_when_a_later_run_fails_in_transform(
        rt: Runtime, clock: FakeClock) -> None:
    rilla(rt).fail(500)
    body = {**load("callrail", "post_call"), "agent_email": ""}   # the tenant's default rep
    eid, outcome = run(rt, body)
    assert outcome == Outcome.RETRY
    sent = rilla(rt).upserts[0]
    assert sent["user_email"] == "office@acme.example"
    # The tenants file changes before the retry: no default rep any more.
    editable(rt)["acme"] = dataclasses.replace(rt.tenants["acme"], default_user_email=None)
    clock.advance(retry_due(rt, eid) - clock.now())
    due_now(rt)
    assert work(rt) == (eid, Outcome.DEAD)
    entry = dead(rt, eid)
    assert entry["reason_code"] == "transform" and "no rep email" in entry["reason"]
    assert entry["payload"] == sent                     # what Rilla was last sent
    assert (entry["attempts"], entry["status_code"]) == (1, None)
    assert len(rilla(rt).upserts) == 1


# -- replay ----------------------------------------------------------------------------------

def dead_row(rt: Runtime, eid: str) -> dict[str, Any]:
    """A dead letter's event as history holds it (its ``received`` record and raw body)."""
    (rec,) = [r for r in history(rt) if r.type == "received" and r.data["id"] == eid]
    return {**{k: rec.data[k] for k in ("id", "tenant", "source", "kind", "call_id",
                                        "received_at")}, "body": rec.body}


def test_replay_runs_a_dead_letter_once_through_the_bulk_lane(rt: Runtime,
                                                              clock: FakeClock) -> None:
    rilla(rt).fail(422, body="User email is not in Rilla")
    eid, outcome = run(rt, load("callrail", "post_call"))
    assert outcome == Outcome.DEAD
    row = dead_row(rt, eid)
    clock.advance(60)
    assert rt.lifecycle.replay(row, "cli:ops") is True
    assert rt.lifecycle.replay(row, "cli:ops") is False     # in progress: refused
    assert queued_ids(rt) == [eid] and event(rt, eid)["lane"] == "replay"
    assert recs(rt, "handled") == [{"id": eid, "how": "replayed", "at": clock.now(),
                                    "by": "cli:ops"}]
    assert work(rt) == (eid, Outcome.DELIVERED)
    assert process_event(rt, eid, "acme") == Outcome.MISSING
    assert rt.lifecycle.replay(row, "cli:ops") is False     # within the hour
    assert len(rilla(rt).upserts) == 2  # the 422 and the replay
    assert whats(rt, eid) == ["attempt", "dead_lettered", "replayed", "attempt", "delivered"]
    assert steps(rt, eid)[-1]["set"]["attempts"] == 1       # counted afresh


def test_replay_after_fixing_tenants_delivers_with_new_user(rt: Runtime) -> None:
    rilla(rt).users = {"dana.w@beta.example"}
    body = load("callingly", "call_completed")
    eid, outcome = run(rt, body, kind="call_completed", tenant="beta", source="callingly")
    assert outcome == Outcome.DEAD
    entry = dead(rt, eid)
    assert entry["status_code"] == 422
    assert entry["payload"]["user_email"] == "dana@sunvalleyroofing.example"
    # The operator adds a users entry to the tenants file; the worker reloads it.
    fixed = TENANTS.replace(
        '[tenants.beta.callrail]',
        '[tenants.beta.users]\n"dana@sunvalleyroofing.example" = "dana.w@beta.example"\n'
        '[tenants.beta.callrail]')
    editable(rt).update(parse_tenants(fixed, env={}))
    assert rt.lifecycle.replay(dead_row(rt, eid), "cli:ops")
    assert work(rt) == (eid, Outcome.DELIVERED)
    assert rilla(rt).upserts[-1]["user_email"] == "dana.w@beta.example"
    assert rilla(rt).upserts[-1]["event_id"] == "callingly-41872219"


# -- the queue's room --------------------------------------------------------------------------

def test_a_run_refills_the_queue_when_tenants_wait_for_room(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    rt = make_runtime(fake_redis, clock, dispatch_queue_max=2)
    ids = [ingest(rt, {**load("callrail", "post_call"), "resource_id": f"CAL{n}"})
           for n in range(4)]
    assert queued_ids(rt) == ids[:1]
    assert rt.lanes.refill() == 1 and queued_ids(rt) == ids[:2]
    # A worker takes one: room for one more, filled when the worker claims its event.
    assert work(rt) == (ids[0], Outcome.DELIVERED)
    assert queued_ids(rt) == ids[1:3]


def test_a_failed_refill_does_not_stop_the_delivery(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    rt = make_runtime(fake_redis, clock, dispatch_queue_max=2)
    first = ingest(rt, load("callrail", "post_call"))
    ingest(rt, {**load("callrail", "post_call"), "resource_id": "CAL2"})
    ingest(rt, {**load("callrail", "post_call"), "resource_id": "CAL3"})

    def down() -> int:
        raise redis.ConnectionError("gone")

    monkeypatch.setattr(rt.lanes, "refill", down)
    with caplog.at_level(logging.WARNING, logger="rilla_bridge.worker"):
        assert work(rt) == (first, Outcome.DELIVERED)
    assert "could not refill the queue" in [r.getMessage() for r in caplog.records]


# -- recordings behind the CallRail quota guard ----------------------------------------------

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
    assert event(rt, eid)["status"] == "waiting_recording"
    assert status(rt, eid) == "waiting_recording"
    assert retry_due(rt, eid) == clock.now() + 3600          # a safety retry, should it be lost
    assert rilla(rt).upserts[-1]["event_id"] != "callrail-CALapi0001"
    assert rt.redis.zcard(keys.inflight("acme")) == 0       # its slot is not kept
    assert not rt.redis.exists(keys.call_lock("acme", "callrail", "CALapi0001"))


def test_an_api_recording_of_a_tenant_without_api_access_is_dead_lettered(
        rt: Runtime) -> None:
    body = load("callrail", "post_call")
    body["recording"] = f"https://api.callrail.com/v3/a/111111111/calls/{CALL}/recording.json"
    eid, outcome = run(rt, body)
    assert outcome == Outcome.DEAD
    entry = dead(rt, eid)
    assert entry["reason_code"] == "transform"
    assert "recording.json" in entry["reason"] and "'acme'" in entry["reason"]
    assert rilla(rt).calls == []
    assert rt.redis.keys("rb:cr:*") == []
