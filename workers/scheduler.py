"""The scheduler process (Procfile ``scheduler``): periodic work, safe to run several copies.

Each job takes a short Redis lock per tick so one copy runs it; the moves themselves are
atomic Lua scripts, so even two copies running a tick at once queue each event only once.

- due retries: events whose retry time has come go back on the ``events`` queue;
- lost-work sweep: an event still pending long after it was queued, and older than every
  message still waiting in the queue, is queued again (delivery is idempotent);
- CallRail dispatch and reconciliation (see workers/callrail_jobs.py).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import redis

from rilla_bridge import redis_conn as keys
from rilla_bridge.taskqueue import QUEUE_EVENTS, queued_at
from workers.pipeline import Runtime

log = logging.getLogger("rilla_bridge.scheduler")


@dataclass
class Job:
    name: str
    every: float
    run: Callable[[Runtime], int]
    next_at: float = 0.0


def move_due_retries(rt: Runtime) -> int:
    return rt.calls.requeue_due(keys.RETRY, time.time())


def sweep_lost(rt: Runtime) -> int:
    """Re-queue pending events that no queue message and no worker holds any more."""
    threshold = time.time() - rt.settings.stale_pending_seconds
    oldest = rt.redis.lindex(QUEUE_EVENTS, -1)
    if oldest is not None:
        at = queued_at(oldest)
        # Events behind a backlog are still queued; only those older than it can be lost.
        threshold = min(threshold, (at if at is not None else 0) - 1)
    moved = rt.calls.requeue_due(keys.PENDING, threshold)
    if moved:
        log.warning("re-queued lost events", extra={"count": moved})
    return moved


def default_jobs() -> list[Job]:
    from workers import callrail_jobs

    return [
        Job("retries", 0.5, move_due_retries),
        Job("sweep", 10.0, sweep_lost),
        *[Job(name, every, fn) for name, every, fn in callrail_jobs.scheduled_jobs()],
    ]


def tick(rt: Runtime, jobs: list[Job], node: str) -> None:
    now = time.monotonic()
    for job in jobs:
        if now < job.next_at:
            continue
        job.next_at = now + job.every
        lock = f"rb:sched:{job.name}"
        try:
            if not rt.redis.set(lock, node, nx=True, px=max(100, int(job.every * 900))):
                continue
            job.run(rt)
        except redis.RedisError as exc:
            log.warning("scheduler job failed", extra={"job": job.name, "error": repr(exc)})
        except Exception:
            log.exception("scheduler job crashed", extra={"job": job.name})


def run_forever(rt: Runtime, jobs: list[Job] | None = None, interval: float = 0.1) -> None:
    import os
    import socket

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
        time.sleep(interval)
    log.info("scheduler stopped")
