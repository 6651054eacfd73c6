"""What an operator does: the one service layer the command line, the console and the admin
API call (none re-implements another). Reads come from the history database; actions go
through ``rilla_bridge.lifecycle`` (which records them in history and the audit log).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from rilla_bridge import keys
from rilla_bridge.clock import Clock
from rilla_bridge.history import queries
from rilla_bridge.history.db import reading, writing
from rilla_bridge.history.models import calls as call_states
from rilla_bridge.history.models import dead_letters, events, timeline
from rilla_bridge.lifecycle import Lifecycle, dedup_digest, make_lifecycle
from rilla_bridge.providers import SOURCES
from rilla_bridge.settings import Settings
from rilla_bridge.tenants import Tenant

# A bulk replay feeds a tenant's bulk lane only while it holds fewer than this many seconds
# of work at the bulk pace: Redis holds what is about to run, history holds the rest.
FEED_AHEAD_SECONDS = 4.0


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

    # -- dead letters ------------------------------------------------------------------------
    def replay(self, event_ids: Iterable[str], actor: str, *,
               progress: Callable[[int], None] | None = None,
               cancelled: Callable[[], bool] | None = None) -> BulkResult:
        """Run dead letters again from their raw events, with today's tenants file, through
        their tenants' bulk lanes (paced, live events first). Feeds each lane only a few
        seconds ahead, so a replay of thousands never fills Redis with their bodies."""
        out = BulkResult()
        ids = list(event_ids)
        for n, event_id in enumerate(ids, 1):
            if cancelled and cancelled():
                out.left += [(i, "cancelled") for i in ids[n - 1:]]
                break
            with reading(self.engine, 10.0) as conn:
                found = queries.event(conn, event_id, with_body=True)
            why = self._unreplayable(found)
            if why is None and found is not None:
                record = dict(found["event"])
                record["body"] = bytes(record["body"])
                self._wait_for_room(str(record["tenant"]))
                if self.lifecycle.replay(record, actor):
                    out.done += 1
                else:
                    why = "in progress, or replayed within the hour"
            if why is not None:
                out.left.append((event_id, why))
            if progress:
                progress(n)
        self.lifecycle.audit(actor, "dlq.replay", {"ids": ids[:100], "count": len(ids)},
                             out.done)
        return out

    @staticmethod
    def _unreplayable(found: Mapping[str, Any] | None) -> str | None:
        if found is None:
            return "no such event in history"
        if not any(d.get("handled_at") is None for d in found.get("dead_letters") or []):
            return "not an open dead letter (replayed or deleted already?)"
        if not found["event"].get("body"):
            return "its raw body was not kept (a lead event)"
        return None

    def _wait_for_room(self, tenant: str) -> None:
        ahead = max(10, int(self.settings.bulk_rate_per_second * FEED_AHEAD_SECONDS))
        while self.redis.llen(keys.bulk_lane(tenant)) >= ahead:
            time.sleep(0.2)

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

    def delete(self, event_ids: Iterable[str], actor: str) -> BulkResult:
        """Close dead letters without running them (history keeps the events)."""
        ids = list(event_ids)
        done = self.lifecycle.delete_dead_letters(ids, actor)
        self.lifecycle.audit(actor, "dlq.delete", {"ids": ids[:100], "count": len(ids)}, done)
        return BulkResult(done=done)

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
                pipe.hdel(keys.LAST_WEBHOOK, *(f"{tenant}|{src}" for src in SOURCES))
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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
