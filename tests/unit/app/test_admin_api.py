"""The admin JSON API (``app/admin_api.py``): every route refused without the token, described
in the OpenAPI document, and each query and action doing what it says through the one
service layer, audited, with no secret in any reply."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.engine import Engine

from app.admin_api import ROUTES
from rilla_bridge import keys
from rilla_bridge.clock import FakeClock
from rilla_bridge.jobs import JobRunner
from rilla_bridge.lifecycle import Outcome, Status
from tests.unit.app.console_support import AUTH, SECRETS, build, drain, ops_of, seed


@pytest.fixture
def app(fake_redis: fakeredis.FakeRedis, clock: FakeClock, history_db: Engine) -> Flask:
    return build(fake_redis, clock, history_db)


@pytest.fixture
def api(app: Flask) -> Iterator[FlaskClient]:
    with app.test_client() as c:
        yield c


def _path(route_path: str) -> str:
    return "/admin/api" + re.sub(r"\{\w+\}", "x", route_path)


def _no_secret(text: str) -> None:
    for s in SECRETS:
        assert s not in text, s


# -- refusals ---------------------------------------------------------------------------------
@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.path}")
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-000000000000"},
                                     {"Authorization": "Basic YWRtaW46eA=="}],
                         ids=["no token", "wrong token", "not bearer"])
def test_every_route_refuses_without_the_token(api: FlaskClient, route: Any,
                                               headers: dict[str, str]) -> None:
    resp = api.open(_path(route.path), method=route.method, headers=headers, json={})
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.path}")
def test_unset_admin_token_refuses_everything(fake_redis: fakeredis.FakeRedis, clock: FakeClock,
                                              history_db: Engine, route: Any) -> None:
    with build(fake_redis, clock, history_db, token="").test_client() as c:
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer x"}):
            resp = c.open(_path(route.path), method=route.method, headers=headers, json={})
            assert resp.status_code == 401
            assert "ADMIN_TOKEN is not set" in resp.get_json()["error"]


def test_openapi_describes_every_route(app: Flask, api: FlaskClient) -> None:
    doc = api.get("/admin/api/openapi.json", headers=AUTH).get_json()
    assert doc["openapi"].startswith("3.")
    described = {(m.upper(), "/admin/api" + p) for p, ops in doc["paths"].items() for m in ops}
    served = {(m, re.sub(r"<(\w+)>", r"{\1}", rule.rule))
              for rule in app.url_map.iter_rules() if rule.rule.startswith("/admin/api/")
              for m in rule.methods or () if m not in ("HEAD", "OPTIONS")}
    assert served == described
    for path, ops in doc["paths"].items():
        for op in ops.values():
            names = {p["name"] for p in op["parameters"] if p["in"] == "path"}
            assert names == set(re.findall(r"\{(\w+)\}", path))
            assert op["summary"] and "401" in op["responses"]


# -- queries ----------------------------------------------------------------------------------
def test_overview_counts_by_tenant_and_total(api: FlaskClient, history_db: Engine,
                                             clock: FakeClock) -> None:
    seed(history_db, clock)
    data = api.get("/admin/api/overview", headers=AUTH).get_json()
    by = {t["tenant"]: t for t in data["tenants"]}
    assert by["acme"]["24h"] == {"received": 2, "delivered": 1, "skipped": 0, "retrying": 0,
                                 "dead": 1, "pending": 0}
    assert by["beta"]["1h"]["dead"] == 1
    assert data["total"]["24h"]["received"] == 3
    assert sum(data["chart"]["series"]["acme"]["received"]) == 2
    assert data["callrail"][0]["account"] == "111111111"
    assert set(data["queues"]) == {"events", "callrail"}
    clock.advance(3 * 86400)
    later = api.get("/admin/api/overview", headers=AUTH).get_json()
    assert {t["tenant"]: t["silent"] for t in later["tenants"]}["acme"].startswith("nothing for")


def test_events_search_by_phone_in_any_format_and_by_name(api: FlaskClient,
                                                          history_db: Engine,
                                                          clock: FakeClock) -> None:
    seed(history_db, clock)
    for phone in ("(720) 555-0139", "+1 720 555 0139", "7205550139"):
        rows = api.get("/admin/api/events", query_string={"phone": phone},
                       headers=AUTH).get_json()["events"]
        assert {r["id"] for r in rows} == {"ev_ok1", "ev_dead1"}
    rows = api.get("/admin/api/events", query_string={"name": "ann"},
                   headers=AUTH).get_json()["events"]
    assert [r["id"] for r in rows] == ["ev_dead2"]
    page = api.get("/admin/api/events", query_string={"limit": 1}, headers=AUTH).get_json()
    assert len(page["events"]) == 1 and page["next"]
    second = api.get("/admin/api/events", query_string={"limit": 1, "before": page["next"]},
                     headers=AUTH).get_json()
    assert second["events"][0]["id"] != page["events"][0]["id"]
    assert api.get("/admin/api/events", query_string={"since": "yesterday"},
                   headers=AUTH).status_code == 400


def test_event_detail_masks_secrets(api: FlaskClient, history_db: Engine,
                                    clock: FakeClock) -> None:
    seed(history_db, clock)
    resp = api.get("/admin/api/events/ev_dead1", headers=AUTH)
    data = resp.get_json()
    assert data["event"]["status"] == "dead"
    assert "Jordan Pike" in data["raw"] and "access_key=[Filtered]" in data["raw"]
    assert "[Filtered]" in data["payload"]
    assert [e["id"] for e in data["same_call"]] == ["ev_ok1"]
    assert [e["what"] for e in data["timeline"]][-1] == "attempt"
    _no_secret(resp.get_data(as_text=True))
    assert api.get("/admin/api/events/ev_nope", headers=AUTH).status_code == 404


def test_dead_letter_groups_and_lists(api: FlaskClient, history_db: Engine,
                                      clock: FakeClock) -> None:
    seed(history_db, clock)
    groups = api.get("/admin/api/dead-letters/groups", headers=AUTH).get_json()["groups"]
    assert {(g["tenant"], g["reason_code"], g["status_code"], g["count"]) for g in groups} == {
        ("acme", "rilla_rejected", 422, 1), ("beta", "rilla_error", 500, 1)}
    rows = api.get("/admin/api/dead-letters", headers=AUTH, query_string={
        "group_tenant": "beta", "group_reason": "rilla_error", "group_status": "500"}
    ).get_json()["dead_letters"]
    assert [r["event_id"] for r in rows] == ["ev_dead2"]
    resp = api.get("/admin/api/dead-letters", headers=AUTH)
    assert len(resp.get_json()["dead_letters"]) == 2
    _no_secret(resp.get_data(as_text=True))


def test_export_is_json_lines_of_the_selection(api: FlaskClient, history_db: Engine,
                                               fake_redis: fakeredis.FakeRedis,
                                               clock: FakeClock) -> None:
    seed(history_db, clock)
    resp = api.post("/admin/api/dead-letters/export", headers=AUTH,
                    json={"selection": {"filter": {"tenant": "acme"}}})
    lines = [json.loads(line) for line in resp.get_data(as_text=True).splitlines()]
    assert [x["event_id"] for x in lines] == ["ev_dead1"]
    _no_secret(resp.get_data(as_text=True))
    assert api.post("/admin/api/dead-letters/export", headers=AUTH,
                    json={"selection": {"ids": "nope"}}).status_code == 400
    drain(fake_redis, history_db)
    audit = api.get("/admin/api/audit", headers=AUTH).get_json()["audit"]
    assert audit[0]["action"] == "dlq.export" and audit[0]["actor"] == "api:alice"
    assert audit[0]["count"] == 1 and audit[0]["selection"] == {"filter": {"tenant": "acme"}}


def test_an_export_holds_at_most_export_max_letters(api: FlaskClient, history_db: Engine,
                                                    clock: FakeClock,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The web process builds an export in memory: it is capped, by filter and by ids."""
    seed(history_db, clock)
    monkeypatch.setattr("rilla_bridge.operations.EXPORT_MAX", 1)
    selections: list[dict[str, Any]] = [{"filter": {}}, {"ids": ["ev_dead1", "ev_dead2"]}]
    for selection in selections:
        resp = api.post("/admin/api/dead-letters/export", headers=AUTH,
                        json={"selection": selection})
        assert resp.status_code == 200
        assert len(resp.get_data(as_text=True).splitlines()) == 1, selection


# -- actions ----------------------------------------------------------------------------------
def test_bulk_replay_plans_then_runs_in_the_runner_and_is_audited(
        app: Flask, api: FlaskClient, history_db: Engine, fake_redis: fakeredis.FakeRedis,
        clock: FakeClock) -> None:
    seed(history_db, clock)
    resp = api.post("/admin/api/jobs", headers=AUTH,
                    json={"action": "replay", "selection": {"group": {
                        "tenant": "acme", "reason_code": "rilla_rejected", "status_code": 422}}})
    assert resp.status_code == 201
    job = resp.get_json()
    assert job["status"] == "planned" and job["total"] == 1 and job["tenants"] == {"acme": 1}
    assert job["sample"][0]["event_id"] == "ev_dead1"
    runner = JobRunner(ops_of(app), history_db, clock)
    assert runner.run_once() is None                    # planned is not run
    assert not fake_redis.exists(keys.event("ev_dead1"))
    confirmed = api.post(f"/admin/api/jobs/{job['id']}/confirm", headers=AUTH).get_json()
    assert confirmed["status"] == "queued"
    assert api.post(f"/admin/api/jobs/{job['id']}/confirm", headers=AUTH).status_code == 409
    finished = runner.run_once()
    assert finished is not None
    assert (finished["status"], finished["done"], finished["processed"]) == ("done", 1, 1)
    assert fake_redis.hget(keys.event("ev_dead1"), "lane") == b"replay"
    assert not fake_redis.exists(keys.event("ev_dead2"))
    drain(fake_redis, history_db)
    shown = api.get(f"/admin/api/jobs/{job['id']}", headers=AUTH).get_json()
    assert shown["status"] == "done"
    actions = [(a["action"], a["actor"], a["count"])
               for a in api.get("/admin/api/audit", headers=AUTH).get_json()["audit"]]
    assert ("dlq.replay", "api:alice", 1) in actions
    assert ("job.plan_replay", "api:alice", 1) in actions
    assert ("job.confirm_replay", "api:alice", 1) in actions
    groups = api.get("/admin/api/dead-letters/groups", headers=AUTH).get_json()["groups"]
    assert [g["tenant"] for g in groups] == ["beta"]


def test_bulk_delete_and_cancel(app: Flask, api: FlaskClient, history_db: Engine,
                                fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    seed(history_db, clock)
    plan = api.post("/admin/api/jobs", headers=AUTH, json={
        "action": "delete", "selection": {"ids": ["ev_dead2", "ev_nope"]}}).get_json()
    assert plan["total"] == 1
    cancelled = api.post(f"/admin/api/jobs/{plan['id']}/cancel", headers=AUTH).get_json()
    assert cancelled["status"] == "cancelled"
    assert api.post(f"/admin/api/jobs/{plan['id']}/confirm", headers=AUTH).status_code == 409
    plan = api.post("/admin/api/jobs", headers=AUTH, json={
        "action": "delete", "selection": {"filter": {"tenant": "beta"}}}).get_json()
    api.post(f"/admin/api/jobs/{plan['id']}/confirm", headers=AUTH)
    done = JobRunner(ops_of(app), history_db, clock).run_once()
    assert done is not None and done["done"] == 1
    drain(fake_redis, history_db)
    left = api.get("/admin/api/dead-letters", headers=AUTH).get_json()["dead_letters"]
    assert [r["event_id"] for r in left] == ["ev_dead1"]
    newest = api.get("/admin/api/jobs", headers=AUTH).get_json()["jobs"][0]
    assert newest["id"] == plan["id"]
    bad: Any
    for bad in ({"action": "explode", "selection": {"ids": ["x"]}},
                {"action": "replay", "selection": {"group": {"tenant": "acme"}}},
                {"action": "replay"}, []):
        assert api.post("/admin/api/jobs", headers=AUTH, json=bad).status_code == 400


def test_redeliver_a_dead_event_runs_it_again(api: FlaskClient, history_db: Engine,
                                              fake_redis: fakeredis.FakeRedis,
                                              clock: FakeClock) -> None:
    seed(history_db, clock)
    resp = api.post("/admin/api/events/ev_dead1/redeliver", headers=AUTH).get_json()
    assert resp["result"] == "queued again from its raw event"
    assert fake_redis.exists(keys.event("ev_dead1"))
    again = api.post("/admin/api/events/ev_dead1/redeliver", headers=AUTH).get_json()
    assert again["result"].startswith("already queued")
    assert api.post("/admin/api/events/ev_nope/redeliver", headers=AUTH).status_code == 404


def test_retries_list_and_retry_now(app: Flask, api: FlaskClient, history_db: Engine,
                                    fake_redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    lc = ops_of(app).lifecycle
    stored = lc.receive(source="callrail", tenant="acme", kind="post_call", body=b"{}",
                        call_id="CAL9")
    claim = lc.claim(stored.event_id, "acme", "w1")
    assert claim.event is not None
    lc.retry(claim.event, 30, Status.RETRY_SCHEDULED, Outcome.RETRY, [], worker="w1")
    drain(fake_redis, history_db)
    rows = api.get("/admin/api/retries", headers=AUTH).get_json()["retries"]
    assert [(r["id"], r["tenant"], r["due_at"]) for r in rows] == [
        (stored.event_id, "acme", clock.now() + 30)]
    assert api.post(f"/admin/api/retries/{stored.event_id}/retry-now",
                    headers=AUTH).status_code == 200
    assert api.get("/admin/api/retries", headers=AUTH).get_json()["retries"] == []
    assert api.post(f"/admin/api/retries/{stored.event_id}/retry-now",
                    headers=AUTH).status_code == 409


def test_tenants_last_webhook_from_intakes_record_then_history(
        api: FlaskClient, history_db: Engine, fake_redis: fakeredis.FakeRedis,
        clock: FakeClock) -> None:
    """The tenants list reads when each source last sent from ``rb:last_webhook`` (what
    intake records, one HGETALL for every tenant), and from history only where Redis has
    no time for a configured source."""
    seed(history_db, clock)

    def last() -> dict[str, dict[str, float | None]]:
        return {t["tenant"]: t["last_webhook"]
                for t in api.get("/admin/api/tenants", headers=AUTH).get_json()["tenants"]}

    fake_redis.hset(keys.LAST_WEBHOOK, "acme|callrail", "1234.5")
    assert last()["acme"]["callrail"] == 1234.5           # intake's record, not a query
    fake_redis.delete(keys.LAST_WEBHOOK)
    from_history = last()["acme"]
    newest = max(r["received_at"] for r in api.get(
        "/admin/api/events?tenant=acme&source=callrail", headers=AUTH).get_json()["events"])
    assert from_history["callrail"] == newest               # Redis lost it: history's newest
    assert from_history["callingly"] is None                # configured, never sent


def test_tenants_urls_masked_reveal_pause_resume(api: FlaskClient, history_db: Engine,
                                                 fake_redis: fakeredis.FakeRedis,
                                                 clock: FakeClock) -> None:
    seed(history_db, clock)
    resp = api.get("/admin/api/tenants", headers={**AUTH, "X-Forwarded-Proto": "https"})
    _no_secret(resp.get_data(as_text=True))
    by = {t["tenant"]: t for t in resp.get_json()["tenants"]}
    assert by["acme"]["urls"]["callrail"] == "https://localhost/webhooks/callrail/acme"
    assert by["acme"]["urls"]["callingly"].startswith(
        "https://localhost/webhooks/callingly/acme?token=****01")
    assert by["acme"]["last_webhook"]["callrail"] is not None
    assert by["acme"]["success_rate_24h"] == 0.5
    shown = api.post("/admin/api/tenants/acme/callingly-url", headers=AUTH).get_json()
    assert shown["callingly_url"].endswith("?token=acme-callingly-token-01")
    assert api.post("/admin/api/tenants/beta/callingly-url", headers=AUTH).status_code == 404
    assert api.post("/admin/api/tenants/acme/pause", headers=AUTH).get_json()["paused"]
    assert fake_redis.sismember(keys.PAUSED, "acme")
    assert {t["tenant"]: t["paused"] for t in api.get(
        "/admin/api/tenants", headers=AUTH).get_json()["tenants"]}["acme"] is True
    api.post("/admin/api/tenants/acme/resume", headers=AUTH)
    assert not fake_redis.sismember(keys.PAUSED, "acme")
    assert api.post("/admin/api/tenants/nobody/pause", headers=AUTH).status_code == 404
    drain(fake_redis, history_db)
    audit = api.get("/admin/api/audit", headers=AUTH).get_json()["audit"]
    assert [a["action"] for a in audit][:3] == ["tenant.resume", "tenant.pause",
                                                "tenant.reveal_callingly_token"]
    assert all(a["actor"] == "api:alice" for a in audit)


def test_security_headers_on_api_replies(api: FlaskClient) -> None:
    resp = api.get("/admin/api/openapi.json", headers=AUTH)
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["Cache-Control"] == "no-store"


def test_replay_stops_between_events_when_cancelled(app: Flask, history_db: Engine,
                                                    fake_redis: fakeredis.FakeRedis,
                                                    clock: FakeClock) -> None:
    seed(history_db, clock)
    ops = ops_of(app)
    seen: list[int] = []
    out = ops.replay(["ev_nope", "ev_ok1", "ev_dead1", "ev_dead2"], "console:t",
                     progress=seen.append, cancelled=lambda: len(seen) >= 3)
    assert out.done == 1 and seen == [1, 2, 3]
    assert out.left == [("ev_nope", "no such event in history"),
                        ("ev_ok1", "not an open dead letter (replayed or deleted already?)"),
                        ("ev_dead2", "cancelled")]
    assert fake_redis.exists(keys.event("ev_dead1"))
    assert not fake_redis.exists(keys.event("ev_dead2"))
