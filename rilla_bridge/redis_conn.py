"""Redis clients: one place that turns ``REDIS_URL`` into connections, and the no-eviction check.

The keys themselves are named in ``rilla_bridge.keys``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import redis

from rilla_bridge.settings import Settings

log = logging.getLogger(__name__)


def connection_kwargs(settings: Settings) -> dict[str, Any]:
    """Options shared by our redis-py clients and Celery's broker connection."""
    kwargs: dict[str, Any] = {
        "socket_connect_timeout": 2,
        "socket_timeout": 5,
        "health_check_interval": 30,
        "socket_keepalive": True,
    }
    if settings.redis_url.startswith("rediss://"):
        kwargs["ssl_cert_reqs"] = settings.redis_tls_cert_reqs
    return kwargs


def make_redis(settings: Settings, **overrides: Any) -> redis.Redis:
    kwargs = connection_kwargs(settings)
    kwargs.update(overrides)
    return redis.Redis.from_url(settings.redis_url, **kwargs)


class ConnectionPerThread:
    """A single-connection redis-py client per thread (and per process), built on first use.

    For the web process's webhook path, which runs on one thread per worker process (the
    event loop thread of a granian worker, ``app.rsgi``; a sync worker's only thread under a
    WSGI server), one request at a time; going through redis-py's pool costs about 12 us per
    command (a lock, a poll syscall, redis-py 8's connection-count metrics). A
    single-connection client connects when it is built, so it is built lazily: while Redis is
    down, calling this raises the RedisError the caller turns into a 503, and the next call
    tries again. After a fork the child builds its
    own, never sharing the parent's socket. Unlike a pooled connection it is not checked
    before use, and redis-py 8 does not retry a command on it: after a Redis restart the first
    command meets the closed socket and fails (``Lifecycle.receive`` then tries once more),
    and the next one reconnects. Meant for real threads: under gevent or eventlet
    ``threading.local`` is per greenlet, so every request would open a connection of its own.
    """

    def __init__(self, factory: Callable[[], redis.Redis]) -> None:
        self._factory = factory
        self._local = threading.local()

    def __call__(self) -> redis.Redis:
        local = self._local
        client: redis.Redis | None = getattr(local, "client", None)
        if client is None or local.pid != os.getpid():
            client = self._factory()
            local.client, local.pid = client, os.getpid()
        return client


def single_connection(settings: Settings) -> ConnectionPerThread:
    return ConnectionPerThread(lambda: make_redis(settings, single_connection_client=True))


def warn_unless_noeviction(client: redis.Redis, logger: logging.Logger | None = None) -> str | None:
    """Warn loudly unless Redis refuses to evict: an evicted key is a lost call."""
    logger = logger or log
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
    except redis.RedisError as exc:
        logger.warning(
            "could not read Redis maxmemory-policy (%s); make sure it is noeviction, "
            "or Redis may silently drop queued calls", type(exc).__name__)
        return None
    if policy != "noeviction":
        logger.warning(
            "!!! Redis maxmemory-policy is %r, not 'noeviction': under memory pressure Redis "
            "will DELETE queued events and dead letters. Set maxmemory-policy noeviction. !!!",
            policy)
    return str(policy) if policy is not None else None
