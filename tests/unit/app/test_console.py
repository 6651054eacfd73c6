"""The console's pages (``app/console``) through Flask's test client: sign-in, session cookie,
CSRF, throttling, headers, and every page rendering real data without a secret."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.engine import Engine

from rilla_bridge import keys
from rilla_bridge.clock import FakeClock
from tests.unit.app.console_support import ADMIN, SECRETS, build, drain, seed

PAGES = ("/console/", "/console/events", "/console/events?phone=720-555-0139",
         "/console/events/ev_dead1", "/console/dead-letters", "/console/dead-letters/list",
         "/console/dead-letters/list?group_tenant=acme&group_reason=rilla_rejected"
         "&group_status=422", "/console/retries", "/console/tenants", "/console/audit")


@pytest.fixture
def app(fake_redis: fakeredis.FakeRedis, clock: FakeClock, history_db: Engine) -> Flask:
    return build(fake_redis, clock, history_db)


def csrf(page: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', page)
    assert m, "no CSRF field on the page"
    return m.group(1)


def sign_in(c: FlaskClient, token: str = ADMIN, name: str = "Dana",
            headers: dict[str, str] | None = None) -> object:
    token_field = csrf(c.get("/console/sign-in").get_data(as_text=True))
    return c.post("/console/sign-in", data={"csrf": token_field, "operator": name,
                                            "token": token}, headers=headers or {})


@pytest.fixture
def console(app: Flask, history_db: Engine, clock: FakeClock) -> Iterator[FlaskClient]:
    seed(history_db, clock)
    with app.test_client() as c:
        resp = sign_in(c)
        assert resp.status_code == 302   # type: ignore[attr-defined]
        yield c


def test_pages_need_a_session(app: Flask) -> None:
    with app.test_client() as c:
        resp = c.get("/console/tenants")
        assert resp.status_code == 302 and "/console/sign-in" in resp.headers["Location"]


def test_sign_in_sets_a_strict_http_only_cookie_secure_behind_https(app: Flask) -> None:
    with app.test_client() as c:
        resp = sign_in(c, headers={"X-Forwarded-Proto": "https"})
        cookie = resp.headers["Set-Cookie"]   # type: ignore[attr-defined]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" in cookie
        assert "Path=/console" in cookie
    with app.test_client() as c:
        assert "Secure" not in sign_in(c).headers["Set-Cookie"]   # type: ignore[attr-defined]


def test_wrong_token_refused_and_throttled_per_address(app: Flask,
                                                       fake_redis: fakeredis.FakeRedis) -> None:
    with app.test_client() as c:
        for _ in range(10):
            assert sign_in(c, token="wrong").status_code == 401   # type: ignore[attr-defined]
        assert c.get("/console/").status_code == 302
        resp = sign_in(c)   # the right token, but this address is over its failures
        assert resp.status_code == 429   # type: ignore[attr-defined]
        other = sign_in(c, headers={"X-Forwarded-For": "203.0.113.9"})
        assert other.status_code == 302   # type: ignore[attr-defined]
    assert int(fake_redis.get(keys.sign_in_failures("127.0.0.1")) or 0) == 10
    assert fake_redis.ttl(keys.sign_in_failures("127.0.0.1")) > 0


def test_forwarded_for_does_not_escape_the_throttle_unless_trusted(
        fake_redis: fakeredis.FakeRedis, clock: FakeClock, history_db: Engine) -> None:
    app = build(fake_redis, clock, history_db, trust_forwarded_for=False)
    with app.test_client() as c:
        for n in range(11):
            resp = sign_in(c, token="wrong", headers={"X-Forwarded-For": f"198.51.100.{n}"})
        assert resp.status_code == 429   # type: ignore[attr-defined]


def test_sign_in_needs_a_name_and_is_audited(app: Flask, fake_redis: fakeredis.FakeRedis,
                                             history_db: Engine) -> None:
    with app.test_client() as c:
        assert sign_in(c, name="  ").status_code == 400   # type: ignore[attr-defined]
        assert sign_in(c, name="Dana").status_code == 302   # type: ignore[attr-defined]
        drain(fake_redis, history_db)
        page = c.get("/console/audit").get_data(as_text=True)
        assert "console:Dana" in page and "console.sign_in" in page


def test_unset_token_turns_the_console_off(fake_redis: fakeredis.FakeRedis, clock: FakeClock,
                                           history_db: Engine) -> None:
    with build(fake_redis, clock, history_db, token="").test_client() as c:
        assert c.get("/console/sign-in").status_code == 403
        assert c.post("/console/sign-in", data={"operator": "x", "token": ""}
                      ).status_code == 403
        assert c.get("/console/").status_code == 403


def test_forms_without_the_csrf_token_are_refused(console: FlaskClient,
                                                  fake_redis: fakeredis.FakeRedis) -> None:
    for path in ("/console/tenants/acme/pause", "/console/events/ev_dead1/redeliver",
                 "/console/dead-letters/act", "/console/sign-out"):
        assert console.post(path, data={}).status_code == 403
        assert console.post(path, data={"csrf": "forged"}).status_code == 403
    assert not fake_redis.sismember(keys.PAUSED, "acme")
    with console.application.test_client() as fresh:   # no session: sign-in needs one too
        assert fresh.post("/console/sign-in", data={"operator": "x", "token": ADMIN}
                          ).status_code == 403


@pytest.mark.parametrize("path", PAGES)
def test_every_page_renders_without_secrets_and_with_strict_headers(console: FlaskClient,
                                                                   path: str) -> None:
    resp = console.get(path)
    assert resp.status_code == 200, resp.get_data(as_text=True)[:500]
    text = resp.get_data(as_text=True)
    for s in SECRETS:
        assert s not in text, s
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp and resp.headers["X-Frame-Options"] == "DENY"
    assert "<script src=\"/console/static/console.js\"" in text
    assert " style=" not in text and "<script>" not in text   # nothing inline for the CSP


def test_overview_draws_a_chart_per_tenant(console: FlaskClient) -> None:
    text = console.get("/console/").get_data(as_text=True)
    assert text.count('<svg class="chart"') == 2
    assert text.count("<path ") == 6   # received, delivered, failed per tenant


def test_event_search_and_timeline(console: FlaskClient) -> None:
    text = console.get("/console/events?phone=(720) 555-0139").get_data(as_text=True)
    assert "ev_dead1" in text and "ev_ok1" in text and "ev_dead2" not in text
    detail = console.get("/console/events/ev_dead1").get_data(as_text=True)
    assert "Jordan Pike" in detail and "access_key=[Filtered]" in detail
    assert "Redeliver now" in detail and "ev_ok1" in detail   # same call


def test_group_replay_plan_confirm_and_cancel_through_forms(
        console: FlaskClient, fake_redis: fakeredis.FakeRedis) -> None:
    page = console.get("/console/dead-letters").get_data(as_text=True)
    resp = console.post("/console/dead-letters/act", data={
        "csrf": csrf(page), "scope": "group", "group_tenant": "acme",
        "group_reason": "rilla_rejected", "group_status": "422", "action": "replay"})
    assert resp.status_code == 302
    plan = console.get(resp.headers["Location"]).get_data(as_text=True)
    assert "Confirm: replay 1 dead letter(s)" in plan and "ev_dead1" in plan
    job_path = resp.headers["Location"]
    confirm = re.search(r'action="([^"]+/confirm)"', plan)
    assert confirm
    console.post(confirm.group(1), data={"csrf": csrf(plan)})
    queued = console.get(job_path).get_data(as_text=True)
    assert "queued" in queued and 'data-refresh="2"' in queued
    cancel = re.search(r'action="([^"]+/cancel)"', queued)
    assert cancel
    console.post(cancel.group(1), data={"csrf": csrf(queued)})
    assert "cancelled" in console.get(job_path).get_data(as_text=True)
    assert not fake_redis.exists(keys.event("ev_dead1"))   # nothing ran in the request


def test_export_selected_downloads_json_lines(console: FlaskClient) -> None:
    page = console.get("/console/dead-letters/list").get_data(as_text=True)
    resp = console.post("/console/dead-letters/act", data={
        "csrf": csrf(page), "scope": "selected", "id": ["ev_dead2"], "action": "export"})
    assert resp.status_code == 200
    assert resp.mimetype == "application/x-ndjson"
    lines = resp.get_data(as_text=True).splitlines()
    assert len(lines) == 1 and '"ev_dead2"' in lines[0]


def test_pause_resume_and_reveal_on_the_tenants_page(console: FlaskClient,
                                                     fake_redis: fakeredis.FakeRedis) -> None:
    page = console.get("/console/tenants").get_data(as_text=True)
    token = csrf(page)
    assert "http://localhost/webhooks/callrail/acme" in page
    assert "http://localhost/webhooks/callingly/acme?token=[Filtered]" in page
    console.post("/console/tenants/acme/pause", data={"csrf": token})
    assert fake_redis.sismember(keys.PAUSED, "acme")
    assert "Resume delivery" in console.get("/console/tenants").get_data(as_text=True)
    console.post("/console/tenants/acme/resume", data={"csrf": token})
    assert not fake_redis.sismember(keys.PAUSED, "acme")
    shown = console.post("/console/tenants/acme/reveal", data={"csrf": token})
    assert "token=acme-callingly-token-01" in shown.get_data(as_text=True)
    assert "acme-callingly-token-01" not in console.get("/console/tenants").get_data(
        as_text=True)


def test_redeliver_form(console: FlaskClient, fake_redis: fakeredis.FakeRedis) -> None:
    page = console.get("/console/events/ev_dead2").get_data(as_text=True)
    resp = console.post("/console/events/ev_dead2/redeliver", data={"csrf": csrf(page)},
                        follow_redirects=True)
    assert "queued again from its raw event" in resp.get_data(as_text=True)
    assert fake_redis.exists(keys.event("ev_dead2"))


def test_static_files_are_vendored(console: FlaskClient) -> None:
    css = console.get("/console/static/console.css")
    js = console.get("/console/static/console.js")
    try:
        assert css.status_code == 200 and b"@media" in css.data
        assert js.status_code == 200 and b"data-refresh" in js.data
    finally:
        css.close()
        js.close()


def test_the_charts_are_drawn_once_per_cached_overview(console: FlaskClient,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from app.console import pages
    from app.console.chart import chart_svg

    drawn: list[str] = []
    real = chart_svg

    def counting(tenant: str, series: dict[str, list[int]], start: float) -> Any:
        drawn.append(tenant)
        return real(tenant, series, start)

    monkeypatch.setattr(pages, "chart_svg", counting)
    first = console.get("/console/").get_data(as_text=True)
    second = console.get("/console/").get_data(as_text=True)
    assert drawn == ["acme", "beta"]   # the first page drew them, the second reused them
    assert first.count("<path ") == second.count("<path ") == 6
