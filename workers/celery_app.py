"""The Celery app, built from settings; ``celery -A workers.celery_app worker`` imports it.

Loss guards: late acknowledgement, reject on worker loss, JSON only, explicit task names, a
visibility timeout that fits (tasks are bounded by the Rilla timeouts, far below it) and a
restore sweep frequent enough that work held by a killed worker is back within two minutes.
Retries never use Celery countdowns (held in worker memory): they wait in a Redis sorted set
that the scheduler drains (see workers/scheduler.py).
"""

from __future__ import annotations

import ssl

from celery import Celery
from kombu.entity import Queue

from rilla_bridge.settings import Settings
from rilla_bridge.taskqueue import QUEUE_CALLRAIL, QUEUE_EVENTS

_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


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
        worker_send_task_events=False,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_seconds,
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
            "health_check_interval": 25,
        },
    )
    if settings.redis_url.startswith("rediss://"):
        app.conf.broker_use_ssl = {"ssl_cert_reqs": _CERT_REQS[settings.redis_tls_cert_reqs]}
    return app


app = make_celery()
