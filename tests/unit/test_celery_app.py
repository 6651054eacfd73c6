"""The worker's Celery app: loss guards, logging, and the kombu client reuse."""

from __future__ import annotations

import logging

import redis
from kombu.connection import Connection

from workers import celery_app


def test_loss_guards_are_set() -> None:
    conf = celery_app.app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.worker_redirect_stdouts is False


def test_broker_pool_fits_a_gevent_pool_of_concurrent_acks() -> None:
    opts = celery_app.app.conf.broker_transport_options
    assert opts["max_connections"] >= 200 + 50   # Procfile worker -c up to 200, plus consumer
    with celery_app.app.connection_for_read() as conn:
        assert conn.default_channel.pool.max_connections == opts["max_connections"]


def test_per_task_lines_are_quiet_after_logging_setup() -> None:
    celery_app._json_logging(loglevel=logging.INFO)
    for name in celery_app.PER_TASK_LOGGERS:
        assert not logging.getLogger(name).isEnabledFor(logging.INFO)
        assert logging.getLogger(name).isEnabledFor(logging.WARNING)


def test_kombu_channel_reuses_one_sync_client_per_pool(real_redis: redis.Redis) -> None:
    url = "redis://{host}:{port}/{db}".format(**real_redis.connection_pool.connection_kwargs)
    with Connection(url) as conn:
        channel = conn.default_channel
        first = channel._create_client()
        assert channel._create_client() is first
        with channel.conn_or_acquire() as client:
            assert client is first
            assert client.ping()
        assert channel._create_client(asynchronous=True) is not first
        channel._pool = None          # a reconnect builds a new pool: a new client for it
        assert channel._create_client() is not first
