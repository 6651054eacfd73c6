"""The web process's Flask views besides webhooks (``app.views``): health, readiness, metrics,
and the JSON error replies of Flask's own handlers."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from rilla_bridge import keys
from rilla_bridge.celery_messages import QUEUE_CALLRAIL, QUEUE_EVENTS
from rilla_bridge.clock import FakeClock
from rilla_bridge.providers.callrail import signature as callrail_signature
from rilla_bridge.settings import Settings
from rilla_bridge.tenants import parse_tenants

TENANTS = """
[tenants.acme]
rilla_api_key = "acme-rilla-key-000001"
[tenants.acme.callrail]
signing_key = "acme-signing-key-0001"

[tenants.vector]
rilla_api_key = "vector-rilla-key-000002"
"""


def build_app(client: Any, clock: FakeClock) -> Flask:
    app = create_app(settings=Settings(), tenants=parse_tenants(TENANTS, env={}),
                     redis_client=client, clock=clock)
    app.testing = True
    return app


@pytest.fixture
def client(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> Iterator[FlaskClient]:
    with build_app(fake_redis, clock).test_client() as c:
        yield c


def _lines(resp: Any) -> list[str]:
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    lines: list[str] = resp.get_data(as_text=True).splitlines()
    return lines


def test_healthz_and_readyz(client: FlaskClient) -> None:
    health = client.get("/healthz")
    assert (health.status_code, health.get_json()) == (200, {"status": "ok"})
    assert health.mimetype == "application/json"
    ready = client.get("/readyz")
    assert (ready.status_code, ready.get_json()) == (200, {"status": "ready"})


def test_redis_down_readyz_is_503_healthz_still_ok(clock: FakeClock) -> None:
    server = fakeredis.FakeServer()
    redis_client = fakeredis.FakeRedis(server=server)
    try:
        with build_app(redis_client, clock).test_client() as client:
            server.connected = False
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.headers["Retry-After"] == "5"
            assert ready.get_json() == {"error": "redis unreachable"}
            assert client.get("/healthz").status_code == 200
            lines = _lines(client.get("/metrics"))
            assert "rilla_bridge_redis_up 0.0" in lines
            server.connected = True
            assert client.get("/readyz").status_code == 200
            assert "rilla_bridge_redis_up 1.0" in _lines(client.get("/metrics"))
    finally:
        redis_client.close()


def test_metrics_show_events_waiting_for_a_tenant_slot(client: FlaskClient,
                                                       fake_redis: fakeredis.FakeRedis) -> None:
    fake_redis.zadd(keys.cap_wait("acme"), {"ev_a": 1.0, "ev_b": 2.0})
    fake_redis.hset(keys.cap_wait_messages("acme"), "ev_a", "{}")   # not counted
    lines = _lines(client.get("/metrics"))
    assert 'rilla_bridge_waiting_for_slot{tenant="acme"} 2.0' in lines
    assert 'rilla_bridge_waiting_for_slot{tenant="vector"} 0.0' in lines
    assert "rilla_bridge_redis_up 1.0" in lines


def test_metrics_show_the_system_state_from_redis(client: FlaskClient,
                                                  fake_redis: fakeredis.FakeRedis) -> None:
    raw = json.dumps({"resource_id": "CAL1"}).encode()
    resp = client.post("/webhooks/callrail/acme", data=raw,
                       headers={"Signature": callrail_signature("acme-signing-key-0001", raw)})
    assert resp.status_code == 202
    fake_redis.lpush(QUEUE_CALLRAIL, "job-1", "job-2")
    fake_redis.zadd(keys.RETRY, {"ev_r": 1.0})
    fake_redis.zadd(keys.DLQ_INDEX, {"ev_d1": 1.0, "ev_d2": 2.0, "ev_d3": 3.0})
    fake_redis.hset(keys.STATS, mapping={"delivered": 7, "dead_lettered": 2})
    lines = _lines(client.get("/metrics"))
    assert f'rilla_bridge_queue_depth{{queue="{QUEUE_EVENTS}"}} 1.0' in lines
    assert f'rilla_bridge_queue_depth{{queue="{QUEUE_CALLRAIL}"}} 2.0' in lines
    assert "rilla_bridge_pending_events 1.0" in lines
    assert "rilla_bridge_retry_scheduled 1.0" in lines
    assert "rilla_bridge_dead_letters 3.0" in lines
    assert 'rilla_bridge_outcomes_total{outcome="delivered"} 7.0' in lines
    assert 'rilla_bridge_outcomes_total{outcome="dead_lettered"} 2.0' in lines
    assert any(line.startswith("rilla_bridge_webhooks_total{") for line in lines)


def test_unknown_path_and_method_are_json_errors(client: FlaskClient) -> None:
    missing = client.get("/nope")
    assert missing.status_code == 404 and missing.mimetype == "application/json"
    assert missing.get_json()["error"]
    wrong = client.post("/healthz")
    assert wrong.status_code == 405 and wrong.mimetype == "application/json"
    assert wrong.get_json()["error"]


def test_an_unexpected_error_in_a_view_is_a_logged_json_500(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock,
        caplog: pytest.LogCaptureFixture) -> None:
    app = build_app(fake_redis, clock)
    app.testing = False      # as in production: errors reach the error handler

    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError("a bug in a view")

    caplog.set_level(logging.INFO)
    with app.test_client() as client:
        resp = client.get("/boom")
    assert resp.status_code == 500
    assert resp.get_json() == {"error": "internal error"}
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)
    (line,) = [r for r in caplog.records if r.getMessage() == "request"]
    assert line.status == 500 and line.path == "/boom"  # type: ignore[attr-defined]
