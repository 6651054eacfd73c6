"""What an operator does: the one service layer the command line, the console and the admin
API call (none re-implements another). Reads come from the history database; actions go
through ``rilla_bridge.lifecycle`` (which records them in history and the audit log).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from rilla_bridge import jobs, keys
from rilla_bridge.celery_messages import QUEUE_CALLRAIL, QUEUE_EVENTS
from rilla_bridge.clock import Clock
from rilla_bridge.history import overview, queries
from rilla_bridge.history.db import reading, writing
from rilla_bridge.history.models import calls as call_states
from rilla_bridge.history.models import dead_letters, events, timeline
from rilla_bridge.lifecycle import Lifecycle, dedup_digest, make_lifecycle
from rilla_bridge.observability import FILTERED, redact_text
from rilla_bridge.providers import SOURCES
from rilla_bridge.quota import QuotaGuard
from rilla_bridge.settings import Settings
from rilla_bridge.tenants import Tenant, mask

# A bulk replay feeds a tenant's bulk lane only while it holds fewer than this many seconds
# of work at the bulk pace: Redis holds what is about to run, history holds the rest.
FEED_AHEAD_SECONDS = 4.0
# Dead letters one export may hold (about 20 MB of JSON Lines): larger selections are
# exported a group or a tenant at a time.
EXPORT_MAX = 10_000
OVERVIEW_CACHE_SECONDS = 10.0
# The scheduler publishes the overview every OVERVIEW_CACHE_SECONDS; a web process uses the
# published one while it is younger than this, and computes its own only when it is older
# (the scheduler stopped): the ~150 ms of SQL and Python an overview takes at 200,000 events
# then stay out of the process that answers webhooks.
OVERVIEW_FRESH_SECONDS = 30.0
REPLAY_BATCH = 100   # dead letters a replay reads from history per round trip
T = TypeVar("T")
SILENT_MIN_SECONDS = 2 * 3600


@dataclass
class BulkResult:
    """What a bulk action did: how many, and why the others were left."""

    done: int = 0
    left: list[tuple[str, str]] = field(default_factory=list)   # (event id, why)


class Operations:
    def __init__(self, settings: Settings, client: redis.Redis, engine: Engine, clock: Clock,
                 tenants: Mapping[str, Tenant], lifecycle: Lifecycle | None = None) -> None:
        self.settings = settings
        self.redis = client
        self.engine = engine
        self.clock = clock
        self.tenants = tenants
        self.lifecycle = lifecycle or make_lifecycle(client, clock, settings, tenants)
        self._overview_cache: tuple[float, dict[str, Any]] | None = None

    # -- dead letters ------------------------------------------------------------------------
    def replay(self, event_ids: Iterable[str], actor: str, *,
               progress: Callable[[int], None] | None = None,
               cancelled: Callable[[], bool] | None = None, job: str | None = None
               ) -> BulkResult:
        """Run dead letters again from their raw events, with today's tenants file, through
        their tenants' bulk lanes (paced, live events first). Feeds each lane only a few
        seconds ahead, so a replay of thousands never fills Redis with their bodies."""
        out = BulkResult()
        ids = list(event_ids)
        n = 0
        for start in range(0, len(ids), REPLAY_BATCH):
            chunk = ids[start:start + REPLAY_BATCH]
            found = self._replay_records(chunk)
            for event_id in chunk:
                if cancelled and cancelled():
                    out.left += [(i, "cancelled") for i in ids[n:]]
                    self.lifecycle.audit(actor, "dlq.replay", _selection(ids, job), out.done)
                    return out
                n += 1
                record = found.get(event_id)
                why = self._unreplayable(record)
                if why is None and record is not None:
                    if not self._wait_for_room(str(record["tenant"]), cancelled):
                        out.left += [(i, "cancelled") for i in ids[n - 1:]]
                        self.lifecycle.audit(actor, "dlq.replay", _selection(ids, job),
                                             out.done)
                        return out
                    if self.lifecycle.replay(record, actor):
                        out.done += 1
                    else:
                        why = "in progress, or replayed within the hour"
                if why is not None:
                    out.left.append((event_id, why))
                if progress:
                    progress(n)
        self.lifecycle.audit(actor, "dlq.replay", _selection(ids, job), out.done)
        return out

    def _replay_records(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """What a replay needs of each event, ``REPLAY_BATCH`` at a time in two indexed
        queries (not one ``queries.event`` each): its record with the raw body, and
        ``open`` when it has an open dead letter."""
        cols = [events.c[c] for c in ("id", "tenant", "source", "kind", "call_id",
                                      "received_at", "body")]
        with reading(self.engine, 10.0) as conn:
            rows = {r["id"]: dict(r) for r in conn.execute(
                sa.select(*cols).where(events.c.id.in_(ids))).mappings()}
            open_ids = set(conn.execute(sa.select(dead_letters.c.event_id).where(
                dead_letters.c.event_id.in_(ids), dead_letters.c.handled_at.is_(None)))
                .scalars())
        for event_id, row in rows.items():
            row["open"] = event_id in open_ids
            row["body"] = bytes(row["body"]) if row["body"] is not None else None
        return rows

    @staticmethod
    def _unreplayable(record: Mapping[str, Any] | None) -> str | None:
        if record is None:
            return "no such event in history"
        if not record.get("open"):
            return "not an open dead letter (replayed or deleted already?)"
        if not record.get("body"):
            return "its raw body was not kept (a lead event)"
        return None

    def _wait_for_room(self, tenant: str, cancelled: Callable[[], bool] | None) -> bool:
        """Wait while the tenant's bulk lane holds a few seconds of work; False when the
        replay is cancelled meanwhile. A paused tenant's lane does not drain: its replay
        is queued at once and waits durably in the lane for the resume."""
        ahead = max(10, int(self.settings.bulk_rate_per_second * FEED_AHEAD_SECONDS))
        while self.redis.llen(keys.bulk_lane(tenant)) >= ahead:
            if self.redis.sismember(keys.PAUSED, tenant):
                return True
            if cancelled and cancelled():
                return False
            time.sleep(0.2)
        return True

    def outcome(self, event_id: str, since: float) -> tuple[str, str]:
        """Where an event run again at ``since`` stands: ``pending`` (in progress, or history
        not written yet), ``delivered``, ``skipped`` or ``dead`` (failed again), with the
        reason."""
        if self.redis.exists(keys.event(event_id)):
            return "pending", ""
        with reading(self.engine, 10.0) as conn:
            found = queries.event(conn, event_id)
        if found is None:
            return "pending", ""
        status = str(found["event"].get("status") or "")
        reason = str(found["event"].get("reason") or "")
        if status in ("delivered", "skipped"):
            return status, reason
        again = [d for d in found.get("dead_letters") or []
                 if d.get("handled_at") is None and float(d.get("failed_at") or 0) >= since]
        if again:
            d = again[-1]
            return "dead", f"{d.get('reason_code')}: {d.get('reason')}"
        return "pending", ""

    def delete(self, event_ids: Iterable[str], actor: str, job: str | None = None
               ) -> BulkResult:
        """Close dead letters without running them (history keeps the events)."""
        ids = list(event_ids)
        done = self.lifecycle.delete_dead_letters(ids, actor)
        self.lifecycle.audit(actor, "dlq.delete", _selection(ids, job), done)
        return BulkResult(done=done)

    def redeliver(self, event_id: str, actor: str) -> str:
        """Deliver one event again now: a retry waiting goes to the head of its lane; a
        finished event (delivered, skipped, dead) runs again from its raw body with today's
        tenants file. Returns what was done, for the operator."""
        tenant = self.redis.hget(keys.event(event_id), "tenant")
        if tenant is not None:
            done = self.lifecycle.requeue(event_id, _text(tenant), f"retry now by {actor}")
            what = ("queued now" if done else
                    "already queued or being delivered (nothing to do)")
        else:
            with reading(self.engine) as conn:
                found = queries.event(conn, event_id, with_body=True)
            if found is None:
                raise LookupError(f"no event {event_id}")
            record = dict(found["event"])
            if not record.get("body"):
                what = "its raw body was not kept (a lead event): nothing to deliver"
            else:
                record["body"] = bytes(record["body"])
                what = ("queued again from its raw event" if self.lifecycle.replay(record, actor)
                        else "refused: in progress, or replayed within the hour")
        self.lifecycle.audit(actor, "event.redeliver", {"ids": [event_id]},
                             0 if what.startswith(("already", "its", "refused")) else 1, what)
        return what

    def retry_event_now(self, event_id: str, actor: str) -> bool:
        """One scheduled retry goes to the head of its tenant's lane now."""
        tenant = self.redis.hget(keys.event(event_id), "tenant")
        done = tenant is not None and self.lifecycle.requeue(
            event_id, _text(tenant), f"retry now by {actor}")
        self.lifecycle.audit(actor, "retry.now", {"ids": [event_id]}, int(done))
        return bool(done)

    # -- waiting retries ---------------------------------------------------------------------
    def retries(self, tenant: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Events waiting in a retry set, soonest due first: id, tenant, lane (live/bulk),
        due_at, attempts, kind, source, last status."""
        sets = [(t, lane, key) for t in self._tenants(tenant)
                for lane, key in (("live", keys.retry(t)), ("bulk", keys.bulk_retry(t)))]
        with self.redis.pipeline(transaction=False) as pipe:
            for _, _, key in sets:
                pipe.zrange(key, 0, limit - 1, withscores=True)
            replies = pipe.execute()
        rows: list[dict[str, Any]] = [
            {"id": _text(eid), "tenant": t, "lane": lane, "due_at": float(due)}
            for (t, lane, _), got in zip(sets, replies, strict=True) for eid, due in got]
        rows.sort(key=lambda r: float(r["due_at"]))
        rows = rows[:limit]
        with self.redis.pipeline(transaction=False) as pipe:
            for r in rows:
                pipe.hmget(keys.event(r["id"]), "attempts", "kind", "source", "status")
            details = pipe.execute()
        for r, (attempts, kind, source, status) in zip(rows, details, strict=True):
            r.update(attempts=int(attempts or 0), kind=_text(kind or b""),
                     source=_text(source or b""), status=_text(status or b""))
        return rows

    def retry_now(self, actor: str, tenant: str | None = None, *, rate: float | None = None,
                  progress: Callable[[int], None] | None = None) -> BulkResult:
        """Every waiting retry (of ``tenant``, or all) goes back to the head of its lane now,
        at most ``rate`` a second (default BULK_RATE_PER_SECOND), so a Rilla that just came
        back is not hit by the whole backlog at once; the lanes' slots and turns pace the
        rest. Audit-logged."""
        rate = rate or self.settings.bulk_rate_per_second
        out = BulkResult()
        waiting = self.retries(tenant, limit=1_000_000)
        started = self.clock.now()
        for n, r in enumerate(waiting, 1):
            ahead = started + (n - 1) / rate - self.clock.now()
            if ahead > 0:
                self.clock.sleep(ahead)
            if self.lifecycle.requeue(r["id"], r["tenant"], f"retry now ({actor})"):
                out.done += 1
            else:
                out.left.append((r["id"], "no longer waiting (ran or finished meanwhile)"))
            if progress:
                progress(n)
        self.lifecycle.audit(actor, "retries.now", {"tenant": tenant, "count": len(waiting)},
                             out.done)
        return out

    # -- offboarding -------------------------------------------------------------------------
    def purge(self, tenant: str, actor: str, *, dry_run: bool = False) -> dict[str, int]:
        """Remove everything stored about ``tenant``: in Redis its lanes, retries, slots, events
        in progress (raw bodies), call states and locks, dedup keys (found from the bodies of
        its recent events: no SCAN of the keyspace), intake buckets; in SQL its events with
        their timelines, dead letters (open or not) and call states. Returns counts; with
        ``dry_run`` only counts. The audit log keeps a line saying it happened."""
        counts = self._purge_redis(tenant, dry_run)
        counts.update(self._purge_sql(tenant, dry_run))
        if not dry_run:
            self.lifecycle.audit(actor, "tenants.purge", {"tenant": tenant},
                                 counts["sql_events"], detail=" ".join(
                                     f"{k}={v}" for k, v in sorted(counts.items())))
        return counts

    def _purge_redis(self, tenant: str, dry_run: bool) -> dict[str, int]:
        r = self.redis
        ids = [_text(i) for i in r.zrange(keys.open_events(tenant), 0, -1)]
        for key in (keys.lane(tenant), keys.bulk_lane(tenant)):
            ids += [_text(i) for i in r.lrange(key, 0, -1)]
        for key in (keys.retry(tenant), keys.bulk_retry(tenant), keys.inflight(tenant)):
            ids += [_text(i) for i in r.zrange(key, 0, -1)]
        ids = sorted(set(ids))
        with r.pipeline(transaction=False) as pipe:
            for eid in ids:
                pipe.hmget(keys.event(eid), "source", "call_id", "body")
            live = [(eid, *row) for eid, row in zip(ids, pipe.execute(), strict=True)
                    if row[0] is not None]
        bodies = [(_text(src), bytes(body)) for _, src, _, body in live if body]
        calls = {(_text(src), _text(cid)) for _, src, cid, _ in live if cid}
        since = self.clock.now() - self.settings.dedup_window_seconds
        with reading(self.engine, 60.0) as conn:
            bodies += [(str(row.source), bytes(row.body)) for row in conn.execute(
                sa.select(events.c.source, events.c.body).where(
                    events.c.tenant == tenant, events.c.received_at >= since,
                    events.c.body.is_not(None)))]
            calls |= {(str(row.source), str(row.call_id)) for row in conn.execute(
                sa.select(events.c.source, events.c.call_id).distinct().where(
                    events.c.tenant == tenant, events.c.call_id.is_not(None)))}
            calls |= {(str(row.source), str(row.call_id)) for row in conn.execute(
                sa.select(call_states.c.source, call_states.c.call_id).where(
                    call_states.c.tenant == tenant))}
        groups = {
            "redis_events": [keys.event(eid) for eid, *_ in live],
            "dedup_keys": sorted({keys.dedup(dedup_digest(src, tenant, body))
                                  for src, body in bodies}),
            "call_states": [k for src, cid in sorted(calls)
                            for k in (keys.call(tenant, src, cid),
                                      keys.call_lock(tenant, src, cid))],
            "redis_keys": [keys.lane(tenant), keys.bulk_lane(tenant), keys.inflight(tenant),
                           keys.retry(tenant), keys.bulk_retry(tenant),
                           keys.open_events(tenant), keys.intake_limit(tenant),
                           keys.reconcile(tenant)],
        }
        counts: dict[str, int] = {}
        for name, names in groups.items():
            total = 0
            for i in range(0, len(names), 500):
                chunk = names[i:i + 500]
                total += int(r.exists(*chunk) if dry_run else r.delete(*chunk))
            counts[name] = total
        if not dry_run:
            with r.pipeline(transaction=True) as pipe:
                pipe.zrem(keys.READY, tenant)
                pipe.srem(keys.PAUSED, tenant)
                pipe.srem(keys.TENANTS, tenant)
                pipe.hdel(keys.LAST_WEBHOOK,
                          *(keys.last_webhook_field(tenant, src) for src in SOURCES))
                # Its counters (``lifecycle.stats_fields``: each field ends in ``|tenant``),
                # or /metrics would list the client for ever.
                suffix = f"|{tenant}"
                theirs = [f for f in r.hkeys(keys.STATS) if _text(f).endswith(suffix)]
                if theirs:
                    pipe.hdel(keys.STATS, *theirs)
                pipe.execute()
        return counts

    def _purge_sql(self, tenant: str, dry_run: bool) -> dict[str, int]:
        ids_of = sa.select(events.c.id).where(events.c.tenant == tenant)
        if dry_run:
            with reading(self.engine, 60.0) as conn:
                def count(q: Any) -> int:
                    return int(conn.execute(sa.select(sa.func.count()).select_from(
                        q.subquery())).scalar_one())

                return {
                    "sql_events": count(ids_of),
                    "timeline": count(sa.select(timeline.c.record).where(
                        timeline.c.event_id.in_(ids_of))),
                    "dead_letters": count(sa.select(dead_letters.c.id).where(
                        dead_letters.c.tenant == tenant)),
                    "calls": count(sa.select(call_states.c.call_id).where(
                        call_states.c.tenant == tenant))}
        out = {"sql_events": 0, "timeline": 0}
        while True:   # a thousand events a transaction: no long lock on a big tenant
            with writing(self.engine, 60.0) as conn:
                chunk = [row.id for row in conn.execute(ids_of.limit(1000))]
                if not chunk:
                    break
                out["timeline"] += conn.execute(
                    timeline.delete().where(timeline.c.event_id.in_(chunk))).rowcount
                out["sql_events"] += conn.execute(
                    events.delete().where(events.c.id.in_(chunk))).rowcount
        with writing(self.engine, 60.0) as conn:
            out["dead_letters"] = conn.execute(
                dead_letters.delete().where(dead_letters.c.tenant == tenant)).rowcount
            out["calls"] = conn.execute(call_states.delete().where(
                call_states.c.tenant == tenant)).rowcount
        return out

    def _tenants(self, tenant: str | None) -> list[str]:
        return [tenant] if tenant else self.lifecycle.lanes.all_tenants()

    # -- reads -------------------------------------------------------------------------------
    def events(self, f: queries.EventFilter, limit: int = 50, before: str | None = None
               ) -> queries.Page:
        with reading(self.engine) as conn:
            return queries.events_page(conn, f, limit, before, now=self.clock.now())

    def event_detail(self, event_id: str) -> dict[str, Any] | None:
        """One event for the console: record, timeline, dead letters, call state, same-call
        events, the raw event and the last payload as formatted JSON, secrets masked."""
        with reading(self.engine) as conn:
            found = queries.event(conn, event_id, with_body=True)
        if found is None:
            return None
        record = found["event"]
        body = record.pop("body", None)
        payload = record.pop("last_payload", None)
        found["raw"] = _pretty(bytes(body)) if body else None
        found["payload"] = _pretty(payload.encode()) if payload else None
        found["in_redis"] = bool(self.redis.exists(keys.event(event_id)))
        return masked(found)

    def dead_letter_groups(self) -> list[dict[str, Any]]:
        with reading(self.engine) as conn:
            return masked(queries.dead_letter_groups(conn))

    def dead_letters(self, f: queries.DeadLetterFilter, limit: int = 100,
                     after: str | None = None) -> queries.Page:
        with reading(self.engine) as conn:
            page = queries.dead_letters_page(conn, f, limit, after)
        return queries.Page(masked(page.rows), page.next)

    def export(self, selection: dict[str, Any], actor: str) -> Iterator[str]:
        """The selected open dead letters as JSON Lines (payload and Rilla's answer
        included, secrets masked), ``EXPORT_MAX`` at most: the web process builds the whole
        answer in memory, beside the webhooks it serves. Raises ``jobs.JobError`` for a bad
        selection."""
        f = jobs.selection_filter(selection)
        if f is None:
            count = len(set(selection["ids"]))   # at most: the open ones among them
        else:
            with reading(self.engine) as conn:
                count = sum(queries.dead_letters_count(conn, f, jobs.MAX_SELECTED).values())
        self.lifecycle.audit(actor, "dlq.export", selection, min(count, EXPORT_MAX))

        def lines() -> Iterator[str]:
            for row in jobs.selected_letters(self.engine, selection, EXPORT_MAX):
                yield json.dumps(masked(row), default=str) + "\n"
        return lines()

    def audit_log(self, limit: int = 100) -> list[dict[str, Any]]:
        with reading(self.engine) as conn:
            return masked(queries.audit(conn, limit))

    def _redis_state(self, tenants: list[str]) -> dict[str, Any]:
        now = self.clock.now()
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(QUEUE_EVENTS)
            pipe.llen(QUEUE_CALLRAIL)
            for t in tenants:
                pipe.llen(keys.lane(t))
                pipe.llen(keys.bulk_lane(t))
                pipe.zcount(keys.inflight(t), int(now * 1000), "+inf")
                pipe.zcard(keys.open_events(t))
                pipe.zrange(keys.open_events(t), 0, 0, withscores=True)
                pipe.zcard(keys.retry(t))
                pipe.zcard(keys.bulk_retry(t))
                pipe.zrange(keys.retry(t), 0, 0, withscores=True)
                pipe.zrange(keys.bulk_retry(t), 0, 0, withscores=True)
            q_events, q_callrail, *per = pipe.execute()
        out: dict[str, Any] = {"queues": {QUEUE_EVENTS: q_events, QUEUE_CALLRAIL: q_callrail},
                               "tenants": {}}
        for i, t in enumerate(tenants):
            (live, bulk, running, n_open, oldest, r_live, r_bulk, next_live,
             next_bulk) = per[9 * i: 9 * i + 9]
            nexts = [float(s) for _, s in [*next_live, *next_bulk]]
            out["tenants"][t] = {
                "waiting_live": live, "waiting_bulk": bulk, "in_flight": running,
                "unfinished": n_open,
                "oldest_pending_seconds": max(0.0, now - oldest[0][1]) if oldest else None,
                "retries_waiting": r_live + r_bulk,
                "next_retry_at": min(nexts) if nexts else None}
        return out

    def budgets(self) -> list[dict[str, Any]]:
        """CallRail budget used and left per account the tenants file names, and any pause."""
        accounts = sorted({t.callrail.account_id for t in self.tenants.values()
                           if t.callrail and t.callrail.api_enabled and t.callrail.account_id})
        guard = QuotaGuard.from_settings(self.settings, self.redis, self.lifecycle.scripts,
                                         self.clock)
        out = []
        for a in accounts:
            st = guard.status(a)
            out.append({k: st[k] for k in ("account", "hourly_limit", "daily_limit", "hour_used",
                                           "hour_left", "day_used", "day_left", "paused_until",
                                           "waiting")})
        return out

    def overview(self) -> dict[str, Any]:
        """The console's first page: per tenant and in total, last hour and day counts,
        queue depths, oldest pending, retries, CallRail budgets, silent tenants, and the
        per-minute series for the charts. The scheduler publishes it every
        ``OVERVIEW_CACHE_SECONDS`` (``publish_overview``) and each process keeps the one it
        read that long, so a room full of operators costs the database nothing; which
        tenants are paused is read fresh each time (one SMEMBERS): a pause or resume made
        through another web process shows at once."""
        result = self._overview()
        paused = sorted(_text(p) for p in self.redis.smembers(keys.PAUSED))
        return {**result, "paused": paused,
                "tenants": [{**r, "paused": r["tenant"] in paused} for r in result["tenants"]]}

    def _overview(self) -> dict[str, Any]:
        now = self.clock.now()
        cached = self._overview_cache
        if cached and 0 <= now - cached[0] < OVERVIEW_CACHE_SECONDS:
            return cached[1]
        result = self._published_overview(now)
        if result is None:
            result = self.publish_overview()
        self._overview_cache = (now, result)
        return result

    def publish_overview(self) -> dict[str, Any]:
        """Compute the overview and publish it in Redis for every web process (the
        scheduler's ``overview`` job, every ``OVERVIEW_CACHE_SECONDS``); returns it."""
        result = self._compute_overview()
        blob = zlib.compress(json.dumps(result, separators=(",", ":")).encode(), 1)
        # Redis refusing: the console still shows it; the next page computes again.
        with contextlib.suppress(redis.RedisError):
            self.redis.set(keys.OVERVIEW, blob, ex=int(OVERVIEW_FRESH_SECONDS * 2))
        return result

    def _published_overview(self, now: float) -> dict[str, Any] | None:
        try:
            blob = self.redis.get(keys.OVERVIEW)
            if not blob:
                return None
            result = json.loads(zlib.decompress(cast(bytes, blob)))
        except (redis.RedisError, zlib.error, ValueError):
            return None
        if not isinstance(result, dict) or not isinstance(result.get("now"), int | float):
            return None
        age = now - float(result["now"])
        return result if -OVERVIEW_CACHE_SECONDS < age < OVERVIEW_FRESH_SECONDS else None

    def _compute_overview(self) -> dict[str, Any]:
        now = self.clock.now()
        with reading(self.engine) as conn:
            series = overview.per_minute(conn, now)
            counts = overview.counts(series)
            tenants = sorted(set(self.tenants) | set(counts))
            last = {t: overview.last_received(conn, t) for t in tenants}
        state = self._redis_state(tenants)
        total = {w: dict.fromkeys(overview.COLUMNS, 0) for w in ("1h", "24h")}
        rows = []
        for t in tenants:
            c = counts.get(t) or {"1h": dict.fromkeys(overview.COLUMNS, 0),
                                  "24h": dict.fromkeys(overview.COLUMNS, 0)}
            for w in total:
                for k, n in c[w].items():
                    total[w][k] += n
            rows.append({"tenant": t, "configured": t in self.tenants, **c,
                         **state["tenants"].get(t, {}),
                         "last_received_at": last[t],
                         "silent": silence(now, last[t], c["24h"]["received"])})
        chart_series = {t: {k: v[k] for k in ("received", "delivered", "failed")}
                        for t, v in series.items()}
        result = {"now": now, "tenants": rows, "total": total, "queues": state["queues"],
                  "callrail": self.budgets(),
                  "chart": {"bucket_minutes": overview.BUCKET_MINUTES, "start": now - 86400,
                            "series": chart_series}}
        return result

    # -- tenants -----------------------------------------------------------------------------
    def webhook_urls(self, tenant: Tenant, base_url: str) -> dict[str, str]:
        """The URLs to paste into CallRail and Callingly, the Callingly token masked."""
        base = base_url.rstrip("/")
        out = {}
        if tenant.callrail:
            out["callrail"] = f"{base}/webhooks/callrail/{tenant.slug}"
        if tenant.callingly:
            out["callingly"] = (f"{base}/webhooks/callingly/{tenant.slug}?token="
                                f"****{tenant.callingly.webhook_tokens[0][-2:]}")
        return out

    def callingly_url(self, slug: str, base_url: str, actor: str) -> str:
        """The Callingly webhook URL with its token, for the operator who asked (audited)."""
        tenant = self.tenants.get(slug)
        if tenant is None or tenant.callingly is None:
            raise LookupError(f"tenant {slug} has no [callingly] section")
        self.lifecycle.audit(actor, "tenant.reveal_callingly_token", {"tenant": slug}, 1)
        return (f"{base_url.rstrip('/')}/webhooks/callingly/{slug}?token="
                f"{tenant.callingly.webhook_tokens[0]}")

    def tenants_info(self, base_url: str) -> list[dict[str, Any]]:
        """Per configured tenant: webhook URLs (masked), secrets masked, last webhook per
        source, last day's success rate, CallRail account, pause."""
        ov = {r["tenant"]: r for r in self.overview()["tenants"]}
        budgets = {b["account"]: b for b in self.budgets()}
        last = self._last_webhooks()
        out = []
        for slug, t in sorted(self.tenants.items()):
            day = (ov.get(slug) or {}).get("24h") or {}
            finished = int(day.get("delivered", 0)) + int(day.get("dead", 0))
            cr = t.callrail
            out.append({
                "tenant": slug, "paused": bool((ov.get(slug) or {}).get("paused")),
                "urls": self.webhook_urls(t, base_url),
                "rilla_api_key": mask(t.rilla_api_key),
                "callrail": None if cr is None else {
                    "signing_key": mask(cr.signing_keys), "account_id": cr.account_id,
                    "company_id": cr.company_id, "api_key": mask(cr.api_key),
                    "budget": budgets.get(cr.account_id or "")},
                "callingly": None if t.callingly is None else {
                    "webhook_token": mask(t.callingly.webhook_tokens)},
                "last_webhook": {src: last.get((slug, src)) for src in SOURCES},
                "success_rate_24h": (round(int(day.get("delivered", 0)) / finished, 4)
                                     if finished else None),
                "silent": (ov.get(slug) or {}).get("silent")})
        return out

    def _last_webhooks(self) -> dict[tuple[str, str], float | None]:
        """When each configured tenant's last webhook of each of its sources was taken: the
        intake script's ``rb:last_webhook`` (one HGETALL; the same as /metrics), and history's
        newest event for a configured source Redis has no time for (Redis lost its data, or
        the source never sent since it was configured): in steady state, no query at all."""
        seen: dict[tuple[str, str], float | None] = dict(
            keys.last_webhook_times(self.redis.hgetall(keys.LAST_WEBHOOK)))
        missing = [(slug, src) for slug, t in sorted(self.tenants.items())
                   for src, section in (("callrail", t.callrail), ("callingly", t.callingly))
                   if section is not None and (slug, src) not in seen]
        if missing:
            with reading(self.engine) as conn:
                for slug, src in missing:
                    seen[(slug, src)] = overview.last_received(conn, slug, src)
        return seen

    def pause(self, tenant: str, actor: str) -> None:
        """Stop delivering the tenant's events (they keep arriving and wait durably)."""
        self._known(tenant)
        self.lifecycle.lanes.pause(tenant)
        self.lifecycle.audit(actor, "tenant.pause", {"tenant": tenant}, 1)

    def resume(self, tenant: str, actor: str) -> int:
        """Deliver the tenant's events again; what waited drains through the lanes."""
        self._known(tenant)
        went = self.lifecycle.lanes.resume(tenant)
        self.lifecycle.audit(actor, "tenant.resume", {"tenant": tenant}, 1)
        return went

    def _known(self, tenant: str) -> None:
        if tenant not in self.tenants and tenant not in self.lifecycle.lanes.all_tenants():
            raise LookupError(f"no tenant {tenant}")

    # -- bulk jobs ---------------------------------------------------------------------------
    def plan(self, action: str, selection: dict[str, Any], actor: str) -> dict[str, Any]:
        job = jobs.plan(self.engine, self.clock, action, selection, actor)
        self.lifecycle.audit(actor, f"job.plan_{action}", {**selection, "job": job["id"]},
                             job["total"])
        return masked(job)

    def confirm(self, job_id: str, actor: str) -> dict[str, Any]:
        job = jobs.confirm(self.engine, self.clock, job_id)
        self.lifecycle.audit(actor, f"job.confirm_{job.get('action')}",
                             {**(job.get("selection") or {}), "job": job_id}, job.get("total") or 0)
        return job

    def cancel(self, job_id: str, actor: str) -> dict[str, Any]:
        job = jobs.cancel(self.engine, self.clock, job_id)
        self.lifecycle.audit(actor, "job.cancel", {"job": job_id}, job.get("processed") or 0)
        return job

    def job(self, job_id: str) -> dict[str, Any] | None:
        return jobs.get(self.engine, job_id)

    def jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        return jobs.recent(self.engine, limit)

    def sign_in(self, actor: str, address: str) -> None:
        self.lifecycle.audit(actor, "console.sign_in", {"address": address}, 1)


def _selection(ids: list[str], job: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"ids": ids[:100], "count": len(ids)}
    if job:
        out["job"] = job
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_SECRET_KEY = re.compile(r"(signature|token|api[-_]?key|authorization|secret|password|"
                         r"access_key|signing_key)", re.IGNORECASE)


def masked(value: T, key: str = "") -> T:
    """A deep copy for operators: values under secret-looking keys and every known secret,
    recording ``access_key`` and token in any text replaced by ``[Filtered]``."""
    return cast(T, _masked(value, key))


def _masked(value: Any, key: str = "") -> Any:
    if key and _SECRET_KEY.search(key) and isinstance(value, str | bytes):
        return FILTERED
    if isinstance(value, dict):
        return {k: _masked(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, bytes):
        return redact_text(value.decode("utf-8", "replace"))
    return value


def _pretty(raw: bytes) -> str:
    """A body as indented JSON with secrets masked (as text when it is not JSON)."""
    try:
        return json.dumps(masked(json.loads(raw)), indent=2, sort_keys=True, default=str)
    except ValueError:
        return redact_text(raw.decode("utf-8", "replace"))


def silence(now: float, last: float | None, received_24h: int) -> str | None:
    """Why a tenant looks silent, or None: nothing ever received; nothing for a day; or a
    gap much longer than its usual one (six of its last day's average gaps, two hours at
    least). CallRail disables a webhook that keeps failing: silence is how that shows."""
    if last is None:
        return "nothing received yet"
    quiet = now - last
    if received_24h == 0:
        return f"nothing for {quiet / 3600:.0f} h" if quiet >= 86400 else None
    usual = 86400 / received_24h
    if quiet > max(SILENT_MIN_SECONDS, 6 * usual):
        return f"nothing for {quiet / 3600:.1f} h (usually one every {usual / 60:.0f} min)"
    return None
