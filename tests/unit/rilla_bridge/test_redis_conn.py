"""Redis clients from settings, the web process's per-thread single-connection client and the
no-eviction check (``rilla_bridge.redis_conn``); a real server's side is in
``tests/integration/test_redis_conn.py``."""

from __future__ import annotations

import logging
import threading
from typing import Any

import fakeredis
import pytest
import redis

from rilla_bridge.redis_conn import (
    ConnectionPerThread,
    connection_kwargs,
    make_redis,
    single_connection,
    warn_unless_noeviction,
)
from rilla_bridge.settings import Settings
from tests.support import free_port


def test_one_client_per_thread_built_on_first_use() -> None:
    built: list[Any] = []

    def factory() -> Any:
        built.append(fakeredis.FakeRedis())
        return built[-1]

    per_thread = ConnectionPerThread(factory)
    assert built == []                    # nothing connects at construction
    first = per_thread()
    assert per_thread() is first and len(built) == 1
    other: list[Any] = []
    t = threading.Thread(target=lambda: other.append(per_thread()))
    t.start()
    t.join()
    assert other[0] is not first and len(built) == 2
    assert per_thread() is first


def test_rebuilt_after_fork(monkeypatch: pytest.MonkeyPatch) -> None:
    per_thread = ConnectionPerThread(fakeredis.FakeRedis)
    parent = per_thread()
    monkeypatch.setattr("rilla_bridge.redis_conn.os.getpid", lambda: -1)   # a forked child
    child = per_thread()
    assert child is not parent and per_thread() is child


def test_redis_down_raises_then_next_call_builds() -> None:
    calls = {"n": 0}

    def factory() -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise redis.ConnectionError("down")
        return fakeredis.FakeRedis()

    per_thread = ConnectionPerThread(factory)
    with pytest.raises(redis.RedisError):
        per_thread()
    assert per_thread() is per_thread() and calls["n"] == 2


def test_connection_options_and_tls_verification_from_settings() -> None:
    plain = connection_kwargs(Settings(redis_url="redis://h:6379/0"))
    assert plain == {"socket_connect_timeout": 2, "socket_timeout": 5,
                     "health_check_interval": 30, "socket_keepalive": True}
    tls = connection_kwargs(Settings(redis_url="rediss://h:6380/0", redis_tls_cert_reqs="none"))
    assert tls == {**plain, "ssl_cert_reqs": "none"}


def test_make_redis_applies_options_and_overrides() -> None:
    client = make_redis(Settings(redis_url="redis://127.0.0.1:6399/3"), socket_timeout=9)
    try:
        kwargs = client.connection_pool.connection_kwargs
        assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("127.0.0.1", 6399, 3)
        assert kwargs["socket_timeout"] == 9 and kwargs["socket_connect_timeout"] == 2
        assert kwargs["health_check_interval"] == 30
    finally:
        client.close()


def test_single_connection_connects_on_first_use_not_when_built() -> None:
    """Nothing listens on the port: building costs nothing, the first use raises the
    RedisError intake turns into a 503, and so does the next try."""
    per_thread = single_connection(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    for _ in range(2):
        with pytest.raises(redis.ConnectionError):
            per_thread()


class _PolicyClient:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def config_get(self, name: str) -> dict[str, Any]:
        assert name == "maxmemory-policy"
        if isinstance(self.answer, Exception):
            raise self.answer
        return {name: self.answer} if self.answer is not None else {}


@pytest.mark.parametrize(("answer", "returned", "warned"), [
    ("noeviction", "noeviction", None),
    ("allkeys-lru", "allkeys-lru", "not 'noeviction'"),
    ("volatile-ttl", "volatile-ttl", "not 'noeviction'"),
    (None, None, "not 'noeviction'"),
    (redis.ResponseError("unknown command 'config get'"), None, "could not read"),
    (redis.ConnectionError("down"), None, "could not read"),
])
def test_warn_unless_noeviction(caplog: pytest.LogCaptureFixture, answer: Any,
                                returned: str | None, warned: str | None) -> None:
    logger = logging.getLogger("rb.test.redis_conn")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        got = warn_unless_noeviction(_PolicyClient(answer), logger)  # type: ignore[arg-type]
    assert got == returned
    messages = [r.getMessage() for r in caplog.records if r.name == logger.name]
    if warned is None:
        assert messages == []
    else:
        assert len(messages) == 1 and warned in messages[0]
        assert all(r.levelno == logging.WARNING for r in caplog.records)
