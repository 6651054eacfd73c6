"""CallRail API work (``workers/callrail_jobs.py``) with the recording service
(``workers/recordings.py``): a recording lookup from the delivery that asks for it to the
delivery with the resolved URL, failures, the quota guard on the runtime's clock, dispatch and
reconciliation. fakeredis, a ``FakeClock`` and a scripted CallRail client."""

from __future__ import annotations

import base64
import dataclasses
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import fakeredis
import pytest

from rilla_bridge import keys
from rilla_bridge.calls import decode_call_state
from rilla_bridge.celery_messages import QUEUE_CALLRAIL, QUEUE_EVENTS, message_args
from rilla_bridge.clients.callrail import CallRailClient, CallRailResult
from rilla_bridge.clock import FakeClock
from rilla_bridge.history.records import Record
from rilla_bridge.lifecycle import Outcome
from tests.fakes import TENANTS, FakeRilla, load, make_runtime
from workers import callrail_jobs
from workers.pipeline import process_event
from workers.runtime import Runtime

ACCOUNT = "111111111"
CALL = "CALapi0001"
API_URL = f"https://api.callrail.com/v3/a/{ACCOUNT}/calls/{CALL}/recording.json"
MEDIA = f"https://app.callrail.com/calls/{CALL}/recording/redirect?access_key=abc"
API_TENANTS = TENANTS.replace(
    'signing_key = "acme-signing-key-0001"',
    f'signing_key = "acme-signing-key-0001"\naccount_id = "{ACCOUNT}"\n'
    'api_key = "acme-callrail-api-key-01"')


class FakeCallRail(CallRailClient):
    """Answers from ``script`` (then ``ok`` with ``data``); notes every request."""

    def __init__(self) -> None:
        super().__init__("https://api.callrail.test")
        self.requests: list[tuple[str, Any]] = []
        self.script: list[CallRailResult] = []
        self.data: dict[str, Any] = {"url": MEDIA}

    def _answer(self, what: str, arg: Any) -> CallRailResult:
        self.requests.append((what, arg))
        if self.script:
            return self.script.pop(0)
        return CallRailResult("ok", 200, self.data, None)

    def get_recording(self, api_key: str, account_id: str, call_id: str) -> CallRailResult:
        assert (api_key, account_id) == ("acme-callrail-api-key-01", ACCOUNT)
        return self._answer("recording", call_id)

    def list_calls(self, api_key: str, account_id: str, *, company_id: str | None,
                   start_date: str, end_date: str, fields: Any, per_page: int = 250,
                   page_url: str | None = None) -> CallRailResult:
        return self._answer("list", page_url or (start_date, end_date))

    def count_calls(self, api_key: str, account_id: str, *, company_id: str | None,
                    start_date: str, end_date: str) -> CallRailResult:
        return self._answer("count", (start_date, end_date))


@pytest.fixture
def rt(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> Runtime:
    base = make_runtime(fake_redis, clock, tenants=API_TENANTS, callrail_hourly_limit=3,
                        callrail_hour_seconds=60, reconcile_interval_seconds=900)
    return dataclasses.replace(base, callrail=FakeCallRail())


def cr(rt: Runtime) -> FakeCallRail:
    assert isinstance(rt.callrail, FakeCallRail)
    return rt.callrail


def rilla(rt: Runtime) -> FakeRilla:
    assert isinstance(rt.rilla, FakeRilla)
    return rt.rilla


def work(rt: Runtime) -> tuple[str, str]:
    """A worker takes the oldest message off the events queue and runs it."""
    raw = rt.redis.rpop(QUEUE_EVENTS)
    assert isinstance(raw, bytes)
    args = message_args(raw)
    assert args is not None
    return str(args[0]), process_event(rt, str(args[0]), str(args[1]))


def waiting_for_recording(rt: Runtime) -> str:
    body = {**load("callrail", "post_call"), "resource_id": CALL, "recording": API_URL}
    eid = rt.lifecycle.receive(source="callrail", tenant="acme", kind="post_call",
                               body=json.dumps(body).encode(), call_id=CALL).event_id
    assert work(rt) == (eid, Outcome.WAITING)
    assert rt.redis.zscore(keys.retry("acme"), eid) is not None
    return eid


def recs(rt: Runtime, kind: str, eid: str | None = None) -> list[dict[str, Any]]:
    """History records of type ``kind`` (of event ``eid``), oldest first."""
    entries: Any = rt.redis.xrange(keys.HISTORY)
    found = (Record.from_entry(sid, f) for sid, f in entries)
    return [r.data for r in found
            if r.type == kind and (eid is None or r.data.get("id") == eid)]


def whats(rt: Runtime, eid: str) -> list[str]:
    return [e["what"] for s in recs(rt, "step", eid) for e in s["tl"]]


def finished(rt: Runtime, eid: str) -> bool:
    return (rt.store.get(eid) is None and rt.redis.zscore(keys.retry("acme"), eid) is None
            and rt.redis.zscore(keys.open_events("acme"), eid) is None)


def dispatched(rt: Runtime) -> list[dict[str, Any]]:
    """Run the scheduler's dispatch; the jobs it put on the callrail queue, in queue order."""
    callrail_jobs.dispatch(rt)
    jobs = []
    while (raw := rt.redis.rpop(QUEUE_CALLRAIL)) is not None:
        assert isinstance(raw, bytes)
        message = json.loads(raw)
        args, _, _ = json.loads(base64.b64decode(message["body"]))
        assert message["headers"]["task"] == "rilla_bridge.callrail_job"
        jobs.append(args[0])
    return jobs


def status(rt: Runtime, eid: str) -> str:
    """The event's status in Redis (while unfinished), else its last one in history."""
    event = rt.store.get(eid)
    if event is not None:
        return str(event["status"])
    return str([s["status"] for s in recs(rt, "step", eid) if s.get("status")][-1])


# -- recording lookups ---------------------------------------------------------------------

def test_a_resolved_recording_is_delivered(rt: Runtime, clock: FakeClock) -> None:
    eid = waiting_for_recording(rt)
    assert rilla(rt).calls == []
    rt.redis.delete(QUEUE_EVENTS)
    (job,) = dispatched(rt)
    assert (job["type"], job["event_id"], job["api_url"], job["lane"]) == (
        "recording", eid, API_URL, "live")
    assert job["granted_at"] == clock.now()
    assert callrail_jobs.run(rt, job) == "resolved"
    assert cr(rt).requests == [("recording", CALL)]
    state = decode_call_state(rt.redis.hgetall(keys.call("acme", "callrail", CALL)))
    assert state["resolved"] == {API_URL: MEDIA}
    # Back at the head of its lane, and dispatched at once (a slot is free).
    assert status(rt, eid) == "queued"
    assert rt.redis.zscore(keys.retry("acme"), eid) is None
    assert work(rt) == (eid, Outcome.DELIVERED)
    (payload,) = rilla(rt).upserts
    assert payload["media_url"] == MEDIA and payload["event_id"] == f"callrail-{CALL}"
    assert whats(rt, eid) == ["waiting_recording", "queued", "attempt", "delivered"]
    assert [s["status"] for s in recs(rt, "step", eid)] == [
        "waiting_recording", "queued", "delivered"]
    assert finished(rt, eid)
    # The resolved URL is part of the call's state history keeps.
    assert recs(rt, "call")[-1]["state"][f"r:{API_URL}"] == MEDIA


def test_a_recording_resolved_for_an_event_no_longer_waiting_queues_nothing(
        rt: Runtime) -> None:
    eid = waiting_for_recording(rt)
    (job,) = dispatched(rt)
    rt.lifecycle.requeue(eid, "acme", "an operator's retry now")
    assert work(rt) == (eid, Outcome.WAITING)            # a second lookup is queued
    assert callrail_jobs.run(rt, job) == "resolved"      # the first one answers: requeued
    assert work(rt) == (eid, Outcome.DELIVERED)
    (second,) = dispatched(rt)
    assert callrail_jobs.run(rt, second) == "resolved"   # the event is finished: nothing
    assert rt.redis.llen(QUEUE_EVENTS) == 0 and len(rilla(rt).upserts) == 1


@pytest.mark.parametrize(("answer", "words"), [
    (CallRailResult("permanent", 404, None, "not found"), "CallRail answered 404"),
    (CallRailResult("ok", 200, {"url": "ftp://nowhere"}, None), "no usable url"),
])
def test_a_lookup_that_cannot_succeed_dead_letters_the_event(
        rt: Runtime, answer: CallRailResult, words: str) -> None:
    eid = waiting_for_recording(rt)
    cr(rt).script = [answer]
    (job,) = dispatched(rt)
    assert callrail_jobs.run(rt, job) == "abandoned"
    (entry,) = recs(rt, "dead", eid)
    assert entry["reason_code"] == "recording_lookup"
    assert words in entry["reason"]
    assert (entry["tenant"], entry["call_id"], entry["attempts"]) == ("acme", CALL, 0)
    assert status(rt, eid) == "dead" and rilla(rt).calls == []
    assert whats(rt, eid) == ["waiting_recording", "dead_lettered"]
    assert finished(rt, eid)            # out of its retry set too: nothing comes due later


def test_a_429_pauses_the_account_and_the_job_goes_first_in_line(rt: Runtime,
                                                                 clock: FakeClock) -> None:
    eid = waiting_for_recording(rt)
    cr(rt).script = [CallRailResult("rate_limited", 429, None, "Too Many Requests")]
    (job,) = dispatched(rt)
    assert callrail_jobs.run(rt, job) == "resubmitted"
    paused = rt.guard.status(ACCOUNT)["paused_until"]
    assert paused is not None and paused > clock.now()
    assert dispatched(rt) == []                  # nothing is granted while paused
    clock.advance(paused - clock.now() + 0.01)
    (again,) = dispatched(rt)
    assert (again["event_id"], again["tries"]) == (eid, 1)
    assert callrail_jobs.run(rt, again) == "resolved"
    assert rt.guard.status(ACCOUNT)["pause_level"] == 0     # a success resets the backoff


def test_a_job_failing_again_and_again_is_given_up(rt: Runtime, clock: FakeClock) -> None:
    eid = waiting_for_recording(rt)
    (job,) = dispatched(rt)
    for tries in range(1, callrail_jobs.MAX_JOB_TRIES + 1):
        cr(rt).script = [CallRailResult("retryable", 503, None, "Service Unavailable")]
        assert callrail_jobs.run(rt, job) == "resubmitted"
        clock.advance(60)                         # a fresh window for the next grant
        (job,) = dispatched(rt)
        assert job["tries"] == tries
    cr(rt).script = [CallRailResult("retryable", 503, None, "Service Unavailable")]
    assert callrail_jobs.run(rt, job) == "abandoned"
    (entry,) = recs(rt, "dead", eid)
    assert "kept failing" in entry["reason"] and finished(rt, eid)


def test_a_grant_used_too_late_is_deferred_not_spent(rt: Runtime, clock: FakeClock) -> None:
    waiting_for_recording(rt)
    (job,) = dispatched(rt)
    clock.advance(rt.guard.margin_seconds + 0.5)      # the worker picked it up late
    assert callrail_jobs.run(rt, job) == "deferred"
    assert cr(rt).requests == []
    assert rt.guard.status(ACCOUNT)["waiting"]["live"] == 1


def test_tenant_without_api_access_gives_the_job_up(rt: Runtime) -> None:
    run_id = "reconcile-beta-x"
    job = {"type": "list", "tenant": "beta", "run": run_id, "start_date": "a", "end_date": "b"}
    assert callrail_jobs.run(rt, job) == "abandoned"
    assert rt.redis.hget(keys.run(run_id), "done") == b"1"
    assert cr(rt).requests == []


@pytest.mark.parametrize("url", [
    f"https://api.callrail.com/v3/a/{ACCOUNT}/calls/CALanother/recording.json",
    f"https://api.callrail.com/v3/a/999999/calls/{CALL}/recording.json",
])
def test_a_recording_of_another_call_or_account_is_refused_without_a_lookup(
        rt: Runtime, clock: FakeClock, url: str) -> None:
    """A tenant's webhook may not name another tenant's call: its recording (and access key)
    would reach this tenant's Rilla, paid from the shared account's quota."""
    body = {**load("callrail", "post_call"), "resource_id": CALL, "recording": url}
    eid = rt.lifecycle.receive(source="callrail", tenant="acme", kind="post_call",
                               body=json.dumps(body).encode(), call_id=CALL).event_id
    assert work(rt) == (eid, Outcome.DEAD)
    (entry,) = recs(rt, "dead", eid)
    assert entry["reason_code"] == "transform"
    assert entry["reason"].startswith("recording URL names CallRail call ")
    assert f"only this call ({CALL}) in the tenant's own account ({ACCOUNT})" in entry["reason"]
    assert rt.guard.status(ACCOUNT)["waiting"]["live"] == 0 and dispatched(rt) == []
    assert not rt.redis.exists(keys.lookups("acme", int(clock.now() // 3600)))
    assert cr(rt).requests == []
    assert rilla(rt).calls == [] and finished(rt, eid)


def test_each_tenant_has_its_own_share_of_the_accounts_lookups(rt: Runtime,
                                                               clock: FakeClock) -> None:
    """Hourly limit 3, share 0.5: a tenant may queue two lookups an hour, then its events
    wait for the next hour (the rest of the account's budget is other tenants')."""
    eids = []
    for n in range(3):
        call = f"CALapi000{n + 2}"
        url = f"https://api.callrail.com/v3/a/{ACCOUNT}/calls/{call}/recording.json"
        body = {**load("callrail", "post_call"), "resource_id": call, "recording": url}
        eids.append(rt.lifecycle.receive(source="callrail", tenant="acme", kind="post_call",
                                         body=json.dumps(body).encode(), call_id=call).event_id)
        assert work(rt) == (eids[-1], Outcome.WAITING)
    assert rt.guard.status(ACCOUNT)["waiting"]["live"] == 2      # the third was not queued
    notes = [[e.get("note") for e in s["tl"]] for s in recs(rt, "step", eids[2])]
    assert notes == [["the tenant used its share of the CallRail account's hourly budget for "
                      "lookups"]]
    hour_end = (int(clock.now() // 3600) + 1) * 3600
    assert rt.redis.zscore(keys.retry("acme"), eids[2]) == hour_end + 1
    assert [recs(rt, "step", e)[0]["tl"][0]["note"] for e in eids[:2]] == [
        "CallRail recording lookup queued"] * 2


# -- dispatch and reconciliation on the clock --------------------------------------------------

def test_dispatch_waits_on_the_clock_for_a_grant_due_within_the_tick(
        rt: Runtime, clock: FakeClock) -> None:
    for n in range(4):
        rt.guard.submit(ACCOUNT, "live", {"type": "count", "n": n})
    assert [j["n"] for j in dispatched(rt)] == [0, 1, 2]          # the hourly limit (3)
    wait = rt.guard.next_grant_in(ACCOUNT)
    assert wait is not None and wait > callrail_jobs.DISPATCH_EVERY
    clock.advance(wait - 0.1)                # the window frees within this tick...
    before = clock.now()
    assert [j["n"] for j in dispatched(rt)] == [3]                # ...so dispatch waits for it
    assert 0.1 <= clock.now() - before <= callrail_jobs.DISPATCH_EVERY


def test_reconcile_starts_one_run_per_api_tenant_per_interval(rt: Runtime,
                                                              clock: FakeClock) -> None:
    assert callrail_jobs.reconcile(rt) == 1          # acme only: beta has no API access
    assert callrail_jobs.reconcile(rt) == 0
    clock.advance(899)
    assert callrail_jobs.reconcile(rt) == 0
    clock.advance(1)
    assert callrail_jobs.reconcile(rt) == 1
    assert rt.guard.status(ACCOUNT)["waiting"]["reconcile"] == 2


def test_a_listed_page_feeds_only_calls_no_webhook_brought(rt: Runtime,
                                                           clock: FakeClock) -> None:
    known = {**load("callrail", "post_call"), "resource_id": "CALknown"}     # its webhook
    rt.lifecycle.receive(source="callrail", tenant="acme", kind="post_call",
                         body=json.dumps(known).encode(), call_id="CALknown")
    assert work(rt)[1] == Outcome.DELIVERED
    api_call = load("callrail", "api_call")
    calls = [{**api_call, "id": "CALknown"}, {**api_call, "id": "CALnew"}]
    cr(rt).data = {"calls": calls, "has_next_page": True,
                   "next_page": "https://api.callrail.test/v3/a/1/calls.json?after=x"}
    run_id = callrail_jobs.start_run(rt.redis, rt.guard, rt.tenants["acme"], "reconcile",
                                     *_window())
    (job,) = dispatched(rt)
    assert callrail_jobs.run(rt, job) == "page: 2 calls, 1 new"
    (fed,) = [r for r in recs(rt, "received") if r["call_id"] == "CALnew"]
    assert (fed["kind"], fed["lane"]) == ("api_call", "reconcile")
    assert fed["note"] == f"found by reconcile run {run_id}"
    assert rt.redis.llen(QUEUE_EVENTS) == 1             # by the bulk lane, at its pace
    info = {k.decode(): v.decode()
            for k, v in fake_redis_hash(rt, keys.run(run_id)).items()}
    assert (info["pages"], info["seen"], info["fed"]) == ("1", "2", "1")
    assert "done" not in info
    assert dispatched(rt) == []              # reconciliation's share of the hour is spent
    clock.advance(62)
    (following,) = dispatched(rt)
    assert following["page_url"].endswith("after=x") and following["lane"] == "reconcile"
    cr(rt).data = {"calls": [], "has_next_page": False}
    callrail_jobs.run(rt, following)
    assert rt.redis.hget(keys.run(run_id), "done") == b"1"


def test_a_call_handed_to_history_is_known_and_not_fed_again(rt: Runtime) -> None:
    asked: list[str] = []

    def call_history(tenant: str, source: str, call_id: str) -> dict[str, str] | None:
        asked.append(call_id)
        return {"v": "3"} if call_id == "CALold" else None   # CALmaybe: a false positive

    rt = dataclasses.replace(rt, call_history=call_history)
    for cid in ("CALold", "CALmaybe"):
        rt.calls.restore("acme", "callrail", cid, {"v": "1"})
        assert rt.calls.forget([("acme", "callrail", cid, 1)]) == 1
    api_call = load("callrail", "api_call")
    cr(rt).data = {"calls": [{**api_call, "id": c} for c in ("CALold", "CALmaybe", "CALnew")],
                   "has_next_page": False}
    start_run = callrail_jobs.start_run
    run_id = start_run(rt.redis, rt.guard, rt.tenants["acme"], "reconcile", *_window())
    (job,) = dispatched(rt)
    assert callrail_jobs.run(rt, job) == "page: 3 calls, 2 new"
    assert asked == ["CALold", "CALmaybe"]        # CALnew: not in the filter, never asked
    assert sorted(r["call_id"] for r in recs(rt, "received")) == ["CALmaybe", "CALnew"]
    assert rt.redis.hget(keys.run(run_id), "done") == b"1"


def fake_redis_hash(rt: Runtime, key: str) -> dict[bytes, bytes]:
    found: dict[bytes, bytes] = rt.redis.hgetall(key)  # type: ignore[assignment]
    return found


def _window() -> tuple[datetime, datetime]:
    end = datetime(2026, 1, 1, tzinfo=UTC)
    return end - timedelta(days=2), end
