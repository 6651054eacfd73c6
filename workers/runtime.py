"""One Runtime per worker process, built lazily after fork (Redis pool, HTTP session)."""

from __future__ import annotations

import logging
import os
import threading

from rilla_bridge.observability import init_sentry, register_secrets, setup_logging
from rilla_bridge.redis_conn import make_redis, warn_unless_noeviction
from rilla_bridge.rilla import RillaClient
from rilla_bridge.settings import Settings
from rilla_bridge.tenants import load_tenants
from workers.pipeline import Runtime

log = logging.getLogger("rilla_bridge.worker")
_runtime: tuple[int, Runtime] | None = None
_lock = threading.Lock()  # gevent patches it: the first tasks of a worker build one Runtime


def build_runtime(settings: Settings | None = None) -> Runtime:
    settings = settings or Settings.from_env()
    setup_logging()
    tenants = load_tenants(settings.tenants_file)
    register_secrets(s for t in tenants.values() for s in t.secrets())
    init_sentry(settings.sentry_dsn, environment=settings.environment, component="worker")
    client = make_redis(settings, max_connections=512)
    warn_unless_noeviction(client, log)
    rilla = RillaClient(settings.rilla_base_url, connect_timeout=settings.rilla_connect_timeout,
                        read_timeout=settings.rilla_read_timeout)
    rt = Runtime(settings=settings, redis=client, tenants=tenants, rilla=rilla)
    from workers import callrail_jobs

    callrail_jobs.attach(rt)
    return rt


def runtime() -> Runtime:
    global _runtime
    if _runtime is None or _runtime[0] != os.getpid():
        with _lock:
            if _runtime is None or _runtime[0] != os.getpid():
                _runtime = (os.getpid(), build_runtime())
    return _runtime[1]
