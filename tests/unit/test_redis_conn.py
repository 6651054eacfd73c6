"""The web process's per-thread single-connection Redis client."""

from __future__ import annotations

import threading
from typing import Any

import fakeredis
import pytest
import redis

from rilla_bridge.redis_conn import ConnectionPerThread


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
