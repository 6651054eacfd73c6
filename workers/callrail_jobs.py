"""CallRail API work: recording lookups, reconciliation and backfill, behind the quota guard.

Every job is exactly one CallRail request. Jobs wait in the guard's durable per-account lists
(rilla_bridge.callrail.quota); the scheduler's ``dispatch`` takes only as many as the
account's hourly and daily budget allows and puts them on the ``callrail`` Celery queue, so a
worker never sleeps waiting for budget and a throttled account never holds up anyone else.
A 429 pauses the account for every process; the job goes back to the front of its line.

Job shapes (JSON):
- ``{"type": "recording", "tenant", "event_id", "call_id", "api_url", "cr_call"}``: resolve an
  API ``recording.json`` URL, remember the media URL in the call's state, re-queue the event.
- ``{"type": "list", "tenant", "run", "start_date", "end_date", "page_url"}``: one page of
  calls; calls no webhook brought are fed into the normal pipeline; queues the next page.
- ``{"type": "count", "tenant", "run", "start_date", "end_date"}``: how many calls a
  backfill window holds, so ``rilla-bridge backfill`` can estimate its budget first.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import redis

from rilla_bridge import redis_conn as keys
from rilla_bridge.callrail.client import CallRailClient, parse_recording_api_url
from rilla_bridge.callrail.quota import QuotaGuard
from rilla_bridge.events import timeline_entry
from rilla_bridge.settings import Settings
from rilla_bridge.taskqueue import QUEUE_CALLRAIL, TASK_CALLRAIL_JOB, task_message
from rilla_bridge.tenants import Tenant
from rilla_bridge.transform import NeedsRecording
from workers import pipeline
from workers.pipeline import Runtime

log = logging.getLogger("rilla_bridge.callrail")
MAX_JOB_TRIES = 8
LIST_FIELDS = ("agent_email", "call_type", "company_id", "company_name", "company_time_zone",
               "created_at", "source", "source_name", "tags", "note", "value", "lead_status",
               "first_call", "person_id", "customer_name", "customer_phone_number",
               "customer_city", "customer_state", "tracking_phone_number", "campaign",
               "spam")
RUN_TTL = 7 * 86400


def make_guard(settings: Settings, client: redis.Redis) -> QuotaGuard:
    return QuotaGuard(
        client, hourly_limit=settings.callrail_hourly_limit,
        daily_limit=settings.callrail_daily_limit, hour_seconds=settings.callrail_hour_seconds,
        day_seconds=settings.callrail_day_seconds,
        shares={"live": 1.0, "backfill": settings.backfill_budget_share,
                "reconcile": settings.reconcile_budget_share},
        pause_base_seconds=settings.callrail_pause_base_seconds)


def attach(rt: Runtime) -> None:
    """Give the delivery pipeline a way to ask for a recording lookup."""
    rt.guard = make_guard(rt.settings, rt.redis)  # type: ignore[attr-defined]
    rt.callrail = CallRailClient(rt.settings.callrail_base_url,  # type: ignore[attr-defined]
                                 connect_timeout=rt.settings.rilla_connect_timeout,
                                 read_timeout=rt.settings.rilla_read_timeout)

    def lookup(tenant: Tenant, event: dict[str, Any], need: NeedsRecording) -> None:
        assert tenant.callrail is not None and tenant.callrail.account_id
        # Live webhooks go first; calls found by reconciliation/backfill spend their lane.
        lane = event.get("lane") or "live"
        rt.guard.submit(tenant.callrail.account_id, lane, {  # type: ignore[attr-defined]
            "type": "recording", "tenant": tenant.slug, "event_id": event["id"],
            "call_id": event.get("call_id") or need.call_id, "api_url": need.api_url,
            "cr_call": need.call_id, "tries": 0})

    rt.recording_lookup = lookup


def run_key(run_id: str) -> str:
    return f"rb:run:{run_id}"


def _resubmit(rt: Runtime, account: str, job: dict[str, Any], why: str) -> str:
    job["tries"] = int(job.get("tries", 0)) + 1
    if job["tries"] > MAX_JOB_TRIES:
        return _give_up(rt, job, f"CallRail kept failing ({why}) after {job['tries']} tries")
    lane = job.pop("lane", "live")
    job.pop("granted_at", None)
    rt.guard.submit(account, lane, job, front=True)  # type: ignore[attr-defined]
    return "resubmitted"


def _give_up(rt: Runtime, job: dict[str, Any], reason: str) -> str:
    if job.get("type") == "recording":
        event = rt.store.get(job["event_id"])
        if event is not None:
            pipeline.dead_letter(rt, event, "recording_lookup", reason)
    elif job.get("run"):
        rt.redis.hset(run_key(job["run"]), mapping={"error": reason, "done": 1})
    log.warning("callrail job abandoned", extra={"type": job.get("type"), "reason": reason})
    return "abandoned"


def run(rt: Runtime, job: dict[str, Any]) -> str:
    """Run one granted job (one request); the Celery task ``rilla_bridge.callrail_job``."""
    tenant = rt.tenants.get(str(job.get("tenant")))
    if tenant is None or tenant.callrail is None or not tenant.callrail.api_enabled:
        return _give_up(rt, job, f"tenant {job.get('tenant')!r} has no CallRail API access")
    cr = tenant.callrail
    account, api_key = str(cr.account_id), str(cr.api_key)
    client: CallRailClient = rt.callrail  # type: ignore[attr-defined]
    kind = job.get("type")
    guard: QuotaGuard = rt.guard  # type: ignore[attr-defined]
    late = guard.still_good(account, float(job.get("granted_at", 0)))
    if late is not None:
        # The grant stays counted (conservative); the job waits for a fresh one, first in line.
        lane = job.pop("lane", "live")
        job.pop("granted_at", None)
        guard.submit(account, lane, job, front=True)
        log.info("callrail job deferred", extra={"account": account, "why": late})
        return "deferred"
    if kind == "recording":
        parsed = parse_recording_api_url(job["api_url"])
        call = parsed[1] if parsed else job["cr_call"]
        result = client.get_recording(api_key, account, call)
    elif kind == "list":
        result = client.list_calls(api_key, account, company_id=cr.company_id,
                                   start_date=job["start_date"], end_date=job["end_date"],
                                   fields=LIST_FIELDS, page_url=job.get("page_url"))
    elif kind == "count":
        result = client.count_calls(api_key, account, company_id=cr.company_id,
                                    start_date=job["start_date"], end_date=job["end_date"])
    else:
        return _give_up(rt, job, f"unknown CallRail job type {kind!r}")
    # One line per CallRail request: a scarce, metered resource (at most the hourly budget
    # per account), so on-call can see who spent it; deliveries to Rilla are not logged so.
    log.info("callrail request", extra={"account": account, "tenant": job.get("tenant"),
                                        "type": kind, "result": result.kind,
                                        "status": result.status})

    if result.kind == "rate_limited":
        paused = rt.guard.pause(account)  # type: ignore[attr-defined]
        log.warning("CallRail 429: account paused", extra={"account": account,
                                                           "seconds": round(paused, 1)})
        return _resubmit(rt, account, job, "429")
    if result.kind == "retryable":
        return _resubmit(rt, account, job, result.error or str(result.status))
    if result.kind == "permanent" or result.data is None:
        return _give_up(rt, job, f"CallRail answered {result.status}: {result.error or ''}")
    rt.guard.record_success(account)  # type: ignore[attr-defined]
    if kind == "recording":
        return _recording_done(rt, tenant, job, result.data)
    if kind == "count":
        rt.redis.hset(run_key(job["run"]), mapping={
            "total": int(result.data["total_records"]), "counted": 1})
        return "counted"
    return _page_done(rt, tenant, account, job, result.data)


def _recording_done(rt: Runtime, tenant: Tenant, job: dict[str, Any],
                    data: dict[str, Any]) -> str:
    url = data.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        return _give_up(rt, job, "CallRail recording.json had no usable url")
    rt.calls.set_resolved(tenant.slug, "callrail", job["call_id"], job["api_url"], url)
    requeue_event(rt, job["event_id"], "recording resolved")
    return "resolved"


def requeue_event(rt: Runtime, event_id: str, note: str) -> None:
    from rilla_bridge.taskqueue import QUEUE_EVENTS, process_event_message

    with rt.redis.pipeline() as pipe:
        pipe.zadd(keys.PENDING, {event_id: time.time()})
        pipe.hset(keys.event_key(event_id), "status", "queued")
        pipe.rpush(keys.timeline_key(event_id), timeline_entry("queued", note=note))
        pipe.lpush(QUEUE_EVENTS, process_event_message(event_id))
        pipe.execute()


def _page_done(rt: Runtime, tenant: Tenant, account: str, job: dict[str, Any],
               data: dict[str, Any]) -> str:
    calls = data.get("calls") or []
    fed = 0
    lane = job.get("lane", "reconcile")
    for call in calls:
        cid = call.get("id") if isinstance(call, dict) else None
        if not isinstance(cid, str) or not cid:
            continue
        # A webhook (or an earlier run) already brought this call: never deliver it twice.
        if rt.redis.exists(keys.call_key(tenant.slug, "callrail", cid)):
            continue
        stored = rt.store.intake(
            source="callrail", tenant=tenant.slug, kind="api_call",
            body=json.dumps(call, sort_keys=True).encode(), call_id=cid,
            extra={"lane": lane, "note": f"found by {lane} run {job.get('run')}"})
        fed += 0 if stored.duplicate else 1
    rk = run_key(job["run"])
    with rt.redis.pipeline() as pipe:
        pipe.hincrby(rk, "pages", 1)
        pipe.hincrby(rk, "seen", len(calls))
        pipe.hincrby(rk, "fed", fed)
        pipe.expire(rk, RUN_TTL)
        pipe.execute()
    if data.get("has_next_page") and data.get("next_page"):
        nxt = {k: v for k, v in job.items() if k not in ("lane", "granted_at", "tries")}
        nxt["page_url"] = data["next_page"]
        rt.guard.submit(account, lane, nxt, front=True)  # type: ignore[attr-defined]
    else:
        rt.redis.hset(rk, "done", 1)
    return f"page: {len(calls)} calls, {fed} new"


def start_run(client: redis.Redis, guard: QuotaGuard, tenant: Tenant, lane: str,
              start: datetime, end: datetime, *, count_first: bool = False) -> str:
    """Queue the first job of a reconciliation or backfill run; returns the run id."""
    assert tenant.callrail is not None and tenant.callrail.account_id
    run_id = f"{lane}-{tenant.slug}-{uuid.uuid4().hex[:10]}"
    window: dict[Any, Any] = {"start_date": start.isoformat(timespec="seconds"),
              "end_date": end.isoformat(timespec="seconds")}
    client.hset(run_key(run_id), mapping={"tenant": tenant.slug, "lane": lane,
                                           "started": time.time(), **window})
    client.expire(run_key(run_id), RUN_TTL)
    base = {"tenant": tenant.slug, "run": run_id, **window, "tries": 0}
    if count_first:
        guard.submit(tenant.callrail.account_id, lane, {"type": "count", **base})
    else:
        guard.submit(tenant.callrail.account_id, lane, {"type": "list", **base})
    return run_id


def estimate_requests(total_calls: int) -> tuple[int, int]:
    """(list pages, most recording lookups) a window of ``total_calls`` can cost."""
    return max(1, math.ceil(total_calls / 250)), total_calls


# -- scheduler jobs -----------------------------------------------------------------------
DISPATCH_EVERY = 0.25
DISPATCH_BATCH = 50
# Granted jobs not yet picked up by a worker: beyond this, dispatch waits for the workers
# (a grant must be used within the guard's margin, so granting ahead of them only wastes it).
DISPATCH_MAX_QUEUED = 200


def _take_and_send(rt: Runtime, guard: QuotaGuard, account: str) -> int:
    room = DISPATCH_MAX_QUEUED - int(rt.redis.llen(QUEUE_CALLRAIL))
    jobs = guard.take(account, max_jobs=min(DISPATCH_BATCH, room)) if room > 0 else []
    if not jobs:
        return 0
    with rt.redis.pipeline(transaction=False) as pipe:
        for job in jobs:
            pipe.lpush(QUEUE_CALLRAIL, task_message(TASK_CALLRAIL_JOB, [job], QUEUE_CALLRAIL))
        pipe.execute()
    return len(jobs)


def dispatch(rt: Runtime) -> int:
    """Hand granted jobs to the callrail queue, as many as each account's budget allows.

    When an account's next grant falls before the next tick, wait for it here (at most one
    tick in all), so a backlog gets the budget the moment the window frees instead of up to a
    tick later.
    """
    guard: QuotaGuard = rt.guard  # type: ignore[attr-defined]
    sent = 0
    soon: list[tuple[float, str]] = []
    for account in guard.accounts_waiting():
        sent += _take_and_send(rt, guard, account)
        wait = guard.next_grant_in(account)
        if wait is not None and 0 < wait < DISPATCH_EVERY:
            soon.append((wait, account))
    deadline = time.monotonic() + DISPATCH_EVERY
    for wait, account in sorted(soon):
        delay = min(wait, deadline - time.monotonic())
        if delay < wait:
            break
        time.sleep(delay + 0.002)
        sent += _take_and_send(rt, guard, account)
    return sent


def reconcile(rt: Runtime) -> int:
    """Start a reconciliation run per API-enabled tenant once per RECONCILE_INTERVAL."""
    started = 0
    s = rt.settings
    for tenant in rt.tenants.values():
        cr = tenant.callrail
        if cr is None or not cr.api_enabled:
            continue
        if not rt.redis.set(f"rb:recon:{tenant.slug}", 1, nx=True,
                            ex=max(1, s.reconcile_interval_seconds)):
            continue
        end = datetime.now(UTC) - timedelta(seconds=s.reconcile_settle_seconds)
        start_run(rt.redis, rt.guard, tenant, "reconcile",  # type: ignore[attr-defined]
                  end - timedelta(seconds=s.reconcile_lookback_seconds), end)
        started += 1
    return started


def scheduled_jobs() -> list[tuple[str, float, Any]]:
    return [("callrail_dispatch", DISPATCH_EVERY, dispatch), ("reconcile", 5.0, reconcile)]
