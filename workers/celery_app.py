"""The Celery app, built from settings; ``celery -A workers.celery_app worker`` imports it.

Loss guards: late acknowledgement, reject on worker loss, JSON only, explicit task names, a
visibility timeout that fits (tasks are bounded by the Rilla timeouts, far below it) and a
restore sweep frequent enough that work held by a killed worker is back within two minutes.
Retries never use Celery countdowns (held in worker memory): they wait in a Redis sorted set
that the scheduler drains (see workers/scheduler.py).
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

from celery import Celery, signals
from kombu.entity import Queue
from kombu.transport import redis as kombu_redis

from rilla_bridge.celery_messages import QUEUE_CALLRAIL, QUEUE_EVENTS
from rilla_bridge.observability import setup_logging
from rilla_bridge.settings import Settings

_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


BROKER_MAX_CONNECTIONS = 1024


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or Settings.from_env()
    app = Celery("rilla_bridge", broker=settings.redis_url, include=["workers.tasks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,  # our pending index re-queues, not the broker
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_default_queue=QUEUE_EVENTS,
        task_queues=[Queue(QUEUE_EVENTS), Queue(QUEUE_CALLRAIL)],
        task_routes={"rilla_bridge.callrail_job": {"queue": QUEUE_CALLRAIL}},
        task_time_limit=settings.visibility_timeout_seconds - 5,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        # Our JSON handler writes to stderr; redirected, every line would be logged twice.
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        # Redis refusing writes (OutOfMemoryError, a ResponseError: a "channel error") must not
        # end the worker ("Unrecoverable error"): the consumer reconnects and resumes by itself
        # once memory frees, instead of a crash loop under the platform's restarts.
        broker_channel_error_retry=True,
        broker_connection_max_retries=None,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_seconds,
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
            "health_check_interval": 25,
            # kombu's default pool of 10 connections is far below a gevent pool's concurrent
            # acks: past it redis-py raises "Too many connections", the ack fails and the
            # consumer restarts (seen at 0 ms Rilla latency with -c 200: 54 deliveries/s).
            "max_connections": BROKER_MAX_CONNECTIONS,
        },
    )
    if settings.redis_url.startswith("rediss://"):
        app.conf.broker_use_ssl = {"ssl_cert_reqs": _CERT_REQS[settings.redis_tls_cert_reqs]}
    return app


# Celery's "Task ... received" and "... succeeded" lines: two log lines per delivery at our
# volume. What happened to an event is in its timeline (`rilla-bridge events show`) and in the
# metrics; failures are still logged, by us and by Celery (its errors are WARNING and above).
PER_TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace")


@signals.setup_logging.connect
def _json_logging(loglevel: Any = None, **_: Any) -> None:
    """Workers log JSON lines through our handler only (Celery configures none of its own)."""
    setup_logging(loglevel or "INFO")
    for name in PER_TASK_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _reuse_sync_redis_clients() -> None:
    """kombu builds a new ``redis.Redis`` object (a few hundred dict entries of reply
    callbacks) for every ack and every unacked-index update; the objects share one
    connection pool anyway, so keep one per channel pool. Measured: ~5 % of a worker's CPU
    per delivery. Asynchronous (BRPOP) clients are left as kombu makes them."""
    channel = kombu_redis.Channel
    original = getattr(channel, "_create_client", None)
    if original is None or getattr(original, "_rb_cached", False):
        return

    def _create_client(self: Any, asynchronous: bool = False) -> Any:
        if asynchronous:
            return original(self, asynchronous=True)
        pool = self.pool
        cached = self.__dict__.get("_rb_sync_client")
        if cached is None or cached[0] is not pool:
            cached = (pool, original(self))
            self.__dict__["_rb_sync_client"] = cached
        return cached[1]

    _create_client._rb_cached = True  # type: ignore[attr-defined]
    channel._create_client = _create_client  # type: ignore[method-assign]


_reuse_sync_redis_clients()


def worker_kind(queues: Any) -> str:
    """``callrail`` for a worker consuming only the callrail queue, else ``worker``."""
    names = {getattr(q, "name", str(q)) for q in queues}
    return "callrail" if names == {QUEUE_CALLRAIL} else "worker"


@signals.worker_ready.connect
def _watch_config(sender: Any = None, **_: Any) -> None:
    """Load the tenants at start (not at the first task) and keep them reloaded."""
    from workers import shutdown
    from workers.runtime import watch_config

    shutdown.consumer = sender
    queues = sender.app.amqp.queues.consume_from.values() if sender is not None else ()
    watch_config(worker_kind(queues))


@signals.worker_shutting_down.connect
def _shutdown_deadline(**_: Any) -> None:
    """SIGTERM: Celery stops taking work and waits for what runs; past the grace, what
    still runs is handed back and the process exits (workers/shutdown.py)."""
    from workers import shutdown

    shutdown.arm()


@signals.worker_shutdown.connect
def _forget_config(**_: Any) -> None:
    from workers import runtime

    if runtime._watcher is not None:
        runtime._watcher.forget()


app = make_celery()
