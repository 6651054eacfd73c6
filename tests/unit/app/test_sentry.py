"""An unexpected error while answering a webhook reaches Sentry through the real app and
Sentry's Flask integration, with no secret, query string or raw body in it."""

from __future__ import annotations

import json
from typing import Any

import fakeredis
import pytest
import sentry_sdk

from app import create_app
from rilla_bridge.clock import FakeClock
from rilla_bridge.lifecycle import Lifecycle
from rilla_bridge.observability import FILTERED, init_sentry
from rilla_bridge.providers.callrail import signature as callrail_signature
from rilla_bridge.settings import Settings
from rilla_bridge.tenants import parse_tenants
from tests.fakes import CapturingTransport

SIGNING_KEY = "obs-signing-key-5f4dcc3b5aa7"
TOKEN = "obs-callingly-token-9a8b7c"
RILLA_KEY = "obs-rilla-key-31415926"
DSN = "https://public@127.0.0.1:9/1"
RAW_BODY_MARK = "RAW-BODY-CUSTOMER-Kaylah-Mills"

TENANTS = f"""
[tenants.obs]
rilla_api_key = "{RILLA_KEY}"
[tenants.obs.callrail]
signing_key = "{SIGNING_KEY}"
[tenants.obs.callingly]
webhook_token = "{TOKEN}"
"""


def test_flask_request_error_reaches_sentry_scrubbed(sentry_transport: CapturingTransport,
                                                     fake_redis: fakeredis.FakeRedis,
                                                     clock: FakeClock,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected error inside intake: the real app, the real Flask integration."""
    app = create_app(settings=Settings(sentry_dsn=DSN, environment="test"),
                     tenants=parse_tenants(TENANTS, env={}), redis_client=fake_redis,
                     clock=clock)
    # create_app called init_sentry with the default transport; re-init with ours
    init_sentry(DSN, environment="test", component="web", transport=sentry_transport)

    def broken_receive(self: Lifecycle, **kw: Any) -> None:
        body = kw["body"]  # noqa: F841 - a local holding the raw body
        raise ValueError(f"unexpected, key {SIGNING_KEY}, token {TOKEN}")

    monkeypatch.setattr(Lifecycle, "receive", broken_receive)
    raw = json.dumps({"customer_name": RAW_BODY_MARK}).encode()
    signature = callrail_signature(SIGNING_KEY, raw)
    with app.test_client() as client:
        resp = client.post("/webhooks/callrail/obs?event=post_call", data=raw,
                           headers={"Signature": signature, "Cookie": f"s={TOKEN}"})
        assert resp.status_code == 500
        assert RAW_BODY_MARK not in resp.get_data(as_text=True)
        resp = client.post(f"/webhooks/callingly/obs?token={TOKEN}",
                           data=json.dumps({"id": 1, "note": RAW_BODY_MARK}))
        assert resp.status_code == 500
    sentry_sdk.flush()
    events = sentry_transport.events
    assert events, "Sentry captured nothing"
    text = "\n".join(json.dumps(e, default=str) for e in events)
    for secret in (SIGNING_KEY, TOKEN, RILLA_KEY, RAW_BODY_MARK, signature):
        assert secret not in text, secret
    assert "unexpected" in text   # the error is there, only the secrets are gone
    requests = [e["request"] for e in events if "request" in e]
    assert len(requests) == 2  # the Flask integration attached each request, scrubbed
    assert requests[0]["headers"]["Signature"] == FILTERED
    assert all("?" not in r["url"] and "data" not in r for r in requests)
    assert all("query_string" not in r and "cookies" not in r for r in requests)
