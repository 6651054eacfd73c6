"""The scheduler process (Procfile ``scheduler``): periodic work, safe to run several copies.

Each job takes a short Redis lease per tick so one copy runs it; the moves themselves are
atomic Lua scripts, so even two copies running a tick at once queue each event only once.

- lanes: retries whose time has come go back to the head of their tenant's lane, events whose
  lease lapsed (a dead worker's) too, and tenants waiting for room in Celery's queue are
  served in turn (``rilla_bridge.lanes``);
- CallRail dispatch and reconciliation (see workers/callrail_jobs.py);
- overview: the console's overview, computed every 10 s and published in Redis, so the web
  processes that answer webhooks do not run its queries (``Operations.publish_overview``);
- in a thread of its own, the bulk jobs operators confirmed in the console or the admin API
  (``rilla_bridge.jobs``): a paced replay of thousands never runs in a web request.
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
from rilla_bridge.history.db import make_engine
from rilla_bridge.jobs import JobRunner
from rilla_bridge.operations import OVERVIEW_CACHE_SECONDS, Operations
from workers import callrail_jobs
from workers.runtime import Runtime

log = logging.getLogger("rilla_bridge.scheduler")


@dataclass
class Job:
    name: str
    every: float
    run: Callable[[Runtime], int]
    next_at: float = 0.0


def sweep_lanes(rt: Runtime) -> int:
    """Due retries, lapsed leases and the shared refill, for every tenant."""
    due, recovered, refilled = rt.lanes.sweep()
    if recovered:
        log.warning("recovered events whose worker stopped", extra={"count": recovered})
    return due + recovered + refilled


class PublishOverview:
    """The ``overview`` job: its own history engine and Operations, made at its first run."""

    def __init__(self) -> None:
        self.ops: Operations | None = None
        self.failing = False

    def __call__(self, rt: Runtime) -> int:
        if self.ops is None:
            self.ops = Operations(rt.settings, rt.redis, make_engine(rt.settings), rt.clock,
                                  rt.tenants, rt.lifecycle)
        try:
            self.ops.publish_overview()
        except Exception as exc:   # the database's own errors vary by driver
            # Web processes compute their own meanwhile; say so once per outage.
            if not self.failing:
                log.warning("overview not published", extra={"error": type(exc).__name__})
            self.failing = True
            return 0
        self.failing = False
        return 1


def default_jobs() -> list[Job]:
    return [
        Job("lanes", 0.25, sweep_lanes),
        Job("callrail_dispatch", callrail_jobs.DISPATCH_EVERY, callrail_jobs.dispatch),
        Job("reconcile", 5.0, callrail_jobs.reconcile),
        Job("overview", OVERVIEW_CACHE_SECONDS, PublishOverview()),
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


def start_job_runner(rt: Runtime) -> JobRunner:
    """The bulk-job thread, on its own history engine and Redis-backed Operations."""
    engine = make_engine(rt.settings)
    ops = Operations(rt.settings, rt.redis, engine, rt.clock, rt.tenants, rt.lifecycle)
    runner = JobRunner(ops, engine, rt.clock)
    runner.start()
    return runner


def release(rt: Runtime, jobs: list[Job], node: str) -> int:
    """Give up the job leases this copy holds (it is stopping): another copy takes each job
    at its next tick instead of when the lease lapses. Returns how many it held."""
    released = 0
    for job in jobs:
        try:
            released += leases.release(rt.scripts, keys.scheduler_job(job.name), node)
        except redis.RedisError as exc:   # they lapse within a tick or two anyway
            log.warning("could not release a job lease", extra={"job": job.name,
                                                               "error": repr(exc)})
    return released


def run_forever(rt: Runtime, jobs: list[Job] | None = None, interval: float = 0.1) -> None:
    """The scheduler process's loop, until SIGTERM or SIGINT; then its leases go."""
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
    # SIGTERM (a restart, a deploy): the tick in progress finished; leave nothing held.
    released = release(rt, jobs, node)
    log.info("scheduler stopped", extra={"leases_released": released})
