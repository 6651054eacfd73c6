"""The web process's Flask views besides webhooks (``app.views``): health, readiness, metrics,
and the JSON error replies of Flask's own handlers."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from app.metrics import RedisStateCollector
from rilla_bridge import keys
from rilla_bridge.celery_messages import QUEUE_CALLRAIL, QUEUE_EVENTS
from rilla_bridge.clock import FakeClock
from rilla_bridge.lifecycle import ClaimCode, Lifecycle, Outcome, Status, make_lifecycle
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


ADMIN = "admin-token-for-the-tests-0001"


def build_app(client: Any, clock: FakeClock) -> Flask:
    app = create_app(settings=Settings(admin_token=ADMIN), tenants=parse_tenants(TENANTS, env={}),
                     redis_client=client, clock=clock)
    app.testing = True
    return app


@pytest.fixture
def client(fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> Iterator[FlaskClient]:
    with build_app(fake_redis, clock).test_client() as c:
        yield c


def metrics(client: FlaskClient) -> Any:
    return client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"})


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
            lines = _lines(metrics(client))
            assert "rilla_bridge_redis_up 0.0" in lines
            server.connected = True
            assert client.get("/readyz").status_code == 200
            assert "rilla_bridge_redis_up 1.0" in _lines(metrics(client))
    finally:
        redis_client.close()


def test_readyz_writes_its_probe_key(client: FlaskClient,
                                    fake_redis: fakeredis.FakeRedis) -> None:
    assert client.get("/readyz").status_code == 200
    assert fake_redis.get(keys.READY_PROBE) == b"1"
    assert 0 < fake_redis.pttl(keys.READY_PROBE) <= 60_000       # it expires by itself


def test_readyz_fails_when_redis_refuses_writes(client: FlaskClient,
                                                fake_redis: fakeredis.FakeRedis,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A full Redis (maxmemory with noeviction) answers PING but refuses every write: intake
    could store nothing, so the web process is not ready."""
    def full(*_: Any, **__: Any) -> None:
        raise redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'.")

    monkeypatch.setattr(fake_redis, "set", full)
    assert fake_redis.ping()
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.headers["Retry-After"] == "5"
    assert ready.get_json() == {"error": "redis refuses writes (out of memory?)"}
    assert client.get("/healthz").status_code == 200
    monkeypatch.undo()
    assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize("header", [
    None, "", "Bearer", "Bearer ", f"Bearer {ADMIN}x", f"Bearer {ADMIN[:-1]}",
    f"bearer {ADMIN}", f"Basic {ADMIN}", ADMIN, f"Token {ADMIN}",
])
def test_metrics_need_the_admin_token(client: FlaskClient, header: str | None) -> None:
    resp = client.get("/metrics", headers={"Authorization": header} if header is not None
                      else {})
    assert resp.status_code == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
    assert resp.get_json() == {"error": "metrics need Authorization: Bearer <ADMIN_TOKEN>"}
    text = resp.get_data(as_text=True)
    assert "acme" not in text and "vector" not in text and ADMIN not in text


def test_metrics_accept_the_admin_token_with_surrounding_spaces(client: FlaskClient) -> None:
    resp = client.get("/metrics", headers={"Authorization": f"Bearer  {ADMIN} "})
    assert resp.status_code == 200 and "rilla_bridge_redis_up 1.0" in _lines(resp)


@pytest.mark.parametrize("header", [None, "Bearer ", "Bearer", "Bearer x"])
def test_metrics_refuse_everyone_without_an_admin_token(fake_redis: fakeredis.FakeRedis,
                                                        clock: FakeClock,
                                                        header: str | None) -> None:
    app = create_app(settings=Settings(), tenants=parse_tenants(TENANTS, env={}),
                     redis_client=fake_redis, clock=clock)
    with app.test_client() as c:
        resp = c.get("/metrics", headers={"Authorization": header} if header else {})
    assert resp.status_code == 401


def test_metrics_show_redis_memory_against_its_limit(client: FlaskClient,
                                                     fake_redis: fakeredis.FakeRedis,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fake_redis, "info", lambda *_a, **_k: {
        "used_memory": 734003200, "maxmemory": 1073741824})
    lines = _lines(metrics(client))
    assert "rilla_bridge_redis_memory_used_bytes 7.340032e+08" in lines
    assert "rilla_bridge_redis_memory_max_bytes 1.073741824e+09" in lines


def test_metrics_show_the_tenants_lanes_and_pauses(client: FlaskClient,
                                                   fake_redis: fakeredis.FakeRedis) -> None:
    fake_redis.rpush(keys.lane("acme"), "ev_a", "ev_b")
    fake_redis.rpush(keys.bulk_lane("acme"), "ev_c")
    fake_redis.sadd(keys.PAUSED, "vector")
    fake_redis.sadd(keys.TENANTS, "gone")          # removed from the file, work left over
    lines = _lines(metrics(client))
    assert 'rilla_bridge_waiting_events{lane="live",tenant="acme"} 2.0' in lines
    assert 'rilla_bridge_waiting_events{lane="bulk",tenant="acme"} 1.0' in lines
    assert 'rilla_bridge_waiting_events{lane="live",tenant="vector"} 0.0' in lines
    assert 'rilla_bridge_tenant_paused{tenant="vector"} 1.0' in lines
    assert 'rilla_bridge_tenant_paused{tenant="acme"} 0.0' in lines
    assert 'rilla_bridge_undelivered_events{tenant="gone"} 0.0' in lines
    assert "rilla_bridge_redis_up 1.0" in lines


def test_metrics_show_the_system_state_from_redis(client: FlaskClient,
                                                  fake_redis: fakeredis.FakeRedis) -> None:
    raw = json.dumps({"resource_id": "CAL1"}).encode()
    resp = client.post("/webhooks/callrail/acme", data=raw,
                       headers={"Signature": callrail_signature("acme-signing-key-0001", raw)})
    assert resp.status_code == 202
    fake_redis.lpush(QUEUE_CALLRAIL, "job-1", "job-2")
    fake_redis.zadd(keys.retry("acme"), {"ev_r": 1.0})
    fake_redis.zadd(keys.bulk_retry("acme"), {"ev_b": 1.0})
    fake_redis.hset(keys.STATS, mapping={"outcome|delivered|acme": 7,
                                         "outcome|dead_lettered|vector": 2,
                                         "rilla|200|acme": 7, "rilla|none|vector": 2,
                                         "latency|0.25|acme": 5, "latency|1.0|acme": 2,
                                         "latency_sum|acme": 1.5, "latency_count|acme": 7})
    lines = _lines(metrics(client))
    assert f'rilla_bridge_queue_depth{{queue="{QUEUE_EVENTS}"}} 1.0' in lines
    assert f'rilla_bridge_queue_depth{{queue="{QUEUE_CALLRAIL}"}} 2.0' in lines
    assert 'rilla_bridge_undelivered_events{tenant="acme"} 1.0' in lines
    assert 'rilla_bridge_undelivered_events{tenant="vector"} 0.0' in lines
    assert 'rilla_bridge_retry_scheduled{tenant="acme"} 2.0' in lines
    assert 'rilla_bridge_oldest_undelivered_seconds{tenant="vector"} 0.0' in lines
    assert not any(line.startswith("rilla_bridge_dead_letters") for line in lines)  # in SQL
    assert 'rilla_bridge_outcomes_total{outcome="delivered",tenant="acme"} 7.0' in lines
    assert 'rilla_bridge_outcomes_total{outcome="dead_lettered",tenant="vector"} 2.0' in lines
    assert 'rilla_bridge_rilla_responses_total{code="200",tenant="acme"} 7.0' in lines
    assert 'rilla_bridge_rilla_responses_total{code="none",tenant="vector"} 2.0' in lines
    # the histogram is cumulative, bucket by bucket, with the tenant's sum and count
    assert 'rilla_bridge_rilla_seconds_bucket{le="0.25",tenant="acme"} 5.0' in lines
    assert 'rilla_bridge_rilla_seconds_bucket{le="0.5",tenant="acme"} 5.0' in lines
    assert 'rilla_bridge_rilla_seconds_bucket{le="1.0",tenant="acme"} 7.0' in lines
    assert 'rilla_bridge_rilla_seconds_bucket{le="+Inf",tenant="acme"} 7.0' in lines
    assert 'rilla_bridge_rilla_seconds_count{tenant="acme"} 7.0' in lines
    assert 'rilla_bridge_rilla_seconds_sum{tenant="acme"} 1.5' in lines
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


# -- the per-tenant gauges, on the test's clock -------------------------------------------------

def gauges(client: Any, clock: FakeClock, tenants: tuple[str, ...] = ("acme", "vector")
           ) -> dict[tuple[str, tuple[str, ...]], float]:
    """One scrape of the Redis state: (sample name, label values) -> value."""
    collector = RedisStateCollector(client, tenants, clock)
    return {(s.name, tuple(s.labels.values())): s.value
            for family in collector.collect() for s in family.samples}


def oldest(g: dict[tuple[str, tuple[str, ...]], float], tenant: str) -> float:
    return g[("rilla_bridge_oldest_undelivered_seconds", (tenant,))]


def test_the_oldest_undelivered_age_counts_queued_in_flight_and_retrying_events(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    tenants = parse_tenants(TENANTS.replace("[tenants.vector]", "[tenants.vector]\n"
                                            "max_inflight = 1"), env={})
    lc: Lifecycle = make_lifecycle(fake_redis, clock, Settings(), tenants)

    def receive(n: int) -> str:
        return lc.receive(source="callrail", tenant="vector", kind="post_call",
                          body=b'{"n": %d}' % n, call_id=None).event_id

    g = gauges(fake_redis, clock, ("vector",))
    assert oldest(g, "vector") == 0.0                      # none
    assert g[("rilla_bridge_undelivered_events", ("vector",))] == 0
    first = receive(1)                                      # dispatched: in flight
    clock.advance(10)
    second = receive(2)                                     # over the cap: queued
    clock.advance(5)
    g = gauges(fake_redis, clock, ("vector",))
    assert oldest(g, "vector") == 15.0
    assert g[("rilla_bridge_undelivered_events", ("vector",))] == 2
    assert g[("rilla_bridge_in_flight", ("vector",))] == 1
    assert g[("rilla_bridge_waiting_events", ("vector", "live"))] == 1
    # The first one fails for now: it waits for its retry, and still counts.
    claim = lc.claim(first, "vector", "w1")
    assert claim.code == ClaimCode.CLAIMED and claim.event is not None
    lc.retry(claim.event, 300, Status.RETRY_SCHEDULED, Outcome.RETRY, [], worker="w1")
    clock.advance(5)
    g = gauges(fake_redis, clock, ("vector",))
    assert oldest(g, "vector") == 20.0
    assert g[("rilla_bridge_retry_scheduled", ("vector",))] == 1
    assert g[("rilla_bridge_in_flight", ("vector",))] == 1     # the second took the slot
    assert g[("rilla_bridge_waiting_events", ("vector", "live"))] == 0
    # The second is delivered: the first (received at 0, waiting for its retry) is oldest.
    claim = lc.claim(second, "vector", "w1")
    assert claim.event is not None
    lc.finish(claim.event, Status.DELIVERED, Outcome.DELIVERED, [], worker="w1")
    g = gauges(fake_redis, clock, ("vector",))
    assert g[("rilla_bridge_undelivered_events", ("vector",))] == 1
    assert oldest(g, "vector") == 20.0
    assert g[("rilla_bridge_in_flight", ("vector",))] == 0
    # Its retry comes due and it is delivered: none left.
    clock.advance(300)
    assert lc.lanes.sweep()[0] == 1
    claim = lc.claim(first, "vector", "w1")
    assert claim.event is not None
    lc.finish(claim.event, Status.DELIVERED, Outcome.DELIVERED, [], worker="w1")
    g = gauges(fake_redis, clock, ("vector",))
    assert oldest(g, "vector") == 0.0
    assert g[("rilla_bridge_undelivered_events", ("vector",))] == 0
    assert g[("rilla_bridge_in_flight", ("vector",))] == 0
    assert g[("rilla_bridge_outcomes_total", ("delivered", "vector"))] == 2


def test_a_lapsed_lease_is_not_counted_in_flight(fake_redis: fakeredis.FakeRedis,
                                                 clock: FakeClock) -> None:
    lc = make_lifecycle(fake_redis, clock, Settings(), parse_tenants(TENANTS, env={}))
    lc.receive(source="callrail", tenant="acme", kind="post_call", body=b"{}", call_id=None)
    assert gauges(fake_redis, clock)[("rilla_bridge_in_flight", ("acme",))] == 1
    clock.advance(60 + 15 + 1)                              # its dispatch lease lapsed
    g = gauges(fake_redis, clock)
    assert g[("rilla_bridge_in_flight", ("acme",))] == 0
    assert g[("rilla_bridge_undelivered_events", ("acme",))] == 1   # still unfinished
    assert oldest(g, "acme") == 76.0
    assert oldest(g, "vector") == 0.0
    # An event only queued (its tenant paused) counts too.
    lc.redis.sadd(keys.PAUSED, "vector")
    lc.receive(source="callrail", tenant="vector", kind="post_call", body=b"{}", call_id=None)
    clock.advance(3)
    g = gauges(fake_redis, clock, ("vector",))
    assert oldest(g, "vector") == 3.0
    assert g[("rilla_bridge_waiting_events", ("vector", "live"))] == 1
    assert g[("rilla_bridge_in_flight", ("vector",))] == 0
    assert g[("rilla_bridge_tenant_paused", ("vector",))] == 1


def test_metrics_tell_when_each_tenant_last_received_a_webhook(
        client: FlaskClient, fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    """The series the "tenant silent" alert reads: the time of each tenant's last webhook per
    source, written by the intake script (a repeat counts, a bad signature does not)."""
    raw = json.dumps({"resource_id": "CAL7"}).encode()
    sig = callrail_signature("acme-signing-key-0001", raw)
    first = clock.now()
    assert client.post("/webhooks/callrail/acme", data=raw,
                       headers={"Signature": sig}).status_code == 202
    assert _last_webhook(client, "acme", "callrail") == first
    assert _last_webhook(client, "vector", "callrail") is None    # never heard from

    clock.advance(600)
    assert client.post("/webhooks/callrail/acme", data=raw + b" ",
                       headers={"Signature": "bad"}).status_code == 401
    assert _last_webhook(client, "acme", "callrail") == first      # unsigned: not counted
    assert client.post("/webhooks/callrail/acme", data=raw,
                       headers={"Signature": sig}).status_code == 200   # a repeat
    assert _last_webhook(client, "acme", "callrail") == first + 600
    # A tenant no longer in the tenants file is not reported.
    fake_redis.hset(keys.LAST_WEBHOOK, "gone|callrail", 5.0)
    assert not any('tenant="gone"' in line and "last_webhook" in line
                   for line in _lines(metrics(client)))


def _last_webhook(client: FlaskClient, tenant: str, source: str) -> float | None:
    prefix = (f'rilla_bridge_last_webhook_timestamp_seconds{{source="{source}",'
              f'tenant="{tenant}"}} ')
    for line in _lines(metrics(client)):
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return None


def test_reconciled_calls_do_not_count_as_webhooks(fake_redis: fakeredis.FakeRedis,
                                                   clock: FakeClock) -> None:
    tenants = parse_tenants(TENANTS, env={})
    lc = make_lifecycle(fake_redis, clock, Settings(), tenants)
    lc.receive(source="callrail", tenant="acme", kind="post_call", body=b'{"id": 1}',
               call_id="CAL1", lane="reconcile")
    assert fake_redis.hgetall(keys.LAST_WEBHOOK) == {}
    lc.receive(source="callrail", tenant="acme", kind="post_call", body=b'{"id": 2}',
               call_id="CAL2")
    assert fake_redis.hgetall(keys.LAST_WEBHOOK) == {b"acme|callrail": repr(clock.now()).encode()}


def test_metrics_show_each_callrail_accounts_budget(client: FlaskClient, clock: FakeClock,
                                                   fake_redis: fakeredis.FakeRedis) -> None:
    """The series the "CallRail budget nearly spent" alert reads: the guard's own count."""
    app = client.application
    guard = app.config["RB_QUOTA"]
    for i in range(3):
        guard.submit("227799611", "live", {"n": i})
    assert len(guard.take("227799611", max_jobs=3)) == 3
    lines = _lines(metrics(client))
    assert ('rilla_bridge_callrail_requests_used{account="227799611",window="hour"} 3.0'
            in lines)
    assert 'rilla_bridge_callrail_requests_used{account="227799611",window="day"} 3.0' in lines
    assert ('rilla_bridge_callrail_requests_limit{account="227799611",window="hour"} 1000.0'
            in lines)
    assert ('rilla_bridge_callrail_requests_limit{account="227799611",window="day"} 10000.0'
            in lines)
    clock.advance(3700)   # the hour rolls, the day does not
    lines = _lines(metrics(client))
    assert ('rilla_bridge_callrail_requests_used{account="227799611",window="hour"} 0.0'
            in lines)
    assert 'rilla_bridge_callrail_requests_used{account="227799611",window="day"} 3.0' in lines


def test_every_metric_the_alert_rules_read_is_exported(client: FlaskClient,
                                                       fake_redis: fakeredis.FakeRedis) -> None:
    """deploy/alerts.yml and /metrics cannot drift apart: a renamed metric fails here."""
    rules = (Path(__file__).resolve().parents[3] / "deploy" / "alerts.yml").read_text()
    wanted = set(re.findall(r"\b(rilla_bridge_[a-z_]+)", rules))
    assert len(wanted) >= 9
    raw = json.dumps({"resource_id": "CAL9"}).encode()
    client.post("/webhooks/callrail/acme", data=raw,
                headers={"Signature": callrail_signature("acme-signing-key-0001", raw)})
    fake_redis.hset(keys.STATS, mapping={"outcome|dead_lettered|acme": 1, "rilla|503|acme": 1})
    guard = client.application.config["RB_QUOTA"]
    guard.submit("227799611", "live", {"n": 1})
    guard.take("227799611")
    exported = {line.split("{")[0].split(" ")[0] for line in _lines(metrics(client))
                if line and not line.startswith("#")}
    assert wanted <= exported, sorted(wanted - exported)
