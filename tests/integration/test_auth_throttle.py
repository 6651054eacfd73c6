"""Repeated 401s from one client address are slowed through the real web server (granian, the
RSGI adapter's REMOTE_ADDR), while that address's valid webhooks keep their 202."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import requests

from tests.support import RedisServer
from tests.system import System

pytestmark = pytest.mark.integration


@pytest.fixture
def web(own_redis: RedisServer) -> Iterator[System]:
    system = System(own_redis.url, env_extra={"AUTH_FAILURES_PER_MINUTE": "5"})
    system.start_web()
    yield system
    system.stop()


def test_a_guessing_address_gets_429_and_its_valid_webhooks_202(web: System) -> None:
    body = {"resource_id": "CALthrottle1", "duration": "30"}
    codes = [web.post_callrail("acme", body, key="guessed-signing-key-000").status_code
             for _ in range(8)]
    assert codes == [401] * 5 + [429] * 3
    slowed = requests.post(f"{web.web}/webhooks/callingly/acme?token=guess",
                           data=json.dumps({"id": 1}), timeout=10)
    assert slowed.status_code == 429 and 1 <= int(slowed.headers["Retry-After"]) <= 60
    assert "guess" not in slowed.text
    for n in range(3):   # the same address (127.0.0.1), signed right: never held back
        ok = web.post_callrail("acme", {**body, "resource_id": f"CALthrottle{n + 2}"})
        assert ok.status_code == 202, ok.text
    metrics = requests.get(f"{web.web}/metrics",
                           headers={"Authorization": "Bearer test-admin-token-0123456789"},
                           timeout=10).text
    assert 'rilla_bridge_webhooks_total{code="429",source="callrail",tenant="acme"} 3.0' in metrics
