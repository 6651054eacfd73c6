"""CallRail API work: recording lookups, reconciliation and backfill, behind the quota guard.

Every job is exactly one CallRail request. Jobs wait in the guard's durable per-account lists
(rilla_bridge.quota); the scheduler's ``dispatch`` takes only as many as the
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
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import redis

from rilla_bridge import keys, leases
from rilla_bridge.celery_messages import QUEUE_CALLRAIL, TASK_CALLRAIL_JOB, task_message
from rilla_bridge.providers import callrail
from rilla_bridge.quota import QuotaGuard
from rilla_bridge.tenants import Tenant
from workers.runtime import Runtime

log = logging.getLogger("rilla_bridge.callrail")
MAX_JOB_TRIES = 8
LIST_FIELDS = ("agent_email", "call_type", "company_id", "company_name", "company_time_zone",
               "created_at", "source", "source_name", "tags", "note", "value", "lead_status",
               "first_call", "person_id", "customer_name", "customer_phone_number",
               "customer_city", "customer_state", "tracking_phone_number", "campaign",
               "spam")
RUN_TTL = 7 * 86400


def _resubmit(rt: Runtime, account: str, job: dict[str, Any], why: str) -> str:
    job["tries"] = int(job.get("tries", 0)) + 1
    if job["tries"] > MAX_JOB_TRIES:
        return _give_up(rt, job, f"CallRail kept failing ({why}) after {job['tries']} tries")
    lane = job.pop("lane", "live")
    job.pop("granted_at", None)
    rt.guard.submit(account, lane, job, front=True)
    return "resubmitted"


def _give_up(rt: Runtime, job: dict[str, Any], reason: str) -> str:
    if job.get("type") == "recording":
        rt.recordings.failed(job, reason)
    elif job.get("run"):
        rt.redis.hset(keys.run(job["run"]), mapping={"error": reason, "done": 1})
    log.warning("callrail job abandoned", extra={"type": job.get("type"), "reason": reason})
    return "abandoned"


def run(rt: Runtime, job: dict[str, Any]) -> str:
    """Run one granted job (one request); the Celery task ``rilla_bridge.callrail_job``."""
    tenant = rt.tenants.get(str(job.get("tenant")))
    if tenant is None or tenant.callrail is None or not tenant.callrail.api_enabled:
        return _give_up(rt, job, f"tenant {job.get('tenant')!r} has no CallRail API access")
    cr = tenant.callrail
    account, api_key = str(cr.account_id), str(cr.api_key)
    client = rt.callrail
    kind = job.get("type")
    guard = rt.guard
    late = guard.still_good(account, float(job.get("granted_at", 0)))
    if late is not None:
        # The grant stays counted (conservative); the job waits for a fresh one, first in line.
        lane = job.pop("lane", "live")
        job.pop("granted_at", None)
        guard.submit(account, lane, job, front=True)
        log.info("callrail job deferred", extra={"account": account, "why": late})
        return "deferred"
    if kind == "recording":
        parsed = callrail.recording_api_call(job["api_url"])
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
        paused = guard.pause(account)
        log.warning("CallRail 429: account paused", extra={"account": account,
                                                           "seconds": round(paused, 1)})
        return _resubmit(rt, account, job, "429")
    if result.kind == "retryable":
        return _resubmit(rt, account, job, result.error or str(result.status))
    if result.kind == "permanent" or result.data is None:
        return _give_up(rt, job, f"CallRail answered {result.status}: {result.error or ''}")
    guard.record_success(account)
    if kind == "recording":
        return _recording_done(rt, job, result.data)
    if kind == "count":
        rt.redis.hset(keys.run(job["run"]), mapping={
            "total": int(result.data["total_records"]), "counted": 1})
        return "counted"
    try:
        return _page_done(rt, tenant, account, job, result.data)
    except HistoryUnavailable as exc:
        # The page goes back through the guard (a repeat costs one request; its calls fed
        # already are answered as duplicates): the run finishes once history answers.
        return _resubmit(rt, account, job, str(exc))


def _recording_done(rt: Runtime, job: dict[str, Any], data: dict[str, Any]) -> str:
    url = data.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        return _give_up(rt, job, "CallRail recording.json had no usable url")
    rt.recordings.resolved(job, url)
    return "resolved"


class HistoryUnavailable(Exception):
    """The history database did not answer whether a call is known."""


def _known(rt: Runtime, tenant: str, call_id: str) -> bool:
    """Whether a webhook (or an earlier run) brought this call: in progress in Redis, or
    handed to history (the filter may say yes wrongly; history then says no)."""
    if rt.calls.in_redis(tenant, callrail.NAME, call_id):
        return True
    if not rt.calls.maybe_in_history(tenant, callrail.NAME, call_id):
        return False
    try:
        return rt.call_history(tenant, callrail.NAME, call_id) is not None
    except Exception as exc:  # the database's own errors vary by driver
        raise HistoryUnavailable(f"history database unavailable ({type(exc).__name__})"
                                 ) from exc


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
        if _known(rt, tenant.slug, cid):
            continue
        stored = rt.lifecycle.receive(
            source="callrail", tenant=tenant.slug, kind="api_call",
            body=json.dumps(call, sort_keys=True).encode(), call_id=cid, lane=lane,
            note=f"found by {lane} run {job.get('run')}")
        fed += 0 if stored.duplicate else 1
    rk = keys.run(job["run"])
    with rt.redis.pipeline() as pipe:
        pipe.hincrby(rk, "pages", 1)
        pipe.hincrby(rk, "seen", len(calls))
        pipe.hincrby(rk, "fed", fed)
        pipe.expire(rk, RUN_TTL)
        pipe.execute()
    if data.get("has_next_page") and data.get("next_page"):
        nxt = {k: v for k, v in job.items() if k not in ("lane", "granted_at", "tries")}
        nxt["page_url"] = data["next_page"]
        rt.guard.submit(account, lane, nxt, front=True)
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
    client.hset(keys.run(run_id), mapping={"tenant": tenant.slug, "lane": lane,
                                            "started": guard.clock.now(), **window})
    client.expire(keys.run(run_id), RUN_TTL)
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
    guard, clock = rt.guard, rt.clock
    sent = 0
    soon: list[tuple[float, str]] = []
    for account in guard.accounts_waiting():
        sent += _take_and_send(rt, guard, account)
        wait = guard.next_grant_in(account)
        if wait is not None and 0 < wait < DISPATCH_EVERY:
            soon.append((wait, account))
    deadline = clock.now() + DISPATCH_EVERY
    for wait, account in sorted(soon):
        delay = min(wait, deadline - clock.now())
        if delay < wait:
            break
        clock.sleep(delay + 0.002)
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
        if not leases.take(rt.scripts, rt.clock, keys.reconcile(tenant.slug), "reconcile",
                           max(1, s.reconcile_interval_seconds)):
            continue
        end = (datetime.fromtimestamp(rt.clock.now(), UTC)
               - timedelta(seconds=s.reconcile_settle_seconds))
        start_run(rt.redis, rt.guard, tenant, "reconcile",
                  end - timedelta(seconds=s.reconcile_lookback_seconds), end)
        started += 1
    return started


def scheduled_jobs() -> list[tuple[str, float, Any]]:
    return [("callrail_dispatch", DISPATCH_EVERY, dispatch), ("reconcile", 5.0, reconcile)]
