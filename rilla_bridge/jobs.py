"""Bulk actions on dead letters: planned, confirmed, then run in the background.

An operator (console or admin API) asks for a replay or delete of a selection (some ids, a
group, a filter); ``plan`` writes a ``jobs`` row with what it would touch (how many, which
tenants, a sample) and nothing else happens until ``confirm``. The scheduler process's
``JobRunner`` thread takes confirmed jobs one at a time, runs them through
``Operations.replay`` / ``delete`` (replays at the bulk pace of the tenants' bulk lanes), writes
its progress to the row every second and stops between two events when ``cancel`` is set.
A web request never runs a job. A runner that stopped mid-job (a restart) leaves a row whose
heartbeat goes stale: the next runner takes it over, and the dead letters already replayed
are no longer open (or carry a replay marker), so nothing runs twice.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from rilla_bridge.clock import Clock
from rilla_bridge.history import queries
from rilla_bridge.history.db import reading, writing
from rilla_bridge.history.models import jobs
from rilla_bridge.history.queries import DeadLetterFilter

if TYPE_CHECKING:
    from rilla_bridge.operations import Operations

log = logging.getLogger("rilla_bridge.jobs")

ACTIONS = ("replay", "delete")
ACTIVE = ("planned", "queued", "running")
STALE_SECONDS = 60.0        # a running job whose heartbeat is older was left by a dead runner
MAX_IDS = 1000              # ids one selection may name
MAX_SELECTED = 200_000      # dead letters one job may touch
SAMPLE = 5


class JobError(ValueError):
    """A plan that cannot be made, or a job that is not in the state the action needs."""


def selection_filter(selection: dict[str, Any]) -> DeadLetterFilter | None:
    """The filter a selection names (None: it names ids). Raises JobError when it is bad."""
    if "ids" in selection:
        ids = selection["ids"]
        if not isinstance(ids, list) or not ids or len(ids) > MAX_IDS or not all(
                isinstance(i, str) and i for i in ids):
            raise JobError(f"ids must be a list of 1 to {MAX_IDS} event ids")
        return None
    if "group" in selection:
        g = selection["group"] or {}
        if not isinstance(g, dict) or not g.get("tenant") or not g.get("reason_code"):
            raise JobError("group needs tenant and reason_code (and status_code, or null)")
        status = g.get("status_code")
        try:
            code = None if status in (None, "", "none") else int(status)
        except (TypeError, ValueError):
            raise JobError("group status_code must be a number or null") from None
        return DeadLetterFilter(group=(str(g["tenant"]), str(g["reason_code"]), code))
    f = selection.get("filter")
    if not isinstance(f, dict):
        raise JobError("a selection is {\"ids\": [...]}, {\"group\": {...}} or "
                       "{\"filter\": {tenant, source, reason}}")
    return DeadLetterFilter(tenant=f.get("tenant") or None, source=f.get("source") or None,
                            reason=f.get("reason") or None)


def selected_letters(engine: Engine, selection: dict[str, Any], limit: int = MAX_SELECTED
                     ) -> Iterator[dict[str, Any]]:
    """The open dead letters a selection names, oldest failure first, page by page (each
    page its own short read transaction)."""
    f = selection_filter(selection)
    if f is None:
        with reading(engine) as conn:
            for event_id in list(dict.fromkeys(selection["ids"]))[:limit]:
                found = queries.dead_letter(conn, event_id)
                if found is not None and found.get("handled_at") is None:
                    found.pop("body", None)
                    yield found
        return
    cursor: str | None = None
    seen = 0
    while seen < limit:
        with reading(engine) as conn:
            page = queries.dead_letters_page(conn, f, limit=min(queries.MAX_LIMIT,
                                                                limit - seen), after=cursor)
        yield from page.rows
        seen += len(page.rows)
        cursor = page.next
        if cursor is None:
            return


def plan(engine: Engine, clock: Clock, action: str, selection: dict[str, Any],
         actor: str) -> dict[str, Any]:
    """Write a planned job: how many open dead letters it would touch, per tenant, and a
    sample. Nothing runs until ``confirm``."""
    if action not in ACTIONS:
        raise JobError(f"action must be one of {', '.join(ACTIONS)}")
    f = selection_filter(selection)
    if f is None:
        rows = list(selected_letters(engine, selection))
        per_tenant: dict[str, int] = {}
        for r in rows:
            per_tenant[r["tenant"]] = per_tenant.get(r["tenant"], 0) + 1
        sample = rows[:SAMPLE]
    else:
        with reading(engine) as conn:
            per_tenant = queries.dead_letters_count(conn, f, MAX_SELECTED)
            sample = queries.dead_letters_page(conn, f, limit=SAMPLE).rows
    total = sum(per_tenant.values())
    job = {"id": "job_" + secrets.token_hex(8), "action": action, "actor": actor,
           "selection": selection, "status": "planned", "total": total, "done": 0,
           "processed": 0, "note": None, "cancel": False, "runner": None,
           "created_at": clock.now(), "confirmed_at": None, "started_at": None,
           "heartbeat_at": None, "finished_at": None}
    with writing(engine) as conn:
        conn.execute(jobs.insert().values(**job))
    return {**job, "tenants": per_tenant,
            "sample": [{k: r.get(k) for k in ("event_id", "tenant", "source", "reason_code",
                                              "reason", "status_code", "failed_at")}
                       for r in sample]}


def get(engine: Engine, job_id: str) -> dict[str, Any] | None:
    with reading(engine) as conn:
        row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).mappings().first()
    return dict(row) if row is not None else None


def recent(engine: Engine, limit: int = 20) -> list[dict[str, Any]]:
    with reading(engine) as conn:
        return [dict(r) for r in conn.execute(
            sa.select(jobs).order_by(jobs.c.created_at.desc()).limit(
                max(1, min(limit, 200)))).mappings()]


def _transition(engine: Engine, job_id: str, from_: tuple[str, ...], **values: Any) -> bool:
    with writing(engine) as conn:
        done = conn.execute(jobs.update().where(jobs.c.id == job_id,
                                                jobs.c.status.in_(from_)).values(**values))
    return bool(done.rowcount)


def confirm(engine: Engine, clock: Clock, job_id: str) -> dict[str, Any]:
    """A planned job goes to the runner's queue."""
    if not _transition(engine, job_id, ("planned",), status="queued",
                       confirmed_at=clock.now()):
        raise JobError(f"job {job_id} is not a planned job")
    return get(engine, job_id) or {}


def cancel(engine: Engine, clock: Clock, job_id: str) -> dict[str, Any]:
    """Cancel a job: one not started yet at once; a running one stops before its next
    event (the runner reads the flag)."""
    if not (_transition(engine, job_id, ("planned", "queued"), status="cancelled",
                        cancel=True, finished_at=clock.now())
            or _transition(engine, job_id, ("running",), cancel=True)):
        raise JobError(f"job {job_id} is finished or unknown")
    return get(engine, job_id) or {}


class JobRunner:
    """The scheduler process's job thread: one confirmed job at a time."""

    def __init__(self, ops: Operations, engine: Engine, clock: Clock,
                 name: str | None = None, poll_seconds: float = 1.0) -> None:
        self.ops = ops
        self.engine = engine
        self.clock = clock
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def claim(self) -> dict[str, Any] | None:
        """Take the oldest queued job, or a running one whose runner stopped."""
        now = self.clock.now()
        with reading(self.engine) as conn:
            candidates = conn.execute(
                sa.select(jobs.c.id, jobs.c.status).where(sa.or_(
                    jobs.c.status == "queued",
                    sa.and_(jobs.c.status == "running",
                            jobs.c.heartbeat_at < now - STALE_SECONDS)))
                .order_by(jobs.c.created_at).limit(5)).all()
        for job_id, status in candidates:
            stale = jobs.c.heartbeat_at < now - STALE_SECONDS
            with writing(self.engine) as conn:
                taken = conn.execute(jobs.update().where(
                    jobs.c.id == job_id, jobs.c.status == status,
                    *([stale] if status == "running" else [])).values(
                    status="running", runner=self.name, heartbeat_at=now,
                    started_at=sa.func.coalesce(jobs.c.started_at, now))).rowcount
            if taken:
                return get(self.engine, job_id)
        return None

    def run_once(self) -> dict[str, Any] | None:
        """Claim and run one job to its end; returns the finished row (None: no job)."""
        job = self.claim()
        if job is None:
            return None
        job_id = job["id"]
        last_beat = [self.clock.now()]
        cancelled_flag = [False]
        processed_so_far = [0]

        def beat(processed: int, done: int | None = None) -> None:
            processed_so_far[0] = processed
            now = self.clock.now()
            if now - last_beat[0] < 1.0 and processed < job["total"]:
                return
            last_beat[0] = now
            values: dict[str, Any] = {"processed": processed, "heartbeat_at": now}
            if done is not None:
                values["done"] = done
            with writing(self.engine) as conn:
                conn.execute(jobs.update().where(jobs.c.id == job_id).values(**values))
                cancelled_flag[0] = bool(conn.execute(
                    sa.select(jobs.c.cancel).where(jobs.c.id == job_id)).scalar())

        try:
            ids = [str(r["event_id"]) for r in selected_letters(self.engine, job["selection"])]
            if job["action"] == "replay":
                def cancelled() -> bool:
                    # Also while a replay waits for room in a lane: the heartbeat goes on
                    # (no other copy takes the job over) and a cancel is seen within 1 s.
                    beat(processed_so_far[0])
                    return cancelled_flag[0]

                result = self.ops.replay(ids, job["actor"], progress=beat,
                                         cancelled=cancelled, job=job_id)
            else:
                result = self.ops.delete(ids, job["actor"], job=job_id)
            left = [why for _, why in result.left]
            status = "cancelled" if "cancelled" in left else "done"
            note = f"{len(left)} left: {left[0]}" if left else None
            values = {"status": status, "done": result.done, "processed": len(ids),
                      "note": note, "finished_at": self.clock.now(),
                      "heartbeat_at": self.clock.now()}
        except Exception as exc:
            log.exception("bulk job failed", extra={"job": job_id})
            values = {"status": "failed", "note": f"{type(exc).__name__}",
                      "finished_at": self.clock.now()}
        with writing(self.engine) as conn:
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(**values))
        return get(self.engine, job_id)

    def loop(self) -> None:
        quiet_until = 0.0
        while not self._stop.is_set():
            try:
                if self.run_once() is not None:
                    continue
            except Exception as exc:
                # The history database down, or not migrated yet: say so once a minute, not
                # once a poll.
                if self.clock.now() >= quiet_until:
                    log.warning("job runner: cannot read the jobs table (retrying)",
                                extra={"error": type(exc).__name__})
                    quiet_until = self.clock.now() + 60
            self._stop.wait(self.poll_seconds)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.loop, name="jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
