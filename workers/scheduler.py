"""The scheduler process (Procfile ``scheduler``): periodic work, safe to run several copies.

Each job takes a short Redis lease per tick so one copy runs it; the moves themselves are
atomic Lua scripts, so even two copies running a tick at once queue each event only once.

- due retries: events whose retry time has come go back on the ``events`` queue;
- lost-work sweep: an event still pending long after it was queued, and older than every
  message still waiting in the queue, is queued again (delivery is idempotent);
- CallRail dispatch and reconciliation (see workers/callrail_jobs.py).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import redis

from rilla_bridge import keys, leases
from rilla_bridge.celery_messages import QUEUE_EVENTS, queued_at
from workers import callrail_jobs
from workers.runtime import Runtime

log = logging.getLogger("rilla_bridge.scheduler")


@dataclass
class Job:
    name: str
    every: float
    run: Callable[[Runtime], int]
    next_at: float = 0.0


def move_due_retries(rt: Runtime) -> int:
    return rt.lifecycle.requeue_due(keys.RETRY, rt.clock.now())


def sweep_lost(rt: Runtime) -> int:
    """Re-queue pending events that no queue message and no worker holds any more."""
    threshold = rt.clock.now() - rt.settings.stale_pending_seconds
    oldest = rt.redis.lindex(QUEUE_EVENTS, -1)
    if oldest is not None:
        at = queued_at(oldest)
        # Events behind a backlog are still queued; only those older than it can be lost.
        threshold = min(threshold, (at if at is not None else 0) - 1)
    moved = rt.lifecycle.requeue_due(keys.PENDING, threshold)
    if moved:
        log.warning("re-queued lost events", extra={"count": moved})
    return moved


def default_jobs() -> list[Job]:
    return [
        Job("retries", 0.5, move_due_retries),
        Job("sweep", 10.0, sweep_lost),
        Job("callrail_dispatch", callrail_jobs.DISPATCH_EVERY, callrail_jobs.dispatch),
        Job("reconcile", 5.0, callrail_jobs.reconcile),
    ]


def tick(rt: Runtime, jobs: list[Job], node: str) -> None:
    """Run every job whose time has come, each in the copy that takes its lease."""
    now = rt.clock.now()
    for job in jobs:
        if now < job.next_at:
            continue
        job.next_at = now + job.every
        try:
            if not leases.take(rt.scripts, rt.clock, keys.scheduler_job(job.name), node,
                               job.every * 0.9):
                continue
            job.run(rt)
        except redis.RedisError as exc:
            log.warning("scheduler job failed", extra={"job": job.name, "error": repr(exc)})
        except Exception:
            log.exception("scheduler job crashed", extra={"job": job.name})


def run_forever(rt: Runtime, jobs: list[Job] | None = None, interval: float = 0.1) -> None:
    """The scheduler process's loop, until SIGTERM or SIGINT."""
    jobs = jobs or default_jobs()
    node = f"{socket.gethostname()}:{os.getpid()}"
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("scheduler started", extra={"jobs": [j.name for j in jobs]})
    while not stopping:
        tick(rt, jobs, node)
        rt.clock.sleep(interval)
    log.info("scheduler stopped")
