"""A changed tenants file reaches every process type without a restart (web, worker, callrail
worker, scheduler, history: real processes on a Redis of the test's own), each reports the new
version, and a bad change is refused everywhere with the old configuration kept."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from rilla_bridge import keys
from rilla_bridge.tenant_config import version_of
from tests.support import RedisServer
from tests.system import TENANTS, System

pytestmark = pytest.mark.integration

GAMMA_KEY = "gamma-signing-key-0003"
PROCESSES = {"web", "worker", "callrail", "scheduler", "history"}
GAMMA = """
[tenants.gamma]
rilla_api_key = "gamma-rilla-key-000003"
default_user_email = "office@gamma.example"
[tenants.gamma.callrail]
signing_key = "gamma-signing-key-0003"
"""


@pytest.fixture
def system(own_redis: RedisServer) -> Iterator[System]:
    s = System(own_redis.url)
    yield s
    s.stop()


def _versions(client: redis.Redis) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for raw in client.hvals(keys.CONFIG_PROCESSES):
        entry = json.loads(raw)
        out.setdefault(entry["process"], set()).add(entry["version"])
    return out


def _wait_all(client: redis.Redis, version: str, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        seen = _versions(client)
        if set(seen) >= PROCESSES and all(v == {version} for v in seen.values()):
            return time.monotonic() - start
        time.sleep(0.25)
    raise AssertionError(f"not every process runs {version} after {timeout}s: "
                         f"{_versions(client)}")


def _replace(path: Path, text: str) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_a_changed_file_reaches_every_process_and_a_bad_one_is_refused(
        system: System) -> None:
    system.start_rilla_sandbox(wait=False)
    system.start_web(wait=False)
    system.start_worker(wait=False)
    system.start_worker("callrail", queue="callrail", concurrency=2, wait=False)
    system.start_scheduler(wait=False)
    system.start_history(wait=False)
    system.ready()
    client = redis.Redis.from_url(system.redis_url)
    _wait_all(client, version_of(TENANTS), timeout=15)
    path = system.workdir / "tenants.toml"

    # A new tenant, without a restart: every process runs it within 30 s, and the web
    # serves the new tenant.
    assert system.post_callrail("gamma", {"resource_id": "CALg1"}, key=GAMMA_KEY).status_code == 404
    good = TENANTS + GAMMA
    _replace(path, good)
    took = _wait_all(client, version_of(good), timeout=30)
    assert took < 30
    deadline = time.monotonic() + 10    # every web worker process: try a few requests
    codes: list[int] = []
    while time.monotonic() < deadline and len(codes) < 6:
        codes.append(system.post_callrail("gamma", {"resource_id": f"CALg{len(codes)}"},
                                          key=GAMMA_KEY).status_code)
    assert codes and set(codes) == {202}, codes

    # A bad change: refused by every process, which keeps (and reports) the good version.
    bad = good + 'colour = "blue"\n'
    _replace(path, bad)
    time.sleep(12)                      # two reload periods
    entries = [json.loads(v) for v in client.hvals(keys.CONFIG_PROCESSES)]
    assert {e["process"] for e in entries} >= PROCESSES
    for e in entries:
        assert e["version"] == version_of(good), e
        assert e.get("refused_version") == version_of(bad), e
        assert "unknown key 'colour'" in e.get("refused_reason", ""), e
    for name in ("web", "worker", "callrail", "scheduler", "history"):
        assert "tenants file change refused" in system.log(name), name
    assert system.post_callrail("gamma", {"resource_id": "CALg9"}, key=GAMMA_KEY).status_code == 202
