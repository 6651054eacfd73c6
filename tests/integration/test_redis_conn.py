"""``rilla_bridge.redis_conn`` against a real Redis server: the eviction policy is read with
CONFIG GET (fakeredis has no CONFIG), and every thread gets a connection of its own."""

from __future__ import annotations

import logging
import threading

import pytest
import redis

from rilla_bridge.redis_conn import make_redis, single_connection, warn_unless_noeviction
from rilla_bridge.settings import Settings


def test_the_real_policy_is_read_and_judged(real_redis: redis.Redis,
                                            caplog: pytest.LogCaptureFixture) -> None:
    policy = real_redis.config_get("maxmemory-policy")["maxmemory-policy"]
    logger = logging.getLogger("rb.test.noeviction")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        assert warn_unless_noeviction(real_redis, logger) == policy
    warned = [r for r in caplog.records if r.name == logger.name]
    assert bool(warned) == (policy != "noeviction")


def test_each_thread_has_its_own_single_connection(redis_url: str) -> None:
    per_thread = single_connection(Settings(redis_url=redis_url))
    mine = per_thread()
    assert mine.connection is not None          # a single-connection client, connected
    my_id = mine.client_id()
    assert per_thread().client_id() == my_id     # the same connection on every call
    clients: list[redis.Redis] = []
    threads = [threading.Thread(target=lambda: clients.append(per_thread()))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    try:
        others = {c.client_id() for c in clients}
        assert len(others) == 3 and my_id not in others
    finally:
        for c in [mine, *clients]:
            c.close()


def test_make_redis_talks_to_the_configured_database(redis_url: str,
                                                     real_redis: redis.Redis) -> None:
    client = make_redis(Settings(redis_url=redis_url))
    try:
        client.set("rb:test:make_redis", "1")
        assert real_redis.get("rb:test:make_redis") == b"1"
    finally:
        client.close()
