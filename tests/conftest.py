from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import fakeredis
import pytest
import redis
import sentry_sdk

from rilla_bridge.clock import FakeClock
from tests.support import RedisServer, shared_redis_url

if TYPE_CHECKING:
    from tests.fakes import CapturingTransport


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis server (started for the session when none answers)."""
    url, server = shared_redis_url()
    yield url
    if server:
        server.stop()


@pytest.fixture
def real_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def fake_redis() -> Iterator[fakeredis.FakeRedis]:
    client = fakeredis.FakeRedis()
    yield client
    client.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server process of the test's own, with append-only persistence."""
    server = RedisServer.temporary(appendonly=True)
    yield server
    server.stop()


@pytest.fixture
def clock() -> FakeClock:
    """The time of a unit test: it moves only when the test says ``clock.advance(s)``."""
    return FakeClock()


@pytest.fixture
def sentry_transport() -> Iterator[CapturingTransport]:
    """Sentry's events of the test (pass it to ``init_sentry``); Sentry is off again after."""
    from tests.fakes import CapturingTransport  # tests.fakes imports the workers: lazily

    transport = CapturingTransport()
    yield transport
    sentry_sdk.get_client().close()
    sentry_sdk.get_global_scope().set_client(None)
    sentry_sdk.get_isolation_scope().clear()
    sentry_sdk.get_current_scope().clear()
