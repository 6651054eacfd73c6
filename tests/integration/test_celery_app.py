"""The worker's Celery app (``workers/celery_app.py``): loss guards, logging, and the kombu
client reuse."""

from __future__ import annotations

import redis
from kombu.connection import Connection

import workers.celery_app  # noqa: F401 - importing it installs the kombu patch under test


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
