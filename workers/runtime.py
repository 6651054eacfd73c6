"""The worker runtime: every service a task needs, as typed fields, built in one place.

``build_runtime`` assembles a Runtime from settings and whatever a caller already has (tests
pass a fakeredis client, a FakeClock, tenants and a fake Rilla); ``runtime()`` is the one
per worker process, built lazily after fork with the process's logging and Sentry.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import redis

from rilla_bridge.calls import CallState
from rilla_bridge.clients.callrail import CallRailClient
from rilla_bridge.clients.rilla import RillaAPI, RillaClient
from rilla_bridge.clock import Clock, SystemClock
from rilla_bridge.events import EventStore
from rilla_bridge.history.db import make_engine
from rilla_bridge.history.queries import CallStateReader
from rilla_bridge.lanes import Lanes
from rilla_bridge.lifecycle import Lifecycle
from rilla_bridge.observability import init_sentry, setup_logging
from rilla_bridge.quota import QuotaGuard
from rilla_bridge.redis_conn import make_redis, warn_unless_noeviction
from rilla_bridge.scripts import Scripts
from rilla_bridge.settings import Settings
from rilla_bridge.tenant_config import LiveTenants, TenantsReloader, live_tenants
from rilla_bridge.tenants import Tenant
from workers.heartbeat import Heartbeat
from workers.recordings import RecordingService

log = logging.getLogger("rilla_bridge.worker")
# A call's state as history holds it (the hash fields), None when history has none; raises
# when the database does not answer (the event then waits and tries again).
CallHistory = Callable[[str, str, str], dict[str, str] | None]


def _no_history(tenant: str, source: str, call_id: str) -> dict[str, str] | None:
    raise RuntimeError("no history database configured")


@dataclass(frozen=True)
class Runtime:
    """Per-process handles the tasks share (one Redis pool, one HTTP session per API)."""

    settings: Settings
    clock: Clock
    redis: redis.Redis
    scripts: Scripts
    tenants: Mapping[str, Tenant]   # a LiveTenants in a process: reloaded when the file changes
    lanes: Lanes
    lifecycle: Lifecycle
    store: EventStore
    calls: CallState
    rilla: RillaAPI
    callrail: CallRailClient
    guard: QuotaGuard
    recordings: RecordingService
    heartbeat: Heartbeat
    call_history: CallHistory


def build_runtime(settings: Settings, *, client: redis.Redis, tenants: Mapping[str, Tenant],
                  clock: Clock | None = None, rilla: RillaAPI | None = None,
                  callrail: CallRailClient | None = None,
                  call_history: CallHistory = _no_history) -> Runtime:
    """A Runtime over ``client``; the API clients default to the settings' base URLs."""
    clock = clock or SystemClock()
    scripts = Scripts(client)
    lanes = Lanes(client, scripts, clock, settings, tenants)
    lifecycle = Lifecycle(client, scripts, clock, settings, lanes)
    store = EventStore(client)
    calls = CallState(client, scripts, clock, settings)
    guard = QuotaGuard.from_settings(settings, client, scripts, clock)
    return Runtime(
        settings=settings, clock=clock, redis=client, scripts=scripts, tenants=tenants,
        lanes=lanes, lifecycle=lifecycle,
        store=store, calls=calls,
        rilla=rilla or RillaClient(settings.rilla_base_url,
                                   connect_timeout=settings.rilla_connect_timeout,
                                   read_timeout=settings.rilla_read_timeout),
        callrail=callrail or CallRailClient(settings.callrail_base_url,
                                            connect_timeout=settings.callrail_connect_timeout,
                                            read_timeout=settings.callrail_read_timeout),
        guard=guard, recordings=RecordingService(guard, calls, store, lifecycle,
                                    settings.callrail_tenant_lookup_share),
        heartbeat=Heartbeat(client, scripts, clock, settings.delivery_lease_seconds),
        call_history=call_history)


_runtime: tuple[int, Runtime] | None = None
_lock = threading.Lock()  # gevent patches it: the first tasks of a worker build one Runtime


def _process_runtime() -> Runtime:
    settings = Settings.from_env()
    setup_logging()
    tenants = live_tenants(settings)
    init_sentry(settings.sentry_dsn, environment=settings.environment, component="worker")
    client = make_redis(settings, max_connections=512)
    warn_unless_noeviction(client, log)
    clock = SystemClock()
    reader = CallStateReader(lambda: make_engine(settings), clock)
    rt = build_runtime(settings, client=client, tenants=tenants, clock=clock,
                       call_history=reader)
    rt.heartbeat.start()
    return rt


def runtime() -> Runtime:
    """This process's Runtime (built on first use, and again after a fork)."""
    global _runtime
    if _runtime is None or _runtime[0] != os.getpid():
        with _lock:
            if _runtime is None or _runtime[0] != os.getpid():
                _runtime = (os.getpid(), _process_runtime())
    return _runtime[1]


_watcher: TenantsReloader | None = None


def watch_config(process: str) -> TenantsReloader | None:
    """Start this process's tenants reloader and version report (``worker``, ``callrail``,
    ``scheduler``): a changed tenants file is running here within seconds."""
    global _watcher
    rt = runtime()
    if _watcher is None and isinstance(rt.tenants, LiveTenants):
        _watcher = TenantsReloader(rt.settings, rt.tenants, rt.clock, client=rt.redis,
                                   process=process).start()
    return _watcher
